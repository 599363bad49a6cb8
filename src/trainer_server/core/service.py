"""The transport-free core: models, sessions, ordering, device work, checkpoints, sampling.

:class:`TrainingCore` is what both front ends (the gRPC servicer and the Tinker HTTP front
end) call. It takes and returns domain types (:mod:`trainer_server.core.types`), raises
:class:`~trainer_server.core.errors.ServiceError`, and knows nothing of protobuf or HTTP.

Every call on a training session goes through one skeleton, :meth:`TrainingCore._sequenced`:
look the session up (owner-checked), hold the call's sequence number, answer a retry with the
stored result, else validate, wait for the call's turn and run the work so that it completes
and is recorded even if the caller goes away (``SequencedCall.commit``).

All model work runs on one dedicated thread (:meth:`TrainingCore.on_device`). That keeps torch
off the event loop (the loop keeps serving health checks, streams and other sessions) and
serialises device work, so session states are never touched by two threads at once.

Work that changes a session's model (create, forward, backward, optimizer step, resume,
close) goes through :meth:`TrainingCore.run_op` as an :mod:`~trainer_server.core.ops`
operation, which every rank of a multi-process server runs in the same order. Work that only
reads the model (checkpoint saves, sampling) is an op too, which only rank 0 runs unless the
session is sharded (FSDP), when every rank takes part.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch

from trainer_server import _export
from trainer_server._batch import Batch, parse_datums
from trainer_server._checkpoints import CheckpointStore, Manifest
from trainer_server._checkpoints import now as _now
from trainer_server._cluster import Cluster, ClusterFailure, pick_device
from trainer_server._config import ServerConfig
from trainer_server._engine import AdamSettings, SessionModel
from trainer_server._losses import LOSSES, LossResult
from trainer_server._losses import compute as compute_loss
from trainer_server._losses import validate as validate_loss
from trainer_server._models import BaseModel, load_base_model
from trainer_server._sampling import Sample as SampleOut
from trainer_server._sampling import (
    SampleRequest,
    SampleResult,
    SamplingModel,
    SamplingSettings,
    text_decoder,
)
from trainer_server._sampling_scheduler import SamplingScheduler
from trainer_server.builtin_models import trainer_home
from trainer_server.core import ops as _ops
from trainer_server.core.errors import (
    ErrorCode,
    ServiceError,
    echo,
    failed_precondition,
    invalid_argument,
    not_found,
    resource_exhausted,
)
from trainer_server.core.held import CustomReplay, HeldForward
from trainer_server.core.restarts import SessionRestarts
from trainer_server.core.sessions import SequencedCall, Session, SessionRegistry, committing_call, new_session_id
from trainer_server.core.types import (
    CHECKPOINT_KINDS,
    CallRef,
    CheckpointResult,
    ForwardBackwardResult,
    ForwardResult,
    OptimStepResult,
    RawDatum,
    ServerSummary,
    SessionSpec,
)

__all__ = ["CAPABILITIES", "TrainingCore", "server_version"]

log = logging.getLogger("trainer_server.core")

P = ParamSpec("P")
T = TypeVar("T")

Prepare = Callable[[BaseModel], Sequence[SampleRequest]]
"""Builds a sampling call's requests, validated against the base model of the weights sampled."""

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
MAX_CACHED_CHECKPOINT_MODELS = 4
"""Checkpoints kept loaded for sampling (least recently loaded dropped first)."""


@functools.cache
def server_version() -> str:
    """The installed package version."""
    try:
        return version("trainer-service")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


