"""Names matched whole, and error messages that never echo a whole user input.

A status message travels in the ``grpc-message`` trailer, which a client refuses past a few
KiB: a message repeating a 1 MiB session id used to reach the user as RESOURCE_EXHAUSTED
"received metadata size exceeds hard limit" instead of the NOT_FOUND it was. Every case
here checks the precise status, a short message naming the input, and an untouched session.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import torch
from conftest import LLAMA, server_session, state_hash

from trainer_client import AsyncServiceClient, AsyncTrainingClient, Datum, InvalidArgumentError, NotFoundError
from trainer_proto import pb, pb_grpc
from trainer_server import TrainerServer
from trainer_server._checkpoints import validate_name
from trainer_server.core.errors import MAX_MESSAGE_BYTES, ErrorCode, ServiceError, cap_message, echo

MIB_ID = "s" * (1 << 20)
LONG_NAME = "c" * 100_000
TIMEOUT_S = 60.0


def datum() -> Datum:
    return Datum.from_tokens([10, 11, 12], [13, 14, 15, 16])


@pytest.fixture
async def stub(server: TrainerServer) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield pb_grpc.TrainerServiceStub(channel)


@pytest.fixture
async def tc(service: AsyncServiceClient) -> AsyncTrainingClient:
    tc = await service.create_training_client(LLAMA, lora_rank=4, seed=2)
    await tc.forward_backward([datum()], "cross_entropy")
    return tc


def assert_short(details: str, length: int) -> None:
    """The message names the input's length and repeats at most a short prefix of it."""
    assert f"({length} characters)" in details, details[:300]
    assert len(details) < 600, len(details)


async def test_megabyte_session_id_is_not_found(stub: Any) -> None:
    header = pb.CallHeader(session_id=MIB_ID, seq=1)
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.OptimStep(pb.OptimStepRequest(call=header), timeout=TIMEOUT_S)
    details = ei.value.details() or ""
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND, details[:300]
    assert_short(details, 1 << 20)
    assert details.startswith(f"session {MIB_ID[:64]!r}... ")


async def test_long_and_newline_checkpoint_names(
    server: TrainerServer, service: AsyncServiceClient, tc: AsyncTrainingClient
) -> None:
    before = state_hash(server_session(server, tc))
    listed = {c.name for c in await service.list_checkpoints()}
    name = f"ckpt-{uuid.uuid4().hex}"
    with pytest.raises(InvalidArgumentError) as ei:
        await asyncio.wait_for(tc.save_checkpoint(LONG_NAME, "adapter"), TIMEOUT_S)
    assert_short(ei.value.details, 100_000)
    assert "at most 128 characters" in ei.value.details

    for bad in (f"{name}\n", f"{name}\r\n", f"\n{name}"):
        with pytest.raises(InvalidArgumentError) as ei:
            await asyncio.wait_for(tc.save_checkpoint(bad, "adapter"), TIMEOUT_S)
        assert repr(bad) in ei.value.details, ei.value.details  # shown escaped, not as a line break
    assert state_hash(server_session(server, tc)) == before
    assert {c.name for c in await service.list_checkpoints()} == listed

    # a saved checkpoint is not reachable under its name and a newline
    await tc.save_checkpoint(name, "adapter")
    with pytest.raises(InvalidArgumentError):
        await service.delete_checkpoint(f"{name}\n")
    with pytest.raises(InvalidArgumentError) as ei:
        await service.delete_checkpoint(LONG_NAME)
    assert_short(ei.value.details, 100_000)
    assert {c.name for c in await service.list_checkpoints()} == listed | {name}
    await service.delete_checkpoint(name)

    out = await tc.forward([datum()])  # the session still works
    assert bool(torch.isfinite(out.logprobs[0]).all())
    assert state_hash(server_session(server, tc)) == before


async def test_long_inputs_everywhere_get_precise_statuses(
    server: TrainerServer, service: AsyncServiceClient, tc: AsyncTrainingClient
) -> None:
    before = state_hash(server_session(server, tc))
    with pytest.raises(NotFoundError) as missing:
        await service.create_training_client(LONG_NAME)
    assert_short(missing.value.details, 100_000)
    for call in (
        tc.forward_backward([datum()], LONG_NAME),
        tc.forward_backward([datum()], "importance_sampling", {LONG_NAME: 1.0}),
    ):
        with pytest.raises(InvalidArgumentError) as ei:
            await call
        assert_short(ei.value.details, 100_000)
    odd = Datum(model_input=datum().model_input, loss_fn_inputs={**datum().loss_fn_inputs, LONG_NAME: torch.ones(7)})
    with pytest.raises(InvalidArgumentError):
        await tc.forward_backward([odd], "cross_entropy")
    assert state_hash(server_session(server, tc)) == before
    await tc.forward_backward([datum()], "cross_entropy")  # still trains


def test_validate_name_matches_whole() -> None:
    assert validate_name("ckpt-1.v2_a") == "ckpt-1.v2_a"
    for bad in ("ckpt\n", "ckpt\x00", "a" * 129, "-x", "a b", "é"):
        with pytest.raises(ServiceError) as ei:
            validate_name(bad)
        assert ei.value.code == ErrorCode.INVALID_ARGUMENT


def test_echo_and_cap() -> None:
    assert echo("ckpt\n") == "'ckpt\\n'"
    assert echo("x" * 65) == f"{'x' * 64!r}... (65 characters)"
    for filler in ("a", "\u00e9", "\U0001f600", "\n"):  # 1, 2, 4 UTF-8 bytes; a percent-encoded control
        message = cap_message("start " + filler * 100_000)
        assert message.startswith("start ") and message.endswith("... (message truncated)")
        wire = sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in message.encode())
        assert MAX_MESSAGE_BYTES - 12 <= wire <= MAX_MESSAGE_BYTES
    assert cap_message("short") == "short"
