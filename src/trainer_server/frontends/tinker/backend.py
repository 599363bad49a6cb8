"""The one interface the Tinker front end calls: domain work, no HTTP and no Tinker ids.

The front end (``trainer_server.frontends.tinker.app``) owns everything Tinker-specific: session,
model and request ids, ``seq_id`` ordering, the two-phase futures, encodings and
``tinker://`` paths. It calls the server's core only through :class:`TinkerBackend`, with
the domain types below; the server implements the protocol over the same core the gRPC
servicer uses, so both front ends share sessions, limits, keys and checkpoints.

Calling contract (what an implementation may rely on):
- Every method is called on the server's event loop. Methods that do device work are
  ``async`` and must not block the loop.
- Calls on one training model never overlap: the front end awaits each call before it
  starts the next one on that model, in ``seq_id`` order. Calls on different models and
  sampling calls may run concurrently.
- ``owner`` is the caller's owner id (``trainer_server.frontends.grpc_auth.owner_id`` of the API key,
  ``""`` with auth off). A model or checkpoint of another owner must look absent
  (:class:`NotFound`), never forbidden.
- Failures are raised as :class:`BackendError` subclasses; their message reaches the
  Tinker user verbatim, so it must be precise and hold no secrets. A refused call must
  change nothing.

Error tree::

    BackendError
    ├── InvalidInput       bad argument or data (HTTP 400, Tinker category "user")
    ├── NotFound           unknown or foreign model, checkpoint or base model (404)
    ├── Conflict           state conflict, e.g. a checkpoint name taken (409)
    ├── LimitExceeded      a server limit; names the limit (429)
    └── Unavailable        loading, shutting down, a lost rank (503)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

__all__ = [
    "AdamSettings",
    "BackendError",
    "BaseModelInfo",
    "CheckpointFile",
    "CheckpointInfo",
    "Conflict",
    "ForwardBackwardResult",
    "InvalidInput",
    "LimitExceeded",
    "LoraSpec",
    "LossSpec",
    "ModelHandle",
    "ModelInfo",
    "ModelSpec",
    "NotFound",
    "OptimResult",
    "SampleResult",
    "SampleSpec",
    "SampledSequence",
    "TinkerBackend",
    "TrainDatum",
    "Unavailable",
]

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


class BackendError(Exception):
    """A refused or failed backend call; the message is shown to the user as is."""


class InvalidInput(BackendError):
    """Bad argument or data."""


class NotFound(BackendError):
    """Unknown, closed, or another owner's model, checkpoint or base model."""


class Conflict(BackendError):
    """The call conflicts with current state (e.g. a checkpoint name that exists)."""


class LimitExceeded(BackendError):
    """A server limit was reached; the message names it."""


class Unavailable(BackendError):
    """The server cannot serve now (loading, shutting down, a lost rank)."""


@dataclass(frozen=True)
class BaseModelInfo:
    """A base model the server serves.

    Attributes:
        name: Its name, as clients pass it (``base_model``).
        max_context_length: Longest sequence a call may carry, in tokens.
        vocab_size: Number of token ids.
        arch: Model architecture name (e.g. ``LlamaForCausalLM``).
        tokenizer_id: What ``transformers.AutoTokenizer.from_pretrained`` loads this
            model's tokenizer from on the client (a hub id or a path the client can read).
    """

    name: str
    max_context_length: int
    vocab_size: int
    arch: str
    tokenizer_id: str


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter: rank and which parts of the model get adapters.

    Attributes:
        rank: Adapter rank (> 0).
        train_mlp: Adapters on the MLP projections.
        train_attn: Adapters on the attention projections.
        train_unembed: Adapter on the output embedding (``lm_head``).
    """

    rank: int
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True


@dataclass(frozen=True)
class ModelSpec:
    """What to train: a base model, LoRA or full fine-tune, and the init seed.

    Attributes:
        base_model: A name from :meth:`TinkerBackend.base_models`.
        lora: The adapter, or None for a full fine-tune.
        seed: Seed of the adapter init and of any randomness in training; None: server's choice.
    """

    base_model: str
    lora: LoraSpec | None
    seed: int | None = None


@dataclass(frozen=True)
class ModelHandle:
    """The backend's reference to one training model (opaque to the front end)."""

    key: str


@dataclass(frozen=True)
class ModelInfo:
    """What a training model is.

    Attributes:
        base_model: Its base model's name.
        lora: Its adapter, or None for a full fine-tune.
    """

    base_model: str
    lora: LoraSpec | None


