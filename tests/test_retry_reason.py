"""The server's reason for a failure survives the client's retries.

A server that lost a rank answers UNAVAILABLE with why, and is then stopped; the client
retries, and its later attempts only find nothing listening ("failed to connect to all
addresses"). The error the user finally gets must still carry the server's explanation.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest

from trainer_client import AsyncServiceClient, ClientConfig, Datum, InvalidArgumentError, UnavailableError
from trainer_client._errors import after_retries
from trainer_server import ServerConfig, TrainerServer

ATTEMPTS = 5


async def test_reason_survives_retries_after_the_server_goes_away(
    llama_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trainer_server.servicer")
    server = TrainerServer(ServerConfig(models={"m": llama_dir}, port=0, device="cpu"))
    await server.start()
    try:
        config = ClientConfig(retry_attempts=ATTEMPTS, retry_backoff_s=0.5)  # ~7 s of backoff in all
        async with AsyncServiceClient(server.address, config=config) as service:
            tc = await service.create_training_client("m", lora_rank=4)
            assert server.core is not None
            await server.core._break("rank 1 stopped answering")  # what the runtime does when a rank is lost
            future = tc.forward([Datum.from_tokens([10, 11], [12, 13])])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while not any("Forward -> UNAVAILABLE" in r.getMessage() for r in caplog.records):
                assert loop.time() < deadline, "the server never answered"
                await asyncio.sleep(0.005)
            await server.stop(0)  # the server goes away: the next attempts cannot connect
            with pytest.raises(UnavailableError) as ei:
                await asyncio.wait_for(future, 60)
    finally:
        await server.stop(0)
    details = ei.value.details
    reason = "the server lost one of its 1 processes and must be restarted (rank 1 stopped answering)"
    assert details.startswith(reason), details
    assert "later attempts:" in details and "failed to connect" in details.split(reason)[1], details
    assert details.endswith(f"({ATTEMPTS} attempts)"), details
    assert ei.value.attempts == ATTEMPTS
    assert str(ei.value).startswith(f"Forward: UNAVAILABLE: {reason}")


def test_after_retries_keeps_distinct_reasons_in_order() -> None:
    first = UnavailableError("lost a rank", method="Forward")
    gone = UnavailableError("failed to connect to all addresses", method="Forward")
    assert after_retries([first]) is first
    combined = after_retries([first, gone, gone])
    assert type(combined) is UnavailableError and combined.code == grpc.StatusCode.UNAVAILABLE
    assert combined.details == "lost a rank; later attempts: failed to connect to all addresses (3 attempts)"
    assert combined.attempts == 3 and combined.method == "Forward"
    same = after_retries([gone, gone])
    assert same.details == "failed to connect to all addresses (2 attempts)"
    other = after_retries([InvalidArgumentError("bad", method="M")])
    assert other.attempts == 1
