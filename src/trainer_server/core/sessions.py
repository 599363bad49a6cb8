"""Training sessions and the sequencer that runs each session's calls in order.

Invariants:
- A session's calls carry client-assigned sequence numbers 1, 2, 3, ...; a call runs only
  when every smaller number has finished (applied, failed, or refused), whatever order
  the RPCs arrived in.
- A call that is refused or cancelled before its turn still takes its slot: when the
  sequencer reaches it, it is skipped, so later calls are not held up.
- A number that never arrives is a gap. A call waiting behind a gap for longer than the
  gap timeout (or its deadline) is aborted and not applied, and the gap is skipped, so no
  optimizer step is ever applied over a missing call.
- A number is used once: a second call with a number already seen is refused.
- A session is a lease: every call and every heartbeat renews it (:meth:`Session.touch`);
  the core closes a session that has no call in flight and was not renewed for the
  server's session TTL.
- Admission is reserved before anything is built (:meth:`SessionRegistry.reserve`), so
  concurrent creates never exceed the limits and a refused or cancelled create leaves
  nothing registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from trainer_server._engine import SessionModel
from trainer_server._models import BaseModel
from trainer_server.core.errors import ErrorCode, ServiceError, echo, invalid_argument, not_found, resource_exhausted

__all__ = [
    "MAX_SEQ_LOOKAHEAD",
    "MAX_STORED_OUTCOMES",
    "Outcome",
    "SequencedCall",
    "Session",
    "SessionRegistry",
    "committing_call",
    "new_session_id",
]

MAX_SEQ_LOOKAHEAD = 1024
"""A call may carry at most this many numbers past the next expected one (a huge number would
otherwise skip, via the gap timeout, every number a session could still use)."""
MAX_STORED_OUTCOMES = 32
"""Finished calls per session whose results are kept to answer retries."""

T = TypeVar("T")

_COMMITTING: contextvars.ContextVar[SequencedCall | None] = contextvars.ContextVar("committing", default=None)
"""The call whose :meth:`SequencedCall.commit` work is running in this task, if any."""


def committing_call() -> SequencedCall | None:
    """The sequenced call whose committed work is running in the current task, if any."""
    return _COMMITTING.get()


log = logging.getLogger("trainer_server.sessions")


class Session:
    """One training session: its model state and its call sequencer."""

    def __init__(
        self, session_id: str, base: BaseModel, state: SessionModel, *, owner: str = "", max_inflight: int = 64
    ) -> None:
        self.id = session_id
        self.base = base
        self.state = state
        self.owner = owner
        self.max_inflight = max_inflight
        self.next_seq = 1
        self.closed = False
        self.created_at = time.time()
        self.last_active = time.monotonic()
        """When the last call started or ended, or the last heartbeat came (monotonic clock)."""
        self.restored = False
        """Saved at a graceful stop and restored at this server's start."""
        self._seen: set[int] = set()  # numbers that arrived and are not yet past
        self._done_early: set[int] = set()  # refused/cancelled before their turn
        self._changed = asyncio.Condition()
        self._outcomes: OrderedDict[int, Outcome] = OrderedDict()
        self._claimed_fingerprints: dict[int, bytes] = {}  # of the calls in _seen
        self._past_forward: set[int] = set()  # running calls whose forward is done (see wait_turn)
        self._queued: set[int] = set()  # running calls whose last device work is queued (see wait_turn)

    def touch(self) -> None:
        """Renew the session's lease (a call or a heartbeat)."""
        self.last_active = time.monotonic()

    @property
    def calls_in_flight(self) -> int:
        """Calls that arrived and have not finished."""
        return len(self._seen)

    @property
    def next_free_seq(self) -> int:
        """The number a new client of this session (see AttachSession) should use next.

        Above every number already run, refused, or still in flight, so an attached client
        never collides with a call its crashed predecessor left running.
        """
        return max([self.next_seq, *(n + 1 for n in self._seen), *(n + 1 for n in self._done_early)])

    def _advance(self) -> None:
        while self.next_seq in self._done_early:
            self._done_early.discard(self.next_seq)
            self.next_seq += 1
        self._done_early = {n for n in self._done_early if n > self.next_seq}

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _finish(self, seq: int, *, had_turn: bool) -> None:
        async with self._changed:
            self._seen.discard(seq)
            self._claimed_fingerprints.pop(seq, None)
            self._past_forward.discard(seq)
            self._queued.discard(seq)
            if had_turn:
                self.next_seq = max(self.next_seq, seq + 1)  # never move back over numbers already used
            elif seq >= self.next_seq:
                self._done_early.add(seq)
            self._advance()
            self._changed.notify_all()

    def record(self, seq: int, fingerprint: bytes, result: Any) -> None:
        """Keep a finished call's result, so a retry of it is answered without re-running."""
        self._outcomes[seq] = Outcome(fingerprint, result)
        while len(self._outcomes) > MAX_STORED_OUTCOMES:
            self._outcomes.popitem(last=False)

    async def _retry_of(self, seq: int, fingerprint: bytes) -> Outcome | None:
        """The stored outcome when ``seq`` is a retry of a finished call, None for a new number.

        A retry that arrives while the original is still running waits for it.

        Raises:
            ServiceError: ALREADY_EXISTS when the number was used by a different request,
                or by a call whose outcome is not kept (it failed, was cancelled, or is
                too old).
        """
        if seq in self._seen:
            if self._claimed_fingerprints.get(seq) != fingerprint:
                raise ServiceError(
                    ErrorCode.ALREADY_EXISTS,
                    f"session {self.id}: sequence number {seq} is in use by a different request "
                    f"(next expected: {self.next_seq})",
                )
            async with self._changed:
                await self._changed.wait_for(lambda: seq not in self._seen)
        if not (seq < self.next_seq or seq in self._done_early):
            return None
        outcome = self._outcomes.get(seq)
        if outcome is not None and outcome.fingerprint == fingerprint:
            return outcome
        why = "by a different request" if outcome is not None else "and its outcome is not kept (failed or cancelled)"
        raise ServiceError(
            ErrorCode.ALREADY_EXISTS,
            f"session {self.id}: sequence number {seq} was already used {why} (next expected: {self.next_seq})",
        )

    @asynccontextmanager
    async def call(self, seq: int, fingerprint: bytes = b"") -> AsyncIterator[SequencedCall]:
        """Hold sequence number ``seq`` for the body; let ``seq + 1`` go afterwards.

        Validate the request inside the body before :meth:`SequencedCall.wait_turn`, so
        bad input is refused at once; whichever way the body ends, the number is used up.
        When ``seq`` is a retry of a finished call with the same ``fingerprint``, the
        yielded call carries that call's stored :attr:`SequencedCall.replay` instead, and
        the body must answer with it (nothing is run twice).

        Raises:
            ServiceError: INVALID_ARGUMENT for 0, ALREADY_EXISTS for a number already used
                by another request, NOT_FOUND when the session is closed.
        """
        self.touch()
        if seq == 0:
            raise invalid_argument("call.seq is required and starts at 1")
        if seq > self.next_seq + MAX_SEQ_LOOKAHEAD:
            raise ServiceError(
                ErrorCode.OUT_OF_RANGE,
                f"session {self.id}: call.seq {seq} is too far ahead (next expected: {self.next_seq}, "
                f"at most {MAX_SEQ_LOOKAHEAD} ahead)",
            )
        replay = await self._retry_of(seq, fingerprint)
        if replay is not None:
            log.info("session %s: call %d is a retry; answering with its stored outcome", self.id, seq)
            yield SequencedCall(self, seq, replay=replay)
            return
        if self.closed:
            raise not_found(f"session {self.id} is closed")
        if len(self._seen) >= self.max_inflight:
            raise resource_exhausted(
                f"session {self.id} has {len(self._seen)} calls in flight, the limit "
                f"max_inflight_per_session={self.max_inflight}; await some before submitting more"
            )
        self._seen.add(seq)
        self._claimed_fingerprints[seq] = fingerprint
        sequenced = SequencedCall(self, seq, fingerprint=fingerprint)
        try:
            yield sequenced
        finally:
            if sequenced.committing is not None and not sequenced.committing.done():
                with contextlib.suppress(BaseException):  # its error went to the caller, or nobody is left to tell
                    await asyncio.shield(sequenced.committing)
            self.touch()
            await asyncio.shield(self._finish(seq, had_turn=sequenced.had_turn))


