"""A client that goes away in the middle of ForwardBackwardCustom leaves nothing behind.

ForwardBackwardCustom holds the forward graph on the server between sending the logprobs
and receiving d_loss/d_logprobs. When the stream breaks in between (the call is cancelled,
the channel closes, the client's loss function raises, or the client process is killed),
the contract is: no gradient is accumulated, the held graph is released (no memory kept),
the call's sequence number is used up so the session's next call runs at once, and the
next optimizer step applies exactly what the good calls accumulated.

Memory is measured as ``len(server.core.held_graphs)`` (a WeakSet of logprob tensors
whose autograd graph is alive), not RSS.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from conftest import LLAMA, QWEN, server_session, state_hash

from trainer_client import AdamParams, AsyncServiceClient, AsyncTrainingClient, Datum, LossFunctionError
from trainer_proto import pb, pb_grpc, wire
from trainer_server import TrainerServer
from trainer_server.core.sessions import Session

TIMEOUT_S = 30.0
ADAM = AdamParams(learning_rate=1e-2)
SRC = Path(__file__).resolve().parents[1] / "src"


# ---- helpers ----------------------------------------------------------------------------


def good_datum(n: int = 8, start: int = 10) -> Datum:
    """A valid datum with ``n`` input tokens."""
    tokens = list(range(start, start + n + 1))
    return Datum.from_tokens(tokens[:3], tokens[3:])


def take_seq(tc: AsyncTrainingClient) -> int:
    """Reserve the training client's next sequence number for a raw-stub call."""
    seq = tc._next_seq
    tc._next_seq += 1
    return seq


def custom_start(tc: AsyncTrainingClient, seq: int, num_datums: int) -> pb.ForwardBackwardCustomRequest:
    start = pb.ForwardStart(call=pb.CallHeader(session_id=tc.session_id, seq=seq), num_datums=num_datums)
    return pb.ForwardBackwardCustomRequest(start=start)


async def read_logprobs(call: Any) -> torch.Tensor:
    """Read the logprobs header and chunks of a raw ForwardBackwardCustom call."""
    msg = await asyncio.wait_for(call.read(), TIMEOUT_S)
    assert msg.WhichOneof("message") == "logprobs_header", msg
    assembler = wire.ChunkAssembler(msg.logprobs_header, "logprobs", max_bytes=1 << 30)
    while not assembler.done:
        msg = await asyncio.wait_for(call.read(), TIMEOUT_S)
        assert msg.WhichOneof("message") == "logprobs_chunk", msg
        assembler.add(msg.logprobs_chunk)
    return assembler.tensor().clone()


def held(server: TrainerServer) -> int:
    assert server.core is not None
    return len(server.core.held_graphs)


