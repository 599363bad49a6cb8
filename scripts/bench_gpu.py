#!/usr/bin/env python
"""GPU check and benchmark: the service in bf16 on CUDA through ``accelerate launch``.

(``--cpu`` runs the same comparison on CPU ranks with gloo, in fp32, reporting peak RSS.)

On a machine with NVIDIA GPUs this builds a Llama-style model locally (random weights,
nothing downloaded), serves it with ``accelerate launch --num_processes N -m trainer_server
--dtype bfloat16`` for N = 1 and N = all GPUs, drives a few training steps through the
client (forward_backward with the built-in loss, then optim_step), and prints one table:
tokens/s, step time and peak GPU memory per process, side by side; with ``--fsdp`` also
N processes with every session sharded by FSDP2 (``--use_fsdp --fsdp_version 2``). On a
machine without CUDA it says so and exits 0, so it is safe to run anywhere::

    python scripts/bench_gpu.py                        # ~125M params, 8 x 512 tokens, LoRA r32
    python scripts/bench_gpu.py --full --steps 10      # full fine-tune
    python scripts/bench_gpu.py --full --fsdp          # ... and FSDP beside the replicated rows
    python scripts/bench_gpu.py --cpu --full --fsdp --hidden 512 --layers 8 --vocab 512 --seq 128 --batch 4
    python scripts/bench_gpu.py --processes 1,2,4 --hidden 1024 --layers 16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GpuMemory:
    """Peak memory of the server's processes, polled from ``nvidia-smi`` (MiB per pid)."""

    def __init__(self) -> None:
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> GpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                    check=False,
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
            except (OSError, subprocess.TimeoutExpired):
                return
            for line in out.splitlines():
                pid, _, mib = line.partition(",")
                if pid.strip().isdigit() and mib.strip().isdigit():
                    self.peak[int(pid)] = max(self.peak.get(int(pid), 0), int(mib))
            self._stop.wait(0.2)


FSDP_ARGS = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]


def launch(
    model_dir: Path, processes: int, fsdp: bool = False, cpu: bool = False
) -> tuple[subprocess.Popen[str], str, list[str]]:
    """Start the server under accelerate on ``processes`` GPUs (or CPU ranks); returns it, its address, its log."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        *(FSDP_ARGS if fsdp else ["--multi_gpu"] if processes > 1 else []),
        "-m",
        "trainer_server",
        "--model",
        f"bench={model_dir}",
        "--dtype",
        "float32" if cpu else "bfloat16",
        "--port",
        "0",
        "--max-tokens-per-call",
        str(1 << 20),
        *(["--device", "cpu", "--torch-threads", "1"] if cpu else []),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cpu:
        env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    address: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            m = re.match(r"trainer-server ready on (\S+)", line)
            if m:
                address.append(m.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    ready.wait(600)
    if not address:
        stop(proc)
        raise SystemExit("the server did not start:\n" + "".join(lines[-40:]))
    return proc, address[0], lines


def stop(proc: subprocess.Popen[str], grace_s: float = 120.0) -> None:
    """Stop the launcher gracefully (it stops its ranks), then SIGKILL anything of it still running.

    The ranks are listed before the launcher is stopped: once it is gone they are
    reparented to init and nothing else would find them.
    """
    ranks = descendants(proc.pid)
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in ranks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def descendants(root: int) -> list[int]:
    """The pids below ``root`` (Linux ``/proc``)."""
    return list(_process_table(root))


def server_processes(root: int) -> list[int]:
    """The pids below ``root`` (the launcher) that run ``trainer_server``."""
    return [p for p, c in _process_table(root).items() if "trainer_server" in c and "launch" not in c]


def _process_table(root: int) -> dict[int, str]:
    """The command line of every process below ``root``, by pid."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])

    def below(pid: int) -> bool:
        while pid in parents and pid != root:
            pid = parents[pid]
        return pid == root

    return {p: c for p, c in commands.items() if p != root and below(p)}


