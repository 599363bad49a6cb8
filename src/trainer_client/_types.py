"""User-facing data types: datums, optimizer parameters and call results.

A :class:`Datum` follows the Tinker/Fireworks vocabulary: ``model_input`` holds the
input token ids and ``loss_fn_inputs`` holds per-token tensors of the same length:
``target_tokens`` (the next token at each position) and ``weights`` (0.0 for prompt
tokens, 1.0 for response tokens), plus whatever a loss needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from trainer_proto import pb, wire

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "CHECKPOINT_KINDS",
    "AdamParams",
    "CheckpointFile",
    "CheckpointInfo",
    "Datum",
    "ForwardBackwardOutput",
    "ForwardOutput",
    "LossFn",
    "ModelInfo",
    "OptimStepResult",
    "SampleOutput",
    "SampledSequence",
    "SamplingParams",
    "ServerInfo",
]


def _as_tensor(values: Sequence[int] | Sequence[float] | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = values if isinstance(values, torch.Tensor) else torch.tensor(list(values), dtype=dtype)
    if t.dim() != 1:
        raise ValueError(f"expected a 1-D sequence, got shape {tuple(t.shape)}")
    return t.to(dtype)


@dataclass(frozen=True)
class Datum:
    """One training sequence.

    Attributes:
        model_input: input token ids, 1-D int64.
        loss_fn_inputs: per-token tensors keyed by name, each as long as ``model_input``;
            ``target_tokens`` is required, ``weights`` defaults to all ones on the server.
    """

    model_input: torch.Tensor
    loss_fn_inputs: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_input", _as_tensor(self.model_input, torch.int64))

    @property
    def target_tokens(self) -> torch.Tensor:
        """The next-token targets, one per input position."""
        return self.loss_fn_inputs["target_tokens"]

    @property
    def weights(self) -> torch.Tensor:
        """Per-token weights (all ones when not given)."""
        w = self.loss_fn_inputs.get("weights")
        return torch.ones(len(self.model_input), dtype=torch.float32) if w is None else w

    def __len__(self) -> int:
        return len(self.model_input)

    @classmethod
    def from_tokens(
        cls,
        prompt: Sequence[int] | torch.Tensor,
        response: Sequence[int] | torch.Tensor,
        **extra: Sequence[float] | torch.Tensor,
    ) -> Datum:
        """Build a datum from prompt and response token ids.

        The full sequence ``prompt + response`` is shifted by one: inputs are all but the
        last token, targets all but the first, and a target's weight is 1.0 when it is a
        response token, 0.0 when it is a prompt token.

        Args:
            prompt: prompt token ids (at least one).
            response: response token ids (at least one).
            **extra: more per-token loss inputs, already aligned with the targets.

        Raises:
            ValueError: an empty prompt or response, or an extra input of the wrong length.
        """
        p = _as_tensor(prompt, torch.int64)
        r = _as_tensor(response, torch.int64)
        if len(p) == 0 or len(r) == 0:
            raise ValueError("prompt and response must each have at least one token")
        tokens = torch.cat([p, r])
        weights = torch.cat([torch.zeros(len(p) - 1), torch.ones(len(r))]).to(torch.float32)
        inputs: dict[str, torch.Tensor] = {"target_tokens": tokens[1:].clone(), "weights": weights}
        for name, values in extra.items():
            t = _as_tensor(values, torch.float32)
            if len(t) != len(tokens) - 1:
                raise ValueError(f"{name} has {len(t)} values, expected {len(tokens) - 1} (one per target)")
            inputs[name] = t
        return cls(model_input=tokens[:-1].clone(), loss_fn_inputs=inputs)

    @classmethod
    def from_sequence(cls, tokens: Sequence[int] | torch.Tensor) -> Datum:
        """A datum scoring every token after the first of ``tokens`` (all weights 1)."""
        t = _as_tensor(tokens, torch.int64)
        if len(t) < 2:
            raise ValueError("a sequence needs at least two tokens to score")
        return cls(model_input=t[:-1].clone(), loss_fn_inputs={"target_tokens": t[1:].clone()})

    @classmethod
    def from_text(cls, tokenizer: Tokenizer, prompt: str, response: str, *, add_eos: bool = True) -> Datum:
        """Tokenize a prompt and a response and build a datum (see :meth:`from_tokens`).

        Args:
            tokenizer: the session's tokenizer (``await training_client.get_tokenizer()``).
            prompt: prompt text.
            response: response text; the tokenizer's EOS token is appended when
                ``add_eos`` and the tokenizer has one.
            add_eos: append EOS to the response.
        """
        p = tokenizer.encode(prompt, add_special_tokens=False).ids
        r = list(tokenizer.encode(response, add_special_tokens=False).ids)
        if add_eos:
            eos = _eos_id(tokenizer)
            if eos is not None:
                r.append(eos)
        return cls.from_tokens(p, r)

    def to_proto(self) -> pb.Datum:
        """Encode for the wire."""
        msg = pb.Datum(model_input=wire.tensor_to_wire(self.model_input))
        for name, value in self.loss_fn_inputs.items():
            msg.loss_fn_inputs[name].CopyFrom(wire.tensor_to_wire(value))
        return msg


def _eos_id(tokenizer: Tokenizer) -> int | None:
    for token in ("<|eos|>", "</s>", "<|endoftext|>", "<eos>"):
        tid = tokenizer.token_to_id(token)
        if tid is not None:
            return int(tid)
    return None


LossFn = Callable[[list["Datum"], list[torch.Tensor]], tuple[torch.Tensor, Mapping[str, float]]]
"""``loss_fn(data: list[Datum], logprobs: list[Tensor]) -> (loss, metrics)``.

