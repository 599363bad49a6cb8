"""The server runs a session's calls in sequence order, whatever order the RPCs arrive in.

Each test drives one session out of order (pipelined futures, a delayed RPC, raw stub
calls sent in reverse) and a second session with the same seed strictly in order, then
checks the two end with bitwise equal weights. Refusals (a reused or zero sequence
number) and gaps (a number that never arrives) are checked to leave the state unchanged.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import torch
from conftest import LLAMA, make_config, server_session, state_hash

from trainer_client import AdamParams, AsyncServiceClient, AsyncTrainingClient, Datum
from trainer_proto import pb, pb_grpc
from trainer_server import TrainerServer
from trainer_server.core.sessions import Session

ADAM = AdamParams(learning_rate=1e-2, weight_decay=0.01, grad_clip_norm=1.0)
SEED = 7
NOT_YET_S = 0.3  # how long a call that must wait is watched to stay unfinished


# ---- helpers ---------------------------------------------------------------------------


def make_batches(vocab: int, count: int, seed: int = 0, n: int = 3) -> list[list[Datum]]:
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        data = []
        for _ in range(n):
            total = int(torch.randint(4, 16, (), generator=gen))
            tokens = torch.randint(0, vocab, (total,), generator=gen)
            data.append(Datum.from_tokens(tokens[: total // 2], tokens[total // 2 :]))
        batches.append(data)
    return batches


async def vocab_size(service: AsyncServiceClient) -> int:
    info = await service.get_server_info()
    return next(m.vocab_size for m in info.models if m.name == LLAMA)


async def new_session(service: AsyncServiceClient) -> AsyncTrainingClient:
    return await service.create_training_client(LLAMA, lora_rank=None, seed=SEED)


def weights(server: TrainerServer, tc: AsyncTrainingClient) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in server_session(server, tc).state.model.state_dict().items()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def assert_changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert any(not torch.equal(before[k], after[k]) for k in before), "training changed nothing"


async def sequential(tc: AsyncTrainingClient, batches: Sequence[list[Datum]]) -> list[tuple[float, float, int]]:
    """The in-order reference loop: await every call before making the next one."""
    results = []
    for data in batches:
        fb = await tc.forward_backward(data, "cross_entropy")
        step = await tc.optim_step(ADAM)
        results.append((fb.loss, step.grad_norm, step.step))
    return results


def header(tc: AsyncTrainingClient, seq: int) -> pb.CallHeader:
    return pb.CallHeader(session_id=tc.session_id, seq=seq)


async def raw_forward_backward(
    stub: pb_grpc.TrainerServiceStub, tc: AsyncTrainingClient, seq: int, data: list[Datum]
) -> pb.ForwardBackwardResult:
    """One ForwardBackward over the raw stream protocol: start, datums, half-close, read the result."""

    async def requests() -> AsyncIterator[pb.ForwardBackwardRequest]:
        start = pb.ForwardBackwardStart(call=header(tc, seq), num_datums=len(data), loss_fn="cross_entropy")
        yield pb.ForwardBackwardRequest(start=start)
        yield pb.ForwardBackwardRequest(datums=pb.DatumBatch(datums=[d.to_proto() for d in data]))

    call: Any = stub.ForwardBackward(requests(), timeout=30)  # type: ignore[arg-type]
    responses: list[pb.ForwardBackwardResponse] = [r async for r in call]
    assert [r.WhichOneof("message") for r in responses] == ["result"]
    result: pb.ForwardBackwardResult = responses[0].result
    assert result.seq == seq
    return result


def raw_optim_step(stub: pb_grpc.TrainerServiceStub, tc: AsyncTrainingClient, seq: int, adam: AdamParams = ADAM) -> Any:
    """Start an OptimStep call (a grpc.aio call object: awaitable, with .done())."""
    return stub.OptimStep(pb.OptimStepRequest(call=header(tc, seq), adam_params=adam.to_proto()), timeout=30)


async def expect_status(awaitable: Any, code: grpc.StatusCode, contains: str = "") -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    assert info.value.code() == code, info.value.details()
    details = info.value.details() or ""
    assert contains in details
    return details


def arrived(session: Session, seq: int) -> bool:
    """Whether call ``seq`` has reached the server (waiting for its turn, running, or done)."""
    return seq in session._seen or session.next_seq > seq


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``condition`` on the loop (the server runs on it too) until it holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        await asyncio.sleep(0.005)


@pytest_asyncio.fixture
async def stub(server: TrainerServer) -> AsyncIterator[pb_grpc.TrainerServiceStub]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield pb_grpc.TrainerServiceStub(channel)


# ---- pipelined client ------------------------------------------------------------------


async def test_pipelined_equals_sequential(server: TrainerServer, service: AsyncServiceClient) -> None:
    """``fb = forward_backward(); op = optim_step(); await fb; await op`` == awaiting each call."""
    batches = make_batches(await vocab_size(service), 3)
    piped, seq_tc, all_at_once = [await new_session(service) for _ in range(3)]
    initial = weights(server, piped)

    expected = await sequential(seq_tc, batches)

    got = []
    for data in batches:
        fb = piped.forward_backward(data, "cross_entropy")
        op = piped.optim_step(ADAM)
        out, step = await fb, await op
        got.append((out.loss, step.grad_norm, step.step))
    assert got == expected  # bitwise: the same work in the same order

    # Every call submitted before any is awaited.
    futures = [(all_at_once.forward_backward(d, "cross_entropy"), all_at_once.optim_step(ADAM)) for d in batches]
    got_all = []
    for fb, op in futures:
        out, step = await fb, await op
        got_all.append((out.loss, step.grad_norm, step.step))
    assert got_all == expected

    assert [s for _, _, s in expected] == [1, 2, 3]
    reference = weights(server, seq_tc)
    assert_changed(initial, reference)
    assert_bitwise_equal(weights(server, piped), reference)
    assert_bitwise_equal(weights(server, all_at_once), reference)


async def test_delayed_first_rpc_still_runs_first(
    server: TrainerServer, service: AsyncServiceClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first call's RPC reaches the server last; the server still runs it first."""
    batches = make_batches(await vocab_size(service), 2, seed=1)
    piped, seq_tc = await new_session(service), await new_session(service)
    expected = await sequential(seq_tc, batches)

    original = AsyncTrainingClient._send_datums
    release = asyncio.Event()

    async def delayed(self: AsyncTrainingClient, stream: Any, start_field: str, start: Any, batches: Any) -> None:
        if self.session_id == piped.session_id and start.call.seq == 1:
            await release.wait()  # hold back call 1's first message until the test says so
        await original(self, stream, start_field, start, batches)

    monkeypatch.setattr(AsyncTrainingClient, "_send_datums", delayed)

    session = server_session(server, piped)
    before = state_hash(session)
    futures: list[Any] = []
    for data in batches:
        futures.append(piped.forward_backward(data, "cross_entropy"))
        futures.append(piped.optim_step(ADAM))
    # Calls 2, 3 and 4 arrive and wait; call 1 has not arrived; nothing runs.
    await wait_until(lambda: {2, 3, 4} <= session._seen)
    await asyncio.sleep(NOT_YET_S)  # time for a server that ignored the order to run them
    assert 1 not in session._seen
    assert not any(f.done() for f in futures)
    assert state_hash(session) == before
    release.set()

    results = [await f for f in futures]
    got = [(results[i].loss, results[i + 1].grad_norm, results[i + 1].step) for i in range(0, len(results), 2)]
    assert got == expected
    assert_bitwise_equal(weights(server, piped), weights(server, seq_tc))


