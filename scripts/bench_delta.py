#!/usr/bin/env python
"""Benchmark the lossless DELTA codec against a plain XOR+zstd baseline on the same weights.

Each row is a fresh "session": a freshly built Llama-style model (the built-in architecture; by
default 32 layers of width 144, 291 tensors, 10.1M parameters) trained with AdamW (eps 1e-12, no
weight decay, as the server's defaults) on an importance-sampling loss (random tokens, on-policy
ratios, random advantages), either fully or through a LoRA adapter (rank 16 on every linear
layer, the output layer included, merged for export). The BASE is the bf16 export at step 0; the
new weights are the bf16 export after the row's steps. For each row it writes a delta with
``trainer_ckpt.write_delta``, applies it back with ``trainer_ckpt.apply_delta`` (checking the
result bit for bit), and compares the **whole delta directory** (``delta.bin`` with its index,
and ``delta.json``) with the plain XOR+zstd baseline (one zstd stream over the XOR of all
tensors' bit patterns, concatenated in name order, at the same level; the Fireworks-style
format, which carries no names, shapes or checksums at all).

Beside each row: two order-0 entropy bounds, as ratios ``BASE / bound``: ``H0 XOR planes`` (the
XOR of each tensor split into byte planes, each plane coded at its own byte entropy: what any
plane-wise order-0 coder of the XOR can reach) and ``H0 ours`` (the changed/unchanged mask, the
sign and "more than one unit" bits of each changed word's integer difference at their binary
entropies, and the byte planes of the larger magnitudes: what an ideal order-0 coder of the
sections ``mask-diff`` stores would reach; zstd codes them). Encode and apply speeds are MB of weights per
second (``write_delta`` hashes the base, encodes, fsyncs; ``apply_delta`` verifies and rebuilds).

``--before FILE`` also runs another version of ``trainer_ckpt/delta.py`` (for example the
previous format: ``git show 5e47da3:src/trainer_ckpt/delta.py > /tmp/delta_before.py``) on the
same weights in the same run, for sizes and speeds side by side.

Usage::

    python scripts/bench_delta.py                 # the five rows of issue 16 (about a minute)
    python scripts/bench_delta.py --levels        # also the lr 1e-5 row at zstd levels 1, 3, 9, 19
    python scripts/bench_delta.py --quick         # tiny model (seconds; used by the tests)

Exits with status 1 if any row does not rebuild bit for bit or its whole delta is larger than
the baseline.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from trainer_ckpt import DeltaStats, write_delta, xor_zstd_baseline_size


@dataclass(frozen=True)
class ModelSpec:
    """A model configuration to benchmark."""

    label: str
    hidden_size: int
    num_layers: int
    num_heads: int
    batch: int  # sequences per training step
    seq_len: int  # random tokens per sequence


@dataclass(frozen=True)
class Case:
    """One row: how the session trains before the new weights are exported."""

    lora_rank: int | None  # None: full fine-tune
    lr: float
    steps: int

    @property
    def label(self) -> str:
        """How the row is described in the table."""
        kind = "full" if self.lora_rank is None else f"LoRA r{self.lora_rank} merged"
        return f"{kind}, lr {self.lr:g}, {self.steps} step{'s' if self.steps > 1 else ''}"


ISSUE_MODEL = ModelSpec("h144-l32", hidden_size=144, num_layers=32, num_heads=4, batch=4, seq_len=64)
TINY = ModelSpec("tiny", hidden_size=64, num_layers=2, num_heads=4, batch=2, seq_len=32)
ISSUE_CASES = (
    Case(None, 1e-6, 1),
    Case(None, 1e-5, 1),
    Case(None, 1e-5, 10),
    Case(16, 1e-6, 1),
    Case(16, 1e-5, 10),
)
QUICK_CASES = (Case(None, 1e-6, 1), Case(None, 1e-5, 1), Case(None, 1e-5, 3), Case(4, 1e-5, 3))


@dataclass(frozen=True)
class Measured:
    """Size and speeds of one codec on one row."""

    whole_bytes: int
    encode_s: float
    apply_s: float
    exact: bool


@dataclass(frozen=True)
class Row:
    """One benchmark result."""

    model: str
    params: int
    tensors: int
    case: Case
    level: int
    base_bytes: int
    baseline_bytes: int
    stats: DeltaStats
    ours: Measured
    before: Measured | None
    h0_xor_planes: float  # bytes
    h0_ours: float  # bytes

    @property
    def ok(self) -> bool:
        """Whether the delta round-trips and the whole directory is no larger than the baseline."""
        return self.ours.exact and self.ours.whole_bytes <= self.baseline_bytes


# --------------------------------------------------------------------------------------------
# Training a fresh session
# --------------------------------------------------------------------------------------------


def _train(model_dir: Path, spec: ModelSpec, case: Case, *, seed: int) -> tuple[dict[str, torch.Tensor], ...]:
    """Return the bf16 exports at step 0 and after ``case.steps`` steps of a fresh session."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def export(source: Any) -> dict[str, torch.Tensor]:
        return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in source.state_dict().items()}

    base = export(model)  # step 0 (with LoRA too: its B matrices start at zero)
    if case.lora_rank is not None:
        from peft import LoraConfig, get_peft_model

        targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        config = LoraConfig(r=case.lora_rank, lora_alpha=case.lora_rank, target_modules=targets, lora_dropout=0.0)
        model = get_peft_model(model, config)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=case.lr, eps=1e-12, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    model.train()
    for _ in range(case.steps):
        ids = torch.randint(0, vocab, (spec.batch, spec.seq_len), generator=gen)
        advantages = torch.randn(spec.batch, 1, generator=gen)
        logits = model(input_ids=ids).logits[:, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        ratio = torch.exp(logprobs - logprobs.detach())  # on-policy: sampled logprobs = current ones
        loss = -(ratio * advantages).sum() / ratio.numel()  # importance sampling
        torch.autograd.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return base, export(model.merge_and_unload() if case.lora_rank is not None else model)


# --------------------------------------------------------------------------------------------
# Entropy bounds
# --------------------------------------------------------------------------------------------


_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SIGNED = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def _h0_bytes(data: np.ndarray) -> float:
    """Order-0 entropy of a byte array, in bytes."""
    if data.size == 0:
        return 0.0
    counts = np.bincount(data.reshape(-1), minlength=256)
    p = counts[counts > 0] / data.size
    return float(-(p * np.log2(p)).sum()) * data.size / 8


def _planes(words: np.ndarray) -> list[np.ndarray]:
    width = words.dtype.itemsize
    return [words.view(np.uint8).reshape(-1, width)[:, k] for k in range(width)]


def _h_bits(flags: np.ndarray) -> float:
    """Binary entropy of a boolean array, in bytes."""
    p = float(flags.mean()) if flags.size else 0.0
    return 0.0 if p in (0.0, 1.0) else flags.size * -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) / 8


