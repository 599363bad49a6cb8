"""The server's shared state: models, sessions, the device thread and the other ranks.

All model work runs on one dedicated thread (:meth:`Runtime.on_device`). That keeps torch
off the event loop (the loop keeps serving health checks, streams and other sessions) and
serialises device work, so session states are never touched by two threads at once.

Work that changes a session's model (create, forward, backward, optimizer step, resume,
close) goes through :meth:`Runtime.run_op` as an :mod:`~trainer_server._ops` operation,
which every rank of a multi-process server runs in the same order. Work that only reads
the model (checkpoint saves, sampling) is an op too, which only rank 0 runs unless the
session is sharded (FSDP), when every rank takes part.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import grpc
import torch

from trainer_proto import pb
from trainer_server import _export, _ops
from trainer_server._batch import Batch
from trainer_server._checkpoints import CheckpointStore, Manifest
from trainer_server._checkpoints import now as _now
from trainer_server._cluster import Cluster, ClusterFailure, pick_device
from trainer_server._config import ServerConfig
from trainer_server._engine import AdamSettings, SessionModel
from trainer_server._errors import ServiceError, echo, invalid_argument, not_found
from trainer_server._losses import LOSSES, LossResult
from trainer_server._models import BaseModel, load_base_model
from trainer_server._sampling import Sample as SampleOut
from trainer_server._sampling import SamplingSettings
from trainer_server._sessions import SequencedCall, Session, SessionRegistry, committing_call, new_session_id
from trainer_server.builtin_models import trainer_home

__all__ = ["CAPABILITIES", "Runtime", "server_version"]

log = logging.getLogger("trainer_server.runtime")

P = ParamSpec("P")
T = TypeVar("T")

CAPABILITIES = (
    "forward",
    "forward_backward",
    "forward_backward_custom",
    "optim_step",
    "lora",
    "full_fine_tune",
    "bfloat16_logprobs",
    "tokenizer",
    "checkpoints",
    "delta_checkpoints",
    "resume",
    "sample",
)
MAX_LORA_RANK = 1024


@functools.cache
def server_version() -> str:
    """The installed package version."""
    try:
        return version("trainer-service")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


LossFn = Callable[[torch.Tensor, Batch, dict[str, float]], LossResult]


class Runtime:
    """Models, sessions, the device executor and the ranks of one server.

    Args:
        config: the server's configuration.
        model_paths: the base models to load, by name.
        cluster: this process's place among the server's processes (rank 0 of a
            multi-process server); None for a single process.
    """

    def __init__(self, config: ServerConfig, model_paths: dict[str, Path], cluster: Cluster | None = None) -> None:
        self.config = config
        self.model_paths = model_paths
        self.cluster = cluster or Cluster(device=pick_device(config.device))
        self.device = self.cluster.device
        self.models: dict[str, BaseModel] = {}
        self.engine = _ops.Engine(self.cluster, self.models)
        self.devices: list[str] = [str(self.device)]
        """Every rank's device, in rank order."""
        self.broken = ""
        """Why the ranks can no longer train together ("" while they can)."""
        self.on_broken: Callable[[], Awaitable[None]] | None = None
        """Called once when the ranks break (the server sets health NOT_SERVING)."""
        self._handles = itertools.count(1)
        self._heartbeat: asyncio.Task[None] | None = None
        limits = config.limits
        self.sessions = SessionRegistry(
            limits.max_sessions,
            max_sessions_per_key=limits.max_sessions_per_key,
            max_inflight=limits.max_inflight_per_session,
        )
        self.ready = False
        self._server_info: pb.GetServerInfoResponse | None = None
        self._checkpoint_models: dict[tuple[str, float], tuple[Any, BaseModel]] = {}
        self.checkpoint_root = config.checkpoint_dir or trainer_home() / "checkpoints"
        self.checkpoints = CheckpointStore(self.checkpoint_root)
        """The anonymous owner's checkpoints (all of them when auth is off)."""
        self._stores: dict[str, CheckpointStore] = {"": self.checkpoints}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainer-device")

    async def on_device(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` on the device thread and wait for it.

        Inside a call's committed work (``SequencedCall.commit``), the call is told as soon
        as the work is queued, so the session's next calls can queue theirs behind it.
        """
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))
        call = committing_call()
        if call is not None:
            call.device_queued()
        return await future

    async def run_op(self, op: _ops.Op) -> Any:
        """Run an operation on every rank (on the device thread); see :meth:`_ops.Engine.run`.

        Raises:
            ServiceError: the operation's error; UNAVAILABLE once a rank is lost.
        """
        return await self._on_ranks(self.engine.run, op)

    async def _on_ranks(self, fn: Callable[..., T], *args: Any, loading_ok: bool = False) -> T:
        """Run ``fn`` (which runs ops) on the device thread; a failed collective breaks the server."""
        self._check_ready(loading_ok=loading_ok)
        try:
            return await self.on_device(fn, *args)
        except ClusterFailure as exc:
            await self._break(str(exc))
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, self.broken) from None

    async def _break(self, why: str) -> None:
        if self.broken:
            return
        self.broken = f"the server lost one of its {self.cluster.world_size} processes and must be restarted ({why})"
        log.error("%s", self.broken)
        if self.on_broken is not None:
            await self.on_broken()

    async def load_models(self) -> None:
        """Load every configured base model (on the device thread) and meet the other ranks."""
        for name, path in self.model_paths.items():
            self.models[name] = await self.on_device(
                load_base_model, name, path, self.cluster.model_device, self.config.dtype
            )
        hello = await self._on_ranks(self.engine.run, _ops.Hello(), loading_ok=True)
        self.devices = [device for device, _ in hello]
        if self.cluster.distributed:
            log.info(
                "%d ranks (%s): %s",
                self.cluster.world_size,
                self.cluster.mode,
                ", ".join(f"{d} pid {p}" for d, p in hello),
            )
            self._heartbeat = asyncio.create_task(self._beat(), name="trainer-heartbeat")
        self.ready = True

    async def _beat(self) -> None:
        """Ping the ranks while idle: keeps their collectives alive and notices a lost rank."""
        with contextlib.suppress(ServiceError):
            while not self.broken:
                await asyncio.sleep(self.config.heartbeat_s)
                await self.run_op(_ops.Ping())

    async def shutdown(self) -> None:
        """Stop the other ranks and the device thread after the work already queued."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if self.cluster.distributed and not self.broken:
            with contextlib.suppress(ServiceError):
                await self.run_op(_ops.Shutdown())
        self.ready = False
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        if not self.broken:
            self.cluster.close()

    def _check_ready(self, *, loading_ok: bool = False) -> None:
        if self.broken:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, self.broken)
        if not self.ready and not loading_ok:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the server is still loading its models; retry shortly")

    # ---- training operations (every rank) ------------------------------------------------

    async def forward(self, session: Session, batch: Batch) -> torch.Tensor:
        """Logprobs of the batch's targets on the session's current weights (float32, CPU)."""
        parts = await self.run_op(_ops.Forward(session.id, batch, grad=False))
        return _concat(parts)

    async def forward_held(self, session: Session, batch: Batch) -> tuple[int, torch.Tensor]:
        """A forward whose graph is kept for :meth:`backward`; returns its handle and logprobs.

        The caller must follow with :meth:`backward` or :meth:`release` for the handle.
        """
        handle = next(self._handles)
        try:
            parts = await self.run_op(_ops.Forward(session.id, batch, grad=True, handle=handle))
        except BaseException:  # failed, or cancelled while the forward may still be running
            self.release(handle)
            raise
        return handle, _concat(parts)

    async def backward(self, session: Session, handle: int, grad: torch.Tensor) -> None:
        """Finish the backward of a held forward with d_loss/d_logprobs."""
        await self.run_op(_ops.Backward(session.id, handle, grad))

    def release(self, handle: int) -> None:
        """Drop a held forward's graph on every rank, without waiting (safe in ``finally``).

        The device thread runs work in order, so the release happens before anything
        submitted after it.
        """
        if not self.broken:
            with contextlib.suppress(RuntimeError):  # the executor is shut down: nothing is held any more
                self._executor.submit(self._release, handle)

    def _release(self, handle: int) -> None:
        try:
            self.engine.run(_ops.Release(handle))
        except Exception as exc:  # nobody awaits a release; a lost rank is noticed by the next op
            log.warning("releasing forward %d failed: %s", handle, exc)

    async def forward_backward(
        self, session: Session, batch: Batch, loss_fn: LossFn, config: dict[str, float]
    ) -> tuple[torch.Tensor, float, dict[str, float]]:
        """A built-in loss: forward on every rank, the loss on rank 0, backward on every rank.

        The loss runs on the gathered logprobs, so its value and metrics are those of the
        whole batch whatever the number of ranks; its gradient w.r.t. the logprobs is sent
        back like a client's custom-loss gradient.

        Raises:
            ServiceError: INVALID_ARGUMENT when the loss is not finite (nothing is applied).
        """
        handle = next(self._handles)

        def run() -> tuple[torch.Tensor, float, dict[str, float]]:  # one device job: no loop round trips
            try:
                logprobs = _concat(self.engine.run(_ops.Forward(session.id, batch, grad=True, handle=handle)))
                leaf = logprobs.detach().requires_grad_(True)
                loss, metrics = loss_fn(leaf, batch, config)
                if not bool(torch.isfinite(loss)):
                    raise invalid_argument(f"{loss_fn.__name__} loss is {float(loss)}; nothing was applied")
                (grad,) = torch.autograd.grad(loss, leaf)
            except ClusterFailure:
                raise
            except BaseException:  # a bad loss value, a worker's error: drop the graph on every rank
                self.engine.run(_ops.Release(handle))
                raise
            self.engine.run(_ops.Backward(session.id, handle, grad))
            return logprobs, float(loss.detach()), metrics

        return await self._on_ranks(run)

    async def sample(
        self, session: Session, prompt: torch.Tensor, settings: SamplingSettings
    ) -> tuple[list[SampleOut], torch.Tensor]:
        """Sample from the session's current weights (rank 0's replica, or every rank's shard)."""
        samples, prompt_lp = await self.run_op(_ops.Sample(session.id, prompt, settings))
        return samples, prompt_lp

    async def optim_step(self, session: Session, settings: AdamSettings) -> tuple[int, float]:
        """Sum the ranks' gradients and apply AdamW; returns (step, gradient norm)."""
        step, norm = await self.run_op(_ops.OptimStep(session.id, settings))
        return int(step), float(norm)

    def model(self, name: str) -> BaseModel:
        """A served base model by name.

        Raises:
            ServiceError: UNAVAILABLE while loading, INVALID_ARGUMENT for an empty name,
                NOT_FOUND for an unknown one.
        """
        self._check_ready()
        if not name:
            raise invalid_argument("base_model is required")
        base = self.models.get(name)
        if base is None:
            raise not_found(f"unknown base model {echo(name)}; this server serves {sorted(self.models)}")
        return base

    def session(self, session_id: str, owner: str = "") -> Session:
        """An open session of ``owner`` by id (see :meth:`SessionRegistry.get`)."""
        self._check_ready()
        return self.sessions.get(session_id, owner)

    def checkpoint_store(self, owner: str) -> CheckpointStore:
        """The checkpoints of one owner: the root for "", else a hidden per-key directory.

        Checkpoint names never start with ".", so an owner directory can never collide
        with a checkpoint name, and the anonymous listing never shows it.
        """
        store = self._stores.get(owner)
        if store is None:
            store = self._stores[owner] = CheckpointStore(self.checkpoint_root / f".owner-{owner}")
        return store

    async def create_session(self, request: pb.CreateSessionRequest, owner: str = "") -> Session:
        """Validate a CreateSession request and build the session on the device thread."""
        if request.resume_from:
            return await self._resume_session(request, owner)
        base = self.model(request.base_model)
        mode = request.WhichOneof("mode")
        if mode is None:
            raise invalid_argument("mode is required: set 'lora' (with a rank) or 'full'")
        lora = request.lora if mode == "lora" else None
        if lora is not None:
            if not 0 < lora.rank <= MAX_LORA_RANK:
                raise invalid_argument(f"lora.rank must be in [1, {MAX_LORA_RANK}], got {lora.rank}")
            if lora.alpha < 0:
                raise invalid_argument(f"lora.alpha must be >= 0 (0 means alpha = rank), got {lora.alpha}")
        self.sessions.check_capacity(owner)
        session_id = new_session_id()
        op = _ops.CreateSession(session_id, base.name, None if lora is None else lora.SerializeToString(), request.seed)
        try:
            await self.run_op(op)
        except ValueError as exc:  # peft rejects target modules that do not exist
            raise invalid_argument(f"cannot build the session: {exc}") from None
        state = self.engine.sessions[session_id]
        session = self.sessions.add(session_id, base, state, owner)
        log.info(
            "session %s created on %r (%s, %d trainable parameters)",
            session.id,
            base.name,
            f"LoRA rank {lora.rank}" if lora else "full fine-tune",
            state.num_trainable,
        )
        return session

    async def _resume_session(self, request: pb.CreateSessionRequest, owner: str) -> Session:
        """Build a session from a STATE checkpoint; training continues exactly."""
        store = self.checkpoint_store(owner)
        manifest = store.manifest(request.resume_from)
        if manifest.kind != "state":
            raise invalid_argument(
                f"resume_from needs a STATE checkpoint; {manifest.name!r} is {manifest.kind.upper()}"
            )
        if request.base_model and request.base_model != manifest.base_model:
            raise invalid_argument(
                f"checkpoint {manifest.name!r} is of base model {manifest.base_model!r}, not {echo(request.base_model)}"
            )
        if request.WhichOneof("mode") is not None:
            raise invalid_argument("resume_from takes the mode from the checkpoint; do not set lora or full")
        base = self.model(manifest.base_model)
        self.sessions.check_capacity(owner)
        directory = store.path(manifest.name)
        await asyncio.to_thread(store.verify, manifest.name)
        session_id = new_session_id()
        await self.run_op(_ops.ResumeSession(session_id, base.name, str(directory.resolve())))
        session = self.sessions.add(session_id, base, self.engine.sessions[session_id], owner)
        log.info("session %s resumed from %r at step %d", session.id, manifest.name, session.state.step)
        return session

    def _check_save(self, session: Session, name: str, kind: int, dtype: int) -> tuple[str, torch.dtype]:
        """Validate a save before its turn; return the kind's name and the export dtype."""
        store = self.checkpoint_store(session.owner)
        store.path(name)  # validates the name
        if store.exists(name):
            raise ServiceError(grpc.StatusCode.ALREADY_EXISTS, f"checkpoint {name!r} already exists; delete it first")
        kinds: dict[int, str] = {
            pb.CHECKPOINT_KIND_BASE: "base",
            pb.CHECKPOINT_KIND_DELTA: "delta",
            pb.CHECKPOINT_KIND_ADAPTER: "adapter",
            pb.CHECKPOINT_KIND_STATE: "state",
        }
        if kind not in kinds:
            raise invalid_argument("kind is required: BASE, DELTA, ADAPTER or STATE")
        dtypes: dict[int, torch.dtype] = {
            pb.DATA_TYPE_UNSPECIFIED: torch.bfloat16,
            pb.DATA_TYPE_BFLOAT16: torch.bfloat16,
            pb.DATA_TYPE_FLOAT32: torch.float32,
        }
        if dtype not in dtypes:
            raise invalid_argument("dtype must be DATA_TYPE_BFLOAT16 (default) or DATA_TYPE_FLOAT32")
        if kind == pb.CHECKPOINT_KIND_ADAPTER and session.state.lora is None:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER checkpoints need a LoRA session; save a BASE instead"
            )
        return kinds[kind], dtypes[dtype]

    async def save_checkpoint(
        self,
        session: Session,
        call: SequencedCall,
        request: pb.SaveCheckpointRequest,
        respond: Callable[[Manifest], T],
    ) -> T:
        """Validate, wait for the call's turn, then write and commit the checkpoint.

        Once writing has begun it completes (see :meth:`SequencedCall.commit`), and the
        call's outcome, ``respond(manifest)``, is stored for a retry.
        """
        kind, dtype = self._check_save(session, request.name, request.kind, request.dtype)
        await call.wait_turn(self.config.sequence_gap_timeout_s)
        state = session.state
        store = self.checkpoint_store(session.owner)
        if kind == "delta":
            if not state.last_base or not store.exists(state.last_base):
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "a DELTA is taken against the session's last BASE checkpoint, and there is none: save a BASE first",
                )
            await asyncio.to_thread(store.verify, state.last_base)
            dtype = await asyncio.to_thread(_export.base_dtype, store.path(state.last_base))

        base_dir = store.path(state.last_base) if kind == "delta" else None

        async def apply() -> T:
            with store.writing(request.name) as tmp:
                # The device thread takes the state as of now (training waits meanwhile); the
                # files are written from that copy off it, while training goes on.
                op = _ops.SaveCheckpoint(session.id, kind, dtype, str(tmp), session.base.name)
                try:
                    step = await self.run_op(op)
                finally:
                    snapshot = self.engine.snapshots.pop(op.directory, None)
                extra: dict[str, Any] = {}
                if snapshot is not None:
                    extra = await asyncio.to_thread(_export.write_snapshot, snapshot, tmp, base_dir)
                base_checkpoint = state.last_base if kind == "delta" else ""
                # Hashing, fsync and the rename run off the device thread: other work goes on meanwhile.
                manifest = await asyncio.to_thread(
                    store.commit,
                    tmp,
                    lambda files: Manifest(
                        name=request.name,
                        kind=kind,
                        base_model=session.base.name,
                        session_id=session.id,
                        step=step,
                        seq=call.seq,
                        dtype=str(torch.float32 if kind in ("adapter", "state") else dtype).removeprefix("torch."),
                        created_at=_now(),
                        files=files,
                        base_checkpoint=base_checkpoint,
                        extra=extra,
                    ),
                )
            if kind == "base":
                state.last_base = request.name
            return respond(manifest)

        return await call.commit(apply(), record=True)

    async def checkpoint_model(self, name: str, owner: str = "") -> tuple[Any, BaseModel]:
        """A model with a BASE or STATE checkpoint's weights, for sampling (a few are cached).

        Returns:
            The model and the base model it belongs to.
        """
        store = self.checkpoint_store(owner)
        manifest = store.manifest(name)
        key = (f"{owner}/{manifest.name}", manifest.created_at)
        if key in self._checkpoint_models:
            return self._checkpoint_models[key]
        if manifest.kind not in ("base", "state"):
            raise invalid_argument(f"sampling needs a BASE or STATE checkpoint; {name!r} is {manifest.kind.upper()}")
        base = self.model(manifest.base_model)
        directory = store.path(manifest.name)
        await asyncio.to_thread(store.verify, manifest.name)
        if manifest.kind == "base":
            loaded = await self.on_device(load_base_model, name, directory, self.device, manifest.dtype)
            model = loaded.model
        elif manifest.kind == "state":
            info, lora = _export.read_state_info(directory)

            def build() -> Any:
                state = SessionModel(base, lora, int(info["seed"]), device=self.device)  # whole, on rank 0
                _export.load_state(state, directory, info, restore_rng=False)
                return state.model

            model = await self.on_device(build)
        self._checkpoint_models[key] = (model, base)
        while len(self._checkpoint_models) > 2:
            self._checkpoint_models.pop(next(iter(self._checkpoint_models)))
        return model, base

    async def close_session(self, session: Session) -> None:
        """Close a session and free its memory."""
        await self.sessions.close(session)
        await self.run_op(_ops.CloseSession(session.id))
        log.info("session %s closed after %d optimizer steps", session.id, session.state.step)
        if self.device.type == "cuda":
            await self.on_device(torch.cuda.empty_cache)

    def server_info(self) -> pb.GetServerInfoResponse:
        """What GetServerInfo reports."""
        if self._server_info is not None:
            return self._server_info
        limits = self.config.limits
        info = pb.GetServerInfoResponse(
            version=server_version(),
            models=[m.info() for m in self.models.values()],
            devices=self.devices,
            world_size=self.cluster.world_size,
            distributed_mode=self.cluster.mode,
            limits=pb.Limits(**dataclasses.asdict(limits)),
            capabilities=list(CAPABILITIES),
            loss_functions=sorted(LOSSES),
        )
        if self.ready:  # models and limits never change once loaded: build the reply once
            self._server_info = info
        return info


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """The ranks' logprobs in rank (and so datum) order."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)
