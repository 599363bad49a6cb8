"""The allocator setting (trainer_proto.alloc): buffers of streamed-chunk size are reused, not re-mapped.

Each case runs in a fresh interpreter, since the setting is process-wide and applied once.
glibc's ``mallinfo2`` tells where a buffer came from: ``hblkhd`` counts bytes in ``mmap``-ed
blocks (returned to the kernel on free), ``fordblks`` free heap bytes kept for reuse.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

if not hasattr(ctypes.CDLL(None), "mallinfo2"):  # pragma: no cover - not glibc >= 2.33
    pytest.skip("needs glibc's mallinfo2", allow_module_level=True)

PROBE = r"""
import ctypes, json, sys
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
how = sys.argv[1]
tuned = None
if how == "tune":
    from trainer_proto import alloc
    tuned = alloc.tune_allocator()
    assert alloc.tune_allocator() is tuned  # once per process
elif how in ("client", "client-off"):
    from trainer_client import AsyncServiceClient, ClientConfig
    AsyncServiceClient("127.0.0.1:1", config=ClientConfig(tune_allocator=how == "client"))
elif how in ("server", "server-off"):
    import asyncio
    from trainer_server import ServerConfig, TrainerServer
    config = ServerConfig(port=0, device="cpu", tune_allocator=how == "server", models={"m": "/nonexistent"})
    server = TrainerServer(config)
    try:
        asyncio.run(server.start())
    except Exception:
        pass  # the model does not exist; the allocator is set before anything loads
mapped = libc.mallinfo2().hblkhd
buf = bytearray(4 << 20)  # a 4 MiB chunk-sized buffer
mapped_during = libc.mallinfo2().hblkhd - mapped
del buf
print(json.dumps({"tuned": tuned, "mapped": mapped_during, "kept": libc.mallinfo2().fordblks}))
"""

MIB = 1 << 20


def probe(how: str, **env: str) -> dict[str, int | bool | None]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    cmd = [sys.executable, "-c", PROBE, how]
    out = subprocess.run(cmd, env={**clean, **env}, capture_output=True, text=True, timeout=120, check=True).stdout
    result: dict[str, int | bool | None] = json.loads(out.strip().splitlines()[-1])
    return result


def test_default_allocator_maps_and_returns_chunk_sized_buffers() -> None:
    got = probe("none")
    assert got["mapped"] >= 4 * MIB  # mmap-ed: page-faulted in on every use, unmapped on free


def test_tuned_allocator_serves_them_from_the_heap_and_keeps_them() -> None:
    got = probe("tune")
    assert got["tuned"] is True
    assert got["mapped"] == 0
    assert got["kept"] >= 4 * MIB  # freed, kept for the next message


def test_an_explicit_environment_setting_is_left_alone() -> None:
    got = probe("tune", MALLOC_TRIM_THRESHOLD_="131072")
    assert got["tuned"] is False
    assert got["mapped"] >= 4 * MIB


@pytest.mark.parametrize("side", ["client", "server"])
def test_client_and_server_tune_unless_told_not_to(side: str) -> None:
    assert probe(side)["mapped"] == 0
    assert probe(f"{side}-off")["mapped"] >= 4 * MIB
