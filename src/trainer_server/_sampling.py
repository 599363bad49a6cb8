"""Sampling: KV-cached generation, batched over the samples of one prompt.

Runs on the device thread. The logprob reported for each sampled token is the model's own
(temperature 1, before top-k/top-p), so it equals what Forward returns for the same
tokens on the same weights; temperature, top-k and top-p only change which token is drawn.
Each request draws from its own ``torch.Generator`` seeded from the request, so the same
seed, weights and request give the same samples and never disturb the global RNG.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trainer_proto import pb
from trainer_server.core.errors import invalid_argument, resource_exhausted

__all__ = ["Sample", "SamplingSettings", "generate"]


@dataclass(frozen=True)
class SamplingSettings:
    """Validated sampling parameters."""

    num_samples: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[tuple[int, ...], ...]
    seed: int

    @classmethod
    def from_proto(
        cls, msg: pb.SamplingParams, *, num_samples: int, prompt_len: int, max_length: int, max_samples: int
    ) -> SamplingSettings:
        """Validate the request's parameters against the model and limits.

        Raises:
            ServiceError: INVALID_ARGUMENT naming the parameter and its valid range.
        """
        if num_samples < 1:
            raise invalid_argument(f"num_samples must be at least 1, got {num_samples}")
        if num_samples > max_samples:
            raise resource_exhausted(f"num_samples {num_samples} is over the limit max_samples_per_call={max_samples}")
        room = max_length - prompt_len
        if msg.max_tokens <= 0:
            raise invalid_argument(f"params.max_tokens must be at least 1, got {msg.max_tokens}")
        if msg.max_tokens > room:
            raise invalid_argument(
                f"params.max_tokens {msg.max_tokens} is over the limit: a {prompt_len}-token prompt leaves {room} "
                f"of the model's maximum length {max_length}"
            )
        temperature = msg.temperature if msg.HasField("temperature") else 1.0
        if not (math.isfinite(temperature) and temperature >= 0):
            raise invalid_argument(f"params.temperature must be >= 0 (0 is greedy), got {temperature}")
        top_p = msg.top_p if msg.HasField("top_p") else 1.0
        if not 0 < top_p <= 1:
            raise invalid_argument(f"params.top_p must be in (0, 1], got {top_p}")
        stop = tuple(tuple(int(t) for t in s.tokens) for s in msg.stop)
        if any(len(s) == 0 for s in stop):
            raise invalid_argument("params.stop contains an empty sequence")
        seed = msg.seed if msg.HasField("seed") else random.getrandbits(63)
        return cls(
            num_samples=num_samples,
            max_tokens=msg.max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=msg.top_k,
            stop=stop,
            seed=seed,
        )


@dataclass(frozen=True)
class Sample:
    """One finished sample."""

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str


def _filter(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) tokens outside the top-k and outside the top-p nucleus."""
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    return scores


def _stopped(tokens: Sequence[int], eos: frozenset[int], stop: tuple[tuple[int, ...], ...]) -> bool:
    if tokens[-1] in eos:
        return True
    return any(len(tokens) >= len(s) and tuple(tokens[-len(s) :]) == s for s in stop)


@torch.no_grad()
def generate(
    model: Any,
    prompt: torch.Tensor,
    settings: SamplingSettings,
    eos: frozenset[int],
    device: torch.device,
    *,
    agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[list[Sample], torch.Tensor]:
    """Sample ``settings.num_samples`` completions of ``prompt`` with a KV cache.

    ``agree`` makes the ranks of a sharded model choose the same tokens (rank 0's): they
    then run the same number of forwards, whose collectives must match.

    Returns:
        The samples in index order, and the prompt's logprobs (one per prompt token
        after the first).
    """
    n = settings.num_samples
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    ids = prompt.to(device).unsqueeze(0)
    out = model(input_ids=ids, use_cache=True)  # the prompt is prefilled once, whatever n is
    full = out.logits[0].float()
    prompt_lp = torch.log_softmax(full[:-1], dim=-1).gather(-1, ids[0, 1:, None])[:, 0].cpu()
    # transformers >= 5.2x names the KV cache `cache`; earlier releases `past_key_values`.
    cache_kw = "cache" if getattr(out, "cache", None) is not None else "past_key_values"
    past = getattr(out, cache_kw)
    if n > 1:
        if hasattr(past, "batch_repeat_interleave"):  # one cache row per sample
            past.batch_repeat_interleave(n)
        else:  # pragma: no cover - a cache without it: prefill every sample
            out = model(input_ids=ids.expand(n, -1).contiguous(), use_cache=True)
            past = getattr(out, cache_kw)
    logits = out.logits[:, -1].float().expand(n, -1)
    tokens: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n
    for step in range(settings.max_tokens):
        logp = torch.log_softmax(logits, dim=-1)
        if settings.temperature == 0:
            chosen = logits.argmax(dim=-1)
        else:
            # Shift the max to 0 first: over a tiny temperature the scores are then 0 or -inf, never
            # inf - inf = NaN; softmax ignores the shift, so the draw is unchanged.
            shifted = logits - logits.max(dim=-1, keepdim=True).values
            scores = _filter(shifted / settings.temperature, settings.top_k, settings.top_p)
            chosen = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)[:, 0]
        if agree is not None:
            chosen = agree(chosen)
        chosen_lp = logp.gather(-1, chosen[:, None])[:, 0].tolist()
        for i, (tok, lp) in enumerate(zip(chosen.tolist(), chosen_lp, strict=True)):
            if reasons[i] is None:
                tokens[i].append(int(tok))
                logprobs[i].append(float(lp))
                if _stopped(tokens[i], eos, settings.stop):
                    reasons[i] = "stop"
        if all(r is not None for r in reasons) or step == settings.max_tokens - 1:
            break
        out = model(input_ids=chosen[:, None], use_cache=True, **{cache_kw: past})
        past = getattr(out, cache_kw)
        logits = out.logits[:, -1].float()
    samples = [Sample(t, lp, r or "length") for t, lp, r in zip(tokens, logprobs, reasons, strict=True)]
    return samples, prompt_lp
