"""One server per port: a second server on a port in use refuses to start, and says why.

gRPC sets ``SO_REUSEPORT`` by default, so a second server used to start and listen on the
same port: clients landed on either at random and their sessions seemed to vanish.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from trainer_client import AsyncServiceClient, Datum
from trainer_server import ServerConfig, TrainerServer

START_TIMEOUT_S = 120.0


def datum() -> Datum:
    return Datum.from_tokens([10, 11, 12], [13, 14, 15])


async def test_second_embedded_server_refuses_a_taken_port(llama_dir: Path) -> None:
    config = ServerConfig(models={"m": llama_dir}, port=0, device="cpu")
    async with TrainerServer(config) as first, AsyncServiceClient(first.address) as service:
        tc = await service.create_training_client("m", lora_rank=4)
        second = TrainerServer(dataclasses.replace(config, port=first.port))
        with pytest.raises(
            OSError, match=rf"port {first.port} is already in use on 127\.0\.0\.1 \(another trainer-server\?\)"
        ):
            await second.start()
        await second.stop()  # nothing to stop: a no-op
        for _ in range(5):  # new connections all reach the first server: the session is always there
            async with AsyncServiceClient(first.address) as fresh:
                info = await fresh.get_server_info()
            assert [m.name for m in info.models] == ["m"]
            out = await tc.forward([datum()])
            assert bool(torch.isfinite(out.logprobs[0]).all())


async def test_cli_exits_with_a_clear_message_on_a_taken_port(llama_dir: Path) -> None:
    config = ServerConfig(models={"m": llama_dir}, port=0, device="cpu")
    async with TrainerServer(config) as first:
        cmd = [sys.executable, "-m", "trainer_server", "--model", f"m={llama_dir}"]
        cmd += ["--host", "127.0.0.1", "--port", str(first.port), "--device", "cpu"]
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            out_b, err_b = await asyncio.wait_for(proc.communicate(), START_TIMEOUT_S)
        finally:  # a server that did start is stopped on every path (timeout and failure included)
            if proc.returncode is None:
                proc.kill()
                await proc.communicate()
        out, err = out_b.decode(), err_b.decode()
        assert proc.returncode == 1, (out, err)
        assert f"trainer-server: cannot start: port {first.port} is already in use on 127.0.0.1" in err, err
        assert "Traceback" not in err
        assert "ready" not in out
        async with AsyncServiceClient(first.address) as service:
            assert [m.name for m in (await service.get_server_info()).models] == ["m"]
