"""Retries never apply a call twice; API keys own their sessions and checkpoints; TLS works.

Dropped responses are injected by wrapping a servicer method: the call runs and commits on
the server, then the RPC fails with UNAVAILABLE as if the connection had dropped. The
client retries with the same sequence number and request, and must get the stored result.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import torch
from conftest import LLAMA, make_config, server_session, state_hash

from trainer_client import (
    AdamParams,
    AlreadyExistsError,
    AsyncServiceClient,
    ClientConfig,
    Datum,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from trainer_proto import pb, pb_grpc
from trainer_server import Limits, TrainerServer
from trainer_server.frontends.grpc_servicer import TrainerServicer

KEYS = frozenset({"key-alice", "key-bob"})


def batch(seed: int = 0) -> list[Datum]:
    gen = torch.Generator().manual_seed(seed)
    return [Datum.from_tokens(torch.randint(3, 500, (5,), generator=gen), torch.randint(3, 500, (6,), generator=gen))]


class _LosingResults:
    """A servicer context that loses the final ``result`` message of a stream."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context

    async def write(self, message: Any) -> None:
        if isinstance(message, bytes) or message.WhichOneof("message") != "result":  # bytes: encoded chunks
            await self._context.write(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def drop_first_response(monkeypatch: pytest.MonkeyPatch, method: str) -> list[int]:
    """Make the first call of ``method`` commit on the server, then lose its result (UNAVAILABLE)."""
    original: Callable[..., Awaitable[Any]] = getattr(TrainerServicer, method)
    calls: list[int] = []

    async def flaky(self: TrainerServicer, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        calls.append(1)
        if len(calls) == 1:
            await original(self, request, _LosingResults(context))  # runs, commits, records the outcome
            await context.abort(grpc.StatusCode.UNAVAILABLE, "injected: the response was lost")
        return await original(self, request, context)

    monkeypatch.setattr(TrainerServicer, method, flaky)
    return calls


@contextlib.asynccontextmanager
async def dropping_server(
    llama_dir: Path, qwen_dir: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> AsyncIterator[tuple[TrainerServer, AsyncServiceClient, list[int]]]:
    """A server whose first ``method`` call loses its response, and a fast-retrying client.

    The servicer's methods are bound when the server registers them, so the fault goes in
    before the server starts.
    """
    calls = drop_first_response(monkeypatch, method)
    async with (
        TrainerServer(make_config(llama_dir, qwen_dir)) as srv,
        AsyncServiceClient(srv.address, config=ClientConfig(retry_backoff_s=0.01)) as client,
    ):
        yield srv, client, calls


async def test_dropped_optim_step_response_is_applied_once(
    llama_dir: Path, qwen_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step counter advances exactly once and the weights equal a run with no fault."""
    async with dropping_server(llama_dir, qwen_dir, monkeypatch, "OptimStep") as (server, service, calls):
        faulty = await service.create_training_client(LLAMA, lora_rank=None, seed=1)
        clean = await service.create_training_client(LLAMA, lora_rank=None, seed=1)
        for tc in (faulty, clean):
            await tc.forward_backward(batch())
        step = await faulty.optim_step(AdamParams(learning_rate=1e-2))
        assert len(calls) == 2, "the client should have retried once"
        reference = await clean.optim_step(AdamParams(learning_rate=1e-2))
        assert len(calls) == 3
        await check_same_step(server, faulty.session_id, clean.session_id, step, reference)


async def check_same_step(server: TrainerServer, faulty: str, clean: str, step: Any, reference: Any) -> None:
    assert server.core is not None
    a = server.core.sessions.get(faulty)
    b = server.core.sessions.get(clean)
    assert step.step == reference.step == 1 and step.grad_norm == reference.grad_norm
    assert a.state.step == 1
    sa, sb = a.state.model.state_dict(), b.state.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


async def test_dropped_forward_backward_response_is_applied_once(
    llama_dir: Path, qwen_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with dropping_server(llama_dir, qwen_dir, monkeypatch, "ForwardBackward") as (server, service, calls):
        faulty = await service.create_training_client(LLAMA, lora_rank=None, seed=1)
        clean = await service.create_training_client(LLAMA, lora_rank=None, seed=1)
        out = await faulty.forward_backward(batch(), return_logprobs=True)
        assert len(calls) == 2
        ref = await clean.forward_backward(batch(), return_logprobs=True)
        assert out.loss == ref.loss and torch.equal(out.logprobs[0], ref.logprobs[0])
        step = await faulty.optim_step()
        reference = await clean.optim_step()
        await check_same_step(server, faulty.session_id, clean.session_id, step, reference)


async def test_dropped_custom_response_replays_with_the_same_gradient(
    llama_dir: Path, qwen_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def loss_fn(data: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss = sum((lp**2).sum() for lp in logprobs)
        assert isinstance(loss, torch.Tensor)
        return loss, {}

    async with dropping_server(llama_dir, qwen_dir, monkeypatch, "ForwardBackwardCustom") as (server, service, calls):
        faulty = await service.create_training_client(LLAMA, lora_rank=None, seed=1)
        clean = await service.create_training_client(LLAMA, lora_rank=None, seed=1)
        out = await faulty.forward_backward_custom(batch(), loss_fn)
        assert len(calls) == 2
        ref = await clean.forward_backward_custom(batch(), loss_fn)
        assert out.loss == ref.loss
        grads_a = [p.grad for p in server_session(server, faulty).state.params]
        grads_b = [p.grad for p in server_session(server, clean).state.params]
        assert all(torch.equal(x, y) for x, y in zip(grads_a, grads_b, strict=True))  # accumulated once


async def test_same_seq_with_different_content_is_refused(server: TrainerServer, service: AsyncServiceClient) -> None:
    tc = await service.create_training_client(LLAMA, lora_rank=4)
    await tc.optim_step(AdamParams(learning_rate=1e-3))
    session = server_session(server, tc)
    before = state_hash(session)
    stub = pb_grpc.TrainerServiceStub(service._channel)
    call = pb.CallHeader(session_id=tc.session_id, seq=1)
    same = await stub.OptimStep(pb.OptimStepRequest(call=call, adam_params=AdamParams(learning_rate=1e-3).to_proto()))
    assert same.step == 1  # the stored result, not a second step
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.OptimStep(pb.OptimStepRequest(call=call, adam_params=AdamParams(learning_rate=1.0).to_proto()))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "different request" in (info.value.details() or "")
    assert state_hash(session) == before


# ---- auth -------------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def auth_server(llama_dir: Path, qwen_dir: Path, tmp_path: Path) -> AsyncIterator[TrainerServer]:
    config = make_config(
        llama_dir,
        qwen_dir,
        api_keys=KEYS,
        checkpoint_dir=tmp_path / "ckpt",
        limits=Limits(max_sessions_per_key=2, max_inflight_per_session=4),
    )
    async with TrainerServer(config) as srv:
        yield srv


async def test_missing_or_wrong_key_is_unauthenticated(auth_server: TrainerServer) -> None:
    for key in ("", "key-mallory"):
        async with AsyncServiceClient(
            auth_server.address, api_key=key, config=ClientConfig(retry_attempts=1)
        ) as client:
            with pytest.raises(UnauthenticatedError, match="API key"):
                await client.get_server_info()
            with pytest.raises(UnauthenticatedError):
                await client.create_training_client(LLAMA, lora_rank=4)
    # Health stays open without a key.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(auth_server.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_keys_own_their_sessions_and_checkpoints(auth_server: TrainerServer) -> None:
    async with (
        AsyncServiceClient(auth_server.address, api_key="key-alice") as alice,
        AsyncServiceClient(auth_server.address, api_key="key-bob") as bob,
    ):
        tc = await alice.create_training_client(LLAMA, lora_rank=4)
        await tc.forward_backward(batch())
        await tc.save_checkpoint("mine", "state")
        assert [c.name for c in await alice.list_checkpoints()] == ["mine"]
        assert await bob.list_checkpoints() == []
        with pytest.raises(NotFoundError):
            await bob.create_training_client_from_state("mine")
        with pytest.raises(NotFoundError):
            await bob.delete_checkpoint("mine")
        with pytest.raises(NotFoundError):
            await bob.download_checkpoint("mine", "/nonexistent-should-not-be-created", progress=False)
        stub = pb_grpc.TrainerServiceStub(bob._channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.OptimStep(
                pb.OptimStepRequest(call=pb.CallHeader(session_id=tc.session_id, seq=9)), metadata=bob._metadata
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # Bob may use the same checkpoint name in his own namespace.
        tb = await bob.create_training_client(LLAMA, lora_rank=4)
        await tb.save_checkpoint("mine", "state")
        # Alice's session is untouched and still hers.
        assert (await tc.optim_step()).step == 1
        with pytest.raises(AlreadyExistsError):
            await tc.save_checkpoint("mine", "state")


async def test_per_key_session_limit(auth_server: TrainerServer) -> None:
    async with AsyncServiceClient(auth_server.address, api_key="key-alice") as alice:
        await alice.create_training_client(LLAMA, lora_rank=2)
        await alice.create_training_client(LLAMA, lora_rank=2)
        with pytest.raises(ResourceExhaustedError, match="max_sessions_per_key=2"):
            await alice.create_training_client(LLAMA, lora_rank=2)
    async with AsyncServiceClient(auth_server.address, api_key="key-bob") as bob:
        await bob.create_training_client(LLAMA, lora_rank=2)  # another key has its own allowance


async def test_inflight_limit_per_session(auth_server: TrainerServer) -> None:
    async with AsyncServiceClient(auth_server.address, api_key="key-alice") as alice:
        tc = await alice.create_training_client(LLAMA, lora_rank=2)
        stub = pb_grpc.TrainerServiceStub(alice._channel)
        # Numbers 2..5 wait behind the missing 1: four calls in flight, the limit.
        waiting = [
            stub.OptimStep(
                pb.OptimStepRequest(call=pb.CallHeader(session_id=tc.session_id, seq=n)), metadata=alice._metadata
            )
            for n in range(2, 6)
        ]
        session = server_session_for(auth_server, tc.session_id)
        for _ in range(200):
            if len(session._seen) == 4:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.OptimStep(
                pb.OptimStepRequest(call=pb.CallHeader(session_id=tc.session_id, seq=6)), metadata=alice._metadata
            )
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_inflight_per_session=4" in (info.value.details() or "")
        for call in waiting:
            call.cancel()


def server_session_for(server: TrainerServer, session_id: str) -> Any:
    assert server.core is not None
    owner = next(iter({s.owner for s in server.core.sessions.all() if s.id == session_id}))
    return server.core.sessions.get(session_id, owner)


# ---- TLS --------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a test certificate")
async def test_tls_with_a_generated_certificate(llama_dir: Path, qwen_dir: Path, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    await asyncio.to_thread(
        subprocess.run,
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    config = make_config(llama_dir, qwen_dir, tls_cert=cert, tls_key=key, api_keys=KEYS)
    async with TrainerServer(config) as srv:
        target = f"localhost:{srv.port}"
        async with AsyncServiceClient(target, api_key="key-alice", root_certificates=cert.read_bytes()) as client:
            tc = await client.create_training_client(LLAMA, lora_rank=2)
            out = await tc.forward_backward(batch())
            assert out.num_tokens == 10
        # A plaintext client cannot talk to a TLS server.
        async with AsyncServiceClient(
            target, api_key="key-alice", config=ClientConfig(retry_attempts=1, unary_timeout_s=3)
        ) as plain:
            with pytest.raises(Exception):  # noqa: B017 - UNAVAILABLE or a handshake error, by platform
                await plain.get_server_info()


async def test_sequence_number_far_ahead_is_out_of_range(server: TrainerServer, service: AsyncServiceClient) -> None:
    """A huge number is refused at once; it cannot burn the session's remaining numbers."""
    tc = await service.create_training_client(LLAMA, lora_rank=2)
    stub = pb_grpc.TrainerServiceStub(service._channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.OptimStep(pb.OptimStepRequest(call=pb.CallHeader(session_id=tc.session_id, seq=2**64 - 1)))
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "too far ahead" in (info.value.details() or "")
    assert (await tc.optim_step()).step == 1


async def test_call_whose_deadline_passes_while_queued_is_dropped(
    server: TrainerServer, service: AsyncServiceClient
) -> None:
    """A call still waiting for its turn when its deadline passes is cancelled and never applied."""
    tc = await service.create_training_client(LLAMA, lora_rank=2)
    session = server_session(server, tc)
    before = state_hash(session)
    stub = pb_grpc.TrainerServiceStub(service._channel)
    # Number 2 waits behind the missing 1; its 0.3 s deadline passes first.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.OptimStep(pb.OptimStepRequest(call=pb.CallHeader(session_id=tc.session_id, seq=2)), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(100):  # the server notices the cancellation and gives the number up
        if not session._seen:
            break
        await asyncio.sleep(0.02)
    assert not session._seen and 2 in session._done_early
    assert state_hash(session) == before
    # Number 1 arrives late: it runs, and the session skips the dropped 2 and goes on.
    await stub.OptimStep(pb.OptimStepRequest(call=pb.CallHeader(session_id=tc.session_id, seq=1)))
    assert session.next_seq == 3 and session.state.step == 1
