"""Sampling as a shared service: concurrent requests on the same weights share decode steps.

:class:`SamplingScheduler` lives on the server's event loop. Requests queued under the same key
(the same weights: a base model, a checkpoint, a session's weights at a point of its call order)
join one :class:`~trainer_server._decode.DecodeBatch`. A driver task per busy key runs that batch
one step at a time, each step one device job (``run_on_device``): device work queued meanwhile
(another session's training step, another key's step) runs between two steps, so a long sampling
batch never holds the device for its whole duration.

Steps ahead. A driver keeps the key's next step queued behind the running one, so the device goes
from step to step without waiting for the event loop (a round trip per step would dominate small
models). Work queued by others therefore waits for at most two steps of each busy key.

Threads. The scheduler's methods and its drivers run on one event loop; ``run_on_device`` must
run its callable on the device thread (the one thread that touches models) and return an
awaitable of its result. The batch is touched only by device jobs. A key's queue (``pending``,
``running``, ``cancelled``) is shared by the loop, which adds and withdraws requests, and the
device jobs, which admit them: it is guarded by the key's lock, held only for list operations.
Drivers run in a fresh ``contextvars`` context, so a request's context (a sequenced call's
commit) never leaks into the device jobs of the requests that share its batch.

Invariants:

- The weights behind a key do not change while the key has requests; fence weight updates with
  :meth:`SamplingScheduler.wait_idle`.
- A request the model cannot run is refused before it joins a batch (:meth:`SamplingModel.check`).
- A step that raises fails exactly the requests admitted to that batch with its exception; the
  key's batch then starts afresh with the requests still queued. No caller is left waiting.
- A cancelled request is withdrawn: from the queue at once, from the batch at its next step.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from trainer_server._decode import DecodeBatch
from trainer_server._sampling import SampleRequest, SampleResult, SamplingModel

__all__ = ["SamplingScheduler", "SchedulerClosedError"]

log = logging.getLogger("trainer_server.sampling")

RunOnDevice = Callable[[Callable[[], Any]], Awaitable[Any]]
"""Runs a callable on the device thread; awaiting it gives the callable's result."""

_STEPS_QUEUED = 2
"""Steps of one key on the device queue at once: the running one and the next."""


class SchedulerClosedError(RuntimeError):
    """The sampling scheduler was closed before the request finished."""


@dataclass(eq=False)
class _Group:
    """The requests of one :meth:`SamplingScheduler.enqueue` call, answered together."""

    future: asyncio.Future[list[SampleResult]]
    results: list[SampleResult | None]
    tickets: list[_Ticket] = field(default_factory=list)
    remaining: int = 0


@dataclass(eq=False)
class _Ticket:
    """One request of a group, queued or admitted to its key's batch."""

    id: int
    request: SampleRequest
    group: _Group
    index: int  # position in the group's results


@dataclass(frozen=True, eq=False)
class _Outcome:
    """What one step did, for the loop to deliver."""

    finished: list[tuple[_Ticket, SampleResult]]
    failed: list[_Ticket]
    error: Exception | None
    rows: int


@dataclass(eq=False)
class _Key:
    """A key's batch (device jobs only) and its queue (under ``lock``)."""

    model: SamplingModel
    batch: DecodeBatch
    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: deque[_Ticket] = field(default_factory=deque)
    running: dict[int, _Ticket] = field(default_factory=dict)
    cancelled: set[int] = field(default_factory=set)
    driver: asyncio.Task[None] | None = None
    rows: int = 0

    def busy(self) -> bool:
        with self.lock:
            return bool(self.pending or self.running)