@dataclass(frozen=True)
class TrainDatum:
    """One sequence of a training or forward call.

    Attributes:
        tokens: Model input token ids (1-D).
        inputs: Per-target inputs by Tinker name (``target_tokens`` int64 and
            ``weights``, ``advantages``, ``logprobs`` float32 ...), each 1-D with one
            entry per input token.
    """

    tokens: IntArray
    inputs: Mapping[str, npt.NDArray[np.generic]]


@dataclass(frozen=True)
class LossSpec:
    """A built-in loss and its configuration.

    Attributes:
        name: ``cross_entropy``, ``importance_sampling``, ``ppo``, ``cispo`` or ``dro``,
            with Tinker's definitions (token sums; see docs/TINKER.md).
        config: ``loss_fn_config`` (e.g. ``clip_low_threshold``).
    """

    name: str
    config: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ForwardBackwardResult:
    """Per-datum outputs and metrics of a forward or forward-backward call.

    Attributes:
        outputs: One mapping per datum: ``logprobs`` (target logprobs, float32, 1-D)
            and, for a loss, ``elementwise_loss`` (float32, 1-D).
        metrics: Reduction-suffixed names (``loss:sum`` ...): exactly one ``:`` each.
    """

    outputs: Sequence[Mapping[str, FloatArray]]
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class AdamSettings:
    """One AdamW step (``torch.optim.AdamW`` semantics; Tinker's defaults).

    Attributes:
        learning_rate: Step size.
        beta1: First-moment decay.
        beta2: Second-moment decay.
        eps: Denominator epsilon.
        weight_decay: Decoupled weight decay.
        grad_clip_norm: Clip the global gradient norm to this; 0 turns clipping off.
    """

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass(frozen=True)
class OptimResult:
    """The outcome of an optimizer step.

    Attributes:
        step: Number of steps applied so far.
        metrics: Reduction-suffixed metrics (``grad_norm:mean`` ...).
    """

    step: int
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class SampleSpec:
    """How to sample.

    Attributes:
        max_tokens: New tokens at most per sample.
        temperature: Softmax temperature (0: greedy).
        top_p: Nucleus threshold (1: off).
        top_k: Keep the k most likely tokens (-1: off).
        seed: Seed of the draw; None: server's choice.
        stop_strings: Stop when the decoded text ends with one of these.
        stop_tokens: Stop after one of these token ids.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    stop_tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class SampledSequence:
    """One sample.

    Attributes:
        tokens: New token ids.
        logprobs: The model's logprob of each new token (temperature 1, before
            top-k/top-p, equal to a forward pass over the same tokens).
        stop_reason: ``stop`` (EOS or a stop string/token) or ``length``.
    """

    tokens: IntArray
    logprobs: FloatArray
    stop_reason: Literal["stop", "length"]


@dataclass(frozen=True)
class SampleResult:
    """Samples, and prompt logprobs when asked.

    Attributes:
        sequences: One per requested sample.
        prompt_logprobs: Logprob of each prompt token given the ones before it; entry 0
            is NaN (no context). None when not asked.
        topk_prompt_ids: ``[len(prompt), k]`` most likely token ids at each prompt
            position (row 0 filled with 0), or None.
        topk_prompt_logprobs: Their logprobs (row 0 filled with -99999), or None.
    """

    sequences: Sequence[SampledSequence]
    prompt_logprobs: FloatArray | None = None
    topk_prompt_ids: IntArray | None = None
    topk_prompt_logprobs: FloatArray | None = None


@dataclass(frozen=True)
class CheckpointFile:
    """One file of a checkpoint, for download.

    Attributes:
        relpath: Path inside the checkpoint (``/``-separated, no ``..``).
        size_bytes: Its size.
        path: Where it lies on the server.
    """

    relpath: str
    size_bytes: int
    path: Path


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint.

    Attributes:
        name: Its name in the owner's store.
        kind: What the backend stored: ``state`` (weights + optimizer, resumable),
            ``adapter`` (a LoRA adapter alone, e.g. sampler weights) or ``external``
            (Hugging Face layout). Tinker's checkpoint type comes from the ``tinker://``
            name instead.
        created_unix_s: When it was committed.
        size_bytes: Total size of its files.
        base_model: The base model it was trained from.
        lora: Its adapter, or None for full weights.
    """

    name: str
    kind: Literal["state", "adapter", "external"]
    created_unix_s: float
    size_bytes: int
    base_model: str
    lora: LoraSpec | None