def entropy_bounds(base: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Return order-0 bounds in bytes, summed over tensors: (XOR byte planes, our sections).

    Our sections: the changed mask, the sign and "bigger than one unit" bits of the changed
    words' differences (each at its binary entropy) and the byte planes of the remaining
    magnitudes (each at its byte entropy).
    """
    xor_total = ours_total = 0.0
    for name in sorted(new):
        width = new[name].element_size()
        b = base[name].reshape(-1).view(torch.uint8).numpy().view(_WORDS[width])
        n = new[name].reshape(-1).view(torch.uint8).numpy().view(_WORDS[width])
        xor = b ^ n
        xor_total += sum(_h0_bytes(p) for p in _planes(xor))
        changed = xor != 0
        diff = n[changed] - b[changed]
        negative = diff.view(_SIGNED[width]) < 0
        magnitude = np.where(negative, ~diff + diff.dtype.type(1), diff)
        big = magnitude > 1
        rest = magnitude[big] - diff.dtype.type(2)
        ours_total += _h_bits(changed) + _h_bits(negative) + _h_bits(big) + sum(_h0_bytes(p) for p in _planes(rest))
    return xor_total, ours_total


# --------------------------------------------------------------------------------------------
# Running the rows
# --------------------------------------------------------------------------------------------


def _bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].view(torch.uint8).equal(b[k].view(torch.uint8))
        for k in a
    )


def _measure(
    codec: Any, base_file: Path, new: dict[str, torch.Tensor], out: Path, *, level: int, repeat: int
) -> tuple[Measured, Any]:
    """Write and apply a delta with ``codec`` (a delta module) ``repeat`` times; best times, and its stats."""
    encode_s = apply_s = math.inf
    exact = True
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        stats = codec.write_delta(base_file, new, out, level=level)
        t1 = time.perf_counter()
        rebuilt = codec.apply_delta(base_file, out)
        t2 = time.perf_counter()
        encode_s, apply_s = min(encode_s, t1 - t0), min(apply_s, t2 - t1)
        exact = exact and _bitwise_equal(rebuilt, new)
    whole = sum(p.stat().st_size for p in out.iterdir())
    return Measured(whole, encode_s, apply_s, exact), stats


def load_codec(path: Path) -> ModuleType:
    """Load another version of ``trainer_ckpt/delta.py`` from a file, as its own module."""
    spec = importlib.util.spec_from_file_location("bench_delta_before", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_benchmark(
    spec: ModelSpec,
    cases: Sequence[Case],
    *,
    levels: Sequence[int] = (3,),
    level_cases: Sequence[Case] = (),
    before: ModuleType | None = None,
    repeat: int = 1,
    work_dir: Path | None = None,
) -> list[Row]:
    """Run each case as a fresh session and return one row per (case, level)."""
    from trainer_server import build_tiny_model

    this = sys.modules[write_delta.__module__]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-delta-", dir=work_dir) as tmp_name:
        tmp = Path(tmp_name)
        model_dir = build_tiny_model(
            tmp / "model",
            hidden_size=spec.hidden_size,
            num_layers=spec.num_layers,
            num_heads=spec.num_heads,
            max_position_embeddings=max(64, spec.seq_len),
            with_tokenizer=False,
        )
        for case in cases:
            base, new = _train(model_dir, spec, case, seed=0)
            base_file = tmp / "base.safetensors"
            save_file(base, str(base_file), metadata={"format": "pt"})
            h0_xor, h0_model = entropy_bounds(base, new)
            for level in (*levels, *(lv for lv in (1, 3, 9, 19) if case in level_cases and lv not in levels)):
                ours, stats = _measure(this, base_file, new, tmp / "ours", level=level, repeat=repeat)
                old = (
                    None
                    if before is None
                    else _measure(before, base_file, new, tmp / "before", level=level, repeat=repeat)[0]
                )
                rows.append(
                    Row(
                        model=spec.label,
                        params=sum(t.numel() for t in base.values()),
                        tensors=len(base),
                        case=case,
                        level=level,
                        base_bytes=base_file.stat().st_size,
                        baseline_bytes=xor_zstd_baseline_size(base, new, level=level),
                        stats=stats,
                        ours=ours,
                        before=old,
                        h0_xor_planes=h0_xor,
                        h0_ours=h0_model,
                    )
                )
    return rows


def metadata_reproduction(tensors: int = 300, shape: tuple[int, ...] = (128, 128)) -> str:
    """Issue 16's reproduction without a server: bf16 tensors with every 97th element changed."""
    gen = torch.Generator().manual_seed(97)
    base = {f"model.layers.{i}.weight": torch.randn(shape, generator=gen).to(torch.bfloat16) for i in range(tensors)}
    new = {k: v.clone() for k, v in base.items()}
    for t in new.values():
        t.reshape(-1)[::97] += 0.01
    with tempfile.TemporaryDirectory(prefix="bench-delta-meta-") as tmp:
        save_file(base, f"{tmp}/base.safetensors")
        stats = write_delta(Path(tmp) / "base.safetensors", new, Path(tmp) / "delta")
        header = (Path(tmp) / "delta" / "delta.json").stat().st_size
    baseline = xor_zstd_baseline_size(base, new)
    return (
        f"{tensors} bf16 tensors of {'x'.join(map(str, shape))}, every 97th element changed: whole delta "
        f"{stats.total_bytes:,} B (blobs {stats.compressed_bytes:,} B, index {stats.manifest_bytes - header:,} B, "
        f"delta.json {header:,} B) against a baseline of {baseline:,} B ({stats.total_bytes / baseline:.2f})"
    )


def _size(n: float) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.2f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n:.0f} B"


