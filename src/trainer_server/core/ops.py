"""Training operations that every rank runs in the same order, and the worker loop.

Rank 0 turns each model-changing request into an :class:`Op` and hands it to
:meth:`Engine.run` on its device thread: the op is broadcast to the other ranks (which
wait in :func:`serve_worker`), and then every rank executes it. A rank works on its shard
of the batch (contiguous datums, balanced by tokens); per-rank results are gathered to
rank 0; an optimizer step first sums the ranks' gradients. The ranks' model replicas start
identical and receive identical updates, so rank 0's copy is the model: checkpoints and
sampling read it alone (the other ranks skip those ops).

Under FSDP each rank holds a shard of every session model instead, so every rank takes part
in everything that touches the model: a rank whose shard of the batch is empty still runs a
forward and backward (on one datum, with a zero gradient) for the collectives inside them;
gradients arrive already summed (reduce-scatter); checkpoints gather whole tensors on every
rank and rank 0 writes them; sampling runs on every rank with rank 0's token choices.

With one process the same code runs with no communication, so there is one code path.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer_server import _export
from trainer_server._batch import Batch, shard_bounds
from trainer_server._cluster import Cluster, ClusterFailure
from trainer_server._engine import AdamSettings, SessionModel
from trainer_server._models import BaseModel, load_base_model
from trainer_server._sampling import Sample as SampleOut
from trainer_server._sampling import SamplingSettings, generate
from trainer_server.core.errors import ErrorCode, ServiceError, failed_precondition, invalid_argument
from trainer_server.core.types import LoraSpec

__all__ = [
    "Backward",
    "CloseSession",
    "CreateSession",
    "Engine",
    "Forward",
    "Hello",
    "LoadState",
    "OptimStep",
    "Ping",
    "Release",
    "ResumeSession",
    "Sample",
    "SaveCheckpoint",
    "Shutdown",
    "serve_worker",
]

log = logging.getLogger("trainer_server.ops")


@dataclass(frozen=True)
class Op:
    """An operation every rank runs."""


@dataclass(frozen=True)
class Hello(Op):
    """Report each rank's device and pid (once, at start)."""


@dataclass(frozen=True)
class Ping(Op):
    """Nothing: keeps idle ranks' collectives alive and notices a lost rank."""


@dataclass(frozen=True)
class Shutdown(Op):
    """Workers leave their loop and the process group."""


@dataclass(frozen=True)
class CreateSession(Op):
    """Build a session's model on every rank (LoRA adapters are seeded identically)."""

    session_id: str
    base_model: str
    lora: LoraSpec | None
    seed: int


@dataclass(frozen=True)
class ResumeSession(Op):
    """Build a session on every rank from a STATE checkpoint directory (shared storage)."""

    session_id: str
    base_model: str
    directory: str
    with_optimizer: bool = True


@dataclass(frozen=True)
class LoadState(Op):
    """Load a STATE checkpoint's weights (and optimizer state) into a live session, on every rank."""

    session_id: str
    directory: str
    with_optimizer: bool


@dataclass(frozen=True)
class CloseSession(Op):
    """Drop a session everywhere."""

    session_id: str


@dataclass(frozen=True)
class Forward(Op):
    """Logprobs of the batch; with ``grad``, each rank keeps its graph under ``handle``."""

    session_id: str
    batch: Batch
    grad: bool
    handle: int = 0


@dataclass(frozen=True)
class Backward(Op):
    """Finish the backward of a held forward; each rank takes its slice of ``grad``."""

    session_id: str
    handle: int
    grad: torch.Tensor


@dataclass(frozen=True)
class Release(Op):
    """Drop a held forward graph without a backward (the call failed or was cancelled)."""

    handle: int


@dataclass(frozen=True)
class OptimStep(Op):
    """Sum gradients over the ranks, then AdamW on each (identical) replica."""

    session_id: str
    settings: AdamSettings


@dataclass(frozen=True)
class SaveCheckpoint(Op):
    """Take a checkpoint of a session (see :mod:`_export`); only rank 0 keeps anything.

    An ADAPTER is written into ``directory`` at once. BASE, DELTA and STATE contents are copied
    to an :class:`_export.Snapshot` that rank 0 keeps in :attr:`Engine.snapshots` under
    ``directory``, for the files to be written off the device thread. Sharded sessions gather
    whole tensors on every rank; otherwise the other ranks do nothing.
    """

    session_id: str
    kind: str  # base, delta, adapter or state
    dtype: torch.dtype  # export dtype (base, delta)
    directory: str
    base_model: str = ""  # state: recorded in state.json


@dataclass(frozen=True)
class Sample(Op):
    """Sample from a session's current weights: rank 0 alone, or every rank when sharded."""

    session_id: str
    prompt: torch.Tensor
    settings: SamplingSettings