async def collected_graphs(server: TrainerServer, *, timeout_s: float = 10.0) -> int:
    """Held graphs once the server has dropped what it should.

    Reference counting normally empties the set at once; a full ``gc.collect()`` (most of
    a second with torch and transformers loaded) runs only after a second of polling.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    while held(server) and loop.time() - start < timeout_s:
        await asyncio.sleep(0.01)
        if loop.time() - start > 1.0:
            gc.collect()
    return held(server)


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll until ``predicate()`` holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting until {what}")
        await asyncio.sleep(0.01)


async def seq_released(session: Session, seq: int) -> None:
    """Wait until the server has finished call ``seq`` (its number is used up)."""
    await until(lambda: session.next_seq > seq, f"the server released sequence number {seq}")
    assert session.next_seq == seq + 1


def weights(session: Session) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in session.state.model.named_parameters()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"weights differ: {different}"


def no_grads(session: Session) -> bool:
    return all(p.grad is None for p in session.state.params)


def sum_loss(data: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    return -torch.cat(logprobs).sum(), {}


async def assert_still_serves(service: AsyncServiceClient, tc: AsyncTrainingClient) -> None:
    out = await asyncio.wait_for(tc.forward([good_datum()]), TIMEOUT_S)
    assert out.num_tokens == 8
    info = await service.get_server_info()
    assert {m.name for m in info.models} == {LLAMA, QWEN}


# ---- the stream breaks after the logprobs ------------------------------------------------


async def _break_stream(mode: str, channel: grpc.aio.Channel, call: Any, num_logprobs: int) -> None:
    if mode == "cancel":
        assert call.cancel()
    elif mode == "close_channel":
        await channel.close()
    elif mode == "partial_gradient":
        grad = torch.full((num_logprobs,), -1.0)
        req = pb.ForwardBackwardCustomRequest
        await call.write(req(grad_header=wire.stream_header(grad, [num_logprobs])))
        half = next(wire.chunk_tensor(grad, chunk_bytes=grad.numel() * 4 // 2))
        await call.write(req(grad_chunk=half))
        await asyncio.sleep(0.1)  # let the server take the first half in
        assert call.cancel()
    else:  # pragma: no cover
        raise AssertionError(mode)


@pytest.mark.parametrize("accumulated", [False, True], ids=["nothing_before", "after_good_call"])
@pytest.mark.parametrize("mode", ["cancel", "close_channel", "partial_gradient"])
async def test_stream_breaks_before_gradient(
    server: TrainerServer, service: AsyncServiceClient, mode: str, accumulated: bool
) -> None:
    tc = await service.create_training_client(LLAMA, lora_rank=None, seed=3)
    session = server_session(server, tc)
    reference: AsyncTrainingClient | None = None
    if accumulated:
        await tc.forward_backward([good_datum()])
        reference = await service.create_training_client(LLAMA, lora_rank=None, seed=3)
        await reference.forward_backward([good_datum()])
    else:
        assert no_grads(session)
    before = state_hash(session)
    weights_before = weights(session)

    channel = grpc.aio.insecure_channel(server.address)
    try:
        call = pb_grpc.TrainerServiceStub(channel).ForwardBackwardCustom(timeout=TIMEOUT_S)
        seq = take_seq(tc)
        await call.write(custom_start(tc, seq, 1))
        await call.write(pb.ForwardBackwardCustomRequest(datums=pb.DatumBatch(datums=[good_datum().to_proto()])))
        logprobs = await read_logprobs(call)
        assert logprobs.shape == (8,)
        # the server now holds the forward graph and waits for the gradient
        assert held(server) == 1
        assert session.next_seq == seq

        await _break_stream(mode, channel, call, len(logprobs))
        await seq_released(session, seq)
        assert await collected_graphs(server) == 0, "the aborted call's graph is still held"
    finally:
        await channel.close()

    assert state_hash(session) == before, "the aborted call changed the session"
    if not accumulated:
        assert no_grads(session), "the aborted call accumulated a gradient"

    # the next optimizer step applies exactly what the good calls accumulated
    step = await asyncio.wait_for(tc.optim_step(ADAM), TIMEOUT_S)
    assert step.step == 1
    if reference is None:
        assert step.grad_norm == 0.0
        assert_same_weights(weights(session), weights_before)
    else:
        expected = await reference.optim_step(ADAM)
        assert step.grad_norm > 0.0
        assert step.grad_norm == expected.grad_norm
        assert_same_weights(weights(session), weights(server_session(server, reference)))
        assert not torch.equal(
            weights(session)["model.embed_tokens.weight"], weights_before["model.embed_tokens.weight"]
        )
    assert no_grads(session)
    await assert_still_serves(service, tc)
    assert held(server) == 0


async def test_client_cancels_its_own_future(server: TrainerServer, service: AsyncServiceClient) -> None:
    """Cancelling the client's future while its loss function runs breaks the stream the same way."""
    tc = await service.create_training_client(LLAMA, lora_rank=None, seed=3)
    session = server_session(server, tc)
    before = state_hash(session)
    in_loss = asyncio.Event()
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_loss(data: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loop.call_soon_threadsafe(in_loss.set)
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(TIMEOUT_S)
        return sum_loss(data, logprobs)

    fut = tc.forward_backward_custom([good_datum()], slow_loss)
    await asyncio.wait_for(in_loss.wait(), TIMEOUT_S)
    assert held(server) == 1
    assert fut.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await fut
    await seq_released(session, 1)
    assert await collected_graphs(server) == 0
    assert state_hash(session) == before
    assert no_grads(session)
    step = await tc.optim_step(ADAM)
    assert step.grad_norm == 0.0
    await assert_still_serves(service, tc)


# ---- the user's loss function fails ------------------------------------------------------


def _raises(data: list[Datum], logprobs: list[torch.Tensor]) -> Any:
    raise ValueError("boom in user code")


LOSS_FAILURES: dict[str, tuple[Callable[[list[Datum], list[torch.Tensor]], Any], str]] = {
    "raises": (_raises, "loss_fn raised ValueError('boom in user code')"),
    "returns_a_bare_tensor": (lambda data, lps: -torch.cat(lps).sum(), "loss_fn must return (loss, metrics)"),
    "loss_not_scalar": (lambda data, lps: (-torch.cat(lps), {}), "loss_fn's loss must be a scalar tensor"),
    "loss_without_gradient": (lambda data, lps: (torch.tensor(1.0), {}), "does not depend on the logprobs"),
    "metrics_not_numbers": (lambda data, lps: (-torch.cat(lps).sum(), {"m": "x"}), "metrics must be numbers"),
}


async def test_loss_fn_failure_applies_nothing(server: TrainerServer, service: AsyncServiceClient) -> None:
    tc = await service.create_training_client(LLAMA, lora_rank=None, seed=3)
    session = server_session(server, tc)
    before = state_hash(session)
    for case, (loss_fn, phrase) in LOSS_FAILURES.items():
        seq = tc._next_seq
        fut = tc.forward_backward_custom([good_datum(), good_datum(5, start=40)], loss_fn)
        with pytest.raises(LossFunctionError) as ei:
            await asyncio.wait_for(fut, TIMEOUT_S)
        assert phrase in str(ei.value), (case, str(ei.value))
        if case == "raises":
            assert isinstance(ei.value.__cause__, ValueError)
        await seq_released(session, seq)
        assert await collected_graphs(server) == 0, f"{case}: the graph is still held"
        assert state_hash(session) == before, f"{case}: the failed call changed the session"
        assert no_grads(session), f"{case}: the failed call accumulated a gradient"

    # the session keeps working: the error was retrieved, so no PreviousCallFailedError
    out = await asyncio.wait_for(tc.forward_backward_custom([good_datum()], sum_loss), TIMEOUT_S)
    assert out.num_tokens == 8
    assert not no_grads(session)
    step = await tc.optim_step(ADAM)
    assert step.step == 1
    assert step.grad_norm > 0.0
    assert held(server) == 0
    await assert_still_serves(service, tc)


# ---- the client process is killed --------------------------------------------------------

CHILD = """
import asyncio, sys
import grpc
from trainer_proto import pb, pb_grpc

async def main():
    address, session_id, seq, datum_hex = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    datum = pb.Datum.FromString(bytes.fromhex(datum_hex))
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.TrainerServiceStub(channel).ForwardBackwardCustom()
        start = pb.ForwardStart(call=pb.CallHeader(session_id=session_id, seq=seq), num_datums=1)
        await call.write(pb.ForwardBackwardCustomRequest(start=start))
        await call.write(pb.ForwardBackwardCustomRequest(datums=pb.DatumBatch(datums=[datum])))
        header = (await call.read()).logprobs_header
        received = 0
        while received < header.total_bytes:
            received += len((await call.read()).logprobs_chunk.data)
        print("GOT_LOGPROBS", received, flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


async def _raw_forward_backward(server: TrainerServer, tc: AsyncTrainingClient, seq: int) -> pb.ForwardBackwardResult:
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = pb_grpc.TrainerServiceStub(channel).ForwardBackward(timeout=10.0)
        start = pb.ForwardBackwardStart(
            call=pb.CallHeader(session_id=tc.session_id, seq=seq), num_datums=1, loss_fn="cross_entropy"
        )
        await call.write(pb.ForwardBackwardRequest(start=start))
        await call.write(pb.ForwardBackwardRequest(datums=pb.DatumBatch(datums=[good_datum().to_proto()])))
        await call.done_writing()
        results = [msg.result async for msg in call if msg.WhichOneof("message") == "result"]
    assert len(results) == 1
    return results[0]


async def _wait_for_line(proc: asyncio.subprocess.Process, expected: str, timeout_s: float) -> str:
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout_s)).decode()
    except TimeoutError:
        line = ""
    if not line.startswith(expected):
        proc.kill()
        await proc.wait()
        err = (await proc.stderr.read()).decode()
        raise AssertionError(f"child did not print {expected!r} (got {line!r}); stderr:\n{err[-4000:]}")
    return line


async def test_killed_client_process(server: TrainerServer, service: AsyncServiceClient) -> None:
    tc = await service.create_training_client(LLAMA, lora_rank=None, seed=3)
    session = server_session(server, tc)
    before = state_hash(session)
    seq = take_seq(tc)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        server.address,
        tc.session_id,
        str(seq),
        good_datum().to_proto().SerializeToString().hex(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        line = await _wait_for_line(proc, "GOT_LOGPROBS", timeout_s=120.0)
        assert line.split() == ["GOT_LOGPROBS", str(8 * 4)]
        assert held(server) == 1, "the server should hold the graph while the client computes its loss"
        assert session.next_seq == seq
    finally:
        if proc.returncode is None:
            proc.kill()  # SIGKILL: no goodbye on the wire, only the TCP connection closing
        await proc.wait()
    assert proc.returncode == -9

    await seq_released(session, seq)
    assert await collected_graphs(server) == 0, "the killed client's graph is still held"
    assert state_hash(session) == before
    assert no_grads(session)

    # the same session goes on at seq N+1 at once (no wait for a gap)
    next_seq = take_seq(tc)
    assert next_seq == seq + 1
    t0 = time.monotonic()
    result = await _raw_forward_backward(server, tc, next_seq)
    assert time.monotonic() - t0 < 5.0
    assert result.seq == next_seq
    assert result.num_tokens == 8
    assert session.next_seq == seq + 2
    assert not no_grads(session)

    # and the client carries on after it
    step = await asyncio.wait_for(tc.optim_step(ADAM), TIMEOUT_S)
    assert step.step == 1
    assert step.grad_norm > 0.0
    assert session.next_seq == seq + 3
    await assert_still_serves(service, tc)
    assert held(server) == 0