# ---- raw stub: arrival order chosen by the test --------------------------------------------


@pytest.mark.parametrize("arrival", [[2, 1], [4, 3, 2, 1], [3, 1, 4, 2]], ids=lambda a: "-".join(map(str, a)))
async def test_out_of_order_arrival_runs_in_sequence(
    server: TrainerServer, service: AsyncServiceClient, stub: pb_grpc.TrainerServiceStub, arrival: list[int]
) -> None:
    """RPCs sent in the order ``arrival`` (odd seq: ForwardBackward, even: OptimStep) run in seq order."""
    batches = make_batches(await vocab_size(service), len(arrival) // 2, seed=2)
    tc, seq_tc = await new_session(service), await new_session(service)
    expected = await sequential(seq_tc, batches)
    before = state_hash(server_session(server, tc))

    session = server_session(server, tc)
    calls: dict[int, asyncio.Future[Any]] = {}
    for seq in arrival:
        if seq == 1:
            # Nothing can run while call 1 has not arrived; give a server that ignored that the time to.
            await asyncio.sleep(NOT_YET_S)
            assert not any(c.done() for c in calls.values())
            assert state_hash(session) == before
        if seq % 2:
            calls[seq] = asyncio.ensure_future(raw_forward_backward(stub, tc, seq, batches[seq // 2]))
        else:
            calls[seq] = asyncio.ensure_future(raw_optim_step(stub, tc, seq))
        # Arrived (waiting, or already run) before the next one is sent: the arrival order is exact.
        await wait_until(functools.partial(arrived, session, seq))

    results = {seq: await call for seq, call in sorted(calls.items())}
    got = [(results[s].loss, results[s + 1].grad_norm, results[s + 1].step) for s in range(1, len(arrival), 2)]
    assert got == expected
    assert all(norm > 0 for _, norm, _ in got)  # each step saw its forward_backward's gradients
    assert_bitwise_equal(weights(server, tc), weights(server, seq_tc))


# ---- refusals ---------------------------------------------------------------------------


async def test_reused_and_zero_sequence_numbers_are_refused(
    server: TrainerServer, service: AsyncServiceClient, stub: pb_grpc.TrainerServiceStub
) -> None:
    """A number reused by a different request gets ALREADY_EXISTS, 0 gets INVALID_ARGUMENT.

    The same request again (a retry) gets the stored result. None of them changes state.
    """
    data, other = make_batches(await vocab_size(service), 2, seed=3)
    tc = await new_session(service)
    session = server_session(server, tc)
    first = await raw_forward_backward(stub, tc, 1, data)  # seq 1: gradients accumulate
    after_one = state_hash(session)

    # Reused after it finished, by a different request of either kind.
    await expect_status(raw_optim_step(stub, tc, 1), grpc.StatusCode.ALREADY_EXISTS, "sequence number 1")
    await expect_status(raw_forward_backward(stub, tc, 1, other), grpc.StatusCode.ALREADY_EXISTS, "already used")
    # The same request again is a retry: the stored result, nothing applied twice.
    assert await raw_forward_backward(stub, tc, 1, data) == first
    assert state_hash(session) == after_one
    # Zero.
    await expect_status(raw_optim_step(stub, tc, 0), grpc.StatusCode.INVALID_ARGUMENT, "seq")
    await expect_status(raw_forward_backward(stub, tc, 0, data), grpc.StatusCode.INVALID_ARGUMENT, "seq")
    assert state_hash(session) == after_one

    # Reused while the first holder of the number is still waiting for its turn (2 is missing).
    waiting = asyncio.ensure_future(raw_optim_step(stub, tc, 3))
    await wait_until(lambda: 3 in session._seen)
    await asyncio.sleep(NOT_YET_S)
    assert not waiting.done()
    other_adam = AdamParams(learning_rate=ADAM.learning_rate * 2)
    await expect_status(raw_optim_step(stub, tc, 3, other_adam), grpc.StatusCode.ALREADY_EXISTS, "sequence number 3")
    assert not waiting.done()
    assert state_hash(session) == after_one

    # The session goes on: 2 arrives (another forward_backward), then 3 runs once.
    await raw_forward_backward(stub, tc, 2, data)
    step = await waiting
    assert step.step == 1 and step.seq == 3
    assert session.state.step == 1
    assert session.next_seq == 4


# ---- gaps --------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def gap_server(llama_dir: Path, qwen_dir: Path) -> AsyncIterator[TrainerServer]:
    async with TrainerServer(make_config(llama_dir, qwen_dir, sequence_gap_timeout_s=0.5)) as srv:
        yield srv


@pytest_asyncio.fixture
async def gap_clients(
    gap_server: TrainerServer,
) -> AsyncIterator[tuple[AsyncServiceClient, pb_grpc.TrainerServiceStub]]:
    async with (
        AsyncServiceClient(gap_server.address) as service,
        grpc.aio.insecure_channel(gap_server.address) as channel,
    ):
        yield service, pb_grpc.TrainerServiceStub(channel)


async def test_gap_aborts_and_the_next_call_works(
    gap_server: TrainerServer, gap_clients: tuple[AsyncServiceClient, pb_grpc.TrainerServiceStub]
) -> None:
    """OptimStep #2 while #1 never arrives: ABORTED after the gap timeout, not applied; #3 runs."""
    service, stub = gap_clients
    (data,) = make_batches(await vocab_size(service), 1, seed=4)
    tc = await new_session(service)
    session = server_session(gap_server, tc)
    before, initial = state_hash(session), weights(gap_server, tc)

    t0 = time.monotonic()
    await expect_status(raw_optim_step(stub, tc, 2), grpc.StatusCode.ABORTED, "never arrived")
    assert time.monotonic() - t0 >= 0.45
    assert state_hash(session) == before
    assert session.state.step == 0

    # The gap is skipped: #3 runs (it would be ABORTED if it waited for #1 or #2), and #4 applies
    # #3's gradients.
    await raw_forward_backward(stub, tc, 3, data)
    step = await raw_optim_step(stub, tc, 4)
    assert step.step == 1 and step.grad_norm > 0
    assert_changed(initial, weights(gap_server, tc))

    # The missing #1 arriving late is refused, not applied out of order.
    after = state_hash(session)
    await expect_status(raw_forward_backward(stub, tc, 1, data), grpc.StatusCode.ALREADY_EXISTS)
    assert state_hash(session) == after


async def test_no_optim_step_over_a_gap(
    gap_server: TrainerServer, gap_clients: tuple[AsyncServiceClient, pb_grpc.TrainerServiceStub]
) -> None:
    """#1 accumulates gradients, #2 never arrives, OptimStep #3 is aborted (weights and gradients
    unchanged); OptimStep #4 then applies #1's gradients exactly as an in-order run would."""
    service, stub = gap_clients
    batches = make_batches(await vocab_size(service), 1, seed=5)
    tc, seq_tc = await new_session(service), await new_session(service)
    session = server_session(gap_server, tc)

    await raw_forward_backward(stub, tc, 1, batches[0])
    with_grads = state_hash(session)
    assert any(p.grad is not None for p in session.state.params)
    await expect_status(raw_optim_step(stub, tc, 3), grpc.StatusCode.ABORTED, "call 2")
    assert state_hash(session) == with_grads  # weights, gradients and step all unchanged

    step = await raw_optim_step(stub, tc, 4)
    expected = await sequential(seq_tc, batches)
    assert (step.grad_norm, step.step) == expected[0][1:]
    assert_bitwise_equal(weights(gap_server, tc), weights(gap_server, seq_tc))


# ---- sequencer regressions: slow calls are not gaps, skipped gaps never reopen numbers ----


async def test_slow_earlier_call_is_not_a_gap(
    gap_server: TrainerServer, gap_clients: tuple[AsyncServiceClient, pb_grpc.TrainerServiceStub]
) -> None:
    """A call that waits longer than the gap timeout behind an earlier call that has arrived (here a
    custom loss that takes longer than the timeout) is not aborted: nothing is missing."""
    service, _ = gap_clients
    (data,) = make_batches(await vocab_size(service), 1, seed=6)
    tc = await new_session(service)

    def slow_cross_entropy(batch: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        time.sleep(1.0)  # twice the gap timeout; runs in a worker thread of the client
        return -torch.stack([(d.weights * lp).sum() for d, lp in zip(batch, logprobs, strict=True)]).sum(), {}

    fb = tc.forward_backward_custom(data, slow_cross_entropy)
    op = tc.optim_step(ADAM)
    await fb
    step = await op
    assert step.step == 1 and step.grad_norm > 0
    assert (await tc.optim_step(ADAM)).step == 2


async def test_gap_skip_never_reopens_used_numbers(
    gap_server: TrainerServer, gap_clients: tuple[AsyncServiceClient, pb_grpc.TrainerServiceStub]
) -> None:
    """#1 never arrives; #3 arrives before #2. Once the gap is skipped, #2 and #3 are both used up:
    reusing either is ALREADY_EXISTS and nothing is applied."""
    service, stub = gap_clients
    tc = await new_session(service)
    session = server_session(gap_server, tc)
    third = asyncio.ensure_future(raw_optim_step(stub, tc, 3))
    await wait_until(lambda: 3 in session._seen)
    await asyncio.sleep(0.2)
    second = asyncio.ensure_future(raw_optim_step(stub, tc, 2))
    await expect_status(third, grpc.StatusCode.ABORTED)
    with pytest.raises(grpc.aio.AioRpcError) as info:  # skipped with the gap, or (if late) already used
        await second
    assert info.value.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.ALREADY_EXISTS)
    before = state_hash(session)
    assert session.next_seq == 4
    await expect_status(raw_optim_step(stub, tc, 3), grpc.StatusCode.ALREADY_EXISTS)
    assert state_hash(session) == before