class TinkerBackend(Protocol):
    """Domain operations the Tinker front end needs from the server core."""

    def base_models(self) -> Sequence[BaseModelInfo]:
        """The base models served (possibly still loading)."""
        ...

    def ready(self) -> bool:
        """Whether the models are loaded and calls can run."""
        ...

    async def create_model(self, owner: str, spec: ModelSpec) -> ModelHandle:
        """Create a training model (a session of the core) for ``owner``.

        Raises:
            NotFound: Unknown base model.
            InvalidInput: Bad LoRA spec (rank, no target left).
            LimitExceeded: Session limits.
        """
        ...

    async def load_model(self, owner: str, checkpoint: str, *, with_optimizer: bool) -> ModelHandle:
        """Create a training model from a ``state`` checkpoint of ``owner``.

        Weights (and the adapter config) always; AdamW moments and step count only with
        ``with_optimizer`` (else a fresh optimizer), so that training on continues exactly
        like an uninterrupted run.

        Raises:
            NotFound: No such checkpoint for this owner.
            InvalidInput: The checkpoint is not a ``state`` checkpoint.
            LimitExceeded: Session limits.
        """
        ...

    def model_info(self, model: ModelHandle) -> ModelInfo:
        """Base model and adapter of a live model.

        Raises:
            NotFound: Closed or unknown.
        """
        ...

    async def forward_backward(
        self, model: ModelHandle, data: Sequence[TrainDatum], loss: LossSpec, *, backward: bool
    ) -> ForwardBackwardResult:
        """Run the loss over ``data``; with ``backward``, accumulate its gradients.

        Raises:
            InvalidInput: Unknown loss or config key, missing or mis-shaped inputs,
                token ids outside the vocabulary, a sequence over the context length.
            LimitExceeded: Tokens or datums per call.
        """
        ...

    async def optim_step(self, model: ModelHandle, adam: AdamSettings) -> OptimResult:
        """Apply one AdamW step with the accumulated gradients, then zero them.

        Raises:
            InvalidInput: A non-finite or negative setting.
        """
        ...

    async def save_state(self, model: ModelHandle, name: str) -> CheckpointInfo:
        """Save a resumable ``state`` checkpoint (weights, optimizer, step, RNG).

        Raises:
            Conflict: The name exists.
            InvalidInput: A bad name.
        """
        ...

    async def save_sampler_weights(self, model: ModelHandle, name: str | None) -> str:
        """Freeze the current weights for sampling; return the reference to sample from.

        With a name, a ``sampler`` checkpoint the owner can list, load for sampling
        later and delete; without, an ephemeral snapshot that lives while ``model`` does.

        Raises:
            Conflict: The name exists.
        """
        ...

    async def load_state(self, model: ModelHandle, checkpoint: str, *, with_optimizer: bool) -> None:
        """Replace the model's weights (and with ``with_optimizer``, its optimizer) from a checkpoint.

        Raises:
            NotFound: No such checkpoint for the model's owner.
            InvalidInput: Incompatible base model or adapter.
        """
        ...

    async def save_external(self, model: ModelHandle, name: str) -> CheckpointInfo:
        """Save the weights in Hugging Face layout (LoRA merged) as an ``external`` checkpoint.

        Raises:
            Conflict: The name exists.
        """
        ...

    async def close_model(self, model: ModelHandle) -> None:
        """Free a model; later calls on it raise :class:`NotFound`. Idempotent."""
        ...

    def keep_alive(self, model: ModelHandle) -> None:
        """Renew the model's lease (the client is alive)."""
        ...

    async def sample(
        self,
        owner: str,
        source: str,
        prompt: IntArray,
        num_samples: int,
        spec: SampleSpec,
        *,
        prompt_logprobs: bool,
        topk_prompt_logprobs: int,
    ) -> SampleResult:
        """Sample from a base model (its name) or saved sampler weights (a reference).

        ``source`` is a base model name, or a reference returned by
        :meth:`save_sampler_weights` or the name of a ``sampler`` or ``state`` checkpoint.
        Seeded calls are reproducible, whatever else runs at the same time.

        Raises:
            NotFound: Unknown source for this owner.
            InvalidInput: Bad tokens or settings.
            LimitExceeded: Tokens or samples per call.
        """
        ...

    def list_checkpoints(self, owner: str) -> Sequence[CheckpointInfo]:
        """The owner's committed checkpoints."""
        ...

    def checkpoint(self, owner: str, name: str) -> CheckpointInfo:
        """One checkpoint of the owner.

        Raises:
            NotFound: No such checkpoint for this owner.
        """
        ...

    async def delete_checkpoint(self, owner: str, name: str) -> None:
        """Delete a checkpoint of the owner.

        Raises:
            NotFound: No such checkpoint for this owner.
        """
        ...

    def checkpoint_files(self, owner: str, name: str) -> Sequence[CheckpointFile]:
        """The files of a committed checkpoint, for download by its owner.

        Raises:
            NotFound: No such checkpoint for this owner.
        """
        ...