def peak_rss_mib(pid: int) -> int:
    """Peak resident memory of a process (``VmHWM``), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return 0


async def drive(address: str, args: argparse.Namespace) -> tuple[list[float], int, dict[str, object]]:
    """Warm-up step, then timed steps; returns step times, tokens per step and server info."""
    from trainer_client import AdamParams, AsyncServiceClient, Datum

    g = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(args.batch):
        tokens = torch.randint(3, args.vocab, (args.seq + 1,), generator=g).tolist()
        batch.append(Datum.from_tokens(tokens[: args.seq // 4], tokens[args.seq // 4 :]))
    num_tokens = sum(len(d) for d in batch)
    async with AsyncServiceClient(address) as service:
        info = await service.get_server_info()
        tc = await service.create_training_client("bench", lora_rank=None if args.full else args.lora_rank, seed=0)
        times = []
        for step in range(args.steps + 1):
            started = time.perf_counter()
            await tc.forward_backward(batch, "cross_entropy")
            await tc.optim_step(AdamParams(learning_rate=1e-5))
            if step:  # the first step warms up kernels and allocators
                times.append(time.perf_counter() - started)
        await tc.close()
    return times, num_tokens, {"world_size": info.world_size, "devices": info.devices, "mode": info.distributed_mode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="", help="comma-separated process counts (default: 1 and all GPUs)")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="datums per forward_backward (split over the ranks)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA")
    parser.add_argument("--fsdp", action="store_true", help="also run every process count > 1 with FSDP2")
    parser.add_argument("--cpu", action="store_true", help="CPU ranks (gloo, fp32): peak RSS instead of GPU memory")
    parser.add_argument("--models-dir", type=Path, default=ROOT / ".cache" / "bench-gpu-models")
    args = parser.parse_args()
    # SIGTERM (a test's or a scheduler's stop) unwinds through the ``finally`` that stops the servers
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if not torch.cuda.is_available() and not args.cpu:
        print("bench_gpu: no CUDA GPU on this machine; nothing to measure (skipped).")
        return
    gpus = (os.cpu_count() or 1) if args.cpu else torch.cuda.device_count()
    counts = sorted({int(c) for c in args.processes.split(",") if c} or {1, 2 if args.cpu else gpus})
    if max(counts) > gpus:
        raise SystemExit(f"--processes {max(counts)} needs that many devices; this machine has {gpus}")
    from trainer_server import build_tiny_model

    model_dir = args.models_dir / f"llama-h{args.hidden}-l{args.layers}-v{args.vocab}"
    if not (model_dir / "model.safetensors").is_file():
        print(f"building the model in {model_dir} ...", flush=True)
        build_tiny_model(
            model_dir,
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=max(1, args.hidden // 64),
            vocab_size=args.vocab,
            max_position_embeddings=args.seq + 1,
        )
    rows = []
    for n, fsdp in [(n, False) for n in counts] + [(n, True) for n in counts if args.fsdp and n > 1]:
        proc, address, _log = launch(model_dir, n, fsdp, args.cpu)
        try:
            with GpuMemory() as memory:
                times, num_tokens, info = asyncio.run(drive(address, args))
            if args.cpu:
                memory.peak = {pid: peak_rss_mib(pid) for pid in server_processes(proc.pid)}
        finally:
            stop(proc)
        step = statistics.median(times)
        peak = max(memory.peak.values(), default=0)
        rows.append((n, info, num_tokens, step, num_tokens / step, peak))
    name = "CPU cores (gloo), fp32" if args.cpu else f"{torch.cuda.get_device_name(0)}; bf16"
    mode = "full fine-tune" if args.full else f"LoRA r{args.lora_rank}"
    print(f"\n{time.strftime('%Y-%m-%d')} on {gpus} x {name}; {mode}; model h{args.hidden} l{args.layers}")
    print(f"batch {args.batch} x {args.seq} tokens; median of {args.steps} steps after one warm-up\n")
    memory_column = "peak RSS MiB per process" if args.cpu else "peak GPU MiB per process"
    print(f"| processes | mode | tokens/step | step s | tokens/s | vs 1 process | {memory_column} |")
    print("|---|---|---|---|---|---|---|")
    base = rows[0][4]
    for n, info, num_tokens, step, tps, peak in rows:
        print(f"| {n} | {info['mode']} | {num_tokens} | {step:.3f} | {tps:,.0f} | {tps / base:.2f}x | {peak:,} |")


if __name__ == "__main__":
    main()
