"""The checkpoint store: atomic, validated, listable checkpoints under one root directory.

Layout::

    ROOT/
      NAME/                  a committed checkpoint
        manifest.json        written last: kind, step, seq, files (size, sha256), base ...
        ...files...
      .tmp-NAME-XXXX/        a save in progress (removed at startup: never visible)

Invariants:
- A checkpoint directory is visible under its name only once it is complete: files are
  written into a temp directory and fsynced, the manifest is written and fsynced last,
  then the directory is renamed into place and the root fsynced. A crash at any point
  leaves either no checkpoint of that name or a whole one; earlier ones are untouched.
- A directory without a valid manifest is never listed or loaded.
- Names are a single path component of safe characters; nothing escapes the root.
- Files are verified against the manifest's sha256 when loaded for a resume or a delta.

Fault injection for crash tests: when the environment variable ``TRAINER_FAULT_AT`` names
a phase (see :data:`SAVE_PHASES`), the process kills itself with SIGKILL on reaching it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer_ckpt.delta import fsync_dir
from trainer_proto.checksums import sha256_file
from trainer_server.core.errors import ErrorCode, ServiceError, echo, invalid_argument, not_found

__all__ = [
    "MANIFEST",
    "SAVE_PHASES",
    "CheckpointStore",
    "FileEntry",
    "Manifest",
    "validate_name",
]

log = logging.getLogger("trainer_server.checkpoints")

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
SAVE_PHASES = ("files_written", "files_synced", "manifest_written", "renamed")
"""Points of a save where ``TRAINER_FAULT_AT`` can kill the process (crash tests)."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # matched whole: fullmatch, no "$" before a newline


def validate_name(name: str) -> str:
    """Check a checkpoint name: one safe path component.

    Raises:
        ServiceError: INVALID_ARGUMENT naming what is wrong.
    """
    if not name:
        raise invalid_argument("checkpoint name is required")
    if "\x00" in name:
        raise invalid_argument("checkpoint name contains a NUL byte")
    if "/" in name or "\\" in name or name in (".", "..") or ".." in name:
        raise invalid_argument(f"checkpoint name {echo(name)} must be a single path component without '..'")
    if not _NAME.fullmatch(name):
        raise invalid_argument(
            f"checkpoint name {echo(name)} must start with a letter or digit and use only letters, digits, "
            "'.', '_', '-' (at most 128 characters)"
        )
    return name


def _fsync_file(path: Path) -> None:
    with path.open("rb+") as f:
        os.fsync(f.fileno())


def _fault(phase: str) -> None:
    if os.environ.get("TRAINER_FAULT_AT") == phase:
        log.warning("fault injection: killing the process at save phase %r", phase)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What a checkpoint is; written last, as ``manifest.json``."""

    name: str
    kind: str  # "base", "delta", "adapter", "state"
    base_model: str
    session_id: str
    step: int
    seq: int
    dtype: str
    created_at: float
    files: list[FileEntry]
    base_checkpoint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    @property
    def total_bytes(self) -> int:
        """Bytes of all files."""
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry:
        """The entry of one file.

        Raises:
            ServiceError: NOT_FOUND when the checkpoint has no such file.
        """
        for f in self.files:
            if f.path == path:
                return f
        raise not_found(f"checkpoint {self.name!r} has no file {echo(path)}; files: {[f.path for f in self.files]}")

    def to_json(self) -> str:
        """Serialise."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse; raises ValueError on anything malformed."""
        data = json.loads(text)
        if data.get("version") != MANIFEST_VERSION:
            raise ValueError(f"unsupported manifest version {data.get('version')!r}")
        data["files"] = [FileEntry(**f) for f in data["files"]]
        return cls(**data)