``logprobs[i]`` has one entry per target of ``data[i]`` and ``requires_grad=True``;
``loss`` is a scalar tensor; ``metrics`` maps names to floats.
"""


@dataclass(frozen=True)
class AdamParams:
    """AdamW hyperparameters (defaults match the Tinker SDK).

    The server refuses values out of range with INVALID_ARGUMENT and changes nothing; a
    step that would still make a weight or the optimizer state non-finite is undone and
    answered FAILED_PRECONDITION.

    Attributes:
        learning_rate: step size, in [0, 10].
        beta1: first-moment decay, in [0, 1).
        beta2: second-moment decay, in [0, 1).
        eps: denominator epsilon, in [1e-30, 1].
        weight_decay: decoupled weight decay, >= 0, with ``learning_rate * weight_decay <= 1``.
        grad_clip_norm: clip the global gradient L2 norm to this; 0 disables; >= 0.
    """

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def to_proto(self) -> pb.AdamParams:
        """Encode for the wire (every field explicit)."""
        return pb.AdamParams(
            learning_rate=self.learning_rate,
            beta1=self.beta1,
            beta2=self.beta2,
            eps=self.eps,
            weight_decay=self.weight_decay,
            grad_clip_norm=self.grad_clip_norm,
        )


@dataclass(frozen=True)
class ForwardOutput:
    """Result of a forward pass.

    Attributes:
        logprobs: per datum, the logprob of each target token.
        num_tokens: targets scored.
    """

    logprobs: list[torch.Tensor]
    num_tokens: int


@dataclass(frozen=True)
class ForwardBackwardOutput:
    """Result of a forward+backward pass; gradients are accumulated on the server.

    Attributes:
        loss: the loss value (for a custom loss, as the loss function computed it).
        metrics: loss metrics by name.
        logprobs: per-datum logprobs when they were returned, else empty.
        num_tokens: targets scored.
    """

    loss: float
    metrics: dict[str, float]
    logprobs: list[torch.Tensor]
    num_tokens: int


@dataclass(frozen=True)
class OptimStepResult:
    """Result of an optimizer step.

    Attributes:
        step: optimizer steps the session has taken, this one included.
        grad_norm: global L2 norm of the accumulated gradients before clipping.
    """

    step: int
    grad_norm: float


@dataclass(frozen=True)
class ModelInfo:
    """A base model the server serves."""

    name: str
    architecture: str
    vocab_size: int
    max_sequence_length: int
    dtype: str
    num_parameters: int


@dataclass(frozen=True)
class ServerInfo:
    """What the server reports about itself."""

    version: str
    models: list[ModelInfo]
    devices: list[str]
    world_size: int
    limits: dict[str, int]
    capabilities: list[str]
    loss_functions: list[str]
    distributed_mode: str = "single"
    """"single", or accelerate's distributed type ("MULTI_GPU", "MULTI_CPU") for ``world_size`` > 1."""

    @classmethod
    def from_proto(cls, msg: pb.GetServerInfoResponse) -> ServerInfo:
        """Decode the server's reply."""
        return cls(
            version=msg.version,
            models=[
                ModelInfo(
                    name=m.name,
                    architecture=m.architecture,
                    vocab_size=m.vocab_size,
                    max_sequence_length=m.max_sequence_length,
                    dtype=m.dtype,
                    num_parameters=m.num_parameters,
                )
                for m in msg.models
            ],
            devices=list(msg.devices),
            world_size=msg.world_size,
            limits={f.name: int(v) for f, v in msg.limits.ListFields()},
            capabilities=list(msg.capabilities),
            loss_functions=list(msg.loss_functions),
            distributed_mode=msg.distributed_mode or "single",
        )


