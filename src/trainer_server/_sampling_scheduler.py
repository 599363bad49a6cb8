"""Sampling as a shared service: concurrent requests on the same weights share decode steps.

:class:`SamplingScheduler` lives on the server's event loop. Requests queued under the same key
(the same weights: a base model, a checkpoint, a session's weights at a point of its call order)
join one :class:`~trainer_server._decode.DecodeBatch`. A driver task per busy key runs that batch
one step at a time, each step one device job (``run_on_device``), so device work queued meanwhile
(another session's training step, another key's step) runs between two steps, in queue order: a
long sampling batch never holds the device for its whole duration.

Threads. The scheduler's methods and its drivers run on one event loop. ``run_on_device`` must
run its callable on the device thread (the one thread that touches models) and return an
awaitable of its result. A batch is touched by one device job at a time, and by the loop only
between its jobs (a driver awaits each step before preparing the next), so no lock is needed.

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
import functools
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from trainer_server._decode import DecodeBatch
from trainer_server._sampling import SampleRequest, SampleResult, SamplingModel

__all__ = ["SamplingScheduler", "SchedulerClosedError"]

log = logging.getLogger("trainer_server.sampling")

T = TypeVar("T")

RunOnDevice = Callable[[Callable[[], Any]], Awaitable[Any]]
"""Runs a callable on the device thread; awaiting it gives the callable's result."""


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


@dataclass(eq=False)
class _Key:
    """A key's batch and the loop-side bookkeeping around it."""

    model: SamplingModel
    batch: DecodeBatch
    pending: deque[_Ticket] = field(default_factory=deque)
    running: dict[int, _Ticket] = field(default_factory=dict)
    cancelled: set[int] = field(default_factory=set)
    driver: asyncio.Task[None] | None = None
    rows: int = 0


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
        entry = self._keys.get(key)
        if entry is None:
            batch = DecodeBatch(model, max_rows=self._max_batch_rows, max_prefill_tokens=self._max_prefill_tokens)
            entry = self._keys[key] = _Key(model, batch)
        elif entry.model.module is not model.module:
            raise ValueError(f"sampling key {key!r} is busy with another model; use one key per set of weights")
        group = _Group(asyncio.get_running_loop().create_future(), [None] * len(requests), remaining=len(requests))
        group.tickets = [_Ticket(next(self._ids), request, group, i) for i, request in enumerate(requests)]
        group.future.add_done_callback(functools.partial(_withdraw, entry, group))
        if not requests:
            group.future.set_result([])
            return group.future
        entry.pending.extend(group.tickets)
        if entry.driver is None:
            entry.driver = asyncio.get_running_loop().create_task(self._drive(key, entry), name=f"sampling {key!r}")
        return group.future

    def rows(self, key: Hashable) -> int:
        """Samples of ``key`` being decoded, as of its last step (0 when idle)."""
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

    async def _drive(self, key: Hashable, entry: _Key) -> None:
        """Run ``entry``'s batch step by step while it has requests."""
        try:
            while entry.pending or entry.running:
                n = entry.batch.admissible([t.request for t in itertools.islice(entry.pending, self._max_batch_rows)])
                admit = [entry.pending.popleft() for _ in range(n)]
                entry.running.update((t.id, t) for t in admit)
                cancel, entry.cancelled = entry.cancelled, set()
                step = functools.partial(entry.batch.step, [(t.id, t.request) for t in admit], cancel)
                try:
                    finished = await self._run_on_device(step)
                except Exception as exc:  # the batch's state is unknown: fail its requests, start afresh
                    log.warning("sampling step for %r failed; failing its %d requests", key, len(entry.running))
                    failed = list(entry.running.values())
                    entry.running.clear()
                    entry.cancelled.clear()
                    entry.batch = DecodeBatch(
                        entry.model, max_rows=self._max_batch_rows, max_prefill_tokens=self._max_prefill_tokens
                    )
                    for ticket in failed:
                        _fail(ticket.group, exc)
                    continue
                entry.rows = entry.batch.num_rows
                for job_id, result in finished:
                    done = entry.running.pop(job_id, None)
                    if done is not None:  # else withdrawn while the step ran
                        _finish(done, result)
        except asyncio.CancelledError:
            closed = SchedulerClosedError("the sampling scheduler was closed")
            for ticket in [*entry.pending, *entry.running.values()]:
                _fail(ticket.group, closed)
            raise
        finally:
            entry.driver = None
            entry.rows = 0
            if self._keys.get(key) is entry and not (entry.pending or entry.running):
                del self._keys[key]


def _withdraw(entry: _Key, group: _Group, future: asyncio.Future[list[SampleResult]]) -> None:
    """Once a group is cancelled or failed, drop its requests still queued or running."""
    if not future.cancelled() and future.exception() is None:
        return
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
