"""``trainer-client``: info, list, download (resumable, verified) and delete from the shell."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path

from conftest import LLAMA, make_config

from trainer_client import AsyncServiceClient, Datum
from trainer_server import TrainerServer


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "trainer_client", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:  # a timeout must not leave the CLI running
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_lists_downloads_and_deletes(llama_dir: Path, qwen_dir: Path, tmp_path: Path) -> None:
    async with TrainerServer(make_config(llama_dir, qwen_dir, checkpoint_dir=tmp_path / "ckpt")) as server:
        async with AsyncServiceClient(server.address) as service:
            tc = await service.create_training_client(LLAMA, lora_rank=4)
            await tc.forward_backward([Datum.from_tokens([5, 6, 7], [8, 9])])
            await tc.optim_step()
            info = await tc.save_checkpoint("ck1", "base", dtype="float32")

        code, out, _ = await run_cli("--server", server.address, "info")
        assert code == 0 and LLAMA in [m["name"] for m in json.loads(out)["models"]]

        code, out, _ = await run_cli("--server", server.address, "checkpoints")
        header, row = out.splitlines()
        assert code == 0 and header.split() == ["NAME", "KIND", "STEP", "SIZE", "DTYPE", "BASE", "CREATED"]
        assert row.split()[:6] == ["ck1", "base", "1", *f"{info.total_bytes / 1024:.1f} KiB".split(), "float32"]

        dest = tmp_path / "dl"
        code, out, _ = await run_cli("--server", server.address, "download", "ck1", str(dest), "--quiet")
        assert code == 0, out
        for f in info.files:
            assert hashlib.sha256((dest / f.path).read_bytes()).hexdigest() == f.sha256
        assert (dest / "manifest.json").is_file()

        code, _, err = await run_cli("--server", server.address, "download", "nope", str(tmp_path / "x"), "--quiet")
        assert code == 1 and "NOT_FOUND" in err

        code, out, _ = await run_cli("--server", server.address, "delete", "ck1")
        assert code == 0 and "deleted ck1" in out
        code, out, _ = await run_cli("--server", server.address, "checkpoints")
        assert code == 0 and out == "no checkpoints\n"


def test_cli_start_imports_no_torch() -> None:
    """The shell commands never touch a tensor, so nothing on their path may import torch (seconds)."""
    code = (
        "import sys, time\n"
        "start = time.perf_counter()\n"
        "import trainer_client.__main__ as cli\n"
        "cli._parser().parse_args(['checkpoints'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"the CLI imports heavy modules: {result.stdout}"


async def test_cli_names_the_address_when_no_server_listens() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, _, err = await run_cli("--server", f"127.0.0.1:{port}", "checkpoints")
    assert code == 1
    assert f"no trainer-server at 127.0.0.1:{port} (is it running?)" in err
    code, _, err = await run_cli("--server", "ftp://127.0.0.1:1", "info")
    assert code == 1 and "expected HOST, HOST:PORT" in err


async def test_cli_lists_and_closes_sessions_of_its_key(llama_dir: Path, qwen_dir: Path) -> None:
    config = make_config(llama_dir, qwen_dir, api_keys=frozenset({"key-a", "key-b"}))
    async with TrainerServer(config) as server, AsyncServiceClient(server.address, api_key="key-a") as service:
        tc = await service.create_training_client(LLAMA, lora_rank=4)
        await tc.forward_backward([Datum.from_tokens([5, 6, 7], [8, 9])])

        code, out, _ = await run_cli("--server", server.address, "--api-key", "key-a", "sessions")
        header, row = out.splitlines()
        assert code == 0 and header.split()[:4] == ["SESSION", "MODEL", "MODE", "STEP"]
        assert row.split()[:5] == [tc.session_id, LLAMA, "lora", "r4", "0"]

        code, out, _ = await run_cli("--server", server.address, "--api-key", "key-b", "sessions")
        assert code == 0 and out == "no open sessions\n"  # another key's sessions are not shown
        code, _, err = await run_cli(
            "--server", server.address, "--api-key", "key-b", "sessions", "close", tc.session_id
        )
        assert code == 1 and "NOT_FOUND" in err

        code, out, _ = await run_cli(
            "--server", server.address, "--api-key", "key-a", "sessions", "close", tc.session_id
        )
        assert code == 0 and f"closed {tc.session_id}" in out
        assert await service.list_sessions() == []
