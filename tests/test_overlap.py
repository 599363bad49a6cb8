"""Overlap: a custom call's forward runs while the previous call waits for its client's loss.

Inside an accumulation window, weights do not change until the optimizer step, so the
forward of call k+1 may run before call k's gradient arrives; backward passes still run in
sequence order, so gradients accumulate bitwise as in a strictly sequential run. The tests
watch the server's held graphs from inside the client's loss function: while the loss of
call k runs, the forward of call k+1 must already be held (overlap happened), never two calls
ahead, and never past an optimizer step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import LLAMA, make_config, server_session, state_hash

from trainer_client import AdamParams, AsyncServiceClient, Datum
from trainer_server import Limits, TrainerServer

ADAM = AdamParams(learning_rate=1e-2)
WAIT_S = 10.0


def batches(count: int) -> list[list[Datum]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(count):
        tokens = torch.randint(3, 500, (12,), generator=g).tolist()
        out.append([Datum.from_tokens(tokens[:4], tokens[4:]), Datum.from_tokens(tokens[:2], tokens[2:7])])
    return out


def loss(data: Sequence[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    total = sum((lp * d.weights).sum() * -1.0 for d, lp in zip(data, logprobs, strict=True))
    assert isinstance(total, torch.Tensor)
    return total, {}


def held_count(server: TrainerServer) -> int:
    assert server.core is not None
    return len(server.core.held_graphs)


async def test_next_forward_runs_during_the_client_loss_and_gradients_match(
    server: TrainerServer, service: AsyncServiceClient
) -> None:
    data = batches(4)
    seen: list[int] = []  # held graphs observed while each loss ran

    def watching_loss(d: Sequence[Datum], lps: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        # Wait (bounded) for the next call's forward to be held beside ours.
        deadline = time.monotonic() + WAIT_S
        while held_count(server) < 2 and time.monotonic() < deadline and len(seen) < len(data) - 1:
            time.sleep(0.005)
        seen.append(held_count(server))
        return loss(d, lps)

    overlapped = await service.create_training_client(LLAMA, lora_rank=8, seed=1)
    futures = [overlapped.forward_backward_custom(b, watching_loss) for b in data]
    step = overlapped.optim_step(ADAM)
    for f in futures:
        await f
    await step
    print(f"\nheld graphs seen from inside each loss: {seen}")
    assert seen[:-1] == [2, 2, 2]  # the next forward was held while each loss ran; never more
    assert seen[-1] in (1, 2)  # nothing runs after the last call; the previous backward may still be queued

    sequential = await service.create_training_client(LLAMA, lora_rank=8, seed=1)
    for b in data:
        await sequential.forward_backward_custom(b, loss)
    await sequential.optim_step(ADAM)
    assert state_hash(server_session(server, overlapped)) == state_hash(server_session(server, sequential))
    assert held_count(server) == 0


async def test_no_forward_runs_ahead_of_an_optimizer_step(server: TrainerServer, service: AsyncServiceClient) -> None:
    data = batches(2)
    seen: list[int] = []

    def slow_loss(d: Sequence[Datum], lps: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        time.sleep(0.5)  # long enough for a forward that was allowed ahead to show up
        seen.append(held_count(server))
        return loss(d, lps)

    tc = await service.create_training_client(LLAMA, lora_rank=8, seed=1)
    first = tc.forward_backward_custom(data[0], slow_loss)
    step = tc.optim_step(ADAM)
    second = tc.forward_backward_custom(data[1], slow_loss)
    await first
    await step
    await second
    assert seen == [1, 1]  # the second forward waited for the step: it must see the new weights

    ref = await service.create_training_client(LLAMA, lora_rank=8, seed=1)
    await ref.forward_backward_custom(data[0], loss)
    await ref.optim_step(ADAM)
    await ref.forward_backward_custom(data[1], loss)
    assert state_hash(server_session(server, tc)) == state_hash(server_session(server, ref))


async def test_a_call_ahead_survives_the_previous_call_failing(
    server: TrainerServer, service: AsyncServiceClient
) -> None:
    data = batches(2)

    def failing_loss(d: Sequence[Datum], lps: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        deadline = time.monotonic() + WAIT_S
        while held_count(server) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        raise RuntimeError("the user's loss failed")

    tc = await service.create_training_client(LLAMA, lora_rank=8, seed=1)
    first = tc.forward_backward_custom(data[0], failing_loss)
    second = tc.forward_backward_custom(data[1], loss)
    try:
        await first
    except Exception as exc:
        assert "the user's loss failed" in str(exc)
    else:
        raise AssertionError("the failing loss did not fail the call")
    await second  # ran its forward ahead; its backward went in once the first call was given up
    assert held_count(server) == 0

    ref = await service.create_training_client(LLAMA, lora_rank=8, seed=1)
    await ref.forward_backward_custom(data[1], loss)
    assert state_hash(server_session(server, tc)) == state_hash(server_session(server, ref))


async def test_next_calls_device_work_is_queued_while_the_previous_runs(
    server: TrainerServer, service: AsyncServiceClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device thread never waits for the event loop between a session's pipelined calls."""
    from trainer_server._engine import SessionModel

    assert server.core is not None
    queue = server.core._executor._work_queue  # type: ignore[attr-defined]
    seen: list[int] = []
    original = SessionModel.backward

    def slow_backward(self: SessionModel, *args: Any) -> Any:
        time.sleep(0.3)  # by now the optim_step submitted behind this call has queued its work
        seen.append(queue.qsize())
        return original(self, *args)

    monkeypatch.setattr(SessionModel, "backward", slow_backward)
    tc = await service.create_training_client(LLAMA, lora_rank=8, seed=1)
    data = batches(1)[0]
    fb = tc.forward_backward(data, "cross_entropy")
    step = tc.optim_step(ADAM)
    await fb
    await step
    assert seen == [1]  # the step's work was already waiting on the device thread's queue

    ref = await service.create_training_client(LLAMA, lora_rank=8, seed=1)
    await ref.forward_backward(data, "cross_entropy")
    await ref.optim_step(ADAM)
    assert state_hash(server_session(server, tc)) == state_hash(server_session(server, ref))


async def test_client_holds_calls_back_at_the_servers_inflight_limit(llama_dir: Path, qwen_dir: Path) -> None:
    """Submitting far past the server's in-flight limit waits in the client instead of failing."""
    config = make_config(llama_dir, qwen_dir, limits=Limits(max_inflight_per_session=3))
    async with TrainerServer(config) as server, AsyncServiceClient(server.address) as service:
        tc = await service.create_training_client(LLAMA, lora_rank=4, seed=1)
        data = batches(1)[0]
        futures = [f for _ in range(10) for f in (tc.forward_backward(data), tc.optim_step(ADAM))]
        for f in futures:
            await f  # none refused with RESOURCE_EXHAUSTED
        assert server_session(server, tc).state.step == 10
