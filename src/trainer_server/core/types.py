"""Domain types the core takes and returns: what a call asks for and what it produced.

Front ends (the gRPC servicer, the Tinker HTTP front end) decode their own wire formats into
these types and encode the results back; nothing here knows about protobuf, HTTP or gRPC.
Tensors are CPU torch tensors; logprobs and gradients are flat float32 buffers over a batch
with per-datum lengths (the layout both wires stream).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from trainer_server._checkpoints import Manifest

__all__ = [
    "CHECKPOINT_KINDS",
    "CallRef",
    "CheckpointResult",
    "CustomResult",
    "ForwardBackwardResult",
    "ForwardResult",
    "LoraSpec",
    "ModelSummary",
    "OptimStepResult",
    "RawDatum",
    "ServerSummary",
    "SessionSpec",
]

CHECKPOINT_KINDS = ("base", "delta", "adapter", "state")
"""What a checkpoint can hold: full weights, a lossless diff from the last base, a LoRA adapter,
or everything needed to resume training."""


@dataclass(frozen=True)
class CallRef:
    """Which sequenced call of which session a front end is making.

    Attributes:
        owner: the caller's owner id ("" when auth is off); see ``frontends.grpc_auth.owner_id``.
        session_id: the session the call belongs to.
        seq: the client-assigned sequence number (1, 2, 3, ... per session).
        fingerprint: what tells a retry (the same bytes again) from a different call reusing
            ``seq``; each front end hashes its own request encoding.
    """

    owner: str
    session_id: str
    seq: int
    fingerprint: bytes = b""


@dataclass(frozen=True)
class RawDatum:
    """One datum as a front end decoded it, before validation against the model.

    Attributes:
        model_input: the token ids fed to the model (1-D integer tensor).
        loss_fn_inputs: per-token inputs by name (``target_tokens`` required; ``weights``,
            ``logprobs``, ``advantages`` ...), each 1-D with one value per input token.
    """

    model_input: torch.Tensor
    loss_fn_inputs: dict[str, torch.Tensor]


@dataclass(frozen=True)
class LoraSpec:
    """LoRA settings of a session.

    Attributes:
        rank: adapter rank (1..1024).
        alpha: scaling numerator; 0 means ``alpha = rank``.
        target_modules: module names to adapt; empty means every linear layer, the output
            layer included.
    """

    rank: int
    alpha: float = 0.0
    target_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class SessionSpec:
    """What a new session trains: a base model, LoRA or a full fine-tune, and a seed."""

    base_model: str
    lora: LoraSpec | None
    seed: int = 0


@dataclass(frozen=True)
class ForwardResult:
    """Logprobs of a batch's targets (flat float32, datum order) and their per-datum lengths."""

    seq: int
    logprobs: torch.Tensor
    lengths: list[int]

    @property
    def num_tokens(self) -> int:
        """Targets in the batch."""
        return sum(self.lengths)


@dataclass(frozen=True)
class ForwardBackwardResult(ForwardResult):
    """A built-in loss's value and metrics, besides the logprobs it was computed from.

    ``elementwise_loss`` holds each target's contribution to ``loss`` (flat, like logprobs).
    """

    loss: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    elementwise_loss: torch.Tensor | None = None


@dataclass(frozen=True)
class CustomResult:
    """A custom-loss call whose client gradient has been applied."""

    seq: int
    num_tokens: int


@dataclass(frozen=True)
class OptimStepResult:
    """An applied optimizer step: the session's step count after it and the gradient norm."""

    seq: int
    step: int
    grad_norm: float


@dataclass(frozen=True)
class CheckpointResult:
    """A committed checkpoint."""

    seq: int
    manifest: Manifest


@dataclass(frozen=True)
class ModelSummary:
    """A served base model, as GetServerInfo (and Tinker's capabilities) describe it."""

    name: str
    architecture: str
    vocab_size: int
    max_sequence_length: int
    dtype: str
    num_parameters: int


@dataclass(frozen=True)
class ServerSummary:
    """What the server serves and how."""

    version: str
    models: list[ModelSummary]
    devices: list[str]
    world_size: int
    distributed_mode: str
    capabilities: list[str]
    loss_functions: list[str]
