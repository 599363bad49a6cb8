"""Keep freed memory for reuse: glibc's allocator set for streaming MiB-sized tensors.

Why: every streamed tensor allocates a few buffers the size of a chunk (1 MiB by default) at
each end: the encoded chunk message, gRPC's copy of it, the received message, the assembled
tensor. With glibc's defaults, buffers over 128 KiB are ``mmap``-ed and each free hands
memory back to the kernel (its thresholds only rise after a buffer of several MiB has been
freed), so a process moving 1 MiB tensors page-faults its buffers back in at every message.
Measured on loopback (``/tmp`` experiment recorded in docs/PERFORMANCE.md, 2026-11-29): a
1 MiB round trip through the service's stream took ~15 ms on a fresh process, and ~4.5 ms
once the thresholds were raised (by a 16 MiB transfer, or by this module).

What: ``mallopt(M_MMAP_THRESHOLD, 32 MiB)`` (serve buffers up to 32 MiB from the heap) and
``mallopt(M_TRIM_THRESHOLD, 128 MiB)`` (keep up to 128 MiB of freed heap before returning it).
The cost is memory the process keeps instead of returning: at most the trim threshold per
glibc arena. The setting is process-wide, so servers and clients apply it only when their
config asks (``tune_allocator``, on by default) and never override an explicit
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment setting. Elsewhere than
glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

__all__ = ["MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES", "tune_allocator"]

log = logging.getLogger("trainer_proto.alloc")

MMAP_THRESHOLD_BYTES = 32 << 20
"""Buffers up to this size come from the heap (glibc's maximum for this setting on 64-bit)."""
TRIM_THRESHOLD_BYTES = 128 << 20
"""Freed heap memory kept for reuse before it is returned to the kernel."""

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


@functools.cache
def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds, once per process (later calls return the first answer).

    Returns:
        True when this process's allocator is tuned; False where it is left alone: not
        glibc, or the environment sets the thresholds.
    """
    if any(name in os.environ for name in _ENV):
        log.debug("allocator left alone: %s set in the environment", " / ".join(_ENV))
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # not glibc
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    log.debug("allocator thresholds: mmap %d, trim %d (applied: %s)", MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES, ok)
    return ok
