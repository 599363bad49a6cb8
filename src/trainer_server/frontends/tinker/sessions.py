"""Tinker sessions, training models and sampling sessions of this front end.

A Tinker *session* (``create_session``) groups the models and sampling sessions one
``ServiceClient`` makes; it is kept alive by heartbeats and ended by ``finish``. Each
training model is one model of the backend (one session of the core). Everything here is
in memory and per owner: an id of another owner is reported unknown (404), never forbidden.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from trainer_server.frontends.tinker import backend
from trainer_server.frontends.tinker.errors import HTTPError, NotFound
from trainer_server.frontends.tinker.ordering import SeqOrder

__all__ = ["Registry", "Sampler", "Session", "SessionFinished", "TrainingModel"]


class SessionFinished(HTTPError):
    """The session was finished; the SDK's heartbeat stops on 410."""

    status = 410


@dataclass
class TrainingModel:
    """One training model (Tinker training run) and its call order."""

    model_id: str
    session_id: str
    owner: str
    handle: backend.ModelHandle
    info: backend.ModelInfo
    order: SeqOrder
    user_metadata: dict[str, str] = field(default_factory=dict)
    last_request_s: float = field(default_factory=time.time)


@dataclass
class Sampler:
    """A sampling session: where its samples come from, and its submitted requests by seq_id."""

    sampler_id: str
    owner: str
    source: str
    base_model: str
    model_path: str | None
    requests: dict[int, tuple[str, str]] = field(default_factory=dict)


@dataclass
class Session:
    """A Tinker session."""

    session_id: str
    owner: str
    user_metadata: dict[str, str] = field(default_factory=dict)
    created_s: float = field(default_factory=time.time)
    last_heartbeat_s: float = field(default_factory=time.monotonic)
    finished: str | None = None
    model_ids: list[str] = field(default_factory=list)
    sampler_ids: list[str] = field(default_factory=list)
    creations: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Submitted create/load requests by the id they create: (fingerprint, request id)."""


class Registry:
    """Sessions, models and samplers by id, with owner checks."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.models: dict[str, TrainingModel] = {}
        self.samplers: dict[str, Sampler] = {}

    def session(self, owner: str, session_id: str, *, live: bool = True) -> Session:
        """A session of ``owner``.

        Raises:
            NotFound: Unknown, or another owner's.
            SessionFinished: ``live`` and the session was finished.
        """
        session = self.sessions.get(session_id)
        if session is None or session.owner != owner:
            raise NotFound(f"unknown session_id {session_id!r}")
        if live and session.finished is not None:
            raise SessionFinished(f"session {session_id} was finished ({session.finished})")
        return session

    def model(self, owner: str, model_id: str) -> TrainingModel:
        """A live training model of ``owner``.

        Raises:
            NotFound: Unknown, closed, or another owner's.
        """
        model = self.models.get(model_id)
        if model is None or model.owner != owner:
            raise NotFound(f"unknown model_id {model_id!r} (never created, closed, or its session finished)")
        return model

    def sampler(self, owner: str, sampler_id: str) -> Sampler:
        """A sampling session of ``owner``.

        Raises:
            NotFound: Unknown, or another owner's.
        """
        sampler = self.samplers.get(sampler_id)
        if sampler is None or sampler.owner != owner:
            raise NotFound(f"unknown sampling_session_id {sampler_id!r}")
        return sampler

    def add_model(self, model: TrainingModel) -> None:
        """Register a created model with its session."""
        self.models[model.model_id] = model
        self.sessions[model.session_id].model_ids.append(model.model_id)

    def add_sampler(self, session: Session, sampler: Sampler) -> None:
        """Register a sampling session with its session."""
        self.samplers[sampler.sampler_id] = sampler
        session.sampler_ids.append(sampler.sampler_id)

    def owned_models(self, owner: str) -> list[TrainingModel]:
        """The owner's live models."""
        return [m for m in self.models.values() if m.owner == owner]

    def finish(self, session: Session, reason: str) -> list[TrainingModel]:
        """Mark a session finished (first reason wins); return its models, now unregistered."""
        if session.finished is None:
            session.finished = reason
        closed = [self.models.pop(mid) for mid in session.model_ids if mid in self.models]
        return closed
