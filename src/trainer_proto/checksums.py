"""File checksums as checkpoint manifests carry them (``CheckpointFile.sha256``).

The server computes them when it commits a checkpoint and when it verifies one; the client
when it checks a download. One definition, so both ends hash the same way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["sha256_file"]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