@dataclass(frozen=True)
class Outcome:
    """A finished call's request fingerprint and result (a domain result), kept to answer retries."""

    fingerprint: bytes
    result: Any


class SequencedCall:
    """A call holding its sequence number; see :meth:`Session.call`."""

    def __init__(self, session: Session, seq: int, replay: Outcome | None = None, fingerprint: bytes = b"") -> None:
        self.session = session
        self.seq = seq
        self.fingerprint = fingerprint
        self.had_turn = False
        self.replay = replay
        self.committing: asyncio.Task[Any] | None = None
        self._wake: asyncio.Future[None] | None = None

    async def commit(self, work: Coroutine[Any, Any, T], *, record: bool = False) -> T:
        """Run ``work`` to its end even if this call is cancelled (its client went away).

        For the part of a call that changes the session and records its outcome: once the
        device work has begun, it completes and the outcome is stored, and the call's number
        is released only after that, so a retry gets the stored outcome and a cancellation
        never leaves a half-applied step or an applied step without its outcome.

        Args:
            work: the device work (and, for streams, recording the outcome).
            record: store the work's result as the call's outcome.
        """

        async def run() -> T:
            _COMMITTING.set(self)  # TrainingCore.on_device reports queued device work to this call
            result = await work
            if record:
                self.session.record(self.seq, self.fingerprint, result)
            return result

        self.committing = asyncio.ensure_future(run())
        return await asyncio.shield(self.committing)

    async def wait_turn(self, gap_timeout_s: float, *, ahead: bool = False, queued: bool = False) -> None:
        """Wait until every earlier call of the session has finished.

        With ``queued`` (only device work follows), also return once every earlier call has
        queued its last device work (see :meth:`commit`): the device thread runs work in the
        order it was queued, so this call's work still runs after theirs, and the device
        does not idle while the event loop finishes the earlier calls.

        With ``ahead`` (a forward that changes nothing), also return when the one call
        still unfinished before this one is past its forward (:meth:`forward_done`):
        weights change only at an optimizer step, so this call's forward may run while
        that call waits for its client's gradient. Only one call runs ahead, so a session
        holds at most two forward graphs. A call let in ahead must wait again, without
        ``ahead``, before it changes anything.

        Raises:
            ServiceError: ABORTED when an earlier number did not arrive within
                ``gap_timeout_s`` (the gap is then skipped); NOT_FOUND when the session
                was closed meanwhile.
        """
        s = self.session
        loop = asyncio.get_running_loop()
        gap_since: float | None = None

        def ready() -> bool:
            if s.next_seq >= self.seq:
                return True
            if not (ahead or queued):
                return False
            last = self.seq - 1
            if ahead and last in s._past_forward:  # one call ahead of a forward waiting for its gradient
                last -= 1
            return all(n in s._queued for n in range(s.next_seq, last + 1))

        async with s._changed:
            while not s.closed and not ready():
                if s.next_seq in s._seen:
                    # The next call has arrived (it may be running): no gap, however long it takes.
                    gap_since = None
                    await s._changed.wait()
                    continue
                if gap_since is None:
                    gap_since = loop.time()
                try:
                    await asyncio.wait_for(s._changed.wait(), max(0.0, gap_since + gap_timeout_s - loop.time()))
                except TimeoutError:
                    if s.next_seq in s._seen or ready() or s.closed:
                        continue  # it arrived (or we were skipped) just as the timer fired
                    missing = s.next_seq
                    log.warning(
                        "session %s: call %d gave up waiting for call %d; skipping the gap", s.id, self.seq, missing
                    )
                    self.had_turn = True  # every number up to and including this one is used up
                    raise ServiceError(
                        ErrorCode.ABORTED,
                        f"session {s.id}: call {self.seq} waited {gap_timeout_s:g}s for call {missing}, which never "
                        f"arrived; call {self.seq} was not applied and calls {missing}..{self.seq} are skipped",
                    ) from None
            if not s.closed and s.next_seq > self.seq:
                raise ServiceError(
                    ErrorCode.ABORTED,
                    f"session {s.id}: call {self.seq} was skipped, with the gap before it, by a later call that gave "
                    "up waiting for a missing call; it was not applied",
                )
        if s.closed:
            raise not_found(f"session {s.id} is closed")
        if s.next_seq >= self.seq:
            self.had_turn = True

    def device_queued(self) -> None:
        """Note that the call's last device work is queued; later calls may queue theirs now.

        See ``wait_turn(queued=True)``.
        """
        s = self.session
        s._queued.add(self.seq)
        self._wake = asyncio.ensure_future(s._notify())

    async def forward_done(self) -> None:
        """Let the next call's forward run (see ``wait_turn(ahead=True)``)."""
        self.session._past_forward.add(self.seq)
        await self.session._notify()


