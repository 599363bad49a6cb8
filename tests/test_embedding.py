"""Embedding: the server and its client inside another asyncio program, and the CLI.

The server is a plain asyncio object (``async with TrainerServer(...)``, or ``start()`` /
``stop()``), so it shares one event loop with whatever else the program serves; here an
unrelated TCP service calls the training API from its own connection handler. The CLI
(``python -m trainer_server``) prints a ready line, serves a sync client from another
process, and stops gracefully on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import LLAMA, QWEN, make_config

import trainer_client
from trainer_client import AdamParams, AsyncServiceClient, ClientConfig, Datum, ServiceClient
from trainer_server import TrainerServer

FAIL_FAST = ClientConfig(retry_attempts=1, unary_timeout_s=2, timeout_s=60)
DATA = [Datum.from_tokens([3, 4, 5, 6], [7, 8, 9]), Datum.from_tokens([10, 11], [12, 13, 14, 15])]


def weighted_nll(data: Sequence[Datum], logprobs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """A custom loss: the weighted negative log-likelihood of the response tokens."""
    total = sum(-(lp * d.weights).sum() for d, lp in zip(data, logprobs, strict=True))
    assert isinstance(total, torch.Tensor)
    return total, {"tokens": float(sum(len(lp) for lp in logprobs))}


# ---- one event loop: a TCP service whose handler trains -----------------------------------


async def test_server_and_client_inside_another_asyncio_service(llama_dir: Path, qwen_dir: Path) -> None:
    loop = asyncio.get_running_loop()
    handler_loops: list[asyncio.AbstractEventLoop] = []
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    async with TrainerServer(make_config(llama_dir, qwen_dir)) as server:

        async def train(model: str) -> dict[str, Any]:
            async with AsyncServiceClient(server.address) as service:
                info = await service.get_server_info()
                tc = await service.create_training_client(model, lora_rank=4, seed=1)
                fb = tc.forward_backward(DATA)  # both submitted before either is awaited
                op = tc.optim_step(AdamParams(learning_rate=1e-3))
                out, step = await fb, await op
                await tc.close()
            return {
                "echo": model,
                "models": sorted(m.name for m in info.models),
                "loss": out.loss,
                "num_tokens": out.num_tokens,
                "step": step.step,
                "grad_norm": step.grad_norm,
            }

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            handler_loops.append(asyncio.get_running_loop())
            model = (await reader.readline()).decode().strip()
            try:
                reply = await train(model)
            except Exception as exc:  # the peer gets the error instead of a hung socket
                reply = {"error": repr(exc)}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        async def ask(port: int, model: str) -> dict[str, Any]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(model.encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 120)
            writer.close()
            await writer.wait_closed()
            reply: dict[str, Any] = json.loads(line)
            return reply

        tick_task = asyncio.create_task(ticker())
        echo = await asyncio.start_server(handle, "127.0.0.1", 0)
        try:
            async with echo:
                port = echo.sockets[0].getsockname()[1]
                replies = await asyncio.gather(ask(port, LLAMA), ask(port, QWEN))  # two connections at once
        finally:
            tick_task.cancel()

        for reply, model in zip(replies, (LLAMA, QWEN), strict=True):
            assert "error" not in reply, reply["error"]
            assert reply["echo"] == model
            assert reply["models"] == sorted([LLAMA, QWEN])
            assert reply["step"] == 1
            assert reply["grad_norm"] > 0
            assert reply["loss"] > 0
            assert reply["num_tokens"] == sum(len(d) for d in DATA)
        assert handler_loops == [loop, loop]  # everything ran on the test's one loop
        assert ticks > 0  # ... and the loop kept running other tasks meanwhile

        address = server.address
        await server.stop()

    async with AsyncServiceClient(address, config=FAIL_FAST) as late:
        with pytest.raises(trainer_client.UnavailableError) as info:
            await late.get_server_info()
    assert info.value.code.name == "UNAVAILABLE"
    assert info.value.method == "GetServerInfo"


async def test_explicit_start_stop_and_port_zero(llama_dir: Path, qwen_dir: Path) -> None:
    server = TrainerServer(make_config(llama_dir, qwen_dir))
    assert server.config.port == 0
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.port
    await server.start()
    try:
        assert 0 < server.port < 65536
        assert server.address == f"127.0.0.1:{server.port}"
        with pytest.raises(RuntimeError, match="already started"):
            await server.start()
        async with AsyncServiceClient(server.address) as service:
            info = await service.get_server_info()
            assert {m.name for m in info.models} == {LLAMA, QWEN}
            assert info.limits["max_tokens_per_call"] > 0
    finally:
        await server.stop(grace_s=0)
    await server.stop()  # a second stop is a no-op
    async with AsyncServiceClient(server.address, config=FAIL_FAST) as service:
        with pytest.raises(trainer_client.UnavailableError):
            await service.get_server_info()


async def test_two_servers_on_one_loop_get_distinct_ports(llama_dir: Path, qwen_dir: Path) -> None:
    async with (
        TrainerServer(make_config(llama_dir, qwen_dir)) as a,
        TrainerServer(make_config(llama_dir, qwen_dir)) as b,
    ):
        assert a.port != b.port
        async with AsyncServiceClient(a.address) as ca, AsyncServiceClient(b.address) as cb:
            ia, ib = await asyncio.gather(ca.get_server_info(), cb.get_server_info())
        assert ia.version == ib.version


# ---- the CLI in a subprocess, driven by the sync client --------------------------------


def _read_ready_line(proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    """Wait for the ``trainer-server ready on HOST:PORT`` line; return ``HOST:PORT``."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        raw = proc.stdout.readline()
        if not raw:  # the process exited
            break
        line = raw.decode().strip()
        seen.append(line)
        match = re.fullmatch(r"trainer-server ready on (\S+:\d+)", line)
        if match:
            return match.group(1)
    raise AssertionError(f"no ready line within {timeout_s}s (exit code {proc.poll()}); stdout: {seen}")