@dataclass
class _Held:
    """One rank's part of a forward whose backward is still to come."""

    logprobs: torch.Tensor | None  # None when this rank's shard was empty
    start: int  # the shard's first target in the whole batch
    stop: int
    stand_in: bool = False
    """FSDP, empty shard: ``logprobs`` are of one datum computed only for the collectives."""
    saved_bytes: int = 0
    """Bytes of the activations the graph saved for its backward (parameters not counted)."""
    session_id: str = ""


def _describe(lora: LoraSpec | None) -> str:
    if lora is None:
        return "full fine-tune"
    return f"LoRA rank {lora.rank} ({', '.join(lora.target_modules) or 'all linear'})"


class _SavedBytes:
    """Counts the bytes of the tensors autograd saves for a backward (distinct storages, no parameters).

    What a held forward costs while it waits for its gradient; measured, not estimated, with
    ``torch.autograd.graph.saved_tensors_hooks`` (the tensors themselves are kept as they are).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._seen: set[int] = set()
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._params and ptr not in self._seen:
            self._seen.add(ptr)
            self.bytes += storage.nbytes()
        return tensor

    def __enter__(self) -> _SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class Engine:
    """The model work of one process: its base models, its session replicas, held graphs.

    Args:
        cluster: this process's place among the server's processes.
        models: the loaded base models, by name.
    """

    def __init__(self, cluster: Cluster, models: dict[str, BaseModel]) -> None:
        self.cluster = cluster
        self.models = models
        self.sessions: dict[str, SessionModel] = {}
        self.held: dict[int, _Held] = {}
        """Forward graphs waiting for their gradient, by handle."""
        self.snapshots: dict[str, _export.Snapshot] = {}
        """Rank 0: checkpoint contents taken by :class:`SaveCheckpoint`, by directory, until written."""
        self._handlers: dict[type[Op], Callable[[Any], Any]] = {
            Hello: self._hello,
            Ping: self._nothing,
            Shutdown: self._nothing,
            CreateSession: self._create_session,
            ResumeSession: self._resume_session,
            LoadState: self._load_state,
            CloseSession: self._close_session,
            Forward: self._forward,
            Backward: self._backward,
            Release: self._release,
            OptimStep: self._optim_step,
            SaveCheckpoint: self._save_checkpoint,
            Sample: self._sample,
        }
        """Each operation's handler: the one place that says what runs an op."""

    # ---- rank 0 ----------------------------------------------------------------------

    def run(self, op: Op) -> Any:
        """Hand ``op`` to every rank and run it here (rank 0, device thread only).

        Raises:
            ServiceError: the error rank 0 raised, else INTERNAL naming a worker's failure.
            ClusterFailure: a collective failed; the ranks are no longer in step.
        """
        self.cluster.broadcast(op)
        return self._execute(op)

    # ---- every rank -------------------------------------------------------------------

    def _execute(self, op: Op) -> Any:
        """Run ``op`` here, then gather every rank's outcome to rank 0 and combine it."""
        result: Any = None
        error: BaseException | None = None
        try:
            result = self._handlers[type(op)](op)
        except ClusterFailure:
            raise
        except Exception as exc:  # reported to rank 0 below; a worker must keep serving
            error = exc
        outcomes = self.cluster.gather((result, None if error is None else f"{type(error).__name__}: {error}"))
        if self.cluster.rank != 0:
            if error is not None and not isinstance(error, ServiceError):
                log.error("rank %d: %s failed: %s", self.cluster.rank, type(op).__name__, error)
            return None
        if error is not None:
            raise error
        for rank, (_, problem) in enumerate(outcomes):
            if problem is not None:
                raise ServiceError(ErrorCode.INTERNAL, f"rank {rank} failed in {type(op).__name__}: {problem}")
        if isinstance(op, Forward | Hello):
            return [r for r, _ in outcomes]
        return result

    def _session(self, session_id: str) -> SessionModel:
        return self.sessions[session_id]

    def _hello(self, op: Hello) -> tuple[str, int]:
        return str(self.cluster.device), os.getpid()

    def _nothing(self, op: Op) -> None:
        return None

    def _new_session(self, base_model: str, lora: LoraSpec | None, seed: int) -> SessionModel:
        state = SessionModel(self.models[base_model], lora, seed, fsdp=self.cluster.fsdp, device=self.cluster.device)
        if state.sharded:
            local = sum(p.to_local().numel() for p in state.model.parameters())
            log.info(
                "rank %d holds %d of the session's %d parameters (FSDP shard)",
                self.cluster.rank,
                local,
                state.num_total,
            )
        return state

    def _create_session(self, op: CreateSession) -> tuple[int, int]:
        state = self._new_session(op.base_model, op.lora, op.seed)
        self.sessions[op.session_id] = state
        return state.num_trainable, state.num_total

    def _resume_session(self, op: ResumeSession) -> None:
        directory = Path(op.directory)
        info, lora = _export.read_state_info(directory)
        state = self._new_session(op.base_model, lora, int(info["seed"]))
        _export.load_state(state, directory, info, with_optimizer=op.with_optimizer)
        state.last_base = str(info.get("last_base", ""))
        self.sessions[op.session_id] = state

    def _load_state(self, op: LoadState) -> int:
        state = self._session(op.session_id)
        directory = Path(op.directory)
        info, lora = _export.read_state_info(directory)
        if lora != state.lora:
            raise invalid_argument(
                f"the checkpoint is of a {_describe(lora)} session, this session is {_describe(state.lora)}; "
                "load it into a session of the same kind (or create one from it)"
            )
        _export.load_state(state, directory, info, restore_rng=False, with_optimizer=op.with_optimizer)
        return state.step

    def _close_session(self, op: CloseSession) -> None:
        self.sessions.pop(op.session_id, None)

    def _forward(self, op: Forward) -> torch.Tensor:
        state = self._session(op.session_id)
        lengths = op.batch.lengths
        start, stop = shard_bounds(lengths, self.cluster.world_size)[self.cluster.rank]
        first, last = sum(lengths[:start]), sum(lengths[:stop])
        stand_in = stop == start and state.sharded  # FSDP: every rank must run the forward
        if stand_in:
            start, stop = 0, 1
        saved = _SavedBytes(state.model) if op.grad and not state.sharded else contextlib.nullcontext(None)
        with saved as counter:
            logprobs = state.logprobs(op.batch.select(start, stop), grad=op.grad) if stop > start else None
        if op.grad:
            self.held[op.handle] = _Held(
                logprobs, first, last, stand_in, counter.bytes if counter else 0, op.session_id
            )
        if logprobs is None or stand_in:
            return torch.zeros(0, dtype=torch.float32)
        return logprobs.detach().to("cpu") if self.cluster.distributed else logprobs.detach()

    def _backward(self, op: Backward) -> None:
        held = self.held.pop(op.handle)
        state = self._session(op.session_id)
        if held.logprobs is None or held.stand_in:
            grad = torch.zeros(0) if held.logprobs is None else torch.zeros_like(held.logprobs)
        else:
            grad = op.grad[held.start : held.stop]
        agree = self.cluster.all_reduce_sum_ if self.cluster.distributed and not state.sharded else None
        state.backward(held.logprobs, grad, agree)  # every rank adds, or every rank refuses

    def _release(self, op: Release) -> None:
        self.held.pop(op.handle, None)

    def _optim_step(self, op: OptimStep) -> tuple[int, float]:
        state = self._session(op.session_id)
        if self.cluster.distributed and not state.sharded:  # FSDP's backward already summed them
            state.sum_gradients(self.cluster.all_reduce_sum_)
        return state.optim_step(op.settings, self.cluster.all_reduce_sum_ if state.sharded else None)

    def _save_checkpoint(self, op: SaveCheckpoint) -> int | None:
        state = self._session(op.session_id)
        keep = self.cluster.rank == 0
        if op.kind == "state" and self.cluster.distributed and not state.sharded and state.has_gradients:
            # Replicated ranks each hold their own part of the gradients until the step sums them.
            raise failed_precondition(
                "a STATE checkpoint of a multi-process (replicated) session is taken between optimizer steps: "
                "gradients accumulated since the last optim_step are spread over the ranks; call optim_step first"
            )
        if not (keep or state.sharded):
            return None
        if op.kind == "adapter":
            _export.write_adapter(state, Path(op.directory) if keep else None)
        else:
            snapshot = _export.take_snapshot(
                state, op.kind, op.dtype, keep=keep, base_model=op.base_model, last_base=state.last_base
            )
            if snapshot is not None:
                self.snapshots[op.directory] = snapshot
        return state.step

    def _sample(self, op: Sample) -> tuple[list[SampleOut], torch.Tensor] | None:
        state = self._session(op.session_id)
        if self.cluster.rank != 0 and not state.sharded:
            return None
        eos = state.base.eos_token_ids
        agree = self.cluster.agree if state.sharded else None  # every rank follows rank 0's tokens
        out = generate(state.model, op.prompt, op.settings, eos, self.cluster.device, agree=agree)
        return out if self.cluster.rank == 0 else None  # the others' (equal) samples need not travel


def serve_worker(cluster: Cluster, model_paths: dict[str, Path], dtype: str) -> None:
    """A rank > 0: load the models, then run rank 0's operations until told to stop.

    Returns when rank 0 shuts down; raises :class:`ClusterFailure` when rank 0 is gone.
    """
    models = {name: load_base_model(name, path, cluster.model_device, dtype) for name, path in model_paths.items()}
    engine = Engine(cluster, models)
    log.info("rank %d of %d ready on %s (pid %d)", cluster.rank, cluster.world_size, cluster.device, os.getpid())
    while True:
        op = cluster.broadcast()
        if isinstance(op, Shutdown):
            engine._execute(op)
            log.info("rank %d: shutdown from rank 0", cluster.rank)
            return
        engine._execute(op)
