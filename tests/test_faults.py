"""Faults from the reliability issue: killed clients, a killed server, keepalive agreement.

1. Client processes attached to one session are SIGKILLed at seeded random points of
   ``forward_backward_custom`` (before the loss runs, inside it, during the gradient
   upload, after the result), ten times, half of them while another client keeps the
   server busy. After each kill the session is exactly as if the unfinished call had never
   been made: its gradients, the next step's norm and its weights equal a reference session
   that replays only the calls the server applied; the held forward graph is released. At
   the end the server's sessions, held graphs and RSS are back at their baseline.
2. A server process is SIGKILLed after a STATE checkpoint and one more (lost) step, then
   restarted on the same port and checkpoint directory. The *same* client object
   reconnects, resumes from the checkpoint and goes on; its losses, gradient norms, logprobs
   and final BASE weights are bitwise those of an uninterrupted run.
3. Keepalive: a client with short keepalive settings against a server built from the same
   ``trainer_proto.options.grpc_options`` stays connected while idle (with and without an
   open call); a channel that pings faster than a server permits is closed with
   ``too_many_pings`` (UNAVAILABLE).

Importing the client costs seconds (torch), far more than a victim lives, so the victims
are forked from one "zygote" process that imports everything once: each victim is still
its own OS process with its own connection, killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import os
import random
import re
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from conftest import LLAMA, make_config, server_session, state_hash
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trainer_client import (
    AdamParams,
    AsyncServiceClient,
    AsyncTrainingClient,
    ClientConfig,
    Datum,
    NotFoundError,
    UnavailableError,
)
from trainer_proto import options, pb
from trainer_server import TrainerServer
from trainer_server.core.sessions import Session

SRC = Path(__file__).resolve().parents[1] / "src"
ADAM = AdamParams(learning_rate=1e-2)
TIMEOUT_S = 60.0


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: this one, with ``src`` importable."""
    path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll until ``predicate()`` holds (a full gc after a second); fail naming ``what``."""
    start = time.monotonic()
    while not predicate():
        elapsed = time.monotonic() - start
        if elapsed > timeout_s:
            raise AssertionError(f"timed out after {timeout_s}s waiting until {what}")
        if elapsed > 1.0:
            gc.collect()
        await asyncio.sleep(0.005)


def random_data(rng: random.Random, vocab: int, n: int, *, lo: int = 24, hi: int = 60) -> list[list[list[int]]]:
    """``n`` datums as ``[prompt, response]`` token lists (JSON-friendly)."""
    data = []
    for _ in range(n):
        total = rng.randint(lo, hi)
        cut = rng.randint(4, total - 4)
        tokens = [rng.randrange(vocab) for _ in range(total)]
        data.append([tokens[:cut], tokens[cut:]])
    return data


def datums(data: Sequence[Sequence[Sequence[int]]]) -> list[Datum]:
    return [Datum.from_tokens(prompt, response) for prompt, response in data]


async def llama_vocab(service: AsyncServiceClient) -> int:
    info = await service.get_server_info()
    return next(m.vocab_size for m in info.models if m.name == LLAMA)


# ---- 1. client processes killed at random points -----------------------------------------

ZYGOTE = r'''
"""Import the client once, then fork one victim per job line read from stdin.

