"""Sampling: the domain types of a sampling request and its result, and one-call ``generate``.

The engine that runs requests lives in :mod:`trainer_server._decode` (a continuous batch over
many requests on one model, device side) and :mod:`trainer_server._sampling_scheduler` (the
asyncio front that batches concurrent requests on the same weights). This module holds what
they share and what callers build:

- :class:`SamplingSettings`: how to sample one prompt (count, length, temperature, top-k/top-p,
  stops, seed, top-k logprobs), validated on construction;
- :class:`SampleRequest`: a prompt, its settings and which prompt logprobs to return;
- :class:`SamplingModel`: what sampling needs to know about a model (module, device, eos ids,
  a text decoder for stop strings, limits for validation);
- :class:`Sample` and :class:`SampleResult`: what comes back.

Invariants (enforced by the engine, relied on by callers):

- The logprob reported for each token is the model's own (temperature 1, before top-k/top-p),
  so it equals what a forward pass over the same tokens on the same weights gives; temperature,
  top-k and top-p only change which token is drawn.
- Each request draws from its own ``torch.Generator`` seeded from the request, so the same seed,
  weights, device and request give the same samples whether the request ran alone or batched
  with others, and the global RNG is never touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trainer_server.core.errors import invalid_argument

__all__ = [
    "MAX_TOP_LOGPROBS",
    "Sample",
    "SampleRequest",
    "SampleResult",
    "SamplingModel",
    "SamplingSettings",
    "TopLogprobs",
    "generate",
    "text_decoder",
]

MAX_TOP_LOGPROBS = 20
"""Most alternatives a request may ask for per position (``top_logprobs``, ``prompt_top_logprobs``)."""

Decoder = Callable[[Sequence[int]], str]
"""Turns token ids into text; stop strings are matched on its output."""


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample one prompt, validated on construction.

    Attributes:
        num_samples: Completions drawn from the prompt (they share its prefill).
        max_tokens: Most tokens per completion; a completion that reaches it ends with "length".
        temperature: 0 is greedy (argmax); otherwise logits are divided by it before the draw.
        top_p: Nucleus mass in (0, 1]; 1 keeps every token.
        top_k: Keep the k most likely tokens (ties with the k-th kept); 0 keeps every token.
        stop: Token sequences that end a completion (the sequence is kept in the completion).
        seed: Seed of the request's generator; ``None`` draws a fresh one when the request starts.
        stop_strings: Texts that end a completion once its decoded text contains one; the
            completion keeps every token up to the one that completes the text.
        top_logprobs: For each sampled token also return the k most likely tokens and their
            logprobs (0: none).

    Raises:
        ServiceError: INVALID_ARGUMENT naming the parameter and its valid range.
    """

    num_samples: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[tuple[int, ...], ...] = ()
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise invalid_argument(f"num_samples must be at least 1, got {self.num_samples}")
        if self.max_tokens < 1:
            raise invalid_argument(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise invalid_argument(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise invalid_argument(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise invalid_argument(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if any(len(s) == 0 for s in self.stop):
            raise invalid_argument("stop contains an empty sequence")
        if any(len(s) == 0 for s in self.stop_strings):
            raise invalid_argument("stop_strings contains an empty string")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise invalid_argument(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")


@dataclass(frozen=True, eq=False)
class SampleRequest:
    """One prompt to sample from.

    Attributes:
        prompt: Token ids (a list or a 1-D integer tensor); kept as a 1-D int64 CPU tensor.
        settings: How to sample it.
        prompt_logprobs: Also return the logprob of every prompt token after the first.
        prompt_top_logprobs: Also return the k most likely tokens at every prompt position
            after the first (0: none).

    Raises:
        ServiceError: INVALID_ARGUMENT for an empty or malformed prompt or a bad k.
    """

    prompt: torch.Tensor | Sequence[int]
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    prompt_logprobs: bool = False
    prompt_top_logprobs: int = 0

    def __post_init__(self) -> None:
        prompt = torch.as_tensor(self.prompt)
        if prompt.dim() != 1 or prompt.numel() == 0:
            raise invalid_argument(f"prompt must be a non-empty list of token ids, got shape {list(prompt.shape)}")
        if prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
            raise invalid_argument(f"prompt must hold integer token ids, got {prompt.dtype}")
        object.__setattr__(self, "prompt", prompt.to(device="cpu", dtype=torch.int64))
        if not 0 <= self.prompt_top_logprobs <= MAX_TOP_LOGPROBS:
            raise invalid_argument(
                f"prompt_top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.prompt_top_logprobs}"
            )

    @property
    def tokens(self) -> torch.Tensor:
        """The prompt as a 1-D int64 CPU tensor."""
        assert isinstance(self.prompt, torch.Tensor)  # normalised in __post_init__
        return self.prompt


@dataclass(frozen=True, eq=False)
class TopLogprobs:
    """The most likely tokens at each position: ``token_ids[i, j]`` has logprob ``logprobs[i, j]``.

    Rows are positions, columns go from most to least likely. int64 and float32 CPU tensors.
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor


@dataclass(frozen=True)
class Sample:
    """One finished completion.

    Attributes:
        tokens: The sampled token ids (a stop sequence or the token completing a stop string included).
        logprobs: The model's logprob of each sampled token.
        finish_reason: "stop" (eos, a stop sequence or a stop string) or "length" (max_tokens).
        top_logprobs: The most likely tokens at each sampled position, when asked for.
    """

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    top_logprobs: TopLogprobs | None = None


@dataclass(frozen=True, eq=False)
class SampleResult:
    """The completions of one :class:`SampleRequest`, in sample-index order.

    Attributes:
        samples: One per requested sample.
        prompt_logprobs: float32, one per prompt token after the first, when asked for.
        prompt_top_logprobs: The most likely tokens at each prompt position after the first, when asked for.
    """

    samples: list[Sample]
    prompt_logprobs: torch.Tensor | None = None
    prompt_top_logprobs: TopLogprobs | None = None


@dataclass(frozen=True, eq=False)
class SamplingModel:
    """What sampling needs to know about a model.

    Attributes:
        module: A ``transformers`` causal LM (or a peft wrapper of one), in eval mode.
        device: Where its inputs go.
        eos_token_ids: Tokens that end a completion.
        decode: Token ids to text, for stop strings (``None``: requests with stop strings are refused).
        vocab_size: Embedding rows, to refuse out-of-range prompt ids before they reach a batch.
        max_length: Longest sequence the model takes, to refuse prompts that cannot fit.
    """

    module: Any
    device: torch.device
    eos_token_ids: frozenset[int] = frozenset()
    decode: Decoder | None = None
    vocab_size: int | None = None
    max_length: int | None = None

    def check(self, request: SampleRequest) -> None:
        """Refuse a request this model cannot run, before it joins a batch (where it would fail the others).

        Raises:
            ServiceError: INVALID_ARGUMENT naming what does not fit.
        """
        prompt = request.tokens
        if self.vocab_size is not None and not (int(prompt.min()) >= 0 and int(prompt.max()) < self.vocab_size):
            raise invalid_argument(f"prompt holds token ids outside the vocabulary [0, {self.vocab_size})")
        settings = request.settings
        if self.max_length is not None and len(prompt) + settings.max_tokens > self.max_length:
            raise invalid_argument(
                f"max_tokens {settings.max_tokens} is over the limit: a {len(prompt)}-token prompt leaves "
                f"{self.max_length - len(prompt)} of the model's maximum length {self.max_length}"
            )
        if settings.stop_strings and self.decode is None:
            raise invalid_argument("stop_strings need the model's tokenizer, and this model has none")


def text_decoder(tokenizer_files: Mapping[str, bytes]) -> Decoder | None:
    """A decoder (special tokens skipped) from a model's ``tokenizer.json``, or ``None`` without one."""
    data = tokenizer_files.get("tokenizer.json")
    if data is None:
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(data.decode())

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    return decode


def generate(
    model: Any,
    prompt: torch.Tensor,
    settings: SamplingSettings,
    eos: frozenset[int],
    device: torch.device,
    *,
    agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[list[Sample], torch.Tensor]:
    """Sample ``settings.num_samples`` completions of one prompt, in one call (a batch of one request).

    ``agree`` makes the ranks of a sharded model choose the same tokens (rank 0's): they
    then run the same number of forwards, whose collectives must match.

    Returns:
        The samples in index order, and the prompt's logprobs (one per prompt token
        after the first).
    """
    from trainer_server._decode import DecodeBatch  # _decode builds on this module's types

    batch = DecodeBatch(SamplingModel(module=model, device=device, eos_token_ids=eos), agree=agree)
    (result,) = batch.run([SampleRequest(prompt, settings, prompt_logprobs=True)])
    assert result.prompt_logprobs is not None
    return result.samples, result.prompt_logprobs
