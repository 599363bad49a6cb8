#!/usr/bin/env python
"""Benchmark the lossless DELTA codec against a plain XOR+zstd baseline on the same weights.

For each model size, learning rate and dtype: train a freshly built model with AdamW on random
token batches (causal LM loss), export the weights at step 0 (the BASE, a safetensors file) and
after each step count, write a delta of each against the base with ``trainer_ckpt.write_delta``,
apply it back with ``trainer_ckpt.apply_delta`` (checking the result bit for bit) and compare its
size with the plain XOR+zstd baseline (one zstd stream over the XOR of all tensors' bit
patterns, concatenated in name order, at the same level; the Fireworks-style format). Prints a
markdown table. (Ours is never larger than per-tensor XOR+zstd by construction: that is one of the
candidates the encoder picks the smallest of; the tests check it.)

Usage::

    python scripts/bench_delta.py            # tiny + ~31M-param model, steps 1/10/100 (a few minutes)
    python scripts/bench_delta.py --quick    # tiny model, steps 1/10 (seconds; used by the tests)

Exits with status 1 if any row's delta is larger than the baseline or does not round-trip.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from trainer_ckpt import DeltaStats, apply_delta, write_delta, xor_zstd_baseline_size

LEARNING_RATES = (1e-6, 1e-5, 1e-4)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class ModelSpec:
    """A model configuration to benchmark."""

    label: str
    hidden_size: int
    num_layers: int
    num_heads: int
    batch: int  # sequences per training step
    seq_len: int  # random tokens per sequence


TINY = ModelSpec("tiny (built-in size)", hidden_size=64, num_layers=2, num_heads=4, batch=2, seq_len=32)
LARGE = ModelSpec("h512-l8", hidden_size=512, num_layers=8, num_heads=8, batch=1, seq_len=16)


@dataclass(frozen=True)
class Row:
    """One benchmark result."""

    model: str
    params: int
    dtype: str
    lr: float
    steps: int
    base_bytes: int
    baseline_bytes: int
    stats: DeltaStats
    encode_s: float
    baseline_s: float
    apply_s: float
    exact: bool

    @property
    def ours_bytes(self) -> int:
        """Size of ``delta.bin``."""
        return self.stats.compressed_bytes

    @property
    def ok(self) -> bool:
        """Whether the delta round-trips and is no larger than the baseline."""
        return self.exact and self.ours_bytes <= self.baseline_bytes


def _train_snapshots(
    model_dir: Path, lr: float, steps: Sequence[int], *, batch: int, seq_len: int, seed: int
) -> dict[int, dict[str, torch.Tensor]]:
    """Train with AdamW on random tokens; return fp32 weights at step 0 and at each of ``steps``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)  # fused: several times faster on CPU
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    snaps = {0: snapshot()}
    for step in range(1, max(steps) + 1):
        ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step in steps:
            snaps[step] = snapshot()
    return snaps


def _bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].view(torch.uint8).equal(b[k].view(torch.uint8))
        for k in a
    )


def run_benchmark(
    specs: Sequence[ModelSpec],
    steps: Sequence[int],
    *,
    learning_rates: Sequence[float] = LEARNING_RATES,
    level: int = 3,
    work_dir: Path | None = None,
) -> list[Row]:
    """Run the benchmark and return one row per (model, dtype, lr, steps)."""
    from trainer_server import build_tiny_model

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-delta-", dir=work_dir) as tmp_name:
        tmp = Path(tmp_name)
        for spec in specs:
            model_dir = build_tiny_model(
                tmp / "model",
                hidden_size=spec.hidden_size,
                num_layers=spec.num_layers,
                num_heads=spec.num_heads,
                max_position_embeddings=max(64, spec.seq_len),
                with_tokenizer=False,
            )
            for lr in learning_rates:
                snaps = _train_snapshots(model_dir, lr, steps, batch=spec.batch, seq_len=spec.seq_len, seed=0)
                params = sum(t.numel() for t in snaps[0].values())
                for dtype_name, dtype in DTYPES.items():
                    base = {k: v.to(dtype).contiguous() for k, v in snaps[0].items()}
                    base_file = tmp / f"base-{dtype_name}.safetensors"
                    save_file(base, str(base_file), metadata={"format": "pt"})
                    for step in steps:
                        new = {k: v.to(dtype).contiguous() for k, v in snaps[step].items()}
                        out = tmp / f"delta-{dtype_name}-{step}"
                        t0 = time.perf_counter()
                        stats = write_delta(base_file, new, out, level=level)
                        t1 = time.perf_counter()
                        rebuilt = apply_delta(base_file, out)
                        t2 = time.perf_counter()
                        baseline = xor_zstd_baseline_size(base, new, level=level)
                        t3 = time.perf_counter()
                        rows.append(
                            Row(
                                model=spec.label,
                                params=params,
                                dtype=dtype_name,
                                lr=lr,
                                steps=step,
                                base_bytes=base_file.stat().st_size,
                                baseline_bytes=baseline,
                                stats=stats,
                                encode_s=t1 - t0,
                                baseline_s=t3 - t2,
                                apply_s=t2 - t1,
                                exact=_bitwise_equal(rebuilt, new),
                            )
                        )
                del snaps
    return rows