CHECKPOINT_KINDS = ("base", "delta", "adapter", "state")
"""Checkpoint kinds: full weights, lossless delta from the last base, LoRA adapter, resumable state."""


@dataclass(frozen=True)
class CheckpointFile:
    """One file of a checkpoint."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint.

    Attributes:
        name: its name on the server.
        kind: one of :data:`CHECKPOINT_KINDS`.
        base_model: the base model it belongs to.
        session_id: the session that saved it.
        step: optimizer steps taken when it was saved.
        seq: the sequence number of the save call.
        dtype: export dtype of the weights.
        created_at: Unix time of the save.
        files: its files, with sizes and sha256.
        base_checkpoint: for a delta, the BASE it applies to.
    """

    name: str
    kind: str
    base_model: str
    session_id: str
    step: int
    seq: int
    dtype: str
    created_at: float
    files: list[CheckpointFile]
    base_checkpoint: str

    @property
    def total_bytes(self) -> int:
        """Bytes of all files."""
        return sum(f.size for f in self.files)

    @classmethod
    def from_proto(cls, msg: pb.CheckpointInfo) -> CheckpointInfo:
        """Decode the server's description."""
        return cls(
            name=msg.name,
            kind=pb.CheckpointKind.Name(msg.kind).removeprefix("CHECKPOINT_KIND_").lower(),
            base_model=msg.base_model,
            session_id=msg.session_id,
            step=msg.step,
            seq=msg.seq,
            dtype=msg.dtype,
            created_at=msg.created_at,
            files=[CheckpointFile(path=f.path, size=f.size, sha256=f.sha256) for f in msg.files],
            base_checkpoint=msg.base_checkpoint,
        )


@dataclass(frozen=True)
class SamplingParams:
    """How to sample.

    Attributes:
        max_tokens: new tokens per sample.
        temperature: softmax temperature; 0 is greedy. It changes which tokens are
            drawn, not the logprobs reported (those are the model's, at temperature 1,
            so they equal ``forward`` logprobs for the same tokens).
        top_p: nucleus mass in (0, 1]; 1 is off.
        top_k: keep the k most likely tokens; 0 is off.
        stop: token sequences that end a sample (included in its tokens); EOS always stops.
        seed: same seed, weights and request give the same samples; None is random.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: Sequence[Sequence[int]] = ()
    seed: int | None = None

    def to_proto(self) -> pb.SamplingParams:
        """Encode for the wire."""
        msg = pb.SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=[pb.TokenSequence(tokens=list(s)) for s in self.stop],
        )
        if self.seed is not None:
            msg.seed = self.seed
        return msg


@dataclass(frozen=True)
class SampledSequence:
    """One sample: new tokens, their logprobs, and why it ended ("stop" or "length")."""

    tokens: list[int]
    logprobs: torch.Tensor
    finish_reason: str


@dataclass(frozen=True)
class SampleOutput:
    """Samples of one prompt, in index order; prompt logprobs when asked for."""

    sequences: list[SampledSequence]
    prompt_logprobs: torch.Tensor | None
