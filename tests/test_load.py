"""Load: 16 concurrent clients, each with its own LoRA session, training on loopback.

Each client pipelines forward_backward + optim_step for a bounded time. Zero errors are
allowed; the process's RSS (server and clients share it, the server runs in-process) must
not grow between the first and last third of the run; every session's sequencer and the
held-graph set are empty afterwards. Steps/s, step latency and RSS figures are printed.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time

import psutil
import torch
from conftest import LLAMA, server_session

from trainer_client import AdamParams, AsyncServiceClient, AsyncTrainingClient, Datum
from trainer_server import TrainerServer

CLIENTS = 16
RUN_S = 12.0
SAMPLE_EVERY_S = 0.1
CALL_TIMEOUT_S = 60.0


def batch(client: int, step: int) -> list[Datum]:
    gen = torch.Generator().manual_seed(client * 100_003 + step)
    return [
        Datum.from_tokens(torch.randint(3, 500, (4,), generator=gen), torch.randint(3, 500, (6,), generator=gen))
        for _ in range(2)
    ]


async def test_sixteen_clients_under_load(server: TrainerServer) -> None:
    proc = psutil.Process()
    services = [AsyncServiceClient(server.address) for _ in range(CLIENTS)]
    for s in services:
        await s.__aenter__()
    try:
        tcs: list[AsyncTrainingClient] = list(
            await asyncio.gather(
                *(s.create_training_client(LLAMA, lora_rank=2, seed=i) for i, s in enumerate(services))
            )
        )
        latencies: list[float] = []
        errors: list[str] = []
        steps = [0] * CLIENTS
        loop = asyncio.get_running_loop()
        start = loop.time()
        stop_at = start + RUN_S

        async def worker(i: int, tc: AsyncTrainingClient) -> None:
            step = 0
            while loop.time() < stop_at:
                t0 = loop.time()
                try:
                    # pipelined: both calls submitted before either is awaited
                    fb = tc.forward_backward(batch(i, step))
                    opt = tc.optim_step(AdamParams(learning_rate=1e-3))
                    out = await asyncio.wait_for(fb, CALL_TIMEOUT_S)
                    result = await asyncio.wait_for(opt, CALL_TIMEOUT_S)
                except Exception as exc:  # every failure is counted and reported
                    errors.append(f"client {i} step {step}: {type(exc).__name__}: {exc}")
                    return
                latencies.append(loop.time() - t0)
                if not torch.isfinite(torch.tensor(out.loss)) or result.step != step + 1:
                    errors.append(f"client {i} step {step}: loss {out.loss}, optimizer step {result.step}")
                    return
                step += 1
                steps[i] = step

        rss: list[tuple[float, int]] = []

        async def sampler() -> None:
            while loop.time() < stop_at:
                rss.append((loop.time() - start, proc.memory_info().rss))
                await asyncio.sleep(SAMPLE_EVERY_S)

        await asyncio.gather(sampler(), *(worker(i, tc) for i, tc in enumerate(tcs)))
        elapsed = loop.time() - start

        assert not errors, "\n".join(errors[:20])
        total = sum(steps)
        lat = sorted(latencies)
        p50 = statistics.median(lat)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        third = len(rss) // 3
        first = statistics.median(r for _, r in rss[:third])
        last = statistics.median(r for _, r in rss[-third:])
        growth = last - first
        tolerance = max(0.10 * first, 30 * 2**20)
        mb = 2**20
        print(
            f"\nload: {CLIENTS} clients, {total} steps in {elapsed:.1f}s = {total / elapsed:.1f} steps/s "
            f"(per client {min(steps)}..{max(steps)}); step latency p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms"
        )
        print(
            f"load: RSS first third {first / mb:.1f} MB, last third {last / mb:.1f} MB, growth {growth / mb:+.1f} MB "
            f"(tolerance {tolerance / mb:.1f} MB), peak {max(r for _, r in rss) / mb:.1f} MB, {len(rss)} samples"
        )
        assert min(steps) >= 3, steps
        assert growth <= tolerance, f"RSS grew {growth / mb:.1f} MB between the first and last third"

        # nothing left behind: no held graphs, no numbers in flight
        assert server.core is not None
        held = server.core.held_graphs
        deadline = time.monotonic() + 10
        while len(held) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            gc.collect()
        assert len(held) == 0
        for i, tc in enumerate(tcs):
            session = server_session(server, tc)
            assert session._seen == set(), (i, session._seen)
            assert session.state.step == steps[i]
        for tc in tcs:
            await tc.close()
    finally:
        for s in services:
            await s.__aexit__(None, None, None)
