"""A call cancelled while its device work runs: the work completes, its outcome is stored.

A client that gives up (deadline, cancel, crash) while the server is applying an optimizer
step or accumulating gradients must not leave a half-applied step, nor an applied step whose
outcome is lost: the retry with the same sequence number gets the stored result, and the
session's state equals a run without the cancellation.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
import torch
from conftest import LLAMA, server_session, state_hash

from trainer_client import AdamParams, AsyncServiceClient, Datum
from trainer_proto import pb, pb_grpc
from trainer_server import TrainerServer
from trainer_server._engine import SessionModel

SLOW_S = 0.6


def data() -> list[Datum]:
    return [Datum.from_tokens([5, 6, 7, 8], [9, 10, 11]), Datum.from_tokens([20, 21], [22, 23, 24, 25])]


async def until(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out waiting")


@pytest.fixture
def slow_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Device work of steps and backward passes takes SLOW_S longer (on the device thread)."""
    original_step, original_backward = SessionModel.optim_step, SessionModel.backward

    def slow_step(self: SessionModel, *args: Any) -> Any:
        time.sleep(SLOW_S)
        return original_step(self, *args)

    def slow_backward(self: SessionModel, *args: Any) -> Any:
        time.sleep(SLOW_S)
        return original_backward(self, *args)

    monkeypatch.setattr(SessionModel, "optim_step", slow_step)
    monkeypatch.setattr(SessionModel, "backward", slow_backward)


async def test_optim_step_cancelled_mid_step_completes_and_the_retry_gets_its_result(
    server: TrainerServer, service: AsyncServiceClient, slow_device: None
) -> None:
    tc = await service.create_training_client(LLAMA, lora_rank=4, seed=1)
    ref = await service.create_training_client(LLAMA, lora_rank=4, seed=1)
    for c in (tc, ref):
        await c.forward_backward(data())
    stub = pb_grpc.TrainerServiceStub(service._channel)
    request = pb.OptimStepRequest(
        call=pb.CallHeader(session_id=tc.session_id, seq=2), adam_params=AdamParams(learning_rate=1e-2).to_proto()
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.OptimStep(request, timeout=SLOW_S / 3)  # gives up while the step runs
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    retry = await stub.OptimStep(request, timeout=30)
    assert (retry.seq, retry.step) == (2, 1)
    expected = await ref.optim_step(AdamParams(learning_rate=1e-2))
    assert retry.grad_norm == expected.grad_norm
    assert server_session(server, tc).state.step == 1
    assert state_hash(server_session(server, tc)) == state_hash(server_session(server, ref))


async def test_custom_call_cancelled_during_its_backward_is_applied_once(
    server: TrainerServer, service: AsyncServiceClient, slow_device: None
) -> None:
    def loss(d: Any, lps: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        time.sleep(0.3)  # the forward stays held long enough to be seen
        total = sum(-(lp * x.weights).sum() for x, lp in zip(d, lps, strict=True))
        assert isinstance(total, torch.Tensor)
        return total, {}

    tc = await service.create_training_client(LLAMA, lora_rank=4, seed=1)
    ref = await service.create_training_client(LLAMA, lora_rank=4, seed=1)
    future = tc.forward_backward_custom(data(), loss)
    session = server_session(server, tc)
    # Cancel once the backward has begun: the gradient is on the server, the backward is sleeping.
    assert server.core is not None
    held = server.core.held_graphs
    await until(lambda: len(held) == 1)  # the forward is held while the client computes its loss
    await until(lambda: len(held) == 0)  # the backward took it
    await asyncio.sleep(SLOW_S / 3)
    future.cancel()
    with pytest.raises(BaseException):  # noqa: B017 - cancelled, however the future reports it
        await future
    await until(lambda: session.next_seq == 2)
    assert 1 in session._outcomes  # finished and stored: a retry is answered with it
    await ref.forward_backward_custom(data(), loss)
    assert state_hash(session) == state_hash(server_session(server, ref))  # applied exactly once


async def test_other_sessions_run_while_a_checkpoint_is_hashed_and_committed(
    server: TrainerServer, service: AsyncServiceClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer_server._checkpoints import CheckpointStore

    original = CheckpointStore.commit

    def slow_commit(self: CheckpointStore, *args: Any) -> Any:
        time.sleep(1.5)  # a big checkpoint's hashing and fsync
        return original(self, *args)

    monkeypatch.setattr(CheckpointStore, "commit", slow_commit)
    saver = await service.create_training_client(LLAMA, lora_rank=4, seed=1)
    other = await service.create_training_client(LLAMA, lora_rank=4, seed=2)
    await other.forward(data())  # warm
    name = f"slow-{uuid.uuid4().hex[:8]}"  # the fixture's checkpoint directory outlives the test
    save = saver.save_checkpoint(name, "state")
    await asyncio.sleep(0.4)  # the files are written; the commit is under way
    started = time.monotonic()
    await other.forward(data())
    elapsed = time.monotonic() - started
    assert not save.done() and elapsed < 1.0, elapsed  # the device thread was free
    assert (await save).name == name


async def test_checkpoint_files_are_written_from_a_snapshot_while_training_goes_on(
    server: TrainerServer, service: AsyncServiceClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    from trainer_server import _export

    original = _export.write_snapshot

    def slow_write(*args: Any) -> Any:
        time.sleep(1.5)  # a big model's safetensors or delta encoding
        return original(*args)

    monkeypatch.setattr(_export, "write_snapshot", slow_write)
    saver = await service.create_training_client(LLAMA, lora_rank=4, seed=3)
    other = await service.create_training_client(LLAMA, lora_rank=4, seed=4)
    await saver.forward_backward(data(), "cross_entropy")
    await saver.optim_step(AdamParams(learning_rate=1e-2))
    await other.forward(data())  # warm
    session = server_session(server, saver)
    before = {n: p.detach().clone() for n, p in session.state.model.named_parameters() if p.requires_grad}
    name = f"snap-{uuid.uuid4().hex[:8]}"
    save = saver.save_checkpoint(name, "state")
    trained = saver.forward_backward(data(), "cross_entropy")  # queued behind the save's snapshot
    await asyncio.sleep(0.4)  # the snapshot is taken; the files are being written
    started = time.monotonic()
    await other.forward(data())
    await trained
    elapsed = time.monotonic() - started
    assert not save.done() and elapsed < 1.0, elapsed  # the device thread was free for both sessions
    step = await saver.optim_step(AdamParams(learning_rate=1e-2))  # changes the weights while or after writing
    info = await save
    assert info.step == 1 and step.step == 2
    saved = load_file(str(server.core.checkpoint_store("").path(name) / "trainable.safetensors"))
    assert saved.keys() == before.keys()
    for n, p in session.state.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(saved[n], before[n]), n  # the state at the save's turn
    assert any(not torch.equal(saved[n], p) for n, p in session.state.model.named_parameters() if p.requires_grad)