def new_session_id() -> str:
    """A fresh, unguessable session id."""
    return f"s-{uuid.uuid4().hex[:16]}"


class SessionRegistry:
    """All open sessions, by id."""

    def __init__(self, max_sessions: int, *, max_sessions_per_key: int = 64, max_inflight: int = 64) -> None:
        self.max_sessions = max_sessions
        self.max_sessions_per_key = max_sessions_per_key
        self.max_inflight = max_inflight
        self._sessions: dict[str, Session] = {}
        self._reserved: dict[str, int] = {}  # admissions being built, by owner

    def __len__(self) -> int:
        return len(self._sessions)

    def check_capacity(self, owner: str = "") -> None:
        """Raise RESOURCE_EXHAUSTED when no more sessions may be opened (in total, or by this key).

        Sessions being built (reserved) count as open.
        """
        total = len(self._sessions) + sum(self._reserved.values())
        if total >= self.max_sessions:
            raise resource_exhausted(
                f"{total} sessions are open or being created, the limit max_sessions={self.max_sessions}; "
                "close one first"
            )
        mine = sum(1 for s in self._sessions.values() if s.owner == owner) + self._reserved.get(owner, 0)
        if owner and mine >= self.max_sessions_per_key:
            raise resource_exhausted(
                f"this API key has {mine} sessions open, the limit max_sessions_per_key={self.max_sessions_per_key}; "
                "close one first"
            )

    @contextlib.contextmanager
    def reserve(self, owner: str = "") -> Iterator[None]:
        """Hold one session slot of ``owner`` while a session is built (checked at once).

        The caller registers the built session with :meth:`add` inside the block; whichever
        way the block ends, the reservation is given back.

        Raises:
            ServiceError: RESOURCE_EXHAUSTED when no slot is free.
        """
        self.check_capacity(owner)
        self._reserved[owner] = self._reserved.get(owner, 0) + 1
        try:
            yield
        finally:
            self._reserved[owner] -= 1
            if not self._reserved[owner]:
                del self._reserved[owner]

    def add(self, session_id: str, base: BaseModel, state: SessionModel, owner: str = "") -> Session:
        """Register a session built under a :meth:`reserve` of ``owner`` (see :func:`new_session_id`)."""
        session = Session(session_id, base, state, owner=owner, max_inflight=self.max_inflight)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str, owner: str = "") -> Session:
        """Look up an open session of ``owner``.

        Raises:
            ServiceError: INVALID_ARGUMENT for an empty id, NOT_FOUND for an unknown one
                or one that belongs to another key.
        """
        if not session_id:
            raise invalid_argument("call.session_id is required")
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise not_found(f"session {echo(session_id)} does not exist (closed, or never created on this server)")
        return session

    def find(self, session_id: str, owner: str = "") -> Session | None:
        """An open session of ``owner`` by id, or None (unknown, closed, or another key's)."""
        session = self._sessions.get(session_id)
        return session if session is not None and session.owner == owner else None

    async def close(self, session: Session) -> None:
        """Remove a session and wake its waiting calls, which then fail NOT_FOUND."""
        self._sessions.pop(session.id, None)
        async with session._changed:
            session.closed = True
            session._changed.notify_all()

    def all(self, owner: str | None = None) -> list[Session]:
        """Open sessions, oldest first: every owner's, or only ``owner``'s."""
        return [s for s in self._sessions.values() if owner is None or s.owner == owner]