class TrainingCore:
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
        self._reaper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        limits = config.limits
        self.sessions = SessionRegistry(
            limits.max_sessions,
            max_sessions_per_key=limits.max_sessions_per_key,
            max_inflight=limits.max_inflight_per_session,
        )
        self.ready = False
        self._checkpoint_models: dict[tuple[str, float], tuple[Any, BaseModel]] = {}
        self._checkpoint_locks: dict[tuple[str, float], asyncio.Lock] = {}
        self.checkpoint_root = config.checkpoint_dir or trainer_home() / "checkpoints"
        self.checkpoints = CheckpointStore(self.checkpoint_root)
        """The anonymous owner's checkpoints (all of them when auth is off)."""
        self._stores: dict[str, CheckpointStore] = {"": self.checkpoints}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainer-device")
        self.restarts = SessionRestarts(self)
        """Saves open sessions at a graceful stop and restores them at the next start."""
        self.sampler = SamplingScheduler(self.on_device)
        """Batches concurrent sampling requests on the same weights into shared decode steps."""
        self._decoders: dict[str, Any] = {}

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
            raise ServiceError(ErrorCode.UNAVAILABLE, self.broken) from None

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
        self._reaper = asyncio.create_task(self._expire_idle_sessions(), name="trainer-session-leases")
        self.ready = True

    async def _beat(self) -> None:
        """Ping the ranks while idle: keeps their collectives alive and notices a lost rank."""
        with contextlib.suppress(ServiceError):
            while not self.broken:
                await asyncio.sleep(self.config.heartbeat_s)
                await self.run_op(_ops.Ping())

    async def shutdown(self) -> None:
        """Stop the other ranks and the device thread after the work already queued."""
        await self.sampler.aclose()
        for task in (self._heartbeat, self._reaper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.cluster.distributed and not self.broken:
            with contextlib.suppress(ServiceError):
                await self.run_op(_ops.Shutdown())
        self.ready = False
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        if not self.broken:
            self.cluster.close()

    def _check_ready(self, *, loading_ok: bool = False) -> None:
        if self.broken:
            raise ServiceError(ErrorCode.UNAVAILABLE, self.broken)
        if not self.ready and not loading_ok:
            raise ServiceError(ErrorCode.UNAVAILABLE, "the server is still loading its models; retry shortly")

    # ---- training operations (every rank) ------------------------------------------------

    async def _forward(self, session: Session, batch: Batch) -> torch.Tensor:
        """Logprobs of the batch's targets on the session's current weights (float32, CPU)."""
        parts = await self.run_op(_ops.Forward(session.id, batch, grad=False))
        return _concat(parts)

    async def _forward_held(self, session: Session, batch: Batch) -> tuple[int, torch.Tensor]:
        """A forward whose graph is kept for :meth:`_backward`; returns its handle and logprobs.

        The caller must follow with :meth:`_backward` or :meth:`release` for the handle.
        """
        handle = next(self._handles)
        try:
            parts = await self.run_op(_ops.Forward(session.id, batch, grad=True, handle=handle))
        except BaseException:  # failed, or cancelled while the forward may still be running
            self.release(handle)
            raise
        return handle, _concat(parts)

    async def _backward(self, session: Session, handle: int, grad: torch.Tensor) -> None:
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

    async def _forward_backward(
        self, session: Session, batch: Batch, loss_fn: str, config: dict[str, float]
    ) -> tuple[torch.Tensor, LossResult]:
        """A built-in loss: forward on every rank, the loss on rank 0, backward on every rank.

        The loss runs on the gathered logprobs, so its value and metrics are those of the
        whole batch whatever the number of ranks; its gradient w.r.t. the logprobs is sent
        back like a client's custom-loss gradient.

        Raises:
            ServiceError: INVALID_ARGUMENT when the loss is not finite (nothing is applied).
        """
        handle = next(self._handles)

        def run() -> tuple[torch.Tensor, LossResult]:  # one device job: no loop round trips
            try:
                logprobs = _concat(self.engine.run(_ops.Forward(session.id, batch, grad=True, handle=handle)))
                leaf = logprobs.detach().requires_grad_(True)
                result = compute_loss(loss_fn, leaf, batch, config)
                if not bool(torch.isfinite(result.loss)):
                    raise invalid_argument(f"{loss_fn} loss is {float(result.loss)}; nothing was applied")
                (grad,) = torch.autograd.grad(result.loss, leaf)
            except ClusterFailure:
                raise
            except BaseException:  # a bad loss value, a worker's error: drop the graph on every rank
                self.engine.run(_ops.Release(handle))
                raise
            self.engine.run(_ops.Backward(session.id, handle, grad))
            return logprobs, result

        return await self._on_ranks(run)

    async def _sample(
        self, session: Session, prompt: torch.Tensor, settings: SamplingSettings
    ) -> tuple[list[SampleOut], torch.Tensor]:
        """Sample from the session's current weights (rank 0's replica, or every rank's shard)."""
        samples, prompt_lp = await self.run_op(_ops.Sample(session.id, prompt, settings))
        return samples, prompt_lp

    async def _optim_step(self, session: Session, settings: AdamSettings) -> tuple[int, float]:
        """Sum the ranks' gradients and apply AdamW; returns (step, gradient norm).

        Samples submitted before the step finish on the old weights first.
        """
        await self.sampler.wait_idle(_session_key(session))
        step, norm = await self.run_op(_ops.OptimStep(session.id, settings))
        return int(step), float(norm)

    @property
    def held_graphs(self) -> dict[int, Any]:
        """Forward graphs kept alive for a gradient still to come, by handle (rank 0's view)."""
        return self.engine.held

    @property
    def held_graph_bytes(self) -> int:
        """Bytes of the tensors the held forward graphs saved for their backward (rank 0's view)."""
        return sum(h.saved_bytes for h in list(self.engine.held.values()))

    def _check_held_budget(self, handle: int) -> None:
        """Refuse a new held forward that takes the held graphs over ``max_held_graph_bytes``.

        Raises:
            ServiceError: RESOURCE_EXHAUSTED (the caller releases the graph; nothing is applied).
        """
        held = self.engine.held.get(handle)
        total, budget = self.held_graph_bytes, self.config.max_held_graph_bytes
        if held is not None and total > budget:
            raise resource_exhausted(
                f"this forward would hold {held.saved_bytes} bytes for its gradient, taking held graphs to {total} "
                f"bytes, over max_held_graph_bytes={budget}; send the gradients of earlier custom-loss calls first "
                "(or send a smaller batch); nothing was applied"
            )

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

    # ---- sessions ----------------------------------------------------------------------

    async def create_session(self, owner: str, spec: SessionSpec) -> Session:
        """Validate a session spec and build the session on the device thread (every rank).

        Raises:
            ServiceError: INVALID_ARGUMENT for a bad LoRA spec, NOT_FOUND for an unknown
                base model, RESOURCE_EXHAUSTED when no more sessions may be opened.
        """
        base = self.model(spec.base_model)
        lora = spec.lora
        if lora is not None:
            if not 0 < lora.rank <= MAX_LORA_RANK:
                raise invalid_argument(f"lora.rank must be in [1, {MAX_LORA_RANK}], got {lora.rank}")
            if lora.alpha < 0:
                raise invalid_argument(f"lora.alpha must be >= 0 (0 means alpha = rank), got {lora.alpha}")
        session = await self._admit(owner, base, lambda sid: _ops.CreateSession(sid, base.name, lora, spec.seed))
        log.info(
            "session %s created on %r (%s, %d trainable parameters)",
            session.id,
            base.name,
            f"LoRA rank {lora.rank}" if lora else "full fine-tune",
            session.state.num_trainable,
        )
        return session

    async def _admit(self, owner: str, base: BaseModel, op_for: Callable[[str], _ops.Op]) -> Session:
        """Build and register a session under a reserved slot; nothing is left behind on failure.

        The slot is reserved before anything is built, so concurrent creates never overshoot
        the limits. A build that fails frees whatever any rank built; a caller that goes away
        (deadline, disconnect) while its session is being built gets nothing, and the
        session, once built, is closed at once.
        """
        session_id = new_session_id()

        async def build() -> Session:
            with self.sessions.reserve(owner):
                try:
                    await self.run_op(op_for(session_id))
                except ValueError as exc:  # peft rejects target modules that do not exist
                    await self._discard_built(session_id)
                    raise invalid_argument(f"cannot build the session: {exc}") from None
                except ServiceError:
                    await self._discard_built(session_id)
                    raise
                session = self.sessions.add(session_id, base, self.engine.sessions[session_id], owner)
                self.restarts.journal(session, open_=True)
                return session

        task = asyncio.ensure_future(build())
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._close_orphan)
            raise

    def _close_orphan(self, task: asyncio.Future[Session]) -> None:
        """Close a session whose creator went away while it was built."""
        if task.cancelled() or task.exception() is not None:
            return
        session = task.result()
        log.warning("session %s: its creator went away while it was built; closing it", session.id)
        self._background(self.close(session))

    async def _discard_built(self, session_id: str) -> None:
        """Free what a failed build left on any rank (best effort; a lost rank is noticed elsewhere)."""
        if not self.broken:
            with contextlib.suppress(ServiceError):
                await self.run_op(_ops.CloseSession(session_id))

    def _background(self, work: Awaitable[Any]) -> None:
        """Run ``work`` on the loop, keeping a reference until it ends and logging its failure."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)

        def done(t: asyncio.Future[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("background work failed: %s", t.exception())

        task.add_done_callback(done)

    async def resume_session(
        self, owner: str, checkpoint: str, *, base_model: str = "", with_optimizer: bool = True
    ) -> Session:
        """Build a session from a STATE checkpoint; training continues exactly.

        Args:
            owner: the caller (the checkpoint must be theirs).
            checkpoint: the STATE checkpoint's name.
            base_model: when given, must be the checkpoint's base model.
            with_optimizer: also restore the AdamW state, pending gradients and step (resume);
                False loads the weights only, with a fresh optimizer.
        """
        store = self.checkpoint_store(owner)
        manifest = store.manifest(checkpoint)
        if manifest.kind != "state":
            raise invalid_argument(
                f"resume_from needs a STATE checkpoint; {manifest.name!r} is {manifest.kind.upper()}"
            )
        if base_model and base_model != manifest.base_model:
            raise invalid_argument(
                f"checkpoint {manifest.name!r} is of base model {manifest.base_model!r}, not {echo(base_model)}"
            )
        base = self.model(manifest.base_model)
        self.sessions.check_capacity(owner)
        directory = str(store.path(manifest.name).resolve())
        await asyncio.to_thread(store.verify, manifest.name)
        session = await self._admit(
            owner, base, lambda sid: _ops.ResumeSession(sid, base.name, directory, with_optimizer)
        )
        log.info("session %s resumed from %r at step %d", session.id, manifest.name, session.state.step)
        return session

    # ---- leases ------------------------------------------------------------------------

    def heartbeat(self, owner: str, session_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Renew the leases of ``owner``'s sessions; returns (open ids, ids not open)."""
        self._check_ready()
        alive, missing = [], []
        for session_id in session_ids:
            session = self.sessions.find(session_id, owner)
            if session is None:
                missing.append(session_id)
            else:
                session.touch()
                alive.append(session_id)
        return alive, missing

    def list_sessions(self, owner: str) -> list[Session]:
        """``owner``'s open sessions, oldest first."""
        self._check_ready()
        return self.sessions.all(owner)

    def attach(self, owner: str, session_id: str) -> Session:
        """Hand a live session to a new client; its next call carries ``session.next_free_seq``."""
        session = self.session(session_id, owner)
        session.touch()
        log.info("session %s attached by a new client (next seq %d)", session.id, session.next_free_seq)
        return session

    async def end_session(self, owner: str, session_id: str) -> None:
        """Close one of ``owner``'s sessions now, out of sequence; its waiting calls fail NOT_FOUND."""
        session = self.session(session_id, owner)
        log.info("session %s ended by its owner", session.id)
        await self.close(session)

    async def _expire_idle_sessions(self) -> None:
        """Close sessions whose lease ran out: no call in flight, no call or heartbeat for the TTL."""
        ttl = self.config.session_ttl_s
        while not self.broken:
            await asyncio.sleep(min(ttl / 4, 5.0))
            now = time.monotonic()
            for session in self.sessions.all():
                idle = now - session.last_active
                if session.calls_in_flight == 0 and idle > ttl and not session.closed:
                    log.warning(
                        "session %s expired: no call or heartbeat for %.0fs (session_ttl_s=%g); closing it and "
                        "freeing its memory",
                        session.id,
                        idle,
                        ttl,
                    )
                    with contextlib.suppress(ServiceError):
                        await self.close(session)

    async def close_session(self, call: CallRef) -> None:
        """Close a session after its earlier calls; its memory is freed."""
        session = self.session(call.session_id, call.owner)
        async with session.call(call.seq) as seq_call:
            await seq_call.wait_turn(self.config.sequence_gap_timeout_s)
            await seq_call.commit(self.close(session))

    # ---- sequenced training calls ---------------------------------------------------------

    async def _sequenced(
        self,
        call: CallRef,
        run: Callable[[Session, SequencedCall], Awaitable[T]],
        problem: ServiceError | None = None,
    ) -> T:
        """The one skeleton of a sequenced call: hold the number, replay a retry, else run.

        ``problem`` is a defect the front end found while reading the request: the call
        still uses up its number (so later calls are not held up), then fails with it.
        """
        session = self.session(call.session_id, call.owner)
        async with session.call(call.seq, call.fingerprint) as seq_call:
            if problem is not None:
                raise problem
            if seq_call.replay is not None:
                stored: T = seq_call.replay.result
                return stored
            return await run(session, seq_call)

    async def _parse(self, data: Sequence[RawDatum], session: Session) -> Batch:
        """Validate datums off the event loop (the work is proportional to the tokens)."""
        return await asyncio.to_thread(parse_datums, data, session.base, self.config.limits)

    async def forward(
        self, call: CallRef, data: Sequence[RawDatum], *, problem: ServiceError | None = None
    ) -> ForwardResult:
        """Logprobs of the targets on the session's weights as of this call; nothing is kept."""

        async def run(session: Session, seq_call: SequencedCall) -> ForwardResult:
            batch = await self._parse(data, session)
            await seq_call.wait_turn(self.config.sequence_gap_timeout_s, queued=True)

            async def apply() -> ForwardResult:
                logprobs = await self._forward(session, batch)
                return ForwardResult(seq_call.seq, logprobs, batch.lengths)

            return await seq_call.commit(apply(), record=True)

        return await self._sequenced(call, run, problem)

    async def forward_backward(
        self,
        call: CallRef,
        data: Sequence[RawDatum],
        loss_fn: str,
        loss_config: Mapping[str, float],
        *,
        problem: ServiceError | None = None,
    ) -> ForwardBackwardResult:
        """A built-in loss: forward, loss, backward; gradients accumulate."""

        async def run(session: Session, seq_call: SequencedCall) -> ForwardBackwardResult:
            if loss_fn not in LOSSES:
                raise invalid_argument(f"unknown loss_fn {echo(loss_fn)}; built-in losses: {sorted(LOSSES)}")
            batch = await self._parse(data, session)
            config = dict(loss_config)
            validate_loss(loss_fn, batch, config)  # refused before its turn, with no model work
            await seq_call.wait_turn(self.config.sequence_gap_timeout_s, queued=True)

            async def apply() -> ForwardBackwardResult:
                logprobs, loss = await self._forward_backward(session, batch, loss_fn, config)
                return ForwardBackwardResult(
                    seq_call.seq,
                    logprobs,
                    batch.lengths,
                    loss=float(loss.loss.detach()),
                    metrics=loss.metrics,
                    elementwise_loss=loss.elementwise,
                )

            return await seq_call.commit(apply(), record=True)

        return await self._sequenced(call, run, problem)

    @contextlib.asynccontextmanager
    async def forward_backward_custom(
        self, call: CallRef, data: Sequence[RawDatum], *, problem: ServiceError | None = None
    ) -> AsyncIterator[HeldForward]:
        """A forward whose graph is held for the caller's d_loss/d_logprobs.

        Inside the block the front end sends :attr:`HeldForward.logprobs` to its client,
        reads the gradient, and calls :meth:`HeldForward.finish`. A block left without
        finishing (the stream broke, bad gradient) applies nothing: the graph is released
        and the session's gradients are untouched. For a retry of a finished call the held
        forward replays the stored logprobs and result (nothing runs twice).
        """
        session = self.session(call.session_id, call.owner)
        async with session.call(call.seq, call.fingerprint) as seq_call:
            if problem is not None:
                raise problem
            if seq_call.replay is not None:
                stored: CustomReplay = seq_call.replay.result
                yield HeldForward(self, session, seq_call, stored.forward, replay=stored)
                return
            batch = await self._parse(data, session)
            # The forward may run while the previous call waits for its client's loss (overlap).
            await seq_call.wait_turn(self.config.sequence_gap_timeout_s, ahead=True)
            handle, logprobs = await self._forward_held(session, batch)
            held = HeldForward(self, session, seq_call, ForwardResult(seq_call.seq, logprobs, batch.lengths))
            held.handle = handle
            try:
                self._check_held_budget(handle)
                await seq_call.forward_done()
                yield held
            finally:
                if held.handle:
                    self.release(held.handle)  # drop the graph on every rank; nothing is applied

    async def optim_step(self, call: CallRef, adam_params: Mapping[str, float]) -> OptimStepResult:
        """AdamW on the accumulated gradients (``adam_params`` by wire name; unset ones default)."""

        async def run(session: Session, seq_call: SequencedCall) -> OptimStepResult:
            settings = AdamSettings(adam_params)
            await seq_call.wait_turn(self.config.sequence_gap_timeout_s, queued=True)

            async def apply() -> OptimStepResult:
                step, norm = await self._optim_step(session, settings)
                return OptimStepResult(seq_call.seq, step, norm)

            return await seq_call.commit(apply(), record=True)

        return await self._sequenced(call, run)

    async def save_checkpoint(self, call: CallRef, name: str, kind: str, dtype: str = "") -> CheckpointResult:
        """Write a checkpoint after the session's earlier calls (a barrier).

        Args:
            call: the sequenced call.
            name: the checkpoint's name (validated; no path escapes the root).
            kind: ``base``, ``delta``, ``adapter`` or ``state``.
            dtype: export dtype of BASE/DELTA weights, ``bfloat16`` (default) or ``float32``.
        """

        async def run(session: Session, seq_call: SequencedCall) -> CheckpointResult:
            return await self._save_checkpoint(session, seq_call, name, kind, dtype)

        return await self._sequenced(call, run)

    async def load_checkpoint(self, call: CallRef, checkpoint: str, *, with_optimizer: bool) -> int:
        """Load a STATE checkpoint into the live session, after its earlier calls (a barrier).

        The checkpoint must be of a session of the same kind (LoRA rank and targets, or full).
        Gradients accumulated and not yet applied are dropped; with ``with_optimizer`` the
        AdamW state and step come from the checkpoint, otherwise the optimizer starts afresh.

        Returns:
            The session's step afterwards.
        """

        async def run(session: Session, seq_call: SequencedCall) -> int:
            store = self.checkpoint_store(session.owner)
            manifest = store.manifest(checkpoint)
            if manifest.kind != "state":
                raise invalid_argument(
                    f"loading needs a STATE checkpoint; {manifest.name!r} is {manifest.kind.upper()}"
                )
            if manifest.base_model != session.base.name:
                raise invalid_argument(
                    f"checkpoint {manifest.name!r} is of base model {manifest.base_model!r}, this session of "
                    f"{session.base.name!r}"
                )
            await asyncio.to_thread(store.verify, manifest.name)
            directory = str(store.path(manifest.name).resolve())
            await seq_call.wait_turn(self.config.sequence_gap_timeout_s)

            async def apply() -> int:
                await self.sampler.wait_idle(_session_key(session))
                step: int = await self.run_op(_ops.LoadState(session.id, directory, with_optimizer))
                return step

            return await seq_call.commit(apply(), record=True)

        return await self._sequenced(call, run)

    # ---- sampling -----------------------------------------------------------------------

    def _sampling_model(self, module: Any, base: BaseModel) -> SamplingModel:
        """What the sampling engine needs to know about ``module`` (a model over ``base``)."""
        if base.name not in self._decoders:
            self._decoders[base.name] = text_decoder(base.tokenizer_files)
        return SamplingModel(
            module=module,
            device=self.device,
            eos_token_ids=base.eos_token_ids,
            decode=self._decoders[base.name],
            vocab_size=base.vocab_size,
            max_length=base.max_sequence_length,
        )

    def _check_sampling(self, requests: Sequence[SampleRequest]) -> None:
        """Refuse a sampling call over the limits (samples and prompt tokens per call)."""
        limits = self.config.limits
        if not requests:
            raise invalid_argument("no prompt to sample from; send at least one")
        if len(requests) > limits.max_datums_per_call:
            raise resource_exhausted(
                f"{len(requests)} prompts in one call is over the limit "
                f"max_datums_per_call={limits.max_datums_per_call}"
            )
        samples = sum(r.settings.num_samples for r in requests)
        if samples > limits.max_samples_per_call:
            raise resource_exhausted(
                f"{samples} samples in one call is over the limit max_samples_per_call={limits.max_samples_per_call}"
            )
        tokens = sum(len(r.tokens) for r in requests)
        if tokens > limits.max_tokens_per_call:
            raise resource_exhausted(
                f"{tokens} prompt tokens in one call is over the limit max_tokens_per_call={limits.max_tokens_per_call}"
            )

    async def sample(self, call: CallRef, prepare: Prepare) -> list[SampleResult]:
        """Sample from the session's weights as of this call's place in its order.

        Concurrent sampling calls of a session share decode steps with each other (the
        sampling scheduler batches them), and training calls that do not change weights run
        beside them; a weight change (optimizer step, load, close) waits until the samples
        submitted before it are done. ``prepare`` builds and validates the requests against the
        session's base model inside the call, so a refused request still uses up its number.
        """
        session = self.session(call.session_id, call.owner)
        async with session.call(call.seq) as seq_call:
            requests = prepare(session.base)
            self._check_sampling(requests)
            if session.state.sharded:  # every rank takes part: one request at a time, rank 0's tokens
                await seq_call.wait_turn(self.config.sequence_gap_timeout_s)
                return [await self._sample_sharded(session, r) for r in requests]
            await seq_call.wait_turn(self.config.sequence_gap_timeout_s, queued=True)
            model = self._sampling_model(session.state.model, session.base)
            pending = self.sampler.enqueue(_session_key(session), model, list(requests))
            seq_call.device_queued()  # later calls may queue theirs; weight changes fence on the key
            return await pending

    async def sample_checkpoint(self, owner: str, checkpoint: str, prepare: Prepare) -> list[SampleResult]:
        """Sample from a BASE, STATE or ADAPTER checkpoint's weights (not sequenced: nothing changes)."""
        store = self.checkpoint_store(owner)
        manifest = store.manifest(checkpoint)
        # Bad parameters are refused before the checkpoint is verified and loaded.
        requests = prepare(self.model(manifest.base_model))
        self._check_sampling(requests)
        module, base = await self.checkpoint_model(checkpoint, owner)
        key = ("checkpoint", owner, manifest.name, manifest.created_at)
        return await self.sampler.submit_many(key, self._sampling_model(module, base), list(requests))

    async def sample_base(self, base_model: str, prepare: Prepare) -> list[SampleResult]:
        """Sample from a served base model's own weights (shared by every caller)."""
        base = self.model(base_model)
        requests = prepare(base)
        self._check_sampling(requests)
        return await self.sampler.submit_many(
            ("base", base.name), self._sampling_model(base.model, base), list(requests)
        )

    async def _sample_sharded(self, session: Session, request: SampleRequest) -> SampleResult:
        samples, prompt_lp = await self._sample(session, request.tokens, request.settings)
        return SampleResult(samples, prompt_lp if request.prompt_logprobs else None)

    def validate_prompt(self, prompt: torch.Tensor, base: BaseModel) -> torch.Tensor:
        """A sampling prompt checked like a datum's tokens (ids in the vocabulary, length).

        Raises:
            ServiceError: INVALID_ARGUMENT naming the prompt.
        """
        if prompt.numel() == 0:
            raise invalid_argument("prompt is empty; send at least one token")
        try:
            batch = parse_datums([RawDatum(prompt, {"target_tokens": prompt})], base, self.config.limits)
        except ServiceError as exc:  # name the request's field, not the datum it was wrapped in
            message = exc.message.replace("datum 0: loss_fn_inputs['target_tokens']", "prompt")
            raise ServiceError(exc.code, message.replace("datum 0: model_input", "prompt")) from None
        return batch.tokens[0]

    # ---- checkpoints ---------------------------------------------------------------------

    def _check_save(self, session: Session, name: str, kind: str, dtype: str) -> torch.dtype:
        """Validate a save before its turn; return the export dtype."""
        store = self.checkpoint_store(session.owner)
        store.path(name)  # validates the name
        if store.exists(name):
            raise ServiceError(ErrorCode.ALREADY_EXISTS, f"checkpoint {name!r} already exists; delete it first")
        if kind not in CHECKPOINT_KINDS:
            raise invalid_argument("kind is required: BASE, DELTA, ADAPTER or STATE")
        dtypes = {"": torch.bfloat16, "bfloat16": torch.bfloat16, "float32": torch.float32}
        if dtype not in dtypes:
            raise invalid_argument("dtype must be DATA_TYPE_BFLOAT16 (default) or DATA_TYPE_FLOAT32")
        if kind == "adapter" and session.state.lora is None:
            raise failed_precondition("ADAPTER checkpoints need a LoRA session; save a BASE instead")
        return dtypes[dtype]

    async def _save_checkpoint(
        self, session: Session, call: SequencedCall, name: str, kind: str, dtype_name: str
    ) -> CheckpointResult:
        """Validate, wait for the call's turn, then write and commit the checkpoint.

        Once writing has begun it completes (see :meth:`SequencedCall.commit`), and the
        call's outcome is stored for a retry.
        """
        dtype = self._check_save(session, name, kind, dtype_name)
        await call.wait_turn(self.config.sequence_gap_timeout_s)
        state = session.state
        store = self.checkpoint_store(session.owner)
        if kind == "delta":
            if not state.last_base or not store.exists(state.last_base):
                raise failed_precondition(
                    "a DELTA is taken against the session's last BASE checkpoint, and there is none: save a BASE first"
                )
            await asyncio.to_thread(store.verify, state.last_base)
            dtype = await asyncio.to_thread(_export.base_dtype, store.path(state.last_base))

        base_dir = store.path(state.last_base) if kind == "delta" else None

        async def apply() -> CheckpointResult:
            with store.writing(name) as tmp:
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
                        name=name,
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
                state.last_base = name
            return CheckpointResult(call.seq, manifest)

        return await call.commit(apply(), record=True)

    async def checkpoint_model(self, name: str, owner: str = "") -> tuple[Any, BaseModel]:
        """A model with a checkpoint's weights, for sampling (a few are cached).

        A BASE loads as a model of its own; a STATE builds its session's model; an ADAPTER
        (what ``save_weights_for_sampler`` writes for a LoRA session: the adapter alone) is
        laid over the served base model's own tensors, so it costs only the adapter.

        Returns:
            The model and the base model it belongs to.
        """
        store = self.checkpoint_store(owner)
        manifest = store.manifest(name)
        key = (f"{owner}/{manifest.name}", manifest.created_at)
        # One load per checkpoint, however many callers ask at once: they then share one model
        # object, so their samples share decode steps.
        async with self._checkpoint_locks.setdefault(key, asyncio.Lock()):
            if key in self._checkpoint_models:
                return self._checkpoint_models[key]
            return await self._load_checkpoint_model(store, manifest, key)

    async def _load_checkpoint_model(
        self, store: CheckpointStore, manifest: Manifest, key: tuple[str, float]
    ) -> tuple[Any, BaseModel]:
        name = manifest.name
        if manifest.kind not in ("base", "state", "adapter"):
            raise invalid_argument(
                f"sampling needs a BASE, STATE or ADAPTER checkpoint; {name!r} is {manifest.kind.upper()}"
            )
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
        else:
            model = await self.on_device(_export.load_adapter, base, directory, self.device)
        self._checkpoint_models[key] = (model, base)
        while len(self._checkpoint_models) > MAX_CACHED_CHECKPOINT_MODELS:
            evicted = next(iter(self._checkpoint_models))
            self._checkpoint_models.pop(evicted)
            self._checkpoint_locks.pop(evicted, None)
        return model, base

    async def close(self, session: Session) -> None:
        """Close a session now (not sequenced) and free its memory; its waiting calls fail NOT_FOUND."""
        if session.closed:
            return
        await self.sessions.close(session)
        self.restarts.journal(session, open_=False)
        await self.sampler.wait_idle(_session_key(session))
        await self.run_op(_ops.CloseSession(session.id))
        log.info("session %s closed after %d optimizer steps", session.id, session.state.step)
        if self.device.type == "cuda":
            await self.on_device(torch.cuda.empty_cache)

    def server_summary(self) -> ServerSummary:
        """What the server serves and how (GetServerInfo; models and limits never change once loaded)."""
        return ServerSummary(
            version=server_version(),
            models=[m.summary() for m in self.models.values()],
            devices=list(self.devices),
            world_size=self.cluster.world_size,
            distributed_mode=self.cluster.mode,
            capabilities=list(CAPABILITIES),
            loss_functions=sorted(LOSSES),
        )


def _session_key(session: Session) -> tuple[str, str]:
    """The sampling scheduler's key for a session's (live, in-place updated) weights."""
    return ("session", session.id)


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """The ranks' logprobs in rank (and so datum) order."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)
