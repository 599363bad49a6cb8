"""Tinker's ``seq_id`` ordering of one training model's calls.

The SDK numbers every call on a training client ``seq_id = 1, 2, 3 ...`` when the method
is called, and submits call N+1 only after the server answered the submission of call N,
except the chunks of one ``forward_backward``, which it submits together (first chunk
last). Invariants kept here:

- Calls run one at a time, in ``seq_id`` order, whatever order they arrive in.
- A ``seq_id`` is claimed once. A retry (same ``seq_id``, same body fingerprint) gets the
  request id of the first submission and is never applied twice; the same ``seq_id``
  with another body is a conflict, and so is one below the next expected.
- A submission refused after its ``seq_id`` was read (:meth:`SeqOrder.skip`) consumes its
  number, so it never blocks the calls after it.
- A call whose predecessor never arrives waits ``gap_timeout_s`` and then fails unapplied
  (no optimizer step is applied over a gap); the numbers below it are given up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from trainer_server.frontends.tinker.errors import BadRequest, Conflict, SeqGapError

__all__ = ["SeqOrder"]

T = TypeVar("T")


@dataclass
class SeqOrder:
    """Runs one model's calls in ``seq_id`` order.

    Attributes:
        gap_timeout_s: How long a call waits for a missing predecessor.
    """

    gap_timeout_s: float = 120.0
    next_seq: int = 1
    _claims: dict[int, tuple[str, str]] = field(default_factory=dict)
    _skipped: set[int] = field(default_factory=set)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def assign(self, seq_id: int | None) -> int:
        """The ``seq_id`` a call runs under: its own, or (None) the next after every claim.

        Raises:
            BadRequest: A ``seq_id`` below 1.
        """
        if seq_id is None:
            return max([self.next_seq - 1, *self._claims]) + 1
        if seq_id < 1:
            raise BadRequest(f"seq_id must be >= 1 (the SDK sends request number + 1), got {seq_id}")
        return seq_id

    def claimed(self, seq_id: int, fingerprint: str) -> str | None:
        """The request id of an earlier submission of this call (a retry), or None if new.

        Raises:
            Conflict: The ``seq_id`` was used by a different request, or is already behind.
        """
        claim = self._claims.get(seq_id)
        if claim is not None:
            if claim[0] != fingerprint:
                raise Conflict(f"seq_id {seq_id} was already used by a different request on this model")
            return claim[1]
        if seq_id < self.next_seq or seq_id in self._skipped:
            raise Conflict(f"seq_id {seq_id} is behind this model's next seq_id {self.next_seq}")
        return None

    def claim(self, seq_id: int, fingerprint: str, request_id: str) -> None:
        """Record that ``request_id`` runs under ``seq_id`` (after :meth:`claimed` said new)."""
        self._claims[seq_id] = (fingerprint, request_id)

    def skip(self, seq_id: int) -> None:
        """Consume a refused call's ``seq_id`` so later calls do not wait for it."""
        if seq_id >= self.next_seq and seq_id not in self._claims:
            self._skipped.add(seq_id)
            self._advance()

    def waiting_for(self, seq_id: int) -> int | None:
        """The ``seq_id`` a call is waiting for, or None when it is its turn (or done)."""
        return self.next_seq if seq_id > self.next_seq else None

    async def run_in_turn(self, seq_id: int, work: Callable[[], Awaitable[T]]) -> T:
        """Wait for ``seq_id``'s turn, run ``work``, then pass the turn on (also on failure).

        Raises:
            SeqGapError: A predecessor did not arrive within ``gap_timeout_s``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.gap_timeout_s
        while self.next_seq < seq_id:
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                missing = self.next_seq
                self._finish(seq_id)
                raise SeqGapError(
                    f"seq_id {seq_id} waited {self.gap_timeout_s:g} s for seq_id {missing}, which never arrived; "
                    "it was not applied"
                ) from None
        try:
            return await work()
        finally:
            self._finish(seq_id)

    def _finish(self, seq_id: int) -> None:
        self.next_seq = max(self.next_seq, seq_id + 1)
        self._advance()

    def _advance(self) -> None:
        while self.next_seq in self._skipped:
            self._skipped.discard(self.next_seq)
            self.next_seq += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
