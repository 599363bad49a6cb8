"""Sessions as leases: expiry, heartbeats, listing and ending by id, reattaching, leak-free admission,
bounded held graphs, and sessions saved at a graceful stop and restored at the next start.

Everything runs against a real server on port 0 with the tiny models of ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from conftest import LLAMA, make_config, state_hash

from trainer_client import (
    AdamParams,
    AsyncServiceClient,
    ClientConfig,
    Datum,
    NotFoundError,
    ResourceExhaustedError,
)
from trainer_proto import pb, pb_grpc
from trainer_server import Limits, TrainerServer
from trainer_server._engine import SessionModel

NO_HEARTBEAT = ClientConfig(heartbeat_interval_s=0)


def data(n: int = 2, length: int = 12) -> list[Datum]:
    gen = torch.Generator().manual_seed(7)
    return [Datum.from_sequence(torch.randint(3, 60, (length,), generator=gen)) for _ in range(n)]


def mse(data: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    loss = sum(((lp + 1.0) ** 2).sum() for lp in logprobs)
    assert isinstance(loss, torch.Tensor)
    return loss, {}


async def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# ---- leases ------------------------------------------------------------------------------


async def test_a_session_without_calls_or_heartbeats_expires_and_is_freed(llama_dir: Path, qwen_dir: Path) -> None:
    async with TrainerServer(make_config(llama_dir, qwen_dir, session_ttl_s=0.6)) as server:
        assert server.core is not None
        async with AsyncServiceClient(server.address, config=NO_HEARTBEAT) as service:
            tc = await service.create_training_client(LLAMA, lora_rank=4)
            assert [s.session_id for s in await service.list_sessions()] == [tc.session_id]
            await wait_until(lambda: len(server.core.sessions) == 0, 10, "the session to expire")  # type: ignore[union-attr]
            assert server.core.engine.sessions == {}, "the expired session's model is still held"
            info = await service.get_server_info()
            assert info.open_sessions == 0
            with pytest.raises(NotFoundError, match="does not exist"):
                await tc.forward(data())


async def test_heartbeats_keep_an_idle_session_alive(llama_dir: Path, qwen_dir: Path) -> None:
    async with (
        TrainerServer(make_config(llama_dir, qwen_dir, session_ttl_s=0.6)) as server,
        AsyncServiceClient(server.address) as service,  # heartbeats every ttl / 3
    ):
        tc = await service.create_training_client(LLAMA, lora_rank=4)
        await asyncio.sleep(2.0)  # over three TTLs without a call
        out = await tc.forward(data())
        assert len(out.logprobs) == 2
        assert (await service.get_server_info()).open_sessions == 1


async def test_sessions_are_listed_and_ended_by_their_owner_only(llama_dir: Path, qwen_dir: Path) -> None:
    config = make_config(llama_dir, qwen_dir, api_keys=frozenset({"key-a", "key-b"}))
    async with (
        TrainerServer(config) as server,
        AsyncServiceClient(server.address, api_key="key-a") as a,
        AsyncServiceClient(server.address, api_key="key-b") as b,
    ):
        tc = await a.create_training_client(LLAMA, lora_rank=4)
        listed = await a.list_sessions()
        assert [s.session_id for s in listed] == [tc.session_id]
        assert listed[0].lora_rank == 4 and listed[0].base_model == LLAMA and listed[0].next_seq == 1
        assert await b.list_sessions() == []
        with pytest.raises(NotFoundError):
            await b.end_session(tc.session_id)
        with pytest.raises(NotFoundError):
            await b.attach_training_client(tc.session_id)
        await a.end_session(tc.session_id)
        assert await a.list_sessions() == []
        with pytest.raises(NotFoundError):
            await tc.forward(data())


async def test_a_new_client_reattaches_and_continues_like_an_uninterrupted_run(llama_dir: Path, qwen_dir: Path) -> None:
    async with TrainerServer(make_config(llama_dir, qwen_dir)) as server:
        assert server.core is not None
        async with AsyncServiceClient(server.address) as reference:
            ref = await reference.create_training_client(LLAMA, lora_rank=4, seed=3)
            for _ in range(3):
                await ref.forward_backward_custom(data(), mse)
                await ref.optim_step(AdamParams(learning_rate=1e-2))
            expected = state_hash(server.core.sessions.get(ref.session_id))

        first = AsyncServiceClient(server.address)
        tc = await first.create_training_client(LLAMA, lora_rank=4, seed=3)
        await tc.forward_backward_custom(data(), mse)
        await tc.optim_step(AdamParams(learning_rate=1e-2))
        await tc.forward_backward_custom(data(), mse)  # gradients pending when the client "crashes"
        await first.close()  # its process is gone: no close of the session

        async with AsyncServiceClient(server.address) as second:
            again = await second.attach_training_client(tc.session_id)
            assert again.session_id == tc.session_id
            await again.optim_step(AdamParams(learning_rate=1e-2))
            await again.forward_backward_custom(data(), mse)
            await again.optim_step(AdamParams(learning_rate=1e-2))
            assert state_hash(server.core.sessions.get(tc.session_id)) == expected


# ---- admission ---------------------------------------------------------------------------


async def test_a_burst_of_creates_over_the_limit_leaves_no_orphans(llama_dir: Path, qwen_dir: Path) -> None:
    config = make_config(llama_dir, qwen_dir, limits=Limits(max_sessions=3))
    async with TrainerServer(config) as server, AsyncServiceClient(server.address) as service:
        assert server.core is not None
        keep = await service.create_training_client(LLAMA, lora_rank=4)  # two slots left
        results = await asyncio.gather(
            *(service.create_training_client(LLAMA, lora_rank=4) for _ in range(40)), return_exceptions=True
        )
        made = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, ResourceExhaustedError)]
        assert len(made) == 2 and len(refused) == 38, results
        assert set(server.core.engine.sessions) == {keep.session_id, *(tc.session_id for tc in made)}
        for tc in [keep, *made]:
            await tc.close()
        assert server.core.engine.sessions == {} and len(server.core.sessions) == 0


async def test_a_create_whose_caller_gives_up_leaves_nothing_behind(
    llama_dir: Path, qwen_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = SessionModel.__init__

    def slow_init(self: SessionModel, *args: Any, **kwargs: Any) -> None:
        time.sleep(1.0)  # a big model being copied
        original(self, *args, **kwargs)

    monkeypatch.setattr(SessionModel, "__init__", slow_init)
    async with TrainerServer(make_config(llama_dir, qwen_dir)) as server:
        assert server.core is not None
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.TrainerServiceStub(channel)
            request = pb.CreateSessionRequest(base_model=LLAMA, lora=pb.LoraConfig(rank=4))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.CreateSession(request, timeout=0.3)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_until(lambda: not server.core.engine.sessions and len(server.core.sessions) == 0, 10, "cleanup")  # type: ignore[union-attr]


# ---- held graphs -------------------------------------------------------------------------


async def test_a_custom_call_whose_gradient_never_comes_is_freed_by_the_timeout(
    llama_dir: Path, qwen_dir: Path
) -> None:
    async with TrainerServer(make_config(llama_dir, qwen_dir, held_graph_timeout_s=1.0)) as server:
        assert server.core is not None
        async with AsyncServiceClient(server.address) as service:
            tc = await service.create_training_client(LLAMA, lora_rank=4)
            before = state_hash(server.core.sessions.get(tc.session_id))
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.TrainerServiceStub(channel)
                call = stub.ForwardBackwardCustom()
                batch = [d.to_proto() for d in data()]
                start = pb.ForwardStart(call=pb.CallHeader(session_id=tc.session_id, seq=1), num_datums=len(batch))
                await call.write(pb.ForwardBackwardCustomRequest(start=start))
                await call.write(pb.ForwardBackwardCustomRequest(datums=pb.DatumBatch(datums=batch)))
                header = await call.read()
                assert header.WhichOneof("message") == "logprobs_header"
                await wait_until(lambda: len(server.core.held_graphs) == 1, 10, "the held graph")  # type: ignore[union-attr]
                assert (await service.get_server_info()).held_graphs == 1
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    while (msg := await call.read()) is not grpc.aio.EOF:  # the chunks, then the abort
                        assert msg.WhichOneof("message") == "logprobs_chunk"
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "held_graph_timeout_s=1s" in (info.value.details() or "")
                assert time.monotonic() - started < 10
            assert len(server.core.held_graphs) == 0
            assert state_hash(server.core.sessions.get(tc.session_id)) == before
            tc._next_seq = 2  # the raw call used number 1
            out = await tc.forward_backward_custom(data(), mse)  # the session goes on
            assert out.loss > 0


async def test_held_graphs_over_the_memory_budget_are_refused(llama_dir: Path, qwen_dir: Path) -> None:
    async with TrainerServer(make_config(llama_dir, qwen_dir, max_held_graph_bytes=1000)) as server:
        assert server.core is not None
        async with AsyncServiceClient(server.address) as service:
            tc = await service.create_training_client(LLAMA, lora_rank=4)
            before = state_hash(server.core.sessions.get(tc.session_id))
            with pytest.raises(ResourceExhaustedError, match="max_held_graph_bytes=1000"):
                await tc.forward_backward_custom(data(), mse)
            assert len(server.core.held_graphs) == 0
            assert state_hash(server.core.sessions.get(tc.session_id)) == before
            out = await tc.forward_backward(data(), "cross_entropy")  # no graph is held for a built-in loss
            assert out.loss > 0


async def test_held_graph_bytes_are_measured(llama_dir: Path, qwen_dir: Path) -> None:
    async with TrainerServer(make_config(llama_dir, qwen_dir)) as server:
        assert server.core is not None
        async with AsyncServiceClient(server.address) as service:
            tc = await service.create_training_client(LLAMA, lora_rank=4)
            seen: list[int] = []

            def loss(d: list[Datum], lp: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
                seen.append(server.core.held_graph_bytes)  # type: ignore[union-attr]
                return mse(d, lp)

            await tc.forward_backward_custom(data(2, 12), loss)
            await tc.forward_backward_custom(data(4, 24), loss)
            small, big = seen
            assert 0 < small < big, seen  # four times the tokens hold more
            assert server.core.held_graph_bytes == 0


# ---- restarts ----------------------------------------------------------------------------


async def test_sessions_saved_at_a_stop_are_restored_and_continue_exactly(
    llama_dir: Path, qwen_dir: Path, tmp_path: Path
) -> None:
    steps = 3

    async def train(tc: Any, start: int, stop: int) -> None:
        for _ in range(start, stop):
            await tc.forward_backward_custom(data(), mse)
            await tc.optim_step(AdamParams(learning_rate=1e-2))

    async with TrainerServer(make_config(llama_dir, qwen_dir, checkpoint_dir=tmp_path / "ref")) as server:
        assert server.core is not None
        async with AsyncServiceClient(server.address) as service:
            ref = await service.create_training_client(LLAMA, lora_rank=None, seed=5)
            await train(ref, 0, steps)
            await ref.forward_backward_custom(data(), mse)
            await ref.optim_step(AdamParams(learning_rate=1e-2))
            expected = state_hash(server.core.sessions.get(ref.session_id))

    config = make_config(llama_dir, qwen_dir, checkpoint_dir=tmp_path / "ck")
    server = TrainerServer(config)
    await server.start()
    try:
        async with AsyncServiceClient(server.address) as service:
            tc = await service.create_training_client(LLAMA, lora_rank=None, seed=5)
            await train(tc, 0, steps)
            await tc.forward_backward_custom(data(), mse)  # gradients pending across the restart
    finally:
        await server.stop(save_sessions=True)
    assert (tmp_path / "ck" / ".sessions" / tc.session_id / "session.json").is_file()

    async with TrainerServer(config) as restarted:
        assert restarted.core is not None
        async with AsyncServiceClient(restarted.address) as service:
            listed = await service.list_sessions()
            assert [(s.session_id, s.restored, s.step) for s in listed] == [(tc.session_id, True, steps)]
            again = await service.attach_training_client(tc.session_id)
            await again.optim_step(AdamParams(learning_rate=1e-2))
            assert state_hash(restarted.core.sessions.get(tc.session_id)) == expected
    assert not (tmp_path / "ck" / ".sessions" / tc.session_id).exists(), "a restored session's copy is removed"


async def test_a_start_after_a_crash_names_the_lost_sessions(
    llama_dir: Path, qwen_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(llama_dir, qwen_dir, checkpoint_dir=tmp_path / "ck")
    async with TrainerServer(config) as server, AsyncServiceClient(server.address) as service:
        tc = await service.create_training_client(LLAMA, lora_rank=4)
        journal = tmp_path / "ck" / ".sessions" / "open" / f"{tc.session_id}.json"
        assert journal.is_file()
        lost = journal.read_bytes()
    journal.parent.mkdir(parents=True, exist_ok=True)
    journal.write_bytes(lost)  # as a SIGKILL leaves it: the stop above cleared it
    with caplog.at_level("WARNING", logger="trainer_server.core"):
        async with TrainerServer(config):
            pass
    assert any(tc.session_id in r.message and "create_training_client_from_state" in r.message for r in caplog.records)
    assert not journal.exists()
