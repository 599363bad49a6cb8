"""Errors a newcomer can act on: each names what went wrong and what to do, as the project's own error."""

from __future__ import annotations

import shutil
import socket
import subprocess
import warnings
from pathlib import Path

import pytest
from conftest import LLAMA, make_config, server_session, state_hash

from trainer_client import (
    AsyncServiceClient,
    ClientClosedError,
    Datum,
    TrainerError,
    UnavailableError,
)
from trainer_client._address import DEFAULT_PORT, parse_target
from trainer_server import TrainerServer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize(
    ("address", "tls", "expected"),
    [
        ("localhost", False, (f"localhost:{DEFAULT_PORT}", False)),
        ("10.0.0.2:7000", False, ("10.0.0.2:7000", False)),
        ("http://example.org:7000", False, ("example.org:7000", False)),
        ("http://example.org:7000/", False, ("example.org:7000", False)),
        ("https://example.org:7000", False, ("example.org:7000", True)),
        ("https://example.org", False, (f"example.org:{DEFAULT_PORT}", True)),
        ("[::1]:7000", False, ("[::1]:7000", False)),
        ("::1", False, (f"[::1]:{DEFAULT_PORT}", False)),
        ("unix:/tmp/trainer.sock", False, ("unix:/tmp/trainer.sock", False)),
        ("dns:///example.org:7000", True, ("dns:///example.org:7000", True)),
    ],
)
def test_addresses_are_understood(address: str, tls: bool, expected: tuple[str, bool]) -> None:
    assert parse_target(address, tls=tls) == expected


@pytest.mark.parametrize(
    ("address", "tls", "message"),
    [
        ("ftp://host:1", False, "unknown scheme 'ftp'"),
        ("host:port", False, "bad port 'port'"),
        ("host:99999", False, "bad port '99999'"),
        ("http://host:1/v1/train", False, "expected HOST, HOST:PORT"),
        ("http://host:1", True, "write https://host:1"),
    ],
)
def test_bad_addresses_are_refused_with_a_hint(address: str, tls: bool, message: str) -> None:
    with pytest.raises(ValueError, match="") as refused:
        parse_target(address, tls=tls)
    assert message in str(refused.value)


async def test_no_server_names_the_address() -> None:
    port = free_port()
    async with AsyncServiceClient(f"127.0.0.1:{port}") as client:
        with pytest.raises(UnavailableError) as err:
            await client.get_server_info()
    assert f"no trainer-server at 127.0.0.1:{port} (is it running?)" in str(err.value)


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1: (key, cert)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(key),
         "-out", str(cert), "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


async def test_plaintext_and_tls_mismatches_say_so(
    llama_dir: Path, qwen_dir: Path, certificate: tuple[Path, Path]
) -> None:
    key, cert = certificate
    tls_config = make_config(llama_dir, qwen_dir, tls_cert=cert, tls_key=key)
    async with TrainerServer(tls_config) as server, AsyncServiceClient(server.address) as plain:
        with pytest.raises(UnavailableError, match="it may serve TLS"):
            await plain.get_server_info()
    roots = cert.read_bytes()
    async with (
        TrainerServer(make_config(llama_dir, qwen_dir)) as server,
        AsyncServiceClient(server.address, root_certificates=roots) as secure,
    ):
        with pytest.raises(UnavailableError, match="the server may be plaintext"):
            await secure.get_server_info()


async def test_closed_clients_raise_the_projects_error(server: TrainerServer) -> None:
    client = AsyncServiceClient(server.address)
    tc = await client.create_training_client(LLAMA, lora_rank=4)
    await client.close()
    with pytest.raises(ClientClosedError, match="is closed"):
        await client.get_server_info()
    with pytest.raises(ClientClosedError, match="is closed"):
        tc.forward([Datum.from_tokens([1, 2], [3])])
    assert issubclass(ClientClosedError, TrainerError) and issubclass(ClientClosedError, RuntimeError)


async def test_sample_wants_token_ids(service: AsyncServiceClient) -> None:
    tc = await service.create_training_client(LLAMA, lora_rank=4)
    with pytest.raises(TypeError, match="takes the prompt's token ids, not text"):
        tc.sample("What is 2 + 2?")  # type: ignore[arg-type]
    await tc.close()


async def test_optim_step_without_gradient_is_reported(server: TrainerServer, service: AsyncServiceClient) -> None:
    tc = await service.create_training_client(LLAMA, lora_rank=4)
    before = state_hash(server_session(server, tc))
    with pytest.warns(RuntimeWarning, match="no forward_backward since the last step"):
        step = await tc.optim_step()
    assert step.no_gradient and step.step == 1 and step.grad_norm == 0.0  # counted, as in Tinker
    after = server_session(server, tc)
    assert state_hash(after) != before  # the step counter moved ...
    after.state.step -= 1
    assert state_hash(after) == before  # ... and nothing else did
    after.state.step += 1

    await tc.forward_backward([Datum.from_tokens([1, 2, 3], [4, 5])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not (await tc.optim_step()).no_gradient
    await tc.close()


async def test_datum_loss_inputs_as_lists(service: AsyncServiceClient) -> None:
    datum = Datum([1, 2, 3], {"target_tokens": [2, 3, 4], "weights": [0, 1, 1], "advantages": [0.5, 0.5, 0.5]})
    assert datum.target_tokens.dtype.is_floating_point is False
    assert datum.weights.tolist() == [0.0, 1.0, 1.0] and datum.weights.dtype.is_floating_point
    assert datum.loss_fn_inputs["advantages"].tolist() == [0.5, 0.5, 0.5]
    tc = await service.create_training_client(LLAMA, lora_rank=4)
    as_lists = await tc.forward_backward([datum])
    as_tensors = await tc.forward_backward([Datum.from_tokens([1, 2], [3, 4])])
    assert as_lists.num_tokens == as_tensors.num_tokens == 3
    assert as_lists.loss == pytest.approx(as_tensors.loss, rel=1e-6)  # same weights: targets 3, 4 only
    await tc.close()
