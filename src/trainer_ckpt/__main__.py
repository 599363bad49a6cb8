"""Command line for DELTA checkpoints: ``python -m trainer_ckpt {apply-delta,inspect,make-delta}``.

- ``apply-delta BASE_DIR DELTA_DIR OUT_DIR``: rebuild a full Hugging Face model directory from a
  base model directory and a delta (bit for bit, verified). A progress bar (tqdm, on stderr)
  shows on large deltas when stderr is a terminal; ``--progress`` / ``--no-progress`` force it.
- ``inspect DELTA_DIR``: show each tensor's encoding and sizes.
- ``make-delta BASE NEW OUT_DIR``: make a delta between two weights files (or model directories).

Errors print ``error: ...`` to stderr and exit with status 2 (as argparse does for bad usage).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from trainer_ckpt.delta import (
    DELTA_BIN,
    DELTA_JSON,
    WEIGHTS_FILE,
    DeltaError,
    DeltaStats,
    apply_delta_to_dir,
    read_manifest,
    write_delta,
)

__all__ = ["main"]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _weights_file(path: Path) -> Path:
    return path / WEIGHTS_FILE if path.is_dir() else path


PROGRESS_MIN_BYTES = 256 << 20
"""Deltas of at least this many bytes of weights show a progress bar by default (on a terminal)."""


def _cmd_apply(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    started = time.perf_counter()
    _, entries = read_manifest(args.delta_dir)
    total = sum(e.raw_bytes for e in entries)
    show = args.progress if args.progress is not None else (total >= PROGRESS_MIN_BYTES and sys.stderr.isatty())
    with tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="apply-delta", file=sys.stderr, disable=not show
    ) as bar:
        out = apply_delta_to_dir(args.base_dir, args.delta_dir, args.out_dir, progress=bar.update)
    size = (out / WEIGHTS_FILE).stat().st_size
    print(
        f"wrote {out} ({WEIGHTS_FILE}: {_human(size)}, verified bit for bit against {args.delta_dir}) "
        f"in {time.perf_counter() - started:.2f} s"
    )
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    header, entries = read_manifest(args.delta_dir)
    stats = DeltaStats.from_entries(entries, manifest_bytes=header["manifest_bytes"])
    print(f"delta {args.delta_dir}: format {header['format']} v{header['version']}, zstd level {header['zstd_level']}")
    if "base_sha256" in header:
        print(f"base file sha256: {header['base_sha256']}")
    print(f"base weights sha256: {header['base_weights_sha256']}")
    print(f"new weights sha256: {header['new_sha256']}")
    width = max([len("tensor"), *(len(e.name) for e in entries)])
    print(f"{'tensor':<{width}}  {'dtype':<5} {'shape':<16} {'encoding':<8} {'changed':>8} {'raw':>11} {'stored':>11}")
    for e in entries:
        changed = f"{100 * e.changed / e.numel:.2f}%" if e.numel else "-"
        shape = "x".join(str(d) for d in e.shape) or "scalar"
        print(
            f"{e.name:<{width}}  {e.dtype:<5} {shape:<16} {e.encoding:<8} {changed:>8} "
            f"{_human(e.raw_bytes):>11} {_human(e.length):>11}"
        )
    counts = ", ".join(f"{k} {n}" for k, n in stats.encodings.items())
    print(
        f"total: {stats.tensors} tensors ({counts}); raw {_human(stats.raw_bytes)}, blobs "
        f"{_human(stats.compressed_bytes)}, metadata ({DELTA_JSON} and index) {_human(stats.manifest_bytes)}, "
        f"whole delta {_human(stats.total_bytes)}; ratio {stats.ratio:.2f}x; "
        f"{100 * stats.changed_fraction:.2f}% of elements changed"
    )
    return 0


def _cmd_make(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    new_file = _weights_file(args.new)
    try:
        new = load_file(str(new_file))
    except FileNotFoundError:
        raise DeltaError(f"weights file {new_file} does not exist") from None
    started = time.perf_counter()
    stats = write_delta(_weights_file(args.base), new, args.out_dir, level=args.level)
    print(
        f"wrote {args.out_dir}: {stats.tensors} tensors, {_human(stats.total_bytes)} ({DELTA_BIN} and {DELTA_JSON}) "
        f"for {_human(stats.raw_bytes)} of weights (ratio {stats.ratio:.2f}x) in {time.perf_counter() - started:.2f} s"
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainer-ckpt", description="Lossless DELTA checkpoints: rebuild, inspect and make them."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("apply-delta", help="rebuild a full Hugging Face model directory from BASE_DIR and DELTA_DIR")
    p.add_argument("base_dir", type=Path, metavar="BASE_DIR", help="base model directory (with model.safetensors)")
    p.add_argument("delta_dir", type=Path, metavar="DELTA_DIR", help="delta directory (delta.json, delta.bin)")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="output model directory (must not exist)")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: on a terminal, for deltas of at least 256 MiB of weights)",
    )
    p.set_defaults(func=_cmd_apply)
    p = sub.add_parser("inspect", help="show a delta's per-tensor encodings and sizes")
    p.add_argument("delta_dir", type=Path, metavar="DELTA_DIR")
    p.set_defaults(func=_cmd_inspect)
    p = sub.add_parser("make-delta", help="make a delta of NEW against BASE (weights files or model directories)")
    p.add_argument("base", type=Path, metavar="BASE")
    p.add_argument("new", type=Path, metavar="NEW")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    p.add_argument("--level", type=int, default=3, help="zstd level (default 3; 1-3 recommended)")
    p.set_defaults(func=_cmd_make)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: Arguments without the program name; ``None`` for ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 2 on an error (after printing ``error: ...`` to stderr).
        Bad usage exits with status 2 through argparse.
    """
    args = _parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except (DeltaError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
