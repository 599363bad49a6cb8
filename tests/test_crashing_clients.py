"""Clients that crash, and a server that restarts: `trainer-server` processes driven as users would.

- Thirty client processes SIGKILLed at random points (while creating their session, while
  uploading a gradient, between calls, during a step): once their leases run out the server
  holds no session and no graph, and its memory is back within a stated bound.
- SIGTERM saves the open sessions; the next start restores them; the client reattaches by id
  and ends bit-identical to a run that was never interrupted.
"""

from __future__ import annotations

import asyncio
import os
import queue
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import torch
from conftest import LLAMA

from trainer_client import AdamParams, AsyncServiceClient, ClientConfig, Datum

READY = re.compile(r"trainer-server ready on (\S+)")
RSS_BOUND_BYTES = 150 << 20
"""Server RSS after the crashed clients' sessions expired, over its RSS after one warm-up session."""


@contextmanager
def server_process(
    llama_dir: Path, checkpoint_dir: Path, log: Path, *extra: str
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``python -m trainer_server`` on port 0; stopped (SIGKILL if need be) on every way out."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(torch.get_num_threads())
    with log.open("a") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trainer_server", "--model", f"{LLAMA}={llama_dir}", "--port", "0",
             "--checkpoint-dir", str(checkpoint_dir), *extra],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env,
        )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline = time.monotonic() + 240
        address = None
        while address is None:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if not line:
                pytest.fail(f"the server exited before it was ready:\n{log.read_text()[-3000:]}")
            if m := READY.search(line):
                address = m.group(1)
        yield address, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


CLIENT = textwrap.dedent(
    """
    import asyncio, sys, torch
    from trainer_client import AdamParams, AsyncServiceClient, Datum

    def loss_fn(data, logprobs):
        loss = sum(((lp + 1.0) ** 2).sum() for lp in logprobs)
        return loss, {}

    async def main(address):
        gen = torch.Generator().manual_seed(0)
        data = [Datum.from_sequence(torch.randint(3, 60, (48,), generator=gen)) for _ in range(8)]
        async with AsyncServiceClient(address) as service:
            tc = await service.create_training_client("tiny-llama", lora_rank=8)
            print("ready", flush=True)
            while True:
                fb = tc.forward_backward_custom(data, loss_fn)
                op = tc.optim_step(AdamParams(learning_rate=1e-3))
                await fb
                await op

    asyncio.run(main(sys.argv[1]))
    """
)


def run_client_until_killed(address: str, rng: random.Random) -> str:
    """Start a client process and SIGKILL it at a random point; returns where it was (roughly)."""
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, address], stdout=subprocess.PIPE, text=True)
    try:
        if rng.random() < 0.2:  # while it imports, connects or creates its session
            time.sleep(rng.uniform(0.5, 4.0))
            where = "before or during CreateSession"
        else:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 1.5))  # between calls, mid-upload, mid-step
            where = "training"
    finally:
        proc.kill()
        proc.wait(30)
    return where


async def test_thirty_clients_killed_at_random_points_leak_nothing(llama_dir: Path, tmp_path: Path) -> None:
    ttl = 3.0
    with server_process(llama_dir, tmp_path / "ck", tmp_path / "server.log", "--session-ttl", str(ttl)) as (
        address,
        proc,
    ):
        rss = psutil.Process(proc.pid)
        async with AsyncServiceClient(address) as service:
            # Warm-up: a batch of five concurrent clients' whole lives (as the trials run them), so the
            # baseline includes the buffers and allocator pools that five at once need.
            await asyncio.gather(
                *(asyncio.to_thread(run_client_until_killed, address, random.Random(-i)) for i in range(1, 6))
            )
            await wait_for_no_sessions(service, ttl)
            baseline = rss.memory_info().rss
            rng = random.Random(1234)
            seeds = [rng.randrange(1 << 30) for _ in range(30)]
            places: list[str] = []
            for batch in range(0, 30, 5):  # five at a time: crashes overlap
                places += await asyncio.gather(
                    *(
                        asyncio.to_thread(run_client_until_killed, address, random.Random(s))
                        for s in seeds[batch : batch + 5]
                    )
                )
            assert places.count("training") >= 15, places
            info = await wait_for_no_sessions(service, ttl)
            assert info.held_graphs == 0 and info.held_graph_bytes == 0
            grown = rss.memory_info().rss - baseline
            assert grown < RSS_BOUND_BYTES, f"server RSS grew {grown / 2**20:.0f} MiB over 30 crashed clients"
            # And it still serves.
            tc = await service.create_training_client(LLAMA, lora_rank=4)
            await tc.forward([Datum.from_sequence([3, 4, 5, 6])])
            await tc.close()


async def wait_for_no_sessions(service: AsyncServiceClient, ttl: float) -> object:
    deadline = time.monotonic() + ttl * 4 + 30
    while True:
        info = await service.get_server_info()
        if info.open_sessions == 0:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"{info.open_sessions} sessions still open long after their lease ended")
        await asyncio.sleep(0.25)


async def test_sigterm_restart_and_reattach_equal_an_uninterrupted_run(llama_dir: Path, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(11)
    data = [Datum.from_sequence(torch.randint(3, 60, (16,), generator=gen)) for _ in range(3)]
    adam = AdamParams(learning_rate=5e-3)

    async def steps(tc: object, n: int) -> list[float]:
        losses = []
        for _ in range(n):
            out = await tc.forward_backward(data, "cross_entropy")  # type: ignore[attr-defined]
            await tc.optim_step(adam)  # type: ignore[attr-defined]
            losses.append(out.loss)
        return losses

    config = ClientConfig(heartbeat_interval_s=0)
    with server_process(llama_dir, tmp_path / "ref", tmp_path / "ref.log") as (address, _):
        async with AsyncServiceClient(address, config=config) as service:
            tc = await service.create_training_client(LLAMA, lora_rank=None, seed=2)
            expected = await steps(tc, 5)
            expected_logprobs = (await tc.forward(data)).logprobs

    checkpoints = tmp_path / "ck"
    with server_process(llama_dir, checkpoints, tmp_path / "first.log") as (address, proc):
        async with AsyncServiceClient(address, config=config) as service:
            tc = await service.create_training_client(LLAMA, lora_rank=None, seed=2)
            losses = await steps(tc, 3)
            session_id = tc.session_id
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    log = (tmp_path / "first.log").read_text()
    assert "saved 1 open sessions" in log, log[-2000:]

    with server_process(llama_dir, checkpoints, tmp_path / "second.log") as (address, _):
        async with AsyncServiceClient(address, config=config) as service:
            tc = await service.attach_training_client(session_id)
            losses += await steps(tc, 2)
            logprobs = (await tc.forward(data)).logprobs
    assert losses == expected
    assert all(torch.equal(a, b) for a, b in zip(logprobs, expected_logprobs, strict=True))