def _size(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.2f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n} B"


def format_table(rows: Sequence[Row]) -> str:
    """Render rows as a markdown table."""
    header = (
        "| model | params | dtype | lr | steps | changed | BASE | XOR+zstd | ours (delta.bin) | delta.json "
        "| base/XOR+zstd | base/ours | ours/XOR+zstd | encodings z/x/p/s | encode s | XOR+zstd s | apply s | ok |"
    )
    lines = [header, "|" + "---|" * header.count(" | ").__add__(1)]
    for r in rows:
        enc = r.stats.encodings
        lines.append(
            f"| {r.model} | {r.params / 1e6:.2f}M | {r.dtype} | {r.lr:g} | {r.steps} "
            f"| {100 * r.stats.changed_fraction:.1f}% | {_size(r.base_bytes)} | {_size(r.baseline_bytes)} "
            f"| {_size(r.ours_bytes)} | {_size(r.stats.manifest_bytes)} "
            f"| {r.base_bytes / r.baseline_bytes:.2f}x | {r.base_bytes / max(r.ours_bytes, 1):.2f}x "
            f"| {r.ours_bytes / r.baseline_bytes:.3f} "
            f"| {enc['zero']}/{enc['xor']}/{enc['planes']}/{enc['sparse']} "
            f"| {r.encode_s:.2f} | {r.baseline_s:.2f} | {r.apply_s:.2f} | {'yes' if r.ok else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table; return 1 if any row is larger than the baseline."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny model, steps 1 and 10 only (seconds)")
    parser.add_argument("--level", type=int, default=3, help="zstd level for ours and the baseline (default 3)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: 1 with --quick, else up to 2)"
    )
    args = parser.parse_args(argv)
    threads = args.threads or (1 if args.quick else min(2, os.cpu_count() or 1))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    specs = [TINY] if args.quick else [TINY, LARGE]
    steps = (1, 10) if args.quick else (1, 10, 100)
    started = time.perf_counter()
    rows = run_benchmark(specs, steps, level=args.level)
    print(format_table(rows))
    print()
    batches = ", ".join(f"{s.batch}x{s.seq_len} for {s.label}" for s in specs)
    notes = [
        f"zstd level {args.level}; AdamW on random token batches ({batches}), trained in fp32, weights exported",
        "to the dtype shown. BASE = safetensors file size; XOR+zstd = one zstd stream over all XOR bytes;",
        "ours = delta.bin (delta.json, the per-tensor manifest, listed separately); encodings = tensors stored",
        "as zero/xor/planes/sparse; encode = write_delta (hash base, encode, fsync); XOR+zstd s = baseline",
        f"compression; apply = apply_delta (verify + rebuild). torch threads {torch.get_num_threads()}.",
        f"Total {time.perf_counter() - started:.0f} s.",
    ]
    print(" ".join(notes))
    bad = [r for r in rows if not r.ok]
    for r in bad:
        print(
            f"FAIL: {r.model} {r.dtype} lr={r.lr:g} steps={r.steps}: ours {r.ours_bytes} B vs baseline "
            f"{r.baseline_bytes} B, exact={r.exact}",
            file=sys.stderr,
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
