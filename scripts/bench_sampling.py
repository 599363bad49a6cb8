#!/usr/bin/env python
"""Sampling at RL scale: the continuous-batching engine vs one ``generate`` call per request.

Drives the sampling scheduler in-process on the built-in tiny model, with the server's device
thread (one worker) and its event loop, and no transport: what is measured is how requests share
the device. Every request has a 20-token prompt and samples exactly 32 tokens (no eos). Rows:

- one request with 16 samples;
- 16 concurrent requests of 1 sample, on the same prompt and on 16 distinct prompts;
- 16 requests of 1 sample, each awaited before the next;
- tokens/s with 1, 16 and 64 concurrent single-sample requests.

Columns: ``per call`` runs one ``generate`` per request on the device thread (today's server:
concurrent calls queue one behind another); ``engine`` submits to :class:`SamplingScheduler`,
which batches concurrent requests into shared decode steps. ``--baseline-commit SHA`` adds the
``generate`` of ``src/trainer_server/_sampling.py`` at that commit as a third column (read with
``git show``). The machines here are noisy: the columns are interleaved rep by rep and medians
are reported. Run::

    python scripts/bench_sampling.py                      # ~1-2 minutes on 2 shared CPU cores
    python scripts/bench_sampling.py --reps 5 --threads 2 --baseline-commit 5e47da3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from trainer_server import ensure_builtin_model
from trainer_server._models import load_base_model
from trainer_server._sampling import SampleRequest, SamplingModel, SamplingSettings, generate
from trainer_server._sampling_scheduler import SamplingScheduler

PROMPT_TOKENS = 20
NEW_TOKENS = 32
CPU = torch.device("cpu")

Generate = Callable[..., Any]


def prompts(count: int, *, distinct: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    made = [torch.randint(3, 512, (PROMPT_TOKENS,), generator=gen) for _ in range(count if distinct else 1)]
    return made if distinct else made * count


def settings(n: int, seed: int) -> SamplingSettings:
    return SamplingSettings(num_samples=n, max_tokens=NEW_TOKENS, seed=seed)


class Bench:
    """The model, the device thread and the two ways of sampling, on one event loop."""

    def __init__(self, model: SamplingModel, baseline: Generate | None) -> None:
        self.model = model
        self.baseline = baseline
        self.device = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")
        self.scheduler = SamplingScheduler(self.on_device)

    def on_device(self, fn: Callable[[], Any]) -> Awaitable[Any]:
        """Run ``fn`` on the device thread (what ``Runtime.on_device`` does in the server)."""
        return asyncio.get_running_loop().run_in_executor(self.device, fn)

    async def engine(self, prompt: torch.Tensor, n: int, seed: int) -> int:
        """Sample through the scheduler; returns the number of sampled tokens."""
        result = await self.scheduler.submit("base", self.model, SampleRequest(prompt, settings(n, seed)))
        return sum(len(s.tokens) for s in result.samples)

    async def per_call(self, prompt: torch.Tensor, n: int, seed: int, fn: Generate = generate) -> int:
        """Sample with one ``fn`` (a ``generate``) call on the device thread; returns the sampled tokens."""
        m = self.model
        samples, _ = await self.on_device(lambda: fn(m.module, prompt, settings(n, seed), m.eos_token_ids, CPU))
        return sum(len(s.tokens) for s in samples)

    def columns(self) -> dict[str, Callable[[torch.Tensor, int, int], Awaitable[int]]]:
        """The ways of sampling compared, by column name."""
        cols: dict[str, Callable[[torch.Tensor, int, int], Awaitable[int]]] = {
            "per call": self.per_call,
            "engine": self.engine,
        }
        baseline = self.baseline
        if baseline is not None:
            cols["per call, baseline generate"] = lambda p, n, s: self.per_call(p, n, s, baseline)
        return cols


async def timed(run: Callable[[], Awaitable[list[int]]]) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = sum(await run())
    return time.perf_counter() - start, tokens


async def single(sample: Callable[[torch.Tensor, int, int], Awaitable[int]], p: torch.Tensor, n: int) -> list[int]:
    return [await sample(p, n, 0)]


async def concurrent(sample: Callable[[torch.Tensor, int, int], Awaitable[int]], ps: list[torch.Tensor]) -> list[int]:
    return list(await asyncio.gather(*(sample(p, 1, i) for i, p in enumerate(ps))))


async def sequential(sample: Callable[[torch.Tensor, int, int], Awaitable[int]], ps: list[torch.Tensor]) -> list[int]:
    return [await sample(p, 1, i) for i, p in enumerate(ps)]


async def run(bench: Bench, reps: int) -> None:
    cols = bench.columns()
    scenarios: dict[str, Callable[[Callable[[torch.Tensor, int, int], Awaitable[int]]], Awaitable[list[int]]]] = {
        "one request, 16 samples": lambda s: single(s, prompts(1, distinct=True)[0], 16),
        "16 concurrent x 1 sample, same prompt": lambda s: concurrent(s, prompts(16, distinct=False)),
        "16 concurrent x 1 sample, distinct prompts": lambda s: concurrent(s, prompts(16, distinct=True)),
        "16 sequential x 1 sample": lambda s: sequential(s, prompts(16, distinct=True)),
    }
    throughput = {n: (lambda s, n=n: concurrent(s, prompts(n, distinct=True))) for n in (1, 16, 64)}
    for sample in cols.values():  # warm up: first-call costs (allocations, lazy inits) out of the timings
        await scenarios["16 concurrent x 1 sample, distinct prompts"](sample)
    times: dict[tuple[str, str], list[float]] = {}
    tokens: dict[tuple[str, str], int] = {}
    for _ in range(reps):
        for name, scenario in [*scenarios.items(), *((f"{n} concurrent", t) for n, t in throughput.items())]:
            for col, sample in cols.items():  # interleaved: each rep measures every column back to back
                elapsed, count = await timed(lambda: scenario(sample))  # noqa: B023 - awaited at once
                times.setdefault((name, col), []).append(elapsed)
                tokens[(name, col)] = count
    med = {key: statistics.median(v) for key, v in times.items()}

    names = list(cols)
    print(f"\n### Latency (ms, median of {reps}); {PROMPT_TOKENS}-token prompts, {NEW_TOKENS} new tokens per sample\n")
    print("| scenario | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for name in scenarios:
        print(f"| {name} | " + " | ".join(f"{1000 * med[(name, c)]:.0f}" for c in names) + " |")
    one, many = "one request, 16 samples", "16 concurrent x 1 sample, distinct prompts"
    ratio = " | ".join(f"{med[(many, c)] / med[(one, c)]:.2f}" for c in names)
    print(f"| ratio: 16 concurrent distinct / one request of 16 (goal <= 1.5) | {ratio} |")

    print(f"\n### Throughput (sampled tokens/s, median of {reps}); concurrent single-sample requests\n")
    print("| concurrent requests | " + " | ".join(names) + " | engine / per call |")
    print("|---" * (len(names) + 2) + "|")
    for n in throughput:
        name = f"{n} concurrent"
        rates = {c: tokens[(name, c)] / med[(name, c)] for c in names}
        print(
            f"| {n} | "
            + " | ".join(f"{rates[c]:.0f}" for c in names)
            + f" | {rates['engine'] / rates['per call']:.2f}x |"
        )
    await bench.scheduler.aclose()
    bench.device.shutdown(wait=True)


def load_baseline(commit: str) -> Generate:
    """``generate`` from ``_sampling.py`` at ``commit`` (a module of its own, nothing else replaced)."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{commit}:src/trainer_server/_sampling.py"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = sys.modules["baseline_sampling"] = types.ModuleType("baseline_sampling")  # dataclasses look it up
    exec(compile(source, f"{commit}:_sampling.py", "exec"), module.__dict__)
    fn: Generate = module.generate
    return fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="repetitions per cell (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--baseline-commit", help="also time generate() from _sampling.py at this git commit")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_base_model("tiny-llama", ensure_builtin_model(), CPU, "float32")
    # No eos: every sample has exactly NEW_TOKENS tokens, so the columns do the same work.
    model = SamplingModel(base.model, CPU, frozenset(), vocab_size=base.vocab_size, max_length=base.max_sequence_length)
    baseline = load_baseline(args.baseline_commit) if args.baseline_commit else None
    print(f"torch {torch.__version__}, {args.threads} thread(s), python {sys.version.split()[0]}")
    asyncio.run(run(Bench(model, baseline), args.reps))


if __name__ == "__main__":
    main()