def test_cli_serves_a_sync_client_and_stops_gracefully_on_sigterm(llama_dir: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trainer_server", "--model", f"tiny={llama_dir}", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        address = _read_ready_line(proc, timeout_s=180)
        assert re.fullmatch(r"127\.0\.0\.1:\d+", address)
        assert not address.endswith(":0")

        with ServiceClient(address, config=ClientConfig(unary_timeout_s=30, timeout_s=60)) as service:
            info = service.get_server_info()
            assert [m.name for m in info.models] == ["tiny"]
            tc = service.create_training_client("tiny", lora_rank=4)
            fb = tc.forward_backward_custom(DATA, weighted_nll)
            op = tc.optim_step(AdamParams(learning_rate=1e-3))
            out = fb.result(timeout=60)
            step = op.result(timeout=60)
            assert out.loss > 0
            assert out.num_tokens == sum(len(d) for d in DATA)
            assert step.step == 1
            assert step.grad_norm > 0

            # SIGTERM while a call is in flight: the call gets the grace period and completes.
            started = threading.Event()

            def slow_loss(data: Sequence[Datum], logprobs: Sequence[torch.Tensor]) -> Any:
                started.set()
                time.sleep(1.0)
                return weighted_nll(data, logprobs)

            inflight = tc.forward_backward_custom(DATA, slow_loss)
            assert started.wait(60), "the loss function never ran"
            proc.send_signal(signal.SIGTERM)
            assert inflight.result(timeout=30).num_tokens == out.num_tokens

        try:
            rc = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"trainer-server did not exit within 15 s of SIGTERM; log:\n{log_path.read_text()[-3000:]}")
        assert rc == 0, log_path.read_text()[-3000:]
        log_text = log_path.read_text()
        assert "shutting down" in log_text
        assert "Traceback" not in log_text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
