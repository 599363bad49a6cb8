"""Tinker ids and ``tinker://`` paths, and how they map to this server's checkpoint names.

Ids this front end hands out:
- session: ``sess-<12 hex>``;
- training model (Tinker's "training run"): ``{session_id}:train:{model_seq_id}``, the id
  the SDK derives itself for ``create_training_client_from_state``;
- sampling session: ``{session_id}:sample:{sampling_session_seq_id}``.

A checkpoint of training run R named N is ``tinker://R/weights/N`` (``save_state``),
``tinker://R/sampler_weights/N`` (``save_weights_for_sampler``) or
``tinker://R/external_weights/N`` (``save_weights_external``). In the owner's checkpoint
store it is named ``{session_id}.{model_seq_id}.{kind}.{N}`` (kind ``state``, ``sampler``
or ``external``): one safe path component, so the store's name rules (letters, digits,
``.``, ``_``, ``-``; at most 128 characters) apply to N too.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Literal

from trainer_server.frontends.tinker.errors import BadRequest

__all__ = [
    "CheckpointKind",
    "TinkerPath",
    "checkpoint_id",
    "model_id",
    "new_session_id",
    "parse_model_id",
    "sampler_id",
]

CheckpointKind = Literal["state", "sampler", "external"]
_SEGMENT: dict[str, CheckpointKind] = {"weights": "state", "sampler_weights": "sampler", "external_weights": "external"}
_KIND_SEGMENT: dict[CheckpointKind, str] = {v: k for k, v in _SEGMENT.items()}
_SESSION = re.compile(r"^sess-[0-9a-f]{12}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MAX_STORE_NAME = 128


def new_session_id() -> str:
    """A fresh session id."""
    return f"sess-{secrets.token_hex(6)}"


def model_id(session_id: str, model_seq_id: int) -> str:
    """The training model id of a session's ``model_seq_id``-th model."""
    return f"{session_id}:train:{model_seq_id}"


def sampler_id(session_id: str, sampling_session_seq_id: int) -> str:
    """The id of a session's sampling session."""
    return f"{session_id}:sample:{sampling_session_seq_id}"


def parse_model_id(text: str) -> tuple[str, int]:
    """Session id and model seq id of a training model id.

    Raises:
        BadRequest: Not an id this server hands out.
    """
    session, sep, seq = text.rpartition(":train:")
    if not sep or not _SESSION.match(session) or not seq.isdigit():
        raise BadRequest(f"{text!r} is not a training run id of this server ({{session_id}}:train:{{n}})")
    return session, int(seq)


def checkpoint_id(kind: CheckpointKind, name: str) -> str:
    """Tinker's checkpoint id within a run: ``weights/N``, ``sampler_weights/N`` ..."""
    return f"{_KIND_SEGMENT[kind]}/{name}"


@dataclass(frozen=True)
class TinkerPath:
    """A checkpoint as Tinker names it.

    Attributes:
        run_id: The training model id that saved it.
        kind: ``state``, ``sampler`` or ``external``.
        name: The name given at save time.
    """

    run_id: str
    kind: CheckpointKind
    name: str

    @classmethod
    def parse(cls, path: str) -> TinkerPath:
        """Parse ``tinker://RUN/SEGMENT/NAME``.

        Raises:
            BadRequest: Not such a path, or a run id or name this server cannot hold.
        """
        if not path.startswith("tinker://"):
            raise BadRequest(f"{path!r} is not a tinker:// path (tinker://<run_id>/weights/<name>)")
        parts = path[len("tinker://") :].split("/")
        if len(parts) != 3 or parts[1] not in _SEGMENT:
            raise BadRequest(
                f"{path!r} is not a checkpoint path: expected tinker://<run_id>/(weights|sampler_weights|"
                "external_weights)/<name>"
            )
        parse_model_id(parts[0])
        return cls.of(parts[0], _SEGMENT[parts[1]], parts[2])

    @classmethod
    def of(cls, run_id: str, kind: CheckpointKind, name: str) -> TinkerPath:
        """A path for a new checkpoint, with its name checked.

        Raises:
            BadRequest: A name the checkpoint store cannot hold.
        """
        path = cls(run_id, kind, name)
        if not _NAME.match(name) or len(path.store_name) > _MAX_STORE_NAME:
            raise BadRequest(
                f"checkpoint name {name!r} must start with a letter or digit, use only letters, digits, "
                f"'.', '_', '-', and keep the stored name {path.store_name!r} within {_MAX_STORE_NAME} characters"
            )
        return path

    @classmethod
    def from_store_name(cls, store_name: str) -> TinkerPath | None:
        """The Tinker path of a checkpoint in the store, or None if Tinker did not make it."""
        parts = store_name.split(".", 3)
        if len(parts) != 4 or not _SESSION.match(parts[0]) or not parts[1].isdigit():
            return None
        kind = parts[2]
        if kind not in _KIND_SEGMENT:
            return None
        return cls(model_id(parts[0], int(parts[1])), kind, parts[3])  # type: ignore[arg-type]

    @property
    def store_name(self) -> str:
        """The checkpoint's name in the owner's store."""
        session, seq = self.run_id.rsplit(":train:", 1)
        return f"{session}.{seq}.{self.kind}.{self.name}"

    @property
    def checkpoint_id(self) -> str:
        """Tinker's id within the run (``weights/N`` ...)."""
        return checkpoint_id(self.kind, self.name)

    def __str__(self) -> str:
        return f"tinker://{self.run_id}/{self.checkpoint_id}"
