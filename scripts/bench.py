#!/usr/bin/env python
"""Performance benchmarks of the training service, each against its anchor in the same run.

Issue 6's seven measurements, printed as markdown tables. These machines are noisy, so every
number that a goal judges is a ratio between two things measured side by side, interleaved rep
by rep, and medians are reported:

1. ``wire``: a float32 tensor round trip through the service's chunked-bytes stream format
   (``trainer_proto.wire`` over a real grpc.aio bidi stream using the service's own messages)
   vs raw asyncio TCP vs JSON float lists vs protobuf ``repeated float``.
2. ``custom``: ``forward_backward_custom`` vs the built-in ``cross_entropy`` vs the public SDKs'
   "recompute" design (forward, local loss, second forward+backward with the gradient as weights).
3. ``overhead``: a full step through the service vs the same step in-process (``SessionModel``),
   for a small and a ~100M-parameter model; and the tiny-call latency (GetServerInfo).
4. ``pipeline``: steps submitted ahead vs each call awaited: wall per step and server busy
   fraction with the server embedded (4), and wall per step with the server in its own process
   (4b: ``python -m trainer_server``), with its default torch threads and, in a full run, with
   torch's own choice with and without OpenMP spinning.
5. ``overlap``: a client loss as slow as the forward, window submitted at once vs awaited.
6. ``lora``: server RSS with 1, 4, 16 LoRA sessions on one base model.
7. ``memory``: peak server RSS of a custom-loss step vs a built-in step.
8. ``tinker``: one SFT step through the official tinker SDK (HTTP) vs through our async client
   (gRPC) on one server process, and each one's per-call latency.
9. ``sampling``: gRPC Sample calls to a server process: 16 concurrent single-sample calls vs one
   call of 16 samples, tokens/s at 1, 16 and 64 concurrent calls, and another session's training
   step latency while a long sampling batch runs.

Sections 6 and 7 run in fresh subprocesses in a full run (clean RSS and ``ru_maxrss``); with
``--quick`` everything runs in this process. Sections 4b, 8 and 9 always start ``trainer-server``
processes (stopped when the section ends). Run::

    python scripts/bench.py                    # full run, 3-5 minutes on 2 shared CPU cores
    python scripts/bench.py --quick            # smoke run (< 60 s); the test suite runs it
    python scripts/bench.py --only wire,custom --threads 2

Models are built locally (random weights, nothing downloaded) under
``$TRAINER_HOME/bench-models`` (or ``--models-dir``) and reused by later runs.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import functools
import gc
import importlib.util
import json
import os
import platform
import queue
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil  # type: ignore[import-untyped]
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from trainer_client import AdamParams, AsyncServiceClient, AsyncTrainingClient, ClientConfig, Datum
from trainer_proto import alloc, options, pb, wire

SECTIONS = ("wire", "custom", "overhead", "pipeline", "overlap", "lora", "memory", "tinker", "sampling")
TORCH_DEFAULT_THREADS = torch.get_num_threads()
"""torch's own choice of CPU threads here (read at import, before ``--threads`` is applied)."""
MIB = 1 << 20
ALLOCATOR = {"tune": True}
"""Whether this run tunes the C allocator as the service does (``--keep-allocator-defaults``: no)."""
LORA_RANK = 16
ADAM = AdamParams(learning_rate=1e-4)

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)


# ---- models ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A locally built Llama-style model (``build_tiny_model`` arguments)."""

    name: str
    hidden: int
    layers: int
    heads: int
    max_positions: int = 512


TINY = ModelSpec("bench-h64-l2", 64, 2, 4)  # the built-in tiny-llama's shape
SMALL = ModelSpec("bench-h256-l4", 256, 4, 4)
MEDIUM = ModelSpec("bench-h512-l8", 512, 8, 8)
LARGE = ModelSpec("bench-h768-l12", 768, 12, 12, 256)  # ~102M parameters with the 512-token vocabulary


def ensure_model(spec: ModelSpec, root: Path) -> Path:
    """The model's directory under ``root``, built on first use (deterministic, atomic)."""
    from trainer_server import build_tiny_model

    path = root / spec.name
    if not ((path / "config.json").is_file() and (path / "model.safetensors").is_file()):
        started = time.perf_counter()
        build_tiny_model(
            path,
            architecture="llama",
            hidden_size=spec.hidden,
            num_layers=spec.layers,
            num_heads=spec.heads,
            max_position_embeddings=spec.max_positions,
            seed=0,
        )
        log(f"built {spec.name} in {time.perf_counter() - started:.1f} s at {path}")
    return path


def make_data(n: int, length: int, vocab: int, seed: int = 0, prompt: int = 16) -> list[Datum]:
    """``n`` random datums of ``length`` targets; the first ``prompt - 1`` targets have weight 0."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(3, vocab, (length + 1,), generator=g)
        out.append(Datum.from_tokens(tokens[:prompt], tokens[prompt:]))
    return out


def weighted_nll(data: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, Mapping[str, float]]:
    """``-sum(weights * logprobs)``: the built-in ``cross_entropy``, written on the client."""
    weights = torch.cat([d.weights for d in data])
    return -(weights * torch.cat(logprobs)).sum(), {}


# ---- small helpers ---------------------------------------------------------------------------


_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress to stderr (stdout carries only the tables)."""
    print(f"[bench +{time.perf_counter() - _T0:5.1f}s] {msg}", file=sys.stderr, flush=True)


def med(xs: Sequence[float]) -> float:
    """Median."""
    return float(statistics.median(xs))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float) -> str:
    """Seconds as milliseconds."""
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def mb(nbytes: float) -> str:
    """Bytes as MB (10^6)."""
    return f"{nbytes / 1e6:.1f} MB"


def malloc_trim() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc), so RSS means live data.

    Call :func:`gc.freeze` once after start-up: a full collection then skips the millions of
    long-lived objects torch and transformers create, which otherwise take a second per call.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss() -> int:
    """Resident set size of this process in bytes, after :func:`malloc_trim`."""
    malloc_trim()
    return int(psutil.Process().memory_info().rss)


class PeakRSS:
    """Samples this process's RSS on a thread every ``interval_s``; ``peak`` is the highest seen."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._proc = psutil.Process()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


class DeviceMeter:
    """Wraps ``runtime.on_device`` to add up the time model work runs on the device thread."""

    def __init__(self, runtime: Any) -> None:
        self.busy_s = 0.0
        self.cpu_s = 0.0  # CPU time of the device thread inside that work (busy_s minus waits)
        self._runtime = runtime
        self._orig = runtime.on_device
        runtime.on_device = self._timed

    async def _timed(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def run() -> Any:
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.busy_s += time.perf_counter() - started
                self.cpu_s += time.thread_time() - cpu

        return await self._orig(run)

    def remove(self) -> None:
        """Restore the original ``on_device``."""
        self._runtime.on_device = self._orig


@dataclass
class Goal:
    """One row of the summary: a goal beside its measured value."""

    section: str
    goal: str
    measured: str
    met: bool | None  # None: reported, not judged


@dataclass
class Report:
    """Everything printed: sections of markdown, and the goals for the summary.

    Sections are kept and printed in their numeric order at the end (the memory sections run
    first, in worker processes, before the timed ones); progress goes to stderr meanwhile.
    """

    goals: list[Goal] = field(default_factory=list)
    sections: list[tuple[str, str]] = field(default_factory=list)

    def section(self, title: str, *parts: str) -> None:
        """Add a section (heading, tables and notes)."""
        self.sections.append((title, "\n\n".join(parts)))
        log(f"finished section {title.split(':', 1)[0]}")

    def goal(self, section: str, goal: str, measured: str, met: bool | None) -> None:
        """Record a goal for the summary table."""
        self.goals.append(Goal(section, goal, measured, met))

    def print(self) -> None:
        """Print every section in order, then the summary table."""
        for title, body in sorted(self.sections, key=lambda s: s[0]):
            print(f"\n## {title}\n\n{body}")
        rows = [
            (g.section, g.goal, g.measured, "n/a" if g.met is None else ("yes" if g.met else "**no**"))
            for g in sorted(self.goals, key=lambda g: g.section[0])
        ]
        print("\n## Summary: goals beside measurements\n")
        print(table(["section", "goal", "measured", "met"], rows), flush=True)


# ---- 1. wire ---------------------------------------------------------------------------------

ECHO_SERVICE = "bench.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
ECHO_FAST_METHOD = f"/{ECHO_SERVICE}/EchoFast"
TCP_CHUNK = MIB
_Req = pb.ForwardBackwardCustomRequest
_Resp = pb.ForwardBackwardCustomResponse


# Two formats carry the same bytes: one protobuf message object per chunk (chunk_tensor +
# SerializeToString / FromString, the format before the fast path), and the service's own
# fast path (`wire.STREAM_CODECS`: chunk messages written as ready bytes, one copy, and read as
# views of the received bytes, no protobuf objects). Both are still checked by ChunkAssembler.

_REQ_CODEC, _RESP_CODEC = wire.STREAM_CODECS["ForwardBackwardCustom"]


def _chunk_messages(tensor: torch.Tensor, chunk_bytes: int, *, fast: bool, response: bool) -> Iterator[Any]:
    """A tensor's chunk messages in either format (``response``: logprobs_chunk, else grad_chunk)."""
    if fast:
        return (_RESP_CODEC if response else _REQ_CODEC).chunk_messages(tensor, chunk_bytes)
    chunks = wire.chunk_tensor(tensor, chunk_bytes)
    if response:
        return (_Resp(logprobs_chunk=chunk) for chunk in chunks)
    return (_Req(grad_chunk=chunk) for chunk in chunks)


