"""Tinker's two-phase futures: a submission answers a request id at once, the result is polled.

``POST /api/v1/<op>`` starts the work as an asyncio task and answers
``{"request_id": ...}``; ``POST /api/v1/retrieve_future`` answers the result, a failure
``{"error": ..., "category": ...}``, or, while the work runs, ``{"type": "try_again",
"queue_state": ..., "queue_state_reason": ...}`` after waiting up to ``poll_wait_s`` (a
long poll, so a result is delivered as soon as it exists).

Invariants:
- A request id is visible only to the owner that submitted it (others get 404).
- A result stays retrievable for ``retain_s`` after it was first retrieved (a retried
  poll gets it again), and unretrieved results for ``retain_unretrieved_s``.
- Cancelling (``cancel_future``) stops work that has not produced a result; a finished
  result is kept.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from trainer_server.frontends.tinker.errors import NotFound

__all__ = ["FutureStore", "Pending", "Reply"]


class Reply(Protocol):
    """A finished result, encodable as JSON and (for some types) as Tinker protobuf."""

    def to_json(self) -> dict[str, Any]:
        """The JSON object the SDK parses."""
        ...

    def to_proto(self) -> bytes | None:
        """The protobuf bytes the SDK parses, or None where Tinker answers JSON only."""
        ...


@dataclass(frozen=True)
class Pending:
    """The work is not finished.

    Attributes:
        queue_state: ``active`` (running or queued behind this model's earlier calls) or
            ``paused_capacity`` (the server is loading).
        reason: Human-readable state, shown by the SDK's progress logger.
    """

    queue_state: str
    reason: str


@dataclass
class _Entry:
    owner: str
    task: asyncio.Task[Reply]
    state: Callable[[], Pending]
    created_s: float = field(default_factory=time.monotonic)
    retrieved_s: float | None = None


class FutureStore:
    """The request ids of submitted work and their results."""

    def __init__(self, *, poll_wait_s: float = 5.0, retain_s: float = 300.0, retain_unretrieved_s: float = 3600.0):
        self.poll_wait_s = poll_wait_s
        self._retain_s = retain_s
        self._retain_unretrieved_s = retain_unretrieved_s
        self._entries: dict[str, _Entry] = {}

    def submit(
        self, owner: str, work: Coroutine[Any, Any, Reply], state: Callable[[], Pending], *, prefix: str = "req"
    ) -> str:
        """Start ``work`` now and return its new request id.

        Args:
            owner: The submitting owner; only it can retrieve or cancel.
            work: The coroutine producing the reply (its exceptions become failures).
            state: Says what the work is waiting for while it runs.
            prefix: Start of the request id, naming the kind of work.
        """
        self._evict()
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        task = asyncio.get_running_loop().create_task(work, name=f"tinker {request_id}")
        task.add_done_callback(_consume_exception)
        self._entries[request_id] = _Entry(owner, task, state)
        return request_id

    async def retrieve(self, owner: str, request_id: str) -> Reply | BaseException | Pending:
        """The reply, the failure, or (after waiting up to ``poll_wait_s``) the pending state.

        Raises:
            NotFound: Unknown, expired, or another owner's request id.
        """
        entry = self._entry(owner, request_id)
        if not entry.task.done():
            await asyncio.wait({entry.task}, timeout=self.poll_wait_s)
        if not entry.task.done():
            return entry.state()
        if entry.retrieved_s is None:
            entry.retrieved_s = time.monotonic()
        if entry.task.cancelled():
            return asyncio.CancelledError(f"request {request_id} was cancelled")
        exc = entry.task.exception()
        return exc if exc is not None else entry.task.result()

    def cancel(self, owner: str, request_id: str) -> None:
        """Stop the work if it has not finished.

        Raises:
            NotFound: Unknown, expired, or another owner's request id.
        """
        self._entry(owner, request_id).task.cancel()

    async def close(self) -> None:
        """Cancel all unfinished work and forget every request."""
        tasks = [e.task for e in self._entries.values() if not e.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._entries.clear()

    def _entry(self, owner: str, request_id: str) -> _Entry:
        entry = self._entries.get(request_id)
        if entry is None or entry.owner != owner:
            raise NotFound(f"unknown or expired request_id {request_id!r}")
        return entry

    def _evict(self) -> None:
        now = time.monotonic()
        expired = [
            rid
            for rid, e in self._entries.items()
            if e.task.done()
            and (
                (e.retrieved_s is not None and now - e.retrieved_s > self._retain_s)
                or now - e.created_s > self._retain_unretrieved_s
            )
        ]
        for rid in expired:
            del self._entries[rid]


def _consume_exception(task: asyncio.Task[Reply]) -> None:
    # Failures are delivered through retrieve_future; retrieving here keeps asyncio from
    # logging "exception was never retrieved" for work whose client went away.
    if not task.cancelled():
        task.exception()