class SamplingScheduler:
    """Batches concurrent sampling requests per key; one decode step per device job.

    Args:
        run_on_device: Runs a callable on the device thread (e.g. ``Runtime.on_device``).
        max_batch_rows: Most samples decoded together under one key.
        max_prefill_tokens: Most (padded) prompt tokens prefilled in one step.
    """

    def __init__(
        self, run_on_device: RunOnDevice, *, max_batch_rows: int = 256, max_prefill_tokens: int = 16384
    ) -> None:
        self._run_on_device = run_on_device
        self._max_batch_rows = max_batch_rows
        self._max_prefill_tokens = max_prefill_tokens
        self._keys: dict[Hashable, _Key] = {}
        self._ids = itertools.count()
        self._closed = False

    async def submit(self, key: Hashable, model: SamplingModel, request: SampleRequest) -> SampleResult:
        """Sample one request; see :meth:`enqueue`."""
        (result,) = await self.enqueue(key, model, [request])
        return result

    async def submit_many(
        self, key: Hashable, model: SamplingModel, requests: Sequence[SampleRequest]
    ) -> list[SampleResult]:
        """Sample many prompts (each with its own settings) together; see :meth:`enqueue`."""
        return await self.enqueue(key, model, requests)

    def enqueue(
        self, key: Hashable, model: SamplingModel, requests: Sequence[SampleRequest]
    ) -> asyncio.Future[list[SampleResult]]:
        """Queue requests now and return a future of their results, in request order.

        The requests are queued before this returns, so a caller that must order sampling
        against other work (a session's call order) can release its turn right away and await
        the future afterwards. Cancelling the future withdraws the requests still running.

        Args:
            key: Identifies the weights: requests with equal keys share decode steps. The
                first request of an idle key fixes the key's model until the key is idle again.
            model: The model to sample from.
            requests: The prompts, each with its settings.

        Raises:
            ServiceError: INVALID_ARGUMENT when the model cannot run a request (nothing is queued).
            ValueError: ``key`` is busy with another model.
            SchedulerClosedError: after :meth:`aclose`.
        """
        if self._closed:
            raise SchedulerClosedError("the sampling scheduler is closed")
        for request in requests:
            model.check(request)
        loop = asyncio.get_running_loop()
        entry = self._keys.get(key)
        if entry is None:
            entry = self._keys[key] = _Key(model, self._new_batch(model))
        elif entry.model.module is not model.module:
            raise ValueError(f"sampling key {key!r} is busy with another model; use one key per set of weights")
        group = _Group(loop.create_future(), [None] * len(requests), remaining=len(requests))
        group.tickets = [_Ticket(next(self._ids), request, group, i) for i, request in enumerate(requests)]
        group.future.add_done_callback(functools.partial(_withdraw, entry, group))
        if not requests:
            group.future.set_result([])
            return group.future
        with entry.lock:
            entry.pending.extend(group.tickets)
        if entry.driver is None:
            entry.driver = loop.create_task(
                self._drive(key, entry), name=f"sampling {key!r}", context=contextvars.Context()
            )
        return group.future

    def rows(self, key: Hashable) -> int:
        """Samples of ``key`` being decoded, as of its last finished step (0 when idle)."""
        entry = self._keys.get(key)
        return 0 if entry is None else entry.rows

    async def wait_idle(self, key: Hashable) -> None:
        """Wait until ``key`` has no queued or running request (before its weights change)."""
        entry = self._keys.get(key)
        if entry is not None and entry.driver is not None:
            await asyncio.wait({entry.driver})

    async def aclose(self) -> None:
        """Refuse new requests and fail the queued and running ones with :class:`SchedulerClosedError`."""
        self._closed = True
        drivers = [entry.driver for entry in self._keys.values() if entry.driver is not None]
        for driver in drivers:
            driver.cancel()
        await asyncio.gather(*drivers, return_exceptions=True)

    def _new_batch(self, model: SamplingModel) -> DecodeBatch:
        return DecodeBatch(model, max_rows=self._max_batch_rows, max_prefill_tokens=self._max_prefill_tokens)

    async def _drive(self, key: Hashable, entry: _Key) -> None:
        """Keep ``entry``'s steps on the device queue while it has requests; deliver their outcomes."""
        queued: deque[asyncio.Future[_Outcome]] = deque()
        try:
            while True:
                while len(queued) < _STEPS_QUEUED and entry.busy():
                    queued.append(asyncio.ensure_future(self._run_on_device(functools.partial(self._step, entry))))
                if not queued:
                    break
                try:
                    outcome = await queued.popleft()
                except Exception as exc:  # the device could not run the job at all (e.g. shut down)
                    with entry.lock:
                        failed = [*entry.pending, *entry.running.values()]
                        entry.pending.clear()
                        entry.running.clear()
                    outcome = _Outcome([], failed, exc, 0)
                entry.rows = outcome.rows
                for ticket, result in outcome.finished:
                    _finish(ticket, result)
                if outcome.error is not None:
                    log.warning("sampling for %r failed (%d requests): %r", key, len(outcome.failed), outcome.error)
                    for ticket in outcome.failed:
                        _fail(ticket.group, outcome.error)
        except asyncio.CancelledError:
            closed = SchedulerClosedError("the sampling scheduler was closed")
            with entry.lock:  # steps still queued on the device then admit nothing
                tickets = [*entry.pending, *entry.running.values()]
                entry.pending.clear()
                entry.running.clear()
            for ticket in tickets:
                _fail(ticket.group, closed)
            raise
        finally:
            for job in queued:
                job.cancel()
            entry.driver = None
            entry.rows = 0
            if self._keys.get(key) is entry and not entry.busy():
                del self._keys[key]

    def _step(self, entry: _Key) -> _Outcome:
        """One device job: admit what fits, drop what was withdrawn, run one step of the batch."""
        batch = entry.batch
        with entry.lock:
            head = [t.request for t in itertools.islice(entry.pending, self._max_batch_rows)]
            admit = [entry.pending.popleft() for _ in range(batch.admissible(head))]
            entry.running.update((t.id, t) for t in admit)
            cancel, entry.cancelled = entry.cancelled, set()
        try:
            finished = batch.step([(t.id, t.request) for t in admit], cancel)
        except Exception as exc:  # the batch's state is unknown: fail its requests, start afresh
            entry.batch = self._new_batch(entry.model)
            with entry.lock:
                failed = list(entry.running.values())
                entry.running.clear()
                entry.cancelled.clear()
            return _Outcome([], failed, exc, 0)
        done = []
        with entry.lock:
            for job_id, result in finished:
                ticket = entry.running.pop(job_id, None)
                if ticket is not None:  # else withdrawn while the step ran
                    done.append((ticket, result))
        return _Outcome(done, [], None, batch.num_rows)


def _withdraw(entry: _Key, group: _Group, future: asyncio.Future[list[SampleResult]]) -> None:
    """Once a group is cancelled or failed, drop its requests still queued or running."""
    if not future.cancelled() and future.exception() is None:
        return
    with entry.lock:
        for ticket in group.tickets:
            if ticket.id in entry.running:
                del entry.running[ticket.id]
                entry.cancelled.add(ticket.id)
        entry.pending = deque(t for t in entry.pending if t.group is not group)


def _finish(ticket: _Ticket, result: SampleResult) -> None:
    group = ticket.group
    if group.future.done():
        return
    group.results[ticket.index] = result
    group.remaining -= 1
    if group.remaining == 0:
        group.future.set_result([r for r in group.results if r is not None])


def _fail(group: _Group, exc: BaseException) -> None:
    if not group.future.done():
        group.future.set_exception(exc)