def _echo_handler(*, fast: bool) -> Any:
    """A stream handler echoing a chunked tensor the way the service moves gradients in and logprobs out.

    Reads ``grad_header`` + ``grad_chunk`` messages into a :class:`wire.ChunkAssembler`
    (decoding into a tensor), then streams the tensor back as ``logprobs_header`` +
    ``logprobs_chunk`` messages, with ``context.read`` / ``context.write`` as the servicer does.
    """

    async def echo(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        metadata = dict(context.invocation_metadata() or ())
        chunk_bytes = int(metadata.get("x-chunk-bytes", wire.DEFAULT_CHUNK_BYTES))
        header = (await context.read()).grad_header
        assembler = wire.ChunkAssembler(header, "gradient", max_bytes=1 << 34)
        while not assembler.done:
            assembler.add((await context.read()).grad_chunk)
        tensor = assembler.tensor()
        await context.write(_Resp(logprobs_header=wire.stream_header(tensor, list(header.lengths))))
        for msg in _chunk_messages(tensor, chunk_bytes, fast=fast, response=True):
            await context.write(msg)

    if fast:
        return grpc.stream_stream_rpc_method_handler(
            echo, request_deserializer=_REQ_CODEC.deserialize, response_serializer=_RESP_CODEC.serialize
        )
    return grpc.stream_stream_rpc_method_handler(
        echo, request_deserializer=_Req.FromString, response_serializer=_Resp.SerializeToString
    )


async def grpc_roundtrip(
    channel: grpc.aio.Channel, tensor: torch.Tensor, chunk_bytes: int, *, fast: bool = True
) -> torch.Tensor:
    """Client side of the gRPC echo: encode, send, receive, decode into a tensor (as the client does)."""
    method, serialize, deserialize = (
        (ECHO_FAST_METHOD, _REQ_CODEC.serialize, _RESP_CODEC.deserialize)
        if fast
        else (ECHO_METHOD, _Req.SerializeToString, _Resp.FromString)
    )
    call: Any = channel.stream_stream(method, request_serializer=serialize, response_deserializer=deserialize)(
        metadata=(("x-chunk-bytes", str(chunk_bytes)),)
    )
    lengths = [tensor.numel()]
    await call.write(_Req(grad_header=wire.stream_header(tensor, lengths)))
    for msg in _chunk_messages(tensor, chunk_bytes, fast=fast, response=False):
        await call.write(msg)
    await call.done_writing()
    header = (await call.read()).logprobs_header
    assembler = wire.ChunkAssembler(header, "logprobs", max_bytes=1 << 34, expected_lengths=lengths)
    while not assembler.done:
        assembler.add((await call.read()).logprobs_chunk)
    if await call.read() is not grpc.aio.EOF or await call.code() != grpc.StatusCode.OK:
        raise RuntimeError("echo stream did not end cleanly")
    return assembler.tensor()


async def _tcp_recv(reader: asyncio.StreamReader) -> torch.Tensor:
    n = int.from_bytes(await reader.readexactly(8), "little")
    buf = bytearray(n)
    view = memoryview(buf)
    pos = 0
    while pos < n:
        data = await reader.read(min(TCP_CHUNK, n - pos))
        if not data:
            raise ConnectionError("TCP echo: connection closed mid-tensor")
        view[pos : pos + len(data)] = data
        pos += len(data)
    return torch.frombuffer(buf, dtype=torch.float32)


async def _tcp_send(writer: asyncio.StreamWriter, tensor: torch.Tensor) -> None:
    view = tensor.numpy().data.cast("B")
    writer.write(len(view).to_bytes(8, "little"))
    for offset in range(0, len(view), TCP_CHUNK):
        writer.write(view[offset : offset + TCP_CHUNK])
        await writer.drain()


async def _tcp_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            await _tcp_send(writer, await _tcp_recv(reader))
    writer.close()


def _float_list_class() -> Any:
    """A protobuf message class ``FloatList { repeated float values = 1; }`` built at runtime."""
    fdp = descriptor_pb2.FileDescriptorProto(name="bench_floats.proto", package="bench", syntax="proto3")
    msg = fdp.message_type.add(name="FloatList")
    msg.field.add(
        name="values",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("bench.FloatList"))


def json_roundtrip(tensor: torch.Tensor) -> torch.Tensor:
    """JSON float list: encode to bytes and decode back into a tensor (no transfer)."""
    body = json.dumps(tensor.tolist()).encode()
    return torch.tensor(json.loads(body), dtype=torch.float32)


def pb_repeated_roundtrip(cls: Any, tensor: torch.Tensor) -> torch.Tensor:
    """Protobuf ``repeated float``: fill, serialize, parse, decode (fastest paths found; no transfer)."""
    msg = cls()
    msg.values.extend(tensor.tolist())
    parsed = cls.FromString(msg.SerializeToString())
    return torch.from_numpy(np.array(parsed.values, dtype=np.float32))


async def bench_wire(args: argparse.Namespace, report: Report) -> None:
    sizes = [1, 4] if args.quick else [1, 16, 64]
    slow_sizes = {1} if args.quick else {1, 16}  # JSON / repeated float: slow, so measured at these
    reps = 2 if args.quick else 5
    server = grpc.aio.server(options=options.grpc_options(max_message_bytes=64 * MIB, server=True))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                ECHO_SERVICE, {"Echo": _echo_handler(fast=False), "EchoFast": _echo_handler(fast=True)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    tcp = await asyncio.start_server(_tcp_echo, "127.0.0.1", 0, limit=4 * MIB)
    tcp_port = tcp.sockets[0].getsockname()[1]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options.grpc_options(max_message_bytes=64 * MIB))
    reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port, limit=4 * MIB)
    float_list = _float_list_class()

    async def tcp_roundtrip(t: torch.Tensor) -> torch.Tensor:
        await _tcp_send(writer, t)
        return await _tcp_recv(reader)

    async def timed(fn: Callable[[torch.Tensor], Awaitable[torch.Tensor]], t: torch.Tensor) -> float:
        started = time.perf_counter()
        out = await fn(t)
        elapsed = time.perf_counter() - started
        if not torch.equal(out, t):
            raise AssertionError("round trip changed the tensor")
        return elapsed

    async def as_async(fn: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        return fn(t)

    methods: dict[str, Callable[[torch.Tensor], Awaitable[torch.Tensor]]] = {
        "grpc": lambda t: grpc_roundtrip(channel, t, wire.DEFAULT_CHUNK_BYTES),
        "msgs": lambda t: grpc_roundtrip(channel, t, wire.DEFAULT_CHUNK_BYTES, fast=False),
        "tcp": tcp_roundtrip,
        "json": lambda t: as_async(json_roundtrip, t),
        "pb": lambda t: as_async(lambda x: pb_repeated_roundtrip(float_list, x), t),
    }
    rates: dict[tuple[str, int], float] = {}
    try:
        for size in sizes:
            t = torch.randn(size * MIB // 4, generator=torch.Generator().manual_seed(size))
            transfers = ["grpc", "msgs", "tcp"]
            # Steady state, as a training loop sees it after its first steps: a fresh connection's
            # flow-control window and the allocator's thresholds grow over its first ~16 MiB.
            warmup = 2 if args.quick else max(2, 16 // size)
            for _ in range(warmup):
                for name in transfers:
                    await timed(methods[name], t)
            times: dict[str, list[float]] = {n: [] for n in methods}
            for rep in range(reps * (3 if size == 1 and not args.quick else 1)):  # small sizes: cheap, noisy
                for name in transfers if rep % 2 == 0 else transfers[::-1]:
                    times[name].append(await timed(methods[name], t))
            if size in slow_sizes:  # encode + decode only: measured apart, so their garbage stays apart
                for name in ("json", "pb"):
                    await timed(methods[name], t)  # warm-up
                    for _ in range(2 if args.quick or size > 1 else 5):  # a few reps: seconds-long encodes
                        times[name].append(await timed(methods[name], t))
            names = [n for n in methods if times[n]]
            for name in names:
                rates[name, size] = size * MIB / med(times[name]) / 1e6
            log(f"wire {size} MiB: " + ", ".join(f"{n} {rates[n, size]:.0f} MB/s" for n in names))

        # the per-call floor: a 4-byte tensor through the same stream vs the same TCP echo
        tiny = torch.ones(1)
        floor: dict[str, list[float]] = {"grpc": [], "tcp": []}
        for rep in range(10 if args.quick else 60):
            for name in ("grpc", "tcp") if rep % 2 == 0 else ("tcp", "grpc"):
                floor[name].append(await timed(methods[name], tiny))

        # chunk-size sweep (the service's chunk_bytes is configurable)
        sweep_sizes = [1] if args.quick else [1, 16]
        chunks = [64 << 10, 256 << 10, MIB, 4 * MIB]
        sweep: dict[tuple[int, int], list[float]] = {}
        sweep_tcp: dict[int, list[float]] = {}
        for size in sweep_sizes:
            t = torch.randn(size * MIB // 4)
            for rep in range(2 if args.quick else 4):
                for c in chunks if rep % 2 == 0 else chunks[::-1]:
                    sweep.setdefault((size, c), []).append(
                        await timed(functools.partial(grpc_roundtrip, channel, chunk_bytes=c), t)
                    )
                sweep_tcp.setdefault(size, []).append(await timed(tcp_roundtrip, t))
    finally:
        writer.close()
        tcp.close()
        await channel.close()
        await server.stop(None)

    def rate(name: str, size: int) -> tuple[float, str]:
        if (name, size) in rates:
            return rates[name, size], ""
        ref = max(s for s in slow_sizes if (name, s) in rates)
        return rates[name, ref], f" (rate at {ref} MiB)"

    rows = []
    for size in sizes:
        g, tcp_rate, f = rates["grpc", size], rates["tcp", size], rates["msgs", size]
        j, jnote = rate("json", size)
        p, pnote = rate("pb", size)
        rows.append(
            (
                f"{size} MiB",
                f"{g:.0f}",
                f"{tcp_rate:.0f}",
                f"**{g / tcp_rate:.0%}**",
                f"{j:.1f}{jnote}",
                f"**{g / j:.0f}x**",
                f"{p:.1f}{pnote}",
                f"{g / p:.0f}x",
                f"{f:.0f} ({f / tcp_rate:.0%} of TCP; service format {g / f:.2f}x)",
            )
        )
    main = table(
        [
            "tensor",
            "gRPC chunked stream MB/s",
            "raw asyncio TCP MB/s",
            "gRPC / TCP",
            "JSON MB/s",
            "gRPC / JSON",
            "pb repeated float MB/s",
            "gRPC / pb",
            "protobuf message per chunk MB/s (before the fast path)",
        ],
        rows,
    )
    sweep_rows = []
    for c in chunks:
        row: list[str] = [f"{c >> 10} KiB"]
        for size in sweep_sizes:
            t_c = med(sweep[size, c])
            row.append(f"{size * MIB / t_c / 1e6:.0f} MB/s ({med(sweep_tcp[size]) / t_c:.0%} of TCP)")
        sweep_rows.append(row)
    sweep_table = table(["chunk size", *(f"gRPC, {size} MiB tensor" for size in sweep_sizes)], sweep_rows)
    report.section(
        "1. Wire: float32 tensor round trip (client -> server -> client, decoded into a tensor at each end)",
        main,
        "MB/s = tensor bytes / round-trip time (median). gRPC: the service's format over a grpc.aio bidi "
        "stream carrying the service's own messages (ForwardBackwardCustomRequest.grad_chunk in, "
        "ForwardBackwardCustomResponse.logprobs_chunk out) with `trainer_proto.wire.STREAM_CODECS`: chunk "
        "messages written as ready bytes and read as views of the received bytes, checked by ChunkAssembler, "
        f"{wire.DEFAULT_CHUNK_BYTES >> 10} KiB chunks. Raw TCP: asyncio streams, same store-and-forward echo "
        "with 1 MiB writes and decode via torch.frombuffer. JSON and protobuf `repeated float` (a FloatList "
        "message built at runtime with descriptor_pb2): encode + decode only, no transfer, so their ratios "
        "flatter them; they run at a fixed rate, so larger sizes reuse the rate measured at the size noted. "
        "Last column: the same bytes built and parsed as one protobuf message per chunk (chunk_tensor + "
        "SerializeToString / FromString), the format before the fast path. Sweep below: the service's format "
        "at other chunk sizes.",
        sweep_table,
        f"Per-call floor (a 4-byte tensor through the same stream, {len(floor['grpc'])} interleaved reps, "
        f"medians): gRPC {med(floor['grpc'][2:]) * 1e3:.2f} ms, raw TCP {med(floor['tcp'][2:]) * 1e3:.2f} ms. "
        "A call opens an HTTP/2 stream and each message is a round trip through the event loop; that fixed "
        "cost is what separates the two at 1 MiB (the data itself moves as fast: see the 16-64 MiB rows).",
    )
    worst_tcp = min(rates["grpc", s] / rates["tcp", s] for s in sizes)
    worst_json = min(rates["grpc", s] / rate("json", s)[0] for s in sizes)
    gain = min(rates["grpc", s] / rates["msgs", s] for s in sizes)
    report.goal("1 wire", ">= 75% of raw asyncio TCP", f"{worst_tcp:.0%} (worst size)", worst_tcp >= 0.75)
    report.goal("1 wire", ">= 100x faster than JSON", f"{worst_json:.0f}x (worst size)", worst_json >= 100)
    report.goal("1 wire", "fast path vs a protobuf message per chunk (reported)", f"{gain:.2f}x (worst size)", None)


# ---- the embedded service for sections 2-5 ---------------------------------------------------


@dataclass
class Service:
    """An embedded server and a client connected to it."""

    server: Any
    client: AsyncServiceClient
    specs: dict[str, ModelSpec]

    def state(self, tc: AsyncTrainingClient) -> Any:
        """The server-side ``SessionModel`` of a training client."""
        return self.server.core.sessions.get(tc.session_id).state

    def base(self, name: str) -> Any:
        """A loaded ``BaseModel``."""
        return self.server.core.models[name]

    def vocab(self, name: str) -> int:
        """Vocabulary size of a served model."""
        return int(self.base(name).vocab_size)

    async def session(self, name: str) -> AsyncTrainingClient:
        """A LoRA session (rank 16, every linear layer)."""
        return await self.client.create_training_client(name, lora_rank=LORA_RANK, seed=0)


@contextlib.asynccontextmanager
async def embedded_service(models: Mapping[ModelSpec, Path]) -> Any:
    """Start a server on 127.0.0.1:0 serving ``models`` and connect a client."""
    from trainer_server import ServerConfig, TrainerServer

    tune = ALLOCATOR["tune"]
    config = ServerConfig(models={s.name: p for s, p in models.items()}, port=0, device="cpu", tune_allocator=tune)
    client_config = ClientConfig(tune_allocator=tune)
    async with TrainerServer(config) as server, AsyncServiceClient(server.address, config=client_config) as client:
        yield Service(server, client, {s.name: s for s in models})


@dataclass
class ServerProcess:
    """A ``trainer-server`` running in its own process (``python -m trainer_server``)."""

    proc: subprocess.Popen[str]
    address: str
    tinker_url: str | None
    output: collections.deque[str]

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server process has used so far, all its threads."""
        times = psutil.Process(self.proc.pid).cpu_times()
        return float(times.user + times.system)


def _read_lines(stream: Any, lines: queue.Queue[str | None], keep: collections.deque[str]) -> None:
    for line in stream:
        keep.append(line.rstrip())
        lines.put(line.rstrip())
    lines.put(None)


@contextlib.contextmanager
def server_process(
    models: Mapping[ModelSpec, Path],
    *,
    threads: int | None = None,
    tinker: bool = False,
    api_keys: Sequence[str] = (),
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout_s: float = 180,
) -> Iterator[ServerProcess]:
    """Start ``python -m trainer_server --port 0`` serving ``models``; stop it on exit.

    The address comes from its "trainer-server ready on HOST:PORT" line; with ``tinker``, the
    Tinker API's URL from its "Tinker API on URL" log line (printed before that). ``threads``:
    ``--torch-threads`` (None: the server's default); ``env``: extra environment variables.
    """
    checkpoints = tempfile.TemporaryDirectory(prefix="bench-ckpt-")
    cmd = [sys.executable, "-m", "trainer_server", "--port", "0", "--device", "cpu"]
    if threads is not None:  # None: the server's default
        cmd += ["--torch-threads", str(threads)]
    cmd += ["--checkpoint-dir", checkpoints.name, "--no-restore-sessions", "--session-save-timeout", "0"]
    for spec, path in models.items():
        cmd += ["--model", f"{spec.name}={path}"]
    if tinker:
        cmd += ["--tinker-port", "0"]
    if not ALLOCATOR["tune"]:
        cmd.append("--keep-allocator-defaults")
    cmd += list(extra)
    environ = dict(os.environ, TRAINER_API_KEYS=",".join(api_keys), **(env or {}))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environ)
    keep: collections.deque[str] = collections.deque(maxlen=200)
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines, keep), daemon=True).start()
    try:
        deadline = time.monotonic() + timeout_s
        address, url = "", None
        while not address:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None or time.monotonic() > deadline:
                raise RuntimeError("trainer-server did not start:\n" + "\n".join(keep))
            if "Tinker API on " in line:
                url = line.split("Tinker API on ", 1)[1].split()[0].removesuffix("/api/v1")
            if line.startswith("trainer-server ready on "):
                address = line.removeprefix("trainer-server ready on ").strip()
        yield ServerProcess(proc, address, url, keep)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        checkpoints.cleanup()


async def fb_step(tc: AsyncTrainingClient, data: list[Datum]) -> None:
    """forward_backward (cross_entropy) + optim_step, both submitted before awaiting."""
    fb = tc.forward_backward(data, "cross_entropy")
    op = tc.optim_step(ADAM)
    await fb
    await op


# ---- 2. custom loss --------------------------------------------------------------------------


async def recompute_step(tc: AsyncTrainingClient, data: list[Datum]) -> None:
    """The public SDKs' custom loss: forward, loss + grad here, forward_backward with weights = -grad.

    The built-in ``cross_entropy`` is ``-sum(w * lp)``, so with ``w = -grad`` its gradient with
    respect to the logprobs is exactly the custom loss's gradient.
    """
    out = await tc.forward(data)
    leaves = [lp.detach().requires_grad_(True) for lp in out.logprobs]
    loss, _ = weighted_nll(data, leaves)
    grads = torch.autograd.grad(loss, leaves)
    surrogate = [
        Datum(model_input=d.model_input, loss_fn_inputs={"target_tokens": d.target_tokens, "weights": -g})
        for d, g in zip(data, grads, strict=True)
    ]
    await tc.forward_backward(surrogate, "cross_entropy")


async def bench_custom(args: argparse.Namespace, svc: Service, spec: ModelSpec, report: Report) -> None:
    n, length = (4, 32) if args.quick else (8, 128)
    warmup, reps = (1, 3) if args.quick else (1, 5)
    data = make_data(n, length, svc.vocab(spec.name))
    modes: dict[str, Callable[[AsyncTrainingClient], Awaitable[Any]]] = {
        "built-in cross_entropy": lambda tc: tc.forward_backward(data, "cross_entropy"),
        "forward_backward_custom (ours)": lambda tc: tc.forward_backward_custom(data, weighted_nll),
        "recompute (public SDKs)": lambda tc: recompute_step(tc, data),
    }
    sessions = {m: await svc.session(spec.name) for m in modes}
    meter = DeviceMeter(svc.server.core)
    times: dict[str, list[float]] = {m: [] for m in modes}
    device: dict[str, list[float]] = {m: [] for m in modes}
    try:
        for m, fn in modes.items():
            for _ in range(warmup):
                await fn(sessions[m])
        order = list(modes)
        for rep in range(reps):
            for m in order[rep % 3 :] + order[: rep % 3]:
                meter.busy_s = 0.0
                started = time.perf_counter()
                await modes[m](sessions[m])
                times[m].append(time.perf_counter() - started)
                device[m].append(meter.busy_s)
    finally:
        meter.remove()
    # Same data, same steps, no optimizer step: the accumulated gradients must agree.
    ref = [p.grad for p in svc.state(sessions["built-in cross_entropy"]).params]
    scale = max(float(g.abs().max()) for g in ref if g is not None)
    diffs = {}
    for m, tc in sessions.items():
        grads = [p.grad for p in svc.state(tc).params]
        diffs[m] = max(float((a - b).abs().max()) for a, b in zip(grads, ref, strict=True)) / scale
    for tc in sessions.values():
        await tc.close()
    base = med(times["built-in cross_entropy"])
    rows = [
        (m, ms(med(times[m])), f"**{med(times[m]) / base:.3f}x**", ms(med(device[m])), f"{diffs[m]:.1e}") for m in modes
    ]
    ours = med(times["forward_backward_custom (ours)"]) / base
    recompute = med(times["recompute (public SDKs)"]) / base
    report.section(
        "2. Custom loss: step time vs the built-in loss computing the same value",
        table(["mode", "step time (median)", "vs built-in", "server device time", "grad diff vs built-in"], rows),
        f"Model {spec.name} ({svc.base(spec.name).num_parameters / 1e6:.1f}M params, LoRA r{LORA_RANK}), "
        f"batch {n} x {length} tokens, {reps} interleaved reps after {warmup} warm-up, server embedded on "
        "loopback. The loss is `-sum(weights * logprobs)` (= cross_entropy) computed on the client. One "
        "step = the forward+backward call(s) only (no optim_step, so all three sessions accumulate "
        "gradients over identical steps; the last column is max|grad - grad_built-in| / max|grad_built-in| "
        "after the run, which checks that the three modes compute the same gradient).",
    )
    report.goal("2 custom loss", "forward_backward_custom <= 1.05x built-in", f"{ours:.3f}x", ours <= 1.05)
    report.goal("2 custom loss", "recompute mode (reference, ~1.3-1.5x expected)", f"{recompute:.2f}x", None)


# ---- 3. service overhead ---------------------------------------------------------------------


async def bench_overhead(args: argparse.Namespace, svc: Service, specs: Sequence[ModelSpec], report: Report) -> None:
    from trainer_server._batch import parse_datums
    from trainer_server._engine import AdamSettings, SessionModel
    from trainer_server._losses import cross_entropy
    from trainer_server.core.types import LoraSpec, RawDatum

    loop = asyncio.get_running_loop()
    device_thread = svc.server.core._executor  # the thread (and torch/OpenMP threads) the service uses
    rows = []
    for i, spec in enumerate(specs):
        big = i == len(specs) - 1
        if args.quick:
            (n, length), (warmup, reps) = ((4, 64), (1, 2)) if big else ((4, 32), (1, 3))
        else:
            (n, length), (warmup, reps) = ((4, 128), (1, 3)) if big else ((8, 128), (1, 5))
        base = svc.base(spec.name)
        data = make_data(n, length, base.vocab_size)
        tc = await svc.session(spec.name)
        state = SessionModel(base, LoraSpec(rank=LORA_RANK), 0)  # what the server builds for tc
        raw = [RawDatum(d.model_input, dict(d.loss_fn_inputs)) for d in data]
        batch = parse_datums(raw, base, svc.server.core.config.limits)
        settings = AdamSettings({f.name: v for f, v in ADAM.to_proto().ListFields()})

        def in_process(state: Any = state, batch: Any = batch, settings: Any = settings) -> None:
            logprobs = state.logprobs(batch, grad=True)
            loss, _ = cross_entropy(logprobs, batch, {})
            state.backward(loss, torch.ones_like(loss))
            state.optim_step(settings)

        async def step(
            which: str, tc: AsyncTrainingClient = tc, data: list[Datum] = data, fn: Callable[[], None] = in_process
        ) -> float:
            started = time.perf_counter()
            if which == "in":
                await loop.run_in_executor(device_thread, fn)
            else:
                await fb_step(tc, data)
            return time.perf_counter() - started

        for _ in range(warmup):
            await step("in")
            await step("svc")
        times: dict[str, list[float]] = {"in": [], "svc": []}
        meter = DeviceMeter(svc.server.core)
        svc_device: list[float] = []
        try:
            for rep in range(reps):
                for which in ("in", "svc") if rep % 2 == 0 else ("svc", "in"):
                    meter.busy_s = 0.0
                    times[which].append(await step(which))
                    if which == "svc":
                        svc_device.append(meter.busy_s)
        finally:
            meter.remove()
        await tc.close()
        del state
        t_in, t_svc = med(times["in"]), med(times["svc"])
        # Each rep is an adjacent (in-process, service) pair: the median of the pairs' ratios cancels
        # slow drifts in the machine's load better than the ratio of the two medians.
        ratio = med([b / a for a, b in zip(times["in"], times["svc"], strict=True)])
        outside = med([w - d for w, d in zip(times["svc"], svc_device, strict=True)])
        label = f"{spec.name} ({base.num_parameters / 1e6:.1f}M params)"
        rows.append(
            (
                label,
                f"{n} x {length}",
                ms(t_in),
                ms(t_svc),
                ms(med(svc_device)),
                f"{ms(outside)} ({outside / t_in:.1%})",
                f"**{ratio:.3f}x**",
                reps,
            )
        )
        judged = t_in >= 0.1
        report.goal(
            "3 overhead",
            f"service step <= 1.05x in-process, {label}" + ("" if judged else " (compute < 100 ms: not judged)"),
            f"{ratio:.3f}x (in-process {ms(t_in)}; outside the device thread {ms(outside)})",
            ratio <= 1.05 if judged else None,
        )
        log(f"overhead {spec.name}: in-process {ms(t_in)}, service {ms(t_svc)}")

    # tiny-call latency
    calls = 30 if args.quick else 300
    stub_call = svc.client._stub.GetServerInfo
    lat_client: list[float] = []
    lat_stub: list[float] = []
    for _ in range(5):
        await svc.client.get_server_info()
    for _ in range(calls):
        started = time.perf_counter()
        await svc.client.get_server_info()
        lat_client.append(time.perf_counter() - started)
        started = time.perf_counter()
        await stub_call(pb.GetServerInfoRequest(), timeout=10)
        lat_stub.append(time.perf_counter() - started)
    lat_rows = [
        ("`AsyncServiceClient.get_server_info()`", f"{med(lat_client) * 1e3:.2f} ms", _p90(lat_client)),
        ("raw stub `GetServerInfo`", f"{med(lat_stub) * 1e3:.2f} ms", _p90(lat_stub)),
    ]
    report.section(
        "3. Service overhead: full step through the service vs the same step in-process",
        table(
            [
                "model",
                "batch",
                "in-process step",
                "service step",
                "service: device time",
                "service: time outside device work",
                "service / in-process (median of paired reps)",
                "reps",
            ],
            rows,
        ),
        "Step = forward + cross_entropy + backward + AdamW step, LoRA r16. In-process: a `SessionModel` built "
        "exactly as the server builds the session's (same base model object, same batch), called directly on "
        "the server's device thread, so the same torch threads do the work; service: `forward_backward` + "
        "`optim_step` submitted together and awaited, through grpc.aio on loopback (client and server share "
        "this process). Device time = time inside `Runtime.on_device` during the service step; the time outside it "
        "(gRPC, datum encode/decode, sequencing, thread hops) is what the service adds, shown as a share of the "
        "in-process step. Reps alternate in-process/service; medians.",
        table(["tiny call (loopback)", "median", "p90"], lat_rows)
        + f"\n\n{calls} calls each, interleaved; the server builds the GetServerInfo response once, after "
        "loading its models.",
    )
    report.goal(
        "3 overhead",
        "tiny call (GetServerInfo) <= 1 ms median",
        f"{med(lat_client) * 1e3:.2f} ms (raw stub: {med(lat_stub) * 1e3:.2f} ms)",
        med(lat_client) <= 1e-3,
    )


def _p90(xs: Sequence[float]) -> str:
    return f"{sorted(xs)[int(0.9 * (len(xs) - 1))] * 1e3:.2f} ms"


# ---- 4. pipelining ---------------------------------------------------------------------------


async def run_steps(tc: AsyncTrainingClient, data: list[Datum], steps: int, *, pipelined: bool) -> None:
    """``steps`` steps of forward_backward + optim_step; pipelined submits step k+1 before awaiting k."""
    if not pipelined:
        for _ in range(steps):
            await tc.forward_backward(data, "cross_entropy")
            await tc.optim_step(ADAM)
        return
    pending = [(tc.forward_backward(data, "cross_entropy"), tc.optim_step(ADAM))]
    for k in range(steps):
        if k + 1 < steps:
            pending.append((tc.forward_backward(data, "cross_entropy"), tc.optim_step(ADAM)))
        fb, op = pending.pop(0)
        await fb
        await op


@dataclass
class EmbeddedRuns:
    """Per-step wall, device time and device-thread CPU of each round, by pipelined (True) or not."""

    wall: dict[bool, list[float]] = field(default_factory=lambda: {False: [], True: []})
    device: dict[bool, list[float]] = field(default_factory=lambda: {False: [], True: []})
    cpu: dict[bool, list[float]] = field(default_factory=lambda: {False: [], True: []})


async def measure_embedded(
    svc: Service, tc: AsyncTrainingClient, data: list[Datum], steps: int, rounds: int
) -> EmbeddedRuns:
    """``rounds`` rounds of awaited and pipelined steps back to back, the order alternating."""
    runs = EmbeddedRuns()
    meter = DeviceMeter(svc.server.core)
    try:
        for r in range(rounds):
            for pipelined in (False, True) if r % 2 == 0 else (True, False):
                meter.busy_s = meter.cpu_s = 0.0
                started = time.perf_counter()
                await run_steps(tc, data, steps, pipelined=pipelined)
                runs.wall[pipelined].append((time.perf_counter() - started) / steps)
                runs.device[pipelined].append(meter.busy_s / steps)
                runs.cpu[pipelined].append(meter.cpu_s / steps)
    finally:
        meter.remove()
    return runs


async def bench_pipeline(args: argparse.Namespace, svc: Service, specs: Sequence[ModelSpec], report: Report) -> None:
    rows = []
    for spec in specs:
        n, length = (4, 32) if args.quick or spec.hidden <= 64 else (8, 128)
        steps = 4 if args.quick or spec.hidden > 64 else 8
        rounds = 1 if args.quick else 6
        data = make_data(n, length, svc.vocab(spec.name))
        tc = await svc.session(spec.name)
        await run_steps(tc, data, 2, pipelined=False)  # warm-up
        runs = await measure_embedded(svc, tc, data, steps, rounds)
        await tc.close()
        ratio = med([p / a for a, p in zip(runs.wall[False], runs.wall[True], strict=True)])
        for pipelined in (False, True):
            wall = med(runs.wall[pipelined])
            busy = med([d / w for w, d in zip(runs.wall[pipelined], runs.device[pipelined], strict=True)])
            rows.append(
                (
                    f"{spec.name}, {n} x {length}",
                    "next step submitted before awaiting" if pipelined else "each call awaited",
                    ms(wall),
                    f"**{ratio:.3f}x**" if pipelined else "1.000x",
                    f"**{busy:.1%}**",
                    ms(med(runs.device[pipelined])),
                    ms(med(runs.cpu[pipelined])),
                )
            )
            if pipelined:
                awaited_busy = med([d / w for w, d in zip(runs.wall[False], runs.device[False], strict=True)])
                report.goal(
                    "4 pipelining",
                    f">= 95% server busy when pipelined, embedded ({spec.name})",
                    f"{busy:.1%} (awaited: {awaited_busy:.1%}; wall {ratio:.3f}x of awaited)",
                    busy >= 0.95,
                )
    report.section(
        "4. Pipelining, server embedded: server busy fraction and wall time per step",
        table(
            [
                "model, batch",
                "submission",
                "wall per step (median)",
                "pipelined / awaited (median of paired rounds)",
                "server busy",
                "device time per step",
                "device thread CPU per step",
            ],
            rows,
        ),
        "Client and server in this process (the server embedded on loopback). Busy = time inside "
        "`TrainingCore.on_device` (all model work: forward, loss, backward, AdamW) / wall time, measured by "
        "wrapping `server.core.on_device`; device thread CPU = `time.thread_time()` inside that work, so "
        "device time minus it is time the device thread waited (for the GIL, held by the event loop that "
        "serves client and server here, or for a core). Each step = forward_backward (cross_entropy) + "
        "optim_step, LoRA r16; rounds run the awaited and the pipelined loop back to back, the order "
        "alternating. Section 4b measures the same with the server in its own process.",
    )


# ---- 4b. pipelining, server in its own process --------------------------------------------


@dataclass(frozen=True)
class ServerSetting:
    """How a server process is started: its ``--torch-threads`` and extra environment."""

    label: str
    threads: int | None
    env: Mapping[str, str] = field(default_factory=dict)


def server_settings(quick: bool) -> list[ServerSetting]:
    """The server's default, and (full run) torch's own thread choice with and without spinning."""
    from trainer_server.__main__ import default_torch_threads

    cores = len(os.sched_getaffinity(0))
    default = default_torch_threads("cpu", cores) or TORCH_DEFAULT_THREADS
    settings = [ServerSetting(f"trainer-server default ({default} thread(s))", None)]
    if not quick and default != TORCH_DEFAULT_THREADS:
        n = TORCH_DEFAULT_THREADS
        settings.append(ServerSetting(f"--torch-threads {n} (torch's choice: the old default)", n))
        settings.append(
            ServerSetting(
                f"--torch-threads {n}, OMP_WAIT_POLICY=PASSIVE (no spinning)", n, {"OMP_WAIT_POLICY": "PASSIVE"}
            )
        )
    return settings


@dataclass
class PipelineRuns:
    """Per-step wall and server CPU seconds of each round, by pipelined (True) or awaited (False)."""

    wall: dict[bool, list[float]] = field(default_factory=lambda: {False: [], True: []})
    cpu: dict[bool, list[float]] = field(default_factory=lambda: {False: [], True: []})

    def ratio(self) -> float:
        """Median over rounds of pipelined / awaited wall (each round runs both back to back)."""
        return med([p / a for a, p in zip(self.wall[False], self.wall[True], strict=True)])


async def measure_pipeline_round(
    tc: AsyncTrainingClient, proc: ServerProcess, data: list[Datum], steps: int, runs: PipelineRuns, *, first: bool
) -> None:
    """One round: awaited and pipelined (order set by ``first``), per-step wall and server CPU."""
    for pipelined in (first, not first):
        cpu0, started = proc.cpu_s(), time.perf_counter()
        await run_steps(tc, data, steps, pipelined=pipelined)
        runs.wall[pipelined].append((time.perf_counter() - started) / steps)
        runs.cpu[pipelined].append((proc.cpu_s() - cpu0) / steps)


async def bench_pipeline_process(
    args: argparse.Namespace, dirs: Mapping[ModelSpec, Path], specs: Sequence[ModelSpec], report: Report
) -> None:
    settings = server_settings(args.quick)
    rounds = 1 if args.quick else 4
    results: dict[tuple[str, str], PipelineRuns] = {}
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(server_process({s: dirs[s] for s in specs}, threads=x.threads, env=x.env))
            for x in settings
        ]
        log(f"pipelining: {len(procs)} server process(es) up")
        async with contextlib.AsyncExitStack() as clients:
            conns = [await clients.enter_async_context(AsyncServiceClient(p.address)) for p in procs]
            for spec in specs:
                n, length = (4, 32) if spec.hidden <= 64 else (8, 128)
                steps = (3 if args.quick else 8) if spec.hidden <= 64 else 3
                data = make_data(n, length, 512)
                sessions = [await c.create_training_client(spec.name, lora_rank=LORA_RANK, seed=0) for c in conns]
                for tc in sessions:
                    await run_steps(tc, data, 2, pipelined=False)  # warm-up
                for r in range(rounds):
                    order = list(range(len(settings)))
                    for i in order if r % 2 == 0 else order[::-1]:
                        runs = results.setdefault((spec.name, settings[i].label), PipelineRuns())
                        await measure_pipeline_round(sessions[i], procs[i], data, steps, runs, first=r % 2 == 0)
                for tc in sessions:
                    await tc.close()
                log(f"pipelining (own process) {spec.name} done")
    rows = []
    for (name, label), runs in results.items():
        ratio = runs.ratio()
        rows.append(
            (
                name,
                label,
                ms(med(runs.wall[False])),
                ms(med(runs.wall[True])),
                f"**{ratio:.3f}x**",
                ms(med(runs.cpu[False])),
                ms(med(runs.cpu[True])),
            )
        )
        if label == settings[0].label:
            report.goal(
                "4 pipelining",
                f"pipelined no slower than awaited, server in its own process, default settings ({name})",
                f"{ratio:.3f}x (<= 1.03 judged: the spread of paired rounds here)",
                ratio <= 1.03,
            )
        else:
            report.goal("4 pipelining", f"same, {label} ({name}) (reported)", f"{ratio:.3f}x", None)
    report.section(
        "4b. Pipelining with the server in its own process: wall time per step",
        table(
            [
                "model",
                "server started with",
                "awaited: wall per step",
                "pipelined: wall per step",
                "pipelined / awaited (median of paired rounds)",
                "server CPU per step, awaited",
                "server CPU per step, pipelined",
            ],
            rows,
        ),
        f"`python -m trainer_server --port 0 --device cpu` per row (all started at once and used in turn, "
        f"{rounds} round(s); in each round every server runs the awaited and the pipelined loop back to back, "
        "the order alternating), our async client in this process. Step = forward_backward (cross_entropy) + "
        "optim_step, LoRA r16; bench-h64-l2 4 x 32 tokens, bench-h256-l4 8 x 128. Server CPU = user + system "
        "time of the server process (all threads) per step: OpenMP threads that busy-wait show up here. "
        f"torch's own choice on this machine is {TORCH_DEFAULT_THREADS} thread(s).",
    )


# ---- 5. overlap ------------------------------------------------------------------------------


async def bench_overlap(args: argparse.Namespace, svc: Service, spec: ModelSpec, report: Report) -> None:
    from trainer_server._batch import parse_datums
    from trainer_server.core.types import RawDatum

    n, length = (4, 32) if args.quick else (8, 128)
    window, windows = (2, 1) if args.quick else (4, 2)
    data = make_data(n, length, svc.vocab(spec.name))
    tc = await svc.session(spec.name)
    state = svc.state(tc)
    raw = [RawDatum(d.model_input, dict(d.loss_fn_inputs)) for d in data]
    batch = parse_datums(raw, svc.base(spec.name), svc.server.core.config.limits)

    def forward_time() -> float:
        started = time.perf_counter()
        state.logprobs(batch, grad=True)
        return time.perf_counter() - started

    await run_steps(tc, data, 1, pipelined=False)  # warm-up
    t_fwd = med([await svc.server.core.on_device(forward_time) for _ in range(3)])

    def slow_loss(d: list[Datum], lp: list[torch.Tensor]) -> tuple[torch.Tensor, Mapping[str, float]]:
        time.sleep(t_fwd)
        return weighted_nll(d, lp)

    async def run_window(mode: str) -> None:
        if mode == "awaited":
            for _ in range(window):
                await tc.forward_backward_custom(data, slow_loss)
            await tc.optim_step(ADAM)
            return
        if mode == "submitted":
            futures = [tc.forward_backward_custom(data, slow_loss) for _ in range(window)]
        else:
            futures = [tc.forward_backward(data, "cross_entropy") for _ in range(window)]
        op = tc.optim_step(ADAM)
        for f in futures:
            await f
        await op

    modes = {
        "awaited": "custom loss (sleep = forward time), each call awaited",
        "submitted": "custom loss (sleep = forward time), window submitted at once",
        "builtin": "built-in loss, window submitted at once (no client loss: the floor)",
    }
    meter = DeviceMeter(svc.server.core)
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    try:
        for w in range(windows):
            for m in list(modes) if w % 2 == 0 else list(modes)[::-1]:
                meter.busy_s = 0.0
                started = time.perf_counter()
                await run_window(m)
                results[m].append((time.perf_counter() - started, meter.busy_s))
    finally:
        meter.remove()
    await tc.close()
    floor = med([w for w, _ in results["builtin"]])
    rows = []
    for m, label in modes.items():
        wall = med([w for w, _ in results[m]])
        dev = med([d for _, d in results[m]])
        rows.append((label, ms(wall), ms(dev), f"{dev / wall:.0%}", f"{wall / floor:.2f}x"))
    dev_custom = med([d for _, d in results["submitted"]])
    bound = floor + t_fwd  # only the window's last loss cannot hide behind server work
    rows.append(
        (
            "lower bound with overlap (the floor + the one loss per window that cannot hide)",
            f"~{ms(bound)}",
            ms(dev_custom),
            f"~{dev_custom / bound:.0%}",
            f"~{bound / floor:.2f}x",
        )
    )
    submitted = med([w for w, _ in results["submitted"]])
    awaited = med([w for w, _ in results["awaited"]])
    report.section(
        "5. Overlap: client loss as slow as the forward",
        table(["mode", f"wall per window of {window} + optim_step", "device time", "busy", "vs floor"], rows),
        f"{spec.name}, batch {n} x {length}, LoRA r16; forward time (with graph) {ms(t_fwd)}, so the loss sleeps "
        f"{ms(t_fwd)}. Median of {windows} window(s) per mode. With the window submitted at once, the server runs "
        "the forward of call k+1 while the client computes the loss of call k (one call ahead; backward passes "
        "stay in sequence order; never past an optim_step). Each call awaited cannot overlap: the client sends "
        "call k+1 only after call k returned. The last row is the bound: only the window's last loss has no "
        "server work to hide behind.",
    )
    report.goal(
        "5 overlap",
        "server runs forward k+1 while the client computes loss k (reported)",
        f"window submitted at once: {submitted / floor:.2f}x the floor (bound ~{bound / floor:.2f}x; "
        f"awaited {awaited / floor:.2f}x)",
        None,
    )


# ---- 8. Tinker SDK vs our client ----------------------------------------------------------

TINKER_KEY = "tml-bench-key"
"""The API key of the bench's server process (the tinker SDK refuses keys without ``tml-``)."""


def tinker_datums(data: Sequence[Datum]) -> list[Any]:
    """The same datums as ``tinker.types.Datum`` (token lists; target_tokens and weights)."""
    from tinker import types

    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(d.model_input.tolist()),
            loss_fn_inputs={
                "target_tokens": types.TensorData.from_torch(d.target_tokens),
                "weights": types.TensorData.from_torch(d.weights),
            },
        )
        for d in data
    ]


def sdk_sft_step(tc: Any, data: list[Any]) -> None:
    """forward_backward (cross_entropy) + optim_step through the tinker SDK, both submitted first."""
    from tinker import types

    fb = tc.forward_backward(data, "cross_entropy")
    op = tc.optim_step(types.AdamParams(learning_rate=ADAM.learning_rate))
    fb.result()
    op.result()


async def timed_call(fn: Callable[[], Awaitable[Any]]) -> float:
    """Seconds one awaited call takes."""
    started = time.perf_counter()
    await fn()
    return time.perf_counter() - started


async def interleaved(calls: Mapping[str, Callable[[], Awaitable[Any]]], reps: int) -> dict[str, list[float]]:
    """Each call ``reps`` times, rep by rep, the order reversed every other rep."""
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            times[name].append(await timed_call(calls[name]))
    return times


async def bench_tinker(
    args: argparse.Namespace, proc: ServerProcess, client: AsyncServiceClient, spec: ModelSpec, report: Report
) -> None:
    import tinker

    n, length = (4, 32) if args.quick else (8, 128)
    reps, tiny_reps = (2, 10) if args.quick else (6, 100)
    data = make_data(n, length, 512)
    sdk_data = tinker_datums(data)
    one = make_data(1, 8, 512, seed=1, prompt=4)
    sdk_one = tinker_datums(one)
    if proc.tinker_url is None:  # never let the SDK fall back to its hosted default URL
        raise RuntimeError("the server printed no Tinker API URL:\n" + "\n".join(proc.output))
    sdk = await asyncio.to_thread(tinker.ServiceClient, base_url=proc.tinker_url, api_key=TINKER_KEY)
    try:
        sdk_tc = await asyncio.to_thread(
            lambda: sdk.create_lora_training_client(base_model=spec.name, rank=LORA_RANK, seed=0).result()
        )
        ours = await client.create_training_client(spec.name, lora_rank=LORA_RANK, seed=0)
        steps: dict[str, Callable[[], Awaitable[Any]]] = {
            "tinker SDK": lambda: asyncio.to_thread(sdk_sft_step, sdk_tc, sdk_data),
            "our async client": lambda: fb_step(ours, data),
        }
        await interleaved(steps, 1)  # warm-up
        step_times = await interleaved(steps, reps)
        tiny: dict[str, Callable[[], Awaitable[Any]]] = {
            "tinker SDK: forward, 1 datum of 8 tokens": lambda: asyncio.to_thread(
                lambda: sdk_tc.forward(sdk_one, "cross_entropy").result()
            ),
            "our client: forward, 1 datum of 8 tokens": lambda: ours.forward(one),
            "tinker SDK: get_server_capabilities": lambda: asyncio.to_thread(sdk.get_server_capabilities),
            "our client: get_server_info": client.get_server_info,
        }
        await interleaved(tiny, 3)
        tiny_times = await interleaved(tiny, tiny_reps)
        await ours.close()
    finally:
        await asyncio.to_thread(lambda: sdk.close("success").result())
    base = step_times["our async client"]
    ratio = med([a / b for a, b in zip(step_times["tinker SDK"], base, strict=True)])
    step_rows = [(name, ms(med(t)), f"{med(t) / med(base):.2f}x") for name, t in step_times.items()]
    tiny_rows = [(name, ms(med(t)), _p90(t)) for name, t in tiny_times.items()]
    sdk_fwd, our_fwd = (med(t) for t in list(tiny_times.values())[:2])
    report.section(
        "8. Tinker SDK vs our client: one SFT step and per-call latency",
        table(["SFT step (forward_backward cross_entropy + optim_step)", "wall (median)", "vs our client"], step_rows)
        + f"\n\nMedian of paired reps (SDK / ours): **{ratio:.2f}x**.",
        table(["tiny call", "median", "p90"], tiny_rows),
        f"One `trainer-server` process (`--tinker-port 0`, API key `{TINKER_KEY}`) serving {spec.name}; the "
        f"official tinker SDK ({tinker.__version__}: HTTP, futures polled with retrieve_future) and our "
        "async client (gRPC) drive it from this process, each with its own LoRA r16 session, on the same "
        f"{n} x {length}-token datums; {reps} interleaved reps after a warm-up, {tiny_reps} per tiny call. "
        "The SDK blocks, so its calls run in a worker thread here (`asyncio.to_thread`), as a script would "
        "call it. get_server_capabilities and get_server_info do no model work: they are the protocol's cost.",
    )
    report.goal("8 tinker", "SFT step: tinker SDK / our client (reported)", f"{ratio:.2f}x", None)
    report.goal(
        "8 tinker",
        "tiny forward: tinker SDK vs our client (reported)",
        f"{sdk_fwd * 1e3:.1f} ms vs {our_fwd * 1e3:.1f} ms ({sdk_fwd / our_fwd:.1f}x)",
        None,
    )


# ---- 9. sampling through the service --------------------------------------------------------

PROMPT_TOKENS = 20
NEW_TOKENS = 32


def prompt_tokens(count: int, seed: int) -> list[list[int]]:
    """``count`` distinct random prompts of ``PROMPT_TOKENS`` tokens."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (PROMPT_TOKENS,), generator=g).tolist() for _ in range(count)]


@dataclass(frozen=True)
class SampleCase:
    """A request pattern: one Sample call per prompt, all at once."""

    prompts: list[list[int]]
    num_samples: int = 1
    max_tokens: int = NEW_TOKENS


async def sample_concurrently(sampler: Any, case: SampleCase) -> int:
    """Run a case (every call at once); the number of tokens generated."""
    from trainer_client import SamplingParams

    params = [SamplingParams(max_tokens=case.max_tokens, temperature=1.0, seed=i) for i in range(len(case.prompts))]
    calls = (sampler.sample(p, case.num_samples, params[i]) for i, p in enumerate(case.prompts))
    outs = await asyncio.gather(*calls)
    return sum(len(seq.tokens) for out in outs for seq in out.sequences)


def sampling_cases(quick: bool) -> dict[str, SampleCase]:
    """The anchor (one call of 16 samples) first, the goal's case (16 concurrent calls) third."""
    cases = {"one call, num_samples=16": SampleCase(prompt_tokens(1, 0), 16)}
    for c in [1, 16] if quick else [1, 16, 64]:
        cases[f"{c} concurrent call(s), 1 sample each, distinct prompts"] = SampleCase(prompt_tokens(c, c))
    if not quick:  # the fixed cost per call: prefill, transport, admission; almost no decoding
        cases["one call, num_samples=16, max_tokens=1"] = SampleCase(prompt_tokens(1, 0), 16, 1)
        cases["16 concurrent calls, max_tokens=1"] = SampleCase(prompt_tokens(16, 16), 1, 1)
    return cases


async def sampling_throughput(args: argparse.Namespace, sampler: Any) -> tuple[list[tuple[str, ...]], float]:
    """Rows of :func:`sampling_cases`; and the 16-concurrent / one-call ratio (median of per-rep ratios)."""
    reps = 1 if args.quick else 7
    cases = sampling_cases(args.quick)
    await sample_concurrently(sampler, SampleCase(prompt_tokens(4, 99)))  # warm-up
    times: dict[str, list[float]] = {k: [] for k in cases}
    tokens: dict[str, int] = {}
    names = list(cases)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            tokens[name] = await sample_concurrently(sampler, cases[name])
            times[name].append(time.perf_counter() - started)
    anchor = med(times[names[0]])
    rows: list[tuple[str, ...]] = [
        (n, ms(med(times[n])), f"{med(times[n]) / anchor:.2f}x", str(tokens[n]), f"{tokens[n] / med(times[n]):.0f}")
        for n in names
    ]
    return rows, med([b / a for a, b in zip(times[names[0]], times[names[2]], strict=True)])


async def training_latencies(
    tc: AsyncTrainingClient, data: list[Datum], until: Callable[[], bool], least: int
) -> list[float]:
    """Step latencies (forward_backward + optim_step, awaited) until ``until()`` and at least ``least`` steps."""
    out: list[float] = []
    while len(out) < least or not until():
        started = time.perf_counter()
        await fb_step(tc, data)
        out.append(time.perf_counter() - started)
    return out


async def fair_scheduling(
    args: argparse.Namespace, client: AsyncServiceClient, spec: ModelSpec
) -> tuple[list[tuple[str, ...]], float]:
    """Session B's step latency alone, and while session A samples a long batch; the worst-case ratio."""
    from trainer_client import SamplingParams

    a = await client.create_training_client(spec.name, lora_rank=LORA_RANK, seed=0)
    b = await client.create_training_client(spec.name, lora_rank=LORA_RANK, seed=1)
    data = make_data(4, 32, 512)
    requests, new_tokens = (16, 64) if args.quick else (64, 128)
    await fb_step(b, data)
    alone = await training_latencies(b, data, lambda: True, 5 if args.quick else 10)
    sampler = a.create_sampling_client()
    params = SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=0)
    started = time.perf_counter()
    batch = asyncio.gather(*(sampler.sample(p, 1, params) for p in prompt_tokens(requests, 7)))
    loaded = await training_latencies(b, data, batch.done, 2)
    await batch
    sampling_s = time.perf_counter() - started
    await a.close()
    await b.close()
    rows: list[tuple[str, ...]] = [
        ("session B alone", str(len(alone)), ms(med(alone)), ms(max(alone)), "-"),
        (
            f"session B while session A samples {requests} x {new_tokens} tokens",
            str(len(loaded)),
            ms(med(loaded)),
            ms(max(loaded)),
            ms(sampling_s),
        ),
    ]
    return rows, max(loaded) / max(alone)


async def bench_sampling(args: argparse.Namespace, client: AsyncServiceClient, spec: ModelSpec, report: Report) -> None:
    rows, ratio = await sampling_throughput(args, client.create_sampling_client(base_model=spec.name))
    fair_rows, worst = await fair_scheduling(args, client, spec)
    report.section(
        "9. Sampling through the service: batching across calls, throughput, fair scheduling",
        table(["request pattern", "wall (median)", "vs one call of 16", "tokens generated", "tokens/s"], rows),
        f"gRPC Sample calls from our async client to a `trainer-server` process serving {spec.name} (base "
        f"weights); {PROMPT_TOKENS}-token prompts, max {NEW_TOKENS} new tokens, temperature 1, a seed per "
        "call (a sample ends early at EOS: tokens are counted). The max_tokens=1 rows (full run) show the fixed "
        "cost of a call (prefill, gRPC, admission) apart from decoding. Cases interleaved rep by rep; medians. The "
        "goal's ratio (summary) is the median over reps of 16 concurrent calls / one call of 16 in the same rep.",
        table(["training steps of session B", "steps", "median step", "worst step", "sampling batch took"], fair_rows),
        "Session B runs forward_backward + optim_step (4 x 32 tokens, awaited) while session A samples a long "
        "batch of single-sample calls on its own weights (same base model, same server): the worst step "
        "with the load shows how long B waits for A.",
    )
    report.goal(
        "9 sampling",
        "16 concurrent calls (distinct prompts) <= 1.5x one call of num_samples=16",
        f"{ratio:.2f}x",
        ratio <= 1.5,
    )
    report.goal(
        "9 sampling", "fair scheduling: B's worst step with A sampling / without (reported)", f"{worst:.1f}x", None
    )


# ---- 6. multi-tenant LoRA memory -------------------------------------------------------------


async def lora_memory(model_dir: str, name: str, counts: Sequence[int]) -> dict[str, Any]:
    """Server RSS with ``counts`` LoRA sessions on one base model (each after one step)."""
    spec = ModelSpec(name, 0, 0, 0)
    async with embedded_service({spec: Path(model_dir)}) as svc:
        base = svc.base(name)
        data = make_data(2, 32, base.vocab_size)
        # Warm the code paths once (kernels, autograd engine, peft import) with a throwaway session.
        tc = await svc.session(name)
        await fb_step(tc, data)
        await tc.close()
        gc.collect()
        gc.freeze()
        rows = [(0, rss())]
        sessions: list[AsyncTrainingClient] = []
        for count in counts:
            while len(sessions) < count:
                tc = await svc.session(name)
                await fb_step(tc, data)
                sessions.append(tc)
            rows.append((count, rss()))
        trainable = sessions[0].trainable_parameters
        optim_bytes = 0
        for p in svc.state(sessions[0]).params:
            opt = svc.state(sessions[0]).optimizer.state[p]
            optim_bytes += sum(v.numel() * v.element_size() for v in opt.values() if isinstance(v, torch.Tensor))
        base_bytes = sum(p.numel() * p.element_size() for p in base.model.parameters())
        for tc in sessions:
            await tc.close()
    gc.unfreeze()
    return {
        "rows": rows,
        "trainable": trainable,
        "adapter_bytes": trainable * 4,
        "optim_bytes": optim_bytes,
        "base_bytes": base_bytes,
        "base_params": sum(p.numel() for p in base.model.parameters()),
    }


def report_lora(result: Mapping[str, Any], name: str, where: str, report: Report) -> None:
    rows_in = result["rows"]
    zero = rows_in[0][1]
    expected = result["adapter_bytes"] + result["optim_bytes"]
    rows = []
    prev: tuple[int, int] | None = None
    per_extra = 0.0
    for count, value in rows_in[1:]:
        extra = ""
        if prev is not None:
            per_extra = (value - prev[1]) / (count - prev[0])
            share = per_extra / result["base_bytes"]
            extra = f"{mb(per_extra)} ({per_extra / expected:.2f}x adapter+Adam, {share:.1%} of base)"
        rows.append((count, mb(value), mb(value - zero), extra or "(first session)"))
        prev = (count, value)
    report.section(
        "6. Multi-tenant LoRA: server memory vs sessions on one base model",
        table(["LoRA sessions", "server RSS", "RSS over 0 sessions", "per extra session (vs previous row)"], rows),
        f"Base {name}: {result['base_params'] / 1e6:.1f}M params = {mb(result['base_bytes'])} fp32. Each session: "
        f"LoRA r{LORA_RANK} on every linear layer incl. lm_head = {result['trainable']:,} trainable params = "
        f"{mb(result['adapter_bytes'])} adapter + {mb(result['optim_bytes'])} AdamW state = {mb(expected)} "
        f"expected. Each session ran one forward_backward + optim_step (2 x 32 tokens) so its optimizer "
        f"state exists; RSS read after gc + malloc_trim; {where}.",
    )
    report.goal(
        "6 LoRA",
        "extra session ~ adapter + optimizer state, not a base copy",
        f"{mb(per_extra)}/session = {per_extra / expected:.2f}x adapter+Adam ({mb(expected)}), "
        f"{per_extra / result['base_bytes']:.1%} of base",
        per_extra < 2 * expected + 4e6 and per_extra < 0.5 * result["base_bytes"],
    )


# ---- 7. step memory --------------------------------------------------------------------------


async def step_memory(model_dir: str, name: str, modes: Sequence[str], n: int, length: int) -> dict[str, Any]:
    """Peak RSS over one step of each mode ("builtin" or "custom"), above the RSS just before it."""
    spec = ModelSpec(name, 0, 0, 0)
    out: dict[str, Any] = {}
    async with embedded_service({spec: Path(model_dir)}) as svc:
        data = make_data(n, length, svc.vocab(name))
        tc = await svc.session(name)

        async def step(mode: str) -> None:
            if mode == "builtin":
                await tc.forward_backward(data, "cross_entropy")
            else:
                await tc.forward_backward_custom(data, weighted_nll)

        for mode in modes:
            await step(mode)  # warm-up: one-time allocations are not the step's
        gc.collect()
        gc.freeze()
        for mode in list(modes) * (1 if len(modes) == 1 else 2):
            before = rss()
            maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            with PeakRSS() as peak:
                await step(mode)
            maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            entry = out.setdefault(mode, {"before": before, "sampled": 0, "maxrss": 0})
            entry["sampled"] = max(entry["sampled"], peak.peak - before)
            # ru_maxrss only says something when the step set a new high (a fresh process per mode)
            entry["maxrss"] = max(entry["maxrss"], maxrss_after - before if maxrss_after > maxrss_before else 0)
        await tc.close()
    gc.unfreeze()
    return out


def report_memory(result: Mapping[str, Any], label: str, where: str, report: Report) -> None:
    rows = []
    for mode, step in (("builtin", "built-in cross_entropy"), ("custom", "forward_backward_custom")):
        r = result[mode]
        rows.append((step, mb(r["before"]), mb(r["sampled"]), mb(r["maxrss"]) if r["maxrss"] else "n/a"))
    ratio = result["custom"]["sampled"] / max(1, result["builtin"]["sampled"])
    report.section(
        "7. Memory: peak server RSS of a custom-loss step vs a built-in step",
        table(["step", "RSS before", "peak RSS delta (sampled every 2 ms)", "ru_maxrss delta"], rows),
        f"{label}, LoRA r16, one warm-up step per mode first; RSS read after gc + "
        f"malloc_trim just before the step; {where}. The custom step holds the forward graph while the "
        "logprobs travel to the client and the gradient comes back; the built-in step holds the same graph "
        "for its backward.",
    )
    report.goal("7 memory", "custom-loss step peak ~ built-in step peak (reported)", f"{ratio:.2f}x", None)


# ---- workers (fresh processes for the memory sections) ---------------------------------------


@dataclass
class Worker:
    """A benchmark worker process; its stderr goes to a temporary file (no pipe to fill up)."""

    proc: subprocess.Popen[str]
    stderr: Any

    def result(self, timeout: float = 900) -> Any:
        """Wait for the worker and return the JSON it printed (killed when it takes longer than ``timeout``)."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        finally:  # a timeout, or an interrupt, must not leave the worker (and its server) running
            self.stop()
        self.stderr.seek(0)
        err = self.stderr.read()
        self.stderr.close()
        if self.proc.returncode != 0:
            raise RuntimeError(f"worker failed ({self.proc.returncode}):\n{err[-3000:]}")
        lines = [line for line in out.splitlines() if line.startswith("BENCH_RESULT ")]
        return json.loads(lines[-1].removeprefix("BENCH_RESULT "))

    def stop(self) -> None:
        """Kill the worker if it is still running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_worker(kind: str, payload: Mapping[str, Any], threads: int) -> Worker:
    """Start ``bench.py --worker KIND`` in a fresh interpreter."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--threads", str(threads)]
    if not ALLOCATOR["tune"]:
        cmd.append("--keep-allocator-defaults")
    cmd += ["--worker-args", json.dumps(payload)]
    stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115  # closed by Worker.result
    return Worker(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True), stderr)


def worker_main(kind: str, payload: Mapping[str, Any]) -> int:
    if kind == "lora":
        result = asyncio.run(lora_memory(payload["model_dir"], payload["name"], payload["counts"]))
    elif kind == "memory":
        result = asyncio.run(
            step_memory(payload["model_dir"], payload["name"], payload["modes"], payload["n"], payload["length"])
        )
    else:
        raise SystemExit(f"unknown worker {kind!r}")
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    return 0


# ---- main --------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> Report:
    from trainer_server.builtin_models import trainer_home

    report = Report()
    only = set(args.only)
    root = args.models_dir or trainer_home() / "bench-models"
    small, large = (TINY, SMALL) if args.quick else (SMALL, LARGE)
    lora_spec, mem_spec = (SMALL, TINY) if args.quick else (MEDIUM, SMALL)
    mem_n, mem_len = (8, 64) if args.quick else (16, 256)
    lora_counts = [1, 2, 4] if args.quick else [1, 4, 16]
    mem_label = f"{mem_spec.name}, batch {mem_n} x {mem_len} tokens"
    print(
        f"# Benchmarks ({'--quick' if args.quick else 'full run'})\n\n"
        f"torch {torch.__version__} (torch.set_num_threads({args.threads}) in this process and its workers; "
        "`trainer-server` processes: their default unless a row says otherwise), grpcio "
        f"{grpc.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPU cores, "
        f"{platform.machine()}, device cpu. C allocator: "
        f"{'tuned as the service does (trainer_proto.alloc)' if ALLOCATOR['tune'] else 'glibc defaults'}. "
        f"Load average at start: {', '.join(f'{x:.1f}' for x in os.getloadavg())}.",
        flush=True,
    )
    started = time.perf_counter()
    needed: set[ModelSpec] = set()
    pipeline_specs = [small] if args.quick else [TINY, small]
    if only & {"custom", "overlap"}:
        needed.add(small)
    if "pipeline" in only:
        needed |= set(pipeline_specs)
    if "overhead" in only:
        needed |= {small, large}
    if "lora" in only:
        needed.add(lora_spec)
    if "memory" in only:
        needed.add(mem_spec)
    if only & {"tinker", "sampling"}:
        needed.add(TINY)
    dirs = {spec: ensure_model(spec, root) for spec in sorted(needed, key=lambda s: s.hidden)}

    # Memory sections first: in fresh processes (full run), side by side, before the timed work.
    workers: dict[str, Worker] = {}
    lora_payload: dict[str, Any] = {
        "model_dir": str(dirs.get(lora_spec, "")),
        "name": lora_spec.name,
        "counts": lora_counts,
    }
    mem_payload: dict[str, Any] = {
        "model_dir": str(dirs.get(mem_spec, "")),
        "name": mem_spec.name,
        "n": mem_n,
        "length": mem_len,
    }
    log("models ready")
    if not args.quick:
        if "lora" in only:
            workers["lora"] = run_worker("lora", lora_payload, args.threads)
        if "memory" in only:
            for mode in ("builtin", "custom"):
                workers[mode] = run_worker("memory", {**mem_payload, "modes": [mode]}, args.threads)
        if workers:
            log(f"started {len(workers)} memory worker process(es)")
            try:
                results = {k: w.result() for k, w in workers.items()}
            finally:  # one worker failed: the others are not left running
                for w in workers.values():
                    w.stop()
            if "lora" in results:
                report_lora(results["lora"], lora_spec.name, "fresh server process", report)
            if "builtin" in results:
                memory = {"builtin": results["builtin"]["builtin"], "custom": results["custom"]["custom"]}
                report_memory(memory, mem_label, "a fresh server process per mode", report)
    else:
        if "lora" in only:
            log("lora memory")
            report_lora(await lora_memory(**lora_payload), lora_spec.name, "in the benchmark process (--quick)", report)
        if "memory" in only:
            log("step memory")
            memory = await step_memory(**mem_payload, modes=["builtin", "custom"])
            report_memory(memory, mem_label, "both modes in the benchmark process (--quick), max of 2", report)

    if "wire" in only:
        log("wire")
        await bench_wire(args, report)
    timed = [s for s in ("custom", "overhead", "pipeline", "overlap") if s in only]
    if timed:
        served = {s: dirs[s] for s in dirs if s in (small, large, *pipeline_specs)}
        async with embedded_service(served) as svc:
            if "custom" in only:
                log("custom loss")
                await bench_custom(args, svc, small, report)
            if "overhead" in only:
                log("service overhead")
                await bench_overhead(args, svc, [small, large], report)
            if "pipeline" in only:
                log("pipelining")
                await bench_pipeline(args, svc, pipeline_specs, report)
            if "overlap" in only:
                log("overlap")
                await bench_overlap(args, svc, small, report)
    if "pipeline" in only:
        log("pipelining, server in its own process")
        await bench_pipeline_process(args, dirs, pipeline_specs, report)
    if "tinker" in only and importlib.util.find_spec("tinker") is None:
        log("section 8 skipped: the tinker SDK is not installed (the dev extra)")
        only.discard("tinker")
    if only & {"tinker", "sampling"}:
        await bench_remote(args, dirs[TINY], only, report)
    report.print()
    print(f"\nTotal benchmark time {time.perf_counter() - started:.0f} s.", flush=True)
    return report


async def bench_remote(args: argparse.Namespace, model_dir: Path, only: set[str], report: Report) -> None:
    """Sections 8 and 9 against one ``trainer-server`` process (gRPC and the Tinker HTTP API)."""
    with server_process({TINY: model_dir}, tinker=True, api_keys=[TINKER_KEY]) as proc:
        async with AsyncServiceClient(proc.address, api_key=TINKER_KEY) as client:
            if "tinker" in only:
                log("tinker SDK vs our client")
                await bench_tinker(args, proc, client, TINY, report)
            if "sampling" in only:
                log("sampling through the service")
                await bench_sampling(args, client, TINY, report)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small models, few reps: a smoke run (< 60 s)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads in every process (default 1: on a shared 2-core machine 2 OpenMP threads "
        "measured several times slower and far noisier)",
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--models-dir", type=Path, help="where bench models are built (default $TRAINER_HOME/bench-models)"
    )
    parser.add_argument(
        "--keep-allocator-defaults",
        action="store_true",
        help="leave glibc's malloc thresholds alone, in the bench and in the servers and clients it starts "
        "(by default they are tuned as trainer-server and the client do: trainer_proto.alloc)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-args", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ALLOCATOR["tune"] = not args.keep_allocator_defaults
    if ALLOCATOR["tune"]:
        alloc.tune_allocator()  # what the service's server and client do; the wire section's raw gRPC too
    import logging

    logging.basicConfig(level=logging.WARNING)
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    if args.worker:
        return worker_main(args.worker, json.loads(args.worker_args or "{}"))
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