A victim attaches to an existing session at a given sequence number and makes
forward_backward_custom calls. Progress goes to stdout as "VID MARKER" lines, one
os.write each (atomic in a pipe): ATTACHED, START k, IN_LOSS k, LOSS_DONE k, ACK k, IDLE;
the zygote adds PID n and EXIT status for each victim.
"""
import asyncio, json, os, select, signal, sys, time

import torch
from trainer_client import AsyncServiceClient, AsyncTrainingClient, ClientConfig, Datum
from trainer_proto import pb


def say(vid, text):
    os.write(1, f"{vid} {text}\n".encode())


def make_loss(vid, k, scale, sleep_s):
    def loss(data, logprobs):
        say(vid, f"IN_LOSS {k}")
        time.sleep(sleep_s)
        total = -scale * sum((d.weights * lp).sum() for d, lp in zip(data, logprobs))
        say(vid, f"LOSS_DONE {k}")
        return total, {}
    return loss


async def victim(job):
    vid = job["vid"]
    config = ClientConfig(retry_attempts=1, timeout_s=60, unary_timeout_s=30)
    async with AsyncServiceClient(job["address"], config=config) as service:
        response = pb.CreateSessionResponse(
            session_id=job["session_id"], base_model=job["model"], next_seq=job["next_seq"]
        )
        tc = AsyncTrainingClient(service, response)
        say(vid, "ATTACHED")
        for k, call in enumerate(job["calls"], 1):
            await asyncio.sleep(call["pause_s"])
            data = [Datum.from_tokens(p, r) for p, r in call["data"]]
            say(vid, f"START {k}")
            await tc.forward_backward_custom(data, make_loss(vid, k, call["scale"], call["sleep_s"]))
            say(vid, f"ACK {k}")
        say(vid, "IDLE")
        await asyncio.sleep(3600)


def child(job):
    try:
        asyncio.run(victim(job))
    except BaseException as exc:
        say(job["vid"], "ERROR " + repr(exc).replace("\n", " ")[:2000])
        os._exit(1)
    os._exit(0)


def main():
    pids, buf = {}, b""
    say("zygote", "READY")
    while True:
        while pids:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            say(pids.pop(pid), f"EXIT {os.waitstatus_to_exitcode(status)}")
        if not select.select([0], [], [], 0.01)[0]:
            continue
        chunk = os.read(0, 1 << 16)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            job = json.loads(line)
            pid = os.fork()
            if pid == 0:
                child(job)
            pids[pid] = job["vid"]
            say(job["vid"], f"PID {pid}")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


main()
'''


class Zygote:
    """The victim factory process and the progress lines of every victim, by victim id."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log
        self.lines: defaultdict[str, list[str]] = defaultdict(list)
        self._changed = asyncio.Condition()
        self._pump_task = asyncio.create_task(self._pump())

    @classmethod
    async def start(cls, tmp_path: Path) -> Zygote:
        script = tmp_path / "victims.py"
        script.write_text(ZYGOTE)
        log = tmp_path / "victims.log"
        with log.open("w") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(script),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env=child_env(OMP_NUM_THREADS="1"),
            )
        return cls(proc, log)

    async def _pump(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            vid, _, text = raw.decode().rstrip("\n").partition(" ")
            async with self._changed:
                self.lines[vid].append(text)
                self._changed.notify_all()
        async with self._changed:
            self.lines["zygote"].append("EOF")
            self._changed.notify_all()

    def launch(self, job: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job).encode() + b"\n")

    async def expect(self, vid: str, prefix: str, timeout_s: float = TIMEOUT_S) -> str:
        """Wait for the victim's line starting with ``prefix``; fail if it dies or errs first."""

        def found() -> str | None:
            return next((line for line in self.lines[vid] if line.startswith(prefix)), None)

        def over() -> bool:
            done = ("ERROR", "EXIT") if prefix != "EXIT" else ("ERROR",)
            return found() is not None or any(line.startswith(done) for line in self.lines[vid])

        with contextlib.suppress(TimeoutError):
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(over), timeout_s)
        line = found()
        if line is None:
            raise AssertionError(
                f"victim {vid} did not print {prefix!r}; its lines: {self.lines[vid]}; "
                f"zygote log:\n{self.log.read_text()[-3000:]}"
            )
        return line

    async def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()  # the zygote kills what is left and exits
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self._pump_task.cancel()


PHASES = ("before_loss", "in_loss", "upload", "after_ack")
"""Where a kill can land in a forward_backward_custom call, named by the victim's last marker:
START (request, server forward, logprobs download), IN_LOSS (the loss function runs, the
server holds the graph), LOSS_DONE (gradient, upload, server backward, result), ACK (done)."""
MARKER_PHASE = {"START": "before_loss", "IN_LOSS": "in_loss", "LOSS_DONE": "upload", "ACK": "after_ack"}
TARGET_MARKER = {phase: marker for marker, phase in MARKER_PHASE.items()}
TARGETS = [*PHASES, *PHASES, "before_loss", "upload"]
"""One victim per entry, in a seeded random order: 10 kills, the narrow windows thrice."""
CALLS_PER_VICTIM = 3
DATUMS_PER_CALL = 8