def format_table(rows: Sequence[Row]) -> str:
    """Render rows as a markdown table."""
    has_before = any(r.before is not None for r in rows)
    header = (
        "| case | level | changed | BASE | XOR+zstd | ours (whole delta) | of it metadata | base/ours | ours/XOR+zstd "
        "| H0 XOR planes | H0 ours | encodings z/x/p/s/m/j | encode MB/s | apply MB/s |"
    )
    if has_before:
        header += " before (whole) | base/before | before encode MB/s | before apply MB/s |"
    header += " ok |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        enc = r.stats.encodings
        counts = "/".join(str(enc.get(k, 0)) for k in ("zero", "xor", "planes", "sparse-diff", "mask-diff", "joined"))
        raw_mb = r.stats.raw_bytes / 1e6
        line = (
            f"| {r.case.label} | {r.level} | {100 * r.stats.changed_fraction:.1f}% | {_size(r.base_bytes)} "
            f"| {_size(r.baseline_bytes)} | {_size(r.ours.whole_bytes)} | {_size(r.stats.manifest_bytes)} "
            f"| **{r.base_bytes / r.ours.whole_bytes:.1f}x** | {r.ours.whole_bytes / r.baseline_bytes:.2f} "
            f"| {r.base_bytes / r.h0_xor_planes:.1f}x | {r.base_bytes / r.h0_ours:.1f}x | {counts} "
            f"| {raw_mb / r.ours.encode_s:.0f} | {raw_mb / r.ours.apply_s:.0f} |"
        )
        if has_before:
            b = r.before
            line += (
                " - | - | - | - |"
                if b is None
                else f" {_size(b.whole_bytes)} | {r.base_bytes / b.whole_bytes:.1f}x "
                f"| {raw_mb / b.encode_s:.0f} | {raw_mb / b.apply_s:.0f} |"
            )
        lines.append(line + f" {'yes' if r.ok else 'NO'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table; return 1 if any row fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny model, short cases (seconds)")
    parser.add_argument("--level", type=int, default=3, help="zstd level for ours and the baseline (default 3)")
    parser.add_argument("--levels", action="store_true", help="also the full lr 1e-5 1-step row at levels 1/3/9/19")
    parser.add_argument("--before", type=Path, help="another trainer_ckpt/delta.py to compare with in the same run")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--repeat", type=int, default=None, help="timed runs per codec and row, best kept (3; 1 --quick)"
    )
    args = parser.parse_args(argv)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    spec, cases = (TINY, QUICK_CASES) if args.quick else (ISSUE_MODEL, ISSUE_CASES)
    started = time.perf_counter()
    rows = run_benchmark(
        spec,
        cases,
        levels=(args.level,),
        level_cases=(Case(None, 1e-5, 1),) if args.levels else (),
        before=None if args.before is None else load_codec(args.before),
        repeat=args.repeat or (1 if args.quick else 3),
    )
    r0 = rows[0]
    print(
        f"model {spec.label}: {r0.params / 1e6:.1f}M parameters, {r0.tensors} tensors, bf16; AdamW, importance "
        f"sampling, batch {spec.batch}x{spec.seq_len} random tokens; each row a fresh session."
    )
    print()
    print(format_table(rows))
    print()
    print(
        f"ours = delta.bin (blobs and index) + delta.json; H0 = order-0 entropy bounds as BASE/bound; encodings = "
        f"tensors stored as zero/xor/planes/sparse-diff/mask-diff/joined; MB/s: MB of weights per second, best of "
        f"{args.repeat or (1 if args.quick else 3)} runs; torch threads {torch.get_num_threads()}; "
        f"total {time.perf_counter() - started:.0f} s."
    )
    print()
    print("Metadata (issue 16's reproduction): " + metadata_reproduction())
    bad = [r for r in rows if not r.ok]
    for r in bad:
        print(
            f"FAIL: {r.case.label} level {r.level}: ours {r.ours.whole_bytes} B vs baseline {r.baseline_bytes} B, "
            f"exact={r.ours.exact}",
            file=sys.stderr,
        )
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