class CheckpointStore:
    """Checkpoints under ``root``; see the module docstring for the invariants."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._clean_temp_dirs()

    def _clean_temp_dirs(self) -> None:
        for d in self.root.glob(".tmp-*"):
            log.info("removing unfinished checkpoint save %s", d.name)
            shutil.rmtree(d, ignore_errors=True)

    def path(self, name: str) -> Path:
        """Directory of a checkpoint name (validated, inside the root)."""
        path = (self.root / validate_name(name)).resolve()
        if path.parent != self.root.resolve():
            raise invalid_argument(f"checkpoint name {echo(name)} escapes the checkpoint root")
        return path

    def exists(self, name: str) -> bool:
        """Whether a committed checkpoint has this name."""
        return (self.path(name) / MANIFEST).is_file()

    def manifest(self, name: str) -> Manifest:
        """The manifest of a committed checkpoint.

        Raises:
            ServiceError: NOT_FOUND when there is none; DATA_LOSS when it is unreadable.
        """
        path = self.path(name) / MANIFEST
        if not path.is_file():
            raise not_found(f"checkpoint {name!r} does not exist")
        try:
            return Manifest.from_json(path.read_text())
        except (ValueError, TypeError, KeyError) as exc:
            raise ServiceError(ErrorCode.DATA_LOSS, f"checkpoint {name!r} has a corrupt manifest: {exc}") from None

    def all(self) -> list[Manifest]:
        """Committed checkpoints, oldest first."""
        found = []
        for d in sorted(self.root.iterdir()):
            if d.name.startswith(".") or not (d / MANIFEST).is_file():
                continue
            try:
                found.append(Manifest.from_json((d / MANIFEST).read_text()))
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("ignoring checkpoint %s with a corrupt manifest: %s", d.name, exc)
        return sorted(found, key=lambda m: (m.created_at, m.name))

    def verify(self, name: str) -> Manifest:
        """Check every file of a checkpoint against its manifest.

        Raises:
            ServiceError: DATA_LOSS naming the first file that is missing or differs.
        """
        manifest = self.manifest(name)
        d = self.path(name)
        for f in manifest.files:
            p = d / f.path
            if not p.is_file() or p.stat().st_size != f.size or sha256_file(p) != f.sha256:
                raise ServiceError(ErrorCode.DATA_LOSS, f"checkpoint {name!r}: file {f.path} is missing or corrupt")
        return manifest

    def delete(self, name: str) -> None:
        """Remove a committed checkpoint (renamed away first, so it vanishes atomically)."""
        d = self.path(name)
        if not (d / MANIFEST).is_file():
            raise not_found(f"checkpoint {name!r} does not exist")
        trash = Path(tempfile.mkdtemp(prefix=f".tmp-del-{name}-", dir=self.root))
        os.replace(d, trash / name)
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    @contextmanager
    def writing(self, name: str) -> Iterator[Path]:
        """A temp directory to write a checkpoint's files into (commit with :meth:`commit`).

        Raises:
            ServiceError: ALREADY_EXISTS when the name is taken.
        """
        if self.exists(name):
            raise ServiceError(ErrorCode.ALREADY_EXISTS, f"checkpoint {name!r} already exists; delete it first")
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.root))
        try:
            yield tmp
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def commit(self, tmp: Path, make_manifest: Callable[[list[FileEntry]], Manifest]) -> Manifest:
        """Fsync the files in ``tmp``, write the manifest last, rename into place."""
        files = []
        for p in sorted(q for q in tmp.rglob("*") if q.is_file()):
            files.append(FileEntry(path=str(p.relative_to(tmp)), size=p.stat().st_size, sha256=sha256_file(p)))
        _fault("files_written")
        for p in tmp.rglob("*"):
            if p.is_file():
                _fsync_file(p)
        for d in sorted({p.parent for p in tmp.rglob("*")} | {tmp}, key=lambda x: len(x.parts), reverse=True):
            fsync_dir(d)
        _fault("files_synced")
        manifest = make_manifest(files)
        manifest_path = tmp / MANIFEST
        manifest_path.write_text(manifest.to_json())
        _fsync_file(manifest_path)
        fsync_dir(tmp)
        _fault("manifest_written")
        final = self.path(manifest.name)
        if final.exists():
            raise ServiceError(
                ErrorCode.ALREADY_EXISTS, f"checkpoint {manifest.name!r} already exists; delete it first"
            )
        os.rename(tmp, final)
        fsync_dir(self.root)
        _fault("renamed")
        log.info(
            "checkpoint %r committed (%s, %d files, %d bytes)",
            manifest.name,
            manifest.kind,
            len(files),
            manifest.total_bytes,
        )
        return manifest


def now() -> float:
    """Wall-clock time for manifests."""
    return time.time()