def last_phase(lines: list[str]) -> tuple[str, int]:
    """The phase and call number (1-based, per victim) of a victim's last progress marker."""
    for line in reversed(lines):
        word, _, arg = line.partition(" ")
        if word in MARKER_PHASE:
            return MARKER_PHASE[word], int(arg)
        if word == "IDLE":
            return "after_ack", CALLS_PER_VICTIM
    raise AssertionError(f"no progress marker in {lines}")


def custom_loss(scale: float) -> Callable[[list[Datum], list[torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]:
    """The victims' loss (without the sleep): the same math, so the same gradient."""

    def loss(data: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        total = -scale * sum((d.weights * lp).sum() for d, lp in zip(data, logprobs, strict=True))
        assert isinstance(total, torch.Tensor)
        return total, {}

    return loss


def held(server: TrainerServer) -> int:
    assert server.core is not None
    return len(server.core.held_graphs)


def in_flight(session: Session) -> int:
    """Calls of the session the server holds a sequence number for (white box)."""
    return len(session._seen)


def rss_mib() -> float:
    """This process's (the in-process server's) resident memory, after returning free heap to the OS."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def attach(service: AsyncServiceClient, session: Session) -> AsyncTrainingClient:
    """A training client for an existing session, at the server's next sequence number."""
    response = pb.CreateSessionResponse(session_id=session.id, base_model=session.base.name, next_seq=session.next_seq)
    return AsyncTrainingClient(service, response)


async def keep_busy(tc: AsyncTrainingClient, data: list[Datum], stop: asyncio.Event) -> int:
    """Another client's forward calls, back to back, so the victim's work queues behind them."""
    n = 0
    while not stop.is_set():
        await tc.forward(data)
        n += 1
    return n


@dataclass(frozen=True)
class CallSpec:
    """One forward_backward_custom call of a victim (sent to it as JSON)."""

    data: list[list[list[int]]]
    scale: float
    sleep_s: float
    pause_s: float


@dataclass
class Kill:
    vid: str
    target: str
    busy: bool
    phase: str
    call: int
    applied: int
    held_at_kill: int
    seq: int
    next_seq: int


RSS_TOLERANCE_MIB = 32.0


@pytest.mark.timeout(180)
async def test_clients_killed_at_random_points(
    server: TrainerServer, service: AsyncServiceClient, tmp_path: Path
) -> None:
    assert server.core is not None
    t0 = time.monotonic()
    rng = random.Random(20260611)
    zygote = await Zygote.start(tmp_path)  # imports torch meanwhile
    try:
        vocab = await llama_vocab(service)
        # Warm up (lazy imports, allocator pools) with the victims' kind of work, then the baseline.
        warm = await service.create_training_client(LLAMA, lora_rank=None)
        await warm.forward_backward_custom(datums(random_data(rng, vocab, DATUMS_PER_CALL)), custom_loss(1.0))
        await warm.optim_step(ADAM)
        await warm.close()
        await zygote.expect("zygote", "READY")
        base_sessions, base_held, base_rss = len(server.core.sessions), held(server), rss_mib()
        assert base_held == 0

        # The victims share one session; the reference replays what the server applied of theirs.
        victims_tc = await service.create_training_client(LLAMA, lora_rank=None)
        ref = await service.create_training_client(LLAMA, lora_rank=None)
        other = await service.create_training_client(LLAMA, lora_rank=None)
        session, ref_session = server_session(server, victims_tc), server_session(server, ref)
        other_data = datums(random_data(rng, vocab, DATUMS_PER_CALL))
        targets = list(TARGETS)
        rng.shuffle(targets)
        kills: list[Kill] = []
        for i, target in enumerate(targets):
            vid, busy = f"v{i}", i % 2 == 1
            calls = [
                CallSpec(
                    data=random_data(rng, vocab, DATUMS_PER_CALL),
                    scale=rng.choice([0.25, 0.5, 1.0, 2.0]),
                    sleep_s=rng.uniform(0.04, 0.1),
                    pause_s=0.05,
                )
                for _ in range(CALLS_PER_VICTIM)
            ]
            kill_call = rng.randint(1, CALLS_PER_VICTIM - 1)
            delay_s = {
                "before_loss": rng.uniform(0.0, 0.04),
                "in_loss": rng.uniform(0.0, 0.8 * calls[kill_call - 1].sleep_s),
                "upload": rng.uniform(0.0, 0.01),
                "after_ack": rng.uniform(0.0, 0.03),
            }[target]
            first_seq = session.next_seq
            stop = asyncio.Event()
            noise = asyncio.create_task(keep_busy(other, other_data, stop)) if busy else None
            job = {"vid": vid, "address": server.address, "model": LLAMA, "calls": [asdict(c) for c in calls]}
            zygote.launch({**job, "session_id": session.id, "next_seq": first_seq})
            pid = int((await zygote.expect(vid, "PID ")).split()[1])
            await zygote.expect(vid, f"{TARGET_MARKER[target]} {kill_call}")
            await asyncio.sleep(delay_s)
            held_at_kill = held(server)
            os.kill(pid, signal.SIGKILL)
            assert await zygote.expect(vid, "EXIT") == f"EXIT {-signal.SIGKILL}"
            stop.set()
            if noise is not None:
                assert await noise > 0
            phase, call = last_phase(zygote.lines[vid])
            seq = first_seq + call - 1

            # The server lets go of the dead client's call: no number held, no graph held.
            await until(lambda: in_flight(session) == 0, f"{vid}'s call is released ({zygote.lines[vid]})")
            await until(lambda: held(server) == 0, f"{vid}'s forward graph is released ({zygote.lines[vid]})")
            await asyncio.sleep(0.05)
            assert (in_flight(session), held(server)) == (0, 0)

            # Calls before ``call`` were acknowledged, so applied; ``call`` itself only if the kill
            # came after its gradient was computed; whether the upload finished decides that.
            candidates = {"before_loss": [call - 1], "in_loss": [call - 1], "upload": [call - 1, call]}.get(
                phase, [call]
            )
            applied = -1
            for n in range(max(candidates) + 1):
                if n > 0:
                    spec = calls[n - 1]
                    await ref.forward_backward_custom(datums(spec.data), custom_loss(spec.scale))
                if n in candidates and state_hash(session) == state_hash(ref_session):
                    applied = n
                    break
            assert applied >= 0, (
                f"{vid} killed in {phase} of call {call}: the shared session matches no reference "
                f"with calls {candidates} of this victim applied"
            )
            next_seq = session.next_seq
            assert next_seq in ((seq, seq + 1) if applied < call else (seq + 1,)), (vid, phase, seq, next_seq)

            # The next optimizer step applies exactly that: same norm, same weights, same step.
            step, ref_step = await attach(service, session).optim_step(ADAM), await ref.optim_step(ADAM)
            assert step.step == ref_step.step == i + 1
            assert step.grad_norm == ref_step.grad_norm
            assert (step.grad_norm > 0) == (applied > 0)
            assert state_hash(session) == state_hash(ref_session)
            kills.append(Kill(vid, target, busy, phase, call, applied, held_at_kill, seq, next_seq))

        for tc in (attach(service, session), ref, other):
            await tc.close()
        await until(lambda: held(server) == 0, "every held graph is released")
        after_sessions, after_rss = len(server.core.sessions), rss_mib()
    finally:
        await zygote.close()

    histogram = Counter(
        k.phase + ("" if k.phase != "upload" else " (applied)" if k.applied == k.call else " (dropped)") for k in kills
    )
    print(f"\n[killed clients] {len(kills)} kills in {time.monotonic() - t0:.1f}s; phase histogram: {dict(histogram)}")
    for k in kills:
        print(
            f"  {k.vid}{' (busy server)' if k.busy else '              '}: aimed at {k.target:<11} landed in "
            f"{k.phase:<11} of call {k.call} (seq {k.seq}); calls applied {k.applied}; graphs held at the kill "
            f"{k.held_at_kill}; next seq after the kill {k.next_seq}"
        )
    print(
        f"  server RSS: baseline {base_rss:.1f} MiB, after {after_rss:.1f} MiB ({after_rss - base_rss:+.1f}); "
        f"sessions {base_sessions} -> {after_sessions}; held graphs {base_held} -> {held(server)}"
    )
    assert all(k.held_at_kill == 1 for k in kills if k.phase == "in_loss"), "the server held no graph mid-loss"
    assert len({k.phase for k in kills}) >= 3, f"the kills landed in too few phases: {histogram}"
    assert after_sessions == base_sessions
    assert after_rss - base_rss < RSS_TOLERANCE_MIB, f"server RSS grew {after_rss - base_rss:.1f} MiB"

    # The server still serves a fresh session.
    fresh = await service.create_training_client(LLAMA, lora_rank=None)
    out = await fresh.forward_backward([Datum.from_tokens([1, 2, 3], [4, 5, 6])])
    assert out.num_tokens == 5
    step = await fresh.optim_step(ADAM)
    assert step.step == 1 and step.grad_norm > 0
    await fresh.close()


# ---- 2. the server killed and restarted ----------------------------------------------------

READY = re.compile(r"trainer-server ready on (\S+)")


class ServerProcess:
    """``python -m trainer_server`` serving the tiny llama with one torch thread."""

    def __init__(self, proc: asyncio.subprocess.Process, address: str, log: Path) -> None:
        self.proc = proc
        self.address = address
        self.log = log

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @classmethod
    async def start(cls, llama_dir: Path, checkpoint_dir: Path, log: Path, *, port: int = 0) -> ServerProcess:
        argv = ["--model", f"{LLAMA}={llama_dir}", "--port", str(port), "--checkpoint-dir", str(checkpoint_dir)]
        with log.open("w") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "trainer_server",
                *argv,
                "--torch-threads",
                "1",
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env=child_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"),
            )
        assert proc.stdout is not None
        line = b""
        with contextlib.suppress(TimeoutError):
            line = await asyncio.wait_for(proc.stdout.readline(), 180)
        if not (m := READY.search(line.decode())):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            pytest.fail(f"the server did not report ready (got {line!r}); log:\n{log.read_text()[-3000:]}")
        return cls(proc, m.group(1), log)

    async def kill(self) -> int:
        if self.proc.returncode is None:
            self.proc.kill()
        return await self.proc.wait()

    async def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 60)


@dataclass
class Steps:
    losses: list[float]
    norms: list[float]
    steps: list[int]

    def hexes(self) -> tuple[list[str], list[str]]:
        return [x.hex() for x in self.losses], [x.hex() for x in self.norms]


async def train(tc: AsyncTrainingClient, batches: list[list[Datum]]) -> Steps:
    """One cross-entropy step per batch, each call submitted before any is awaited."""
    futures = [(tc.forward_backward(b), tc.optim_step(ADAM)) for b in batches]
    out = Steps([], [], [])
    for fb, op in futures:
        out.losses.append((await fb).loss)
        step = await op
        out.norms.append(step.grad_norm)
        out.steps.append(step.step)
    return out


async def reconnect(service: AsyncServiceClient, timeout_s: float = 60.0) -> float:
    """Call until the (same) client gets through again; the seconds that took."""
    start = time.monotonic()
    while True:
        try:
            await service.get_server_info()
            return time.monotonic() - start
        except UnavailableError:
            if time.monotonic() - start > timeout_s:
                raise
            await asyncio.sleep(0.05)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


BEFORE, AFTER = 2, 3
"""Steps before the STATE checkpoint, and steps after it."""


@pytest.mark.timeout(300)
async def test_server_killed_and_restarted_client_carries_on(llama_dir: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    ckpt = tmp_path / "ckpt"
    rng = random.Random(7)
    config = ClientConfig(timeout_s=TIMEOUT_S, unary_timeout_s=10, retry_attempts=2, retry_backoff_s=0.05)
    first = await ServerProcess.start(llama_dir, ckpt, tmp_path / "first.log")
    second: ServerProcess | None = None
    t_first = time.monotonic() - t0
    try:
        async with AsyncServiceClient(first.address, config=config) as service:
            vocab = await llama_vocab(service)
            batches = [datums(random_data(rng, vocab, 4, lo=8, hi=40)) for _ in range(BEFORE + AFTER)]
            probe = datums(random_data(rng, vocab, 3, lo=8, hi=40))

            # The uninterrupted reference, on the first server.
            ref = await service.create_training_client(LLAMA, lora_rank=None, seed=1)
            reference = await train(ref, batches)
            ref_logprobs = (await ref.forward(probe)).logprobs
            await ref.save_checkpoint("reference-final", "base", dtype="float32")

            # The interrupted run: steps, a STATE, one more step that is lost with the server.
            run = await service.create_training_client(LLAMA, lora_rank=None, seed=1)
            before = await train(run, batches[:BEFORE])
            state = await run.save_checkpoint("state", "state")
            assert (state.kind, state.step) == ("state", BEFORE)
            lost = await train(run, batches[BEFORE : BEFORE + 1])
            assert lost.steps == [BEFORE + 1]

            t_kill = time.monotonic()
            assert await first.kill() == -signal.SIGKILL
            with pytest.raises(UnavailableError):
                await run.forward(probe)  # the server is gone: an error, not a hang

            second = await ServerProcess.start(llama_dir, ckpt, tmp_path / "second.log", port=first.port)
            assert second.address == first.address
            t_second = time.monotonic() - t_kill
            waited = await reconnect(service)  # the same client object, the same channel

            assert {c.name for c in await service.list_checkpoints()} == {"state", "reference-final"}
            with pytest.raises(NotFoundError):  # the session lived in the killed process
                await run.forward(probe)
            resumed = await service.create_training_client_from_state("state")
            after = await train(resumed, batches[BEFORE:])
            logprobs = (await resumed.forward(probe)).logprobs
            final = await resumed.save_checkpoint("resumed-final", "base", dtype="float32")
            assert final.step == BEFORE + AFTER
        assert await second.stop() == 0
    finally:
        await first.kill()
        if second is not None:
            await second.kill()

    print(
        f"\n[server restart] first server ready in {t_first:.1f}s; after the SIGKILL the second was ready in "
        f"{t_second:.1f}s and the same client got through {waited:.2f}s later; total {time.monotonic() - t0:.1f}s"
    )
    print(f"  losses reference {reference.losses}\n  losses run       {before.losses} + {after.losses}")
    print(f"  grad norms reference {reference.norms}\n  grad norms run       {before.norms} + {after.norms}")
    assert reference.steps == list(range(1, BEFORE + AFTER + 1))
    assert after.steps == list(range(BEFORE + 1, BEFORE + AFTER + 1)), "the resumed session continues the count"
    assert before.hexes() == Steps(reference.losses[:BEFORE], reference.norms[:BEFORE], []).hexes()
    # The lost step is redone exactly; everything after the checkpoint matches bit for bit.
    assert lost.hexes() == Steps(after.losses[:1], after.norms[:1], []).hexes()
    assert after.hexes() == Steps(reference.losses[BEFORE:], reference.norms[BEFORE:], []).hexes()
    for i, (got, want) in enumerate(zip(logprobs, ref_logprobs, strict=True)):
        assert torch.equal(bits(got), bits(want)), f"forward logprobs of datum {i} differ"
    resumed_weights = (ckpt / "resumed-final" / "model.safetensors").read_bytes()
    assert resumed_weights == (ckpt / "reference-final" / "model.safetensors").read_bytes()


# ---- 3. keepalive agreement ----------------------------------------------------------------

KEEPALIVE_S = 0.2
IDLE_S = 4.0
"""Long enough for a mismatch to show: gRPC sends at most one ping a second, and a server
closes the connection on the third ping that comes too soon."""


async def record_states(channel: grpc.aio.Channel, states: list[grpc.ChannelConnectivity]) -> None:
    """Append every connectivity state the channel goes through."""
    state = channel.get_state(try_to_connect=False)
    states.append(state)
    while True:
        await channel.wait_for_state_change(state)
        state = channel.get_state(try_to_connect=False)
        states.append(state)


async def open_watch(channel: grpc.aio.Channel) -> Any:
    """A health Watch stream: a call that stays open and quiet."""
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    first = await asyncio.wait_for(call.read(), 10)
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    return call


async def stays_connected(address: str) -> list[grpc.ChannelConnectivity]:
    """A client with short keepalives idles without calls, then with an open call, then calls."""
    config = ClientConfig(keepalive_time_s=KEEPALIVE_S, keepalive_timeout_s=5.0)
    async with AsyncServiceClient(address, config=config) as service:
        await service.get_server_info()
        channel = service._channel
        states: list[grpc.ChannelConnectivity] = []
        recorder = asyncio.create_task(record_states(channel, states))
        await asyncio.sleep(IDLE_S / 2)  # idle, no call open: pings go on (permit_without_calls)
        watch = await open_watch(channel)
        await asyncio.sleep(IDLE_S / 2)  # idle with a call open
        assert not watch.done(), f"the open call ended: {await watch.code()} {await watch.details()}"
        watch.cancel()
        info = await service.get_server_info()  # on the same channel
        assert info.models
        recorder.cancel()
        return states


async def gets_closed(address: str) -> tuple[grpc.aio.AioRpcError, float, list[grpc.ChannelConnectivity]]:
    """A raw channel pinging (once a second, gRPC's floor) faster than the server permits."""
    opts = options.grpc_options(keepalive_time_s=KEEPALIVE_S, keepalive_timeout_s=5.0)
    async with grpc.aio.insecure_channel(address, options=opts) as channel:
        states: list[grpc.ChannelConnectivity] = []
        recorder = asyncio.create_task(record_states(channel, states))
        watch = await open_watch(channel)
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(watch.read(), 4 * IDLE_S)
        recorder.cancel()
        return info.value, time.monotonic() - start, states


async def test_keepalive_agreement(llama_dir: Path, qwen_dir: Path) -> None:
    strict_s = 30.0  # the default: such a server permits a ping every 15 s
    permitted_ms = dict(options.grpc_options(keepalive_time_s=strict_s, server=True))[
        "grpc.http2.min_ping_interval_without_data_ms"
    ]
    async with (
        TrainerServer(make_config(llama_dir, qwen_dir, keepalive_time_s=KEEPALIVE_S)) as agreeing,
        TrainerServer(make_config(llama_dir, qwen_dir, keepalive_time_s=strict_s)) as strict,
    ):
        t0 = time.monotonic()
        negative = permitted_ms > 1000  # a client cannot ping faster than once a second
        states, closed = await asyncio.gather(
            stays_connected(agreeing.address),
            gets_closed(strict.address) if negative else asyncio.sleep(0, None),
        )
        wall = time.monotonic() - t0
    ready = grpc.ChannelConnectivity.READY
    print(f"\n[keepalive] agreeing server: channel states while idle {[s.name for s in states]} ({wall:.1f}s)")
    assert states == [ready], f"the connection was dropped or replaced while idle: {states}"
    if closed is None:  # the negative half cannot happen
        print(f"  the strict server permits a ping every {permitted_ms} ms; no gRPC client pings faster")
        return
    error, after_s, closed_states = closed
    print(
        f"  strict server (pings permitted every {permitted_ms} ms): open call failed after {after_s:.1f}s with "
        f"{error.code().name} {error.details()!r}; channel states {[s.name for s in closed_states]}"
    )
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "too many pings" in (error.details() or "").lower()
    assert closed_states[-1] != ready
