"""Sessions across server restarts: saved at a graceful stop, restored at the next start.

At a graceful stop (``trainer-server`` on SIGTERM, or ``TrainerServer.stop(save_sessions=True)``)
every open session is saved under ``CHECKPOINT_DIR/.sessions/SESSION_ID`` like a STATE
checkpoint (weights, AdamW state, step, RNG, gradients accumulated since the last step) plus its
id, owner and next sequence number; the next start with the same checkpoint directory restores
each one under the same id, so its client reattaches (AttachSession) and continues bit for bit.

A journal of open sessions (``.sessions/open/SESSION_ID.json``, written at create, removed at
close or save) lets a start after a SIGKILL or crash name the sessions that were lost and say how
to resume them (from their last STATE checkpoint).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainer_server import _export
from trainer_server.core import ops as _ops
from trainer_server.core.errors import ServiceError
from trainer_server.core.sessions import Session

if TYPE_CHECKING:
    from trainer_server.core.service import TrainingCore

__all__ = ["SESSIONS_DIR", "SessionRestarts"]

log = logging.getLogger("trainer_server.core")

SESSIONS_DIR = ".sessions"
"""The folder of the checkpoint root that holds saved sessions and the journal (never a checkpoint name)."""


class SessionRestarts:
    """Saves, restores and journals the sessions of one :class:`TrainingCore`."""

    def __init__(self, core: TrainingCore) -> None:
        self._core = core
        self._root: Path = core.checkpoint_root / SESSIONS_DIR

    def journal(self, session: Session, *, open_: bool) -> None:
        """Note that a session is open (or no longer), so a start after a crash can say what was lost."""
        entry = self._root / "open" / f"{session.id}.json"
        try:
            if open_:
                entry.parent.mkdir(parents=True, exist_ok=True)
                record = {"session_id": session.id, "base_model": session.base.name, "created_at": session.created_at}
                entry.write_text(json.dumps(record) + "\n")
            else:
                entry.unlink(missing_ok=True)
        except OSError as exc:  # the journal only improves a message; never fail a call for it
            log.warning("session journal: %s", exc)

    async def save_open(self) -> list[str]:
        """Save every open session so that the next start restores it (a graceful stop).

        Each is saved like a STATE checkpoint (weights, AdamW state, step, RNG, gradients
        accumulated since the last step) plus its id, owner and next sequence number, under
        ``checkpoint_dir/.sessions``; all of it within ``session_save_timeout_s``.

        Returns:
            The ids of the sessions saved.
        """
        timeout_s = self._core.config.session_save_timeout_s
        sessions = [s for s in self._core.sessions.all() if not s.closed]
        saved: list[str] = []
        if not sessions or timeout_s <= 0 or self._core.broken:
            return saved

        async def save_all() -> None:
            for session in sessions:
                try:
                    await self._save_session(session)
                except ServiceError as exc:
                    log.warning("session %s could not be saved: %s", session.id, exc.message)
                else:
                    saved.append(session.id)

        try:
            await asyncio.wait_for(save_all(), timeout_s)
        except TimeoutError:
            log.warning(
                "saving open sessions took over session_save_timeout_s=%gs; %d of %d saved",
                timeout_s,
                len(saved),
                len(sessions),
            )
        log.info("saved %d open sessions for the next start: %s", len(saved), ", ".join(saved) or "-")
        return saved

    async def _save_session(self, session: Session) -> None:
        root = self._root
        final, tmp = root / session.id, root / f".{session.id}.tmp"
        await asyncio.to_thread(shutil.rmtree, tmp, True)
        tmp.mkdir(parents=True)
        op = _ops.SaveCheckpoint(session.id, "state", torch.float32, str(tmp), session.base.name)
        try:
            await self._core.run_op(op)
        finally:
            snapshot = self._core.engine.snapshots.pop(op.directory, None)
        if snapshot is not None:
            await asyncio.to_thread(_export.write_snapshot, snapshot, tmp, None)
        record = {
            "session_id": session.id,
            "owner": session.owner,
            "base_model": session.base.name,
            "next_seq": session.next_free_seq,
            "created_at": session.created_at,
        }
        (tmp / "session.json").write_text(json.dumps(record, indent=2) + "\n")
        await asyncio.to_thread(shutil.rmtree, final, True)
        tmp.rename(final)
        self.journal(session, open_=False)

    def discard_open(self) -> None:
        """At a stop that saves nothing: the open sessions end with the server, deliberately."""
        sessions = self._core.sessions.all()
        for session in sessions:
            self.journal(session, open_=False)
        if sessions:
            log.info("stopping with %d open sessions, not saved: %s", len(sessions), ", ".join(s.id for s in sessions))

    async def restore(self) -> list[Session]:
        """Restore the sessions saved at the last graceful stop; report those a crash lost.

        A restored session keeps its id, owner, weights, optimizer state, step, pending
        gradients and sequence numbers: its client reattaches by id (AttachSession) and
        continues as if the server had never stopped. Its saved copy is removed once restored.
        """
        root = self._root
        restored: list[Session] = []
        saved = sorted(p.parent for p in root.glob("s-*/session.json")) if root.is_dir() else []
        saved_ids = {d.name for d in saved}
        for entry in sorted((root / "open").glob("*.json")) if (root / "open").is_dir() else []:
            if entry.stem not in saved_ids:
                log.warning(
                    "session %s was open when the server last stopped without saving it (killed, or a crash): what it "
                    "trained since its last STATE checkpoint is lost; resume from that checkpoint with "
                    "create_training_client_from_state(NAME)",
                    entry.stem,
                )
            entry.unlink(missing_ok=True)
        for directory in saved:
            record = json.loads((directory / "session.json").read_text())
            base = self._core.models.get(record["base_model"])
            if base is None:
                log.warning(
                    "saved session %s is of model %r, which this server does not serve; kept in %s",
                    directory.name,
                    record["base_model"],
                    directory,
                )
                continue
            session_id = str(record["session_id"])
            await self._core.run_op(_ops.ResumeSession(session_id, base.name, str(directory.resolve())))
            session = self._core.sessions.add(
                session_id, base, self._core.engine.sessions[session_id], str(record["owner"])
            )
            session.next_seq = int(record["next_seq"])
            session.created_at = float(record["created_at"])
            session.restored = True
            self.journal(session, open_=True)
            await asyncio.to_thread(shutil.rmtree, directory, True)
            restored.append(session)
            log.info("session %s restored at step %d (next seq %d)", session.id, session.state.step, session.next_seq)
        return restored
