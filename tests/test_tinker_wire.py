"""Fast unit tests of the Tinker front end's codecs and ordering (no server, no model).

The codecs are checked against the SDK's own converters: what the SDK encodes we decode
to the same numbers, and what we encode the SDK decodes to the same numbers.
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402
from tinker.proto.request_conv import forward_backward_request_to_proto  # noqa: E402
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response  # noqa: E402

from trainer_server.frontends.tinker import backend as be  # noqa: E402
from trainer_server.frontends.tinker import encoding  # noqa: E402
from trainer_server.frontends.tinker.errors import BadRequest, Conflict, SeqGapError  # noqa: E402
from trainer_server.frontends.tinker.ordering import SeqOrder  # noqa: E402
from trainer_server.frontends.tinker.paths import TinkerPath  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_tinker_proto", ROOT / "scripts" / "gen_tinker_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_wire_stubs_match_the_schema(tmp_path: Path) -> None:
    gen = _gen()
    for path in gen.generate(tmp_path):
        assert path.read_bytes() == (gen.WIRE_DIR / path.name).read_bytes(), (
            f"run scripts/gen_tinker_proto.py ({path.name})"
        )


def test_sdk_encoded_forward_backward_decodes_to_the_same_numbers() -> None:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6, 7]),
        loss_fn_inputs={"target_tokens": [6, 7, 8], "advantages": [0.0, 0.5, -1.25], "logprobs": [-1.0, -2.0, -3.0]},
    )
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=[datum], loss_fn="ppo", loss_fn_config={"clip_low_threshold": 0.7}
        ),
        model_id="sess-0123456789ab:train:0",
        seq_id=4,
    )
    msg = forward_backward_request_to_proto(request)
    call = encoding.forward_backward_call(encoding.parse_forward_backward(msg.SerializeToString()))
    assert (call.model_id, call.seq_id, call.loss, call.forward_only) == (
        "sess-0123456789ab:train:0",
        4,
        be.LossSpec("ppo", {"clip_low_threshold": pytest.approx(0.7)}),
        False,
    )
    (d,) = call.data
    assert d.tokens.tolist() == [5, 6, 7] and d.inputs["target_tokens"].dtype == np.int64
    assert d.inputs["advantages"].tolist() == [0.0, 0.5, -1.25]


def test_sparse_inputs_are_densified() -> None:
    td = types.TensorData(
        data=[1.0, 0.5], dtype="float32", shape=[3, 2], sparse_crow_indices=[0, 1, 2, 2], sparse_col_indices=[1, 0]
    )
    tensor = encoding.wire.Tensor()
    tensor.ParseFromString(
        forward_backward_request_to_proto(
            types.ForwardBackwardRequest(
                forward_backward_input=types.ForwardBackwardInput(
                    data=[types.Datum(model_input=types.ModelInput.from_ints([1]), loss_fn_inputs={"weights": td})],
                    loss_fn="cross_entropy",
                ),
                model_id="m",
                seq_id=1,
            )
        )
        .data[0]
        .loss_fn_inputs["weights"]
        .SerializeToString()
    )
    assert tensor.WhichOneof("encoding") == "sparse_csr"
    dense = encoding._tensor("w", tensor)
    np.testing.assert_array_equal(dense, [[0.0, 1.0], [0.5, 0.0], [0.0, 0.0]])


def test_our_replies_decode_in_the_sdk() -> None:
    fb = be.ForwardBackwardResult(
        [
            {"logprobs": np.array([-1.0, -2.0], np.float32), "elementwise_loss": np.array([1.0, 2.0], np.float32)},
            {"logprobs": np.array([-0.5], np.float32), "elementwise_loss": np.array([0.5], np.float32)},
        ],
        {"loss:sum": 3.5, "tokens": 3.0, "a:b:c": 1.0},
    )
    out = deserialize_forward_backward_output(encoding.ForwardBackwardReply(fb).to_proto())
    assert [o["logprobs"].tolist() for o in out.loss_fn_outputs] == [[-1.0, -2.0], [-0.5]]
    assert out.metrics == {"loss:sum": 3.5, "tokens:mean": 3.0, "a_b:c": 1.0}
    sample = be.SampleResult(
        [be.SampledSequence(np.array([3, 4]), np.array([-0.25, -0.5], np.float32), "stop")],
        prompt_logprobs=np.array([np.nan, -1.5], np.float32),
        topk_prompt_ids=np.array([[0, 0], [7, 8]]),
        topk_prompt_logprobs=np.array([[-99999.0, -99999.0], [-0.1, -0.2]], np.float32),
    )
    got = deserialize_sample_response(encoding.SampleReply(sample).to_proto())
    assert got.sequences[0].tokens == [3, 4] and got.sequences[0].stop_reason == "stop"
    assert got.sequences[0].logprobs == [-0.25, -0.5]
    assert got.prompt_logprobs == [None, -1.5]
    assert got.topk_prompt_logprobs is not None and got.topk_prompt_logprobs[1] == [
        (7, pytest.approx(-0.1)),
        (8, pytest.approx(-0.2)),
    ]


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ([1, 2], "2 entries for 3 input tokens"),
        ([1.5, 2.5, 3.5], "must be int64, got float32"),
    ],
)
def test_bad_datums_are_refused_with_the_field_named(targets: list[float], message: str) -> None:
    msg = encoding.wire.ForwardBackwardRequest(model_id="m", seq_id=1)
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = np.array([1, 2, 3], "<i4").tobytes()
    dtype = encoding.wire.DTYPE_INT64 if isinstance(targets[0], int) else encoding.wire.DTYPE_FLOAT32
    raw = np.asarray(targets, "<i8" if dtype == encoding.wire.DTYPE_INT64 else "<f4").tobytes()
    d.loss_fn_inputs["target_tokens"].CopyFrom(encoding.wire.Tensor(dense=raw, dtype=dtype))
    with pytest.raises(BadRequest, match=rf"data\[0\]\.loss_fn_inputs\['target_tokens'\]: {message}"):
        encoding.forward_backward_call(msg)


def test_tinker_paths_map_to_store_names() -> None:
    path = TinkerPath.parse("tinker://sess-0123456789ab:train:3/sampler_weights/step-10")
    assert path.store_name == "sess-0123456789ab.3.sampler.step-10"
    assert TinkerPath.from_store_name(path.store_name) == path
    assert str(path) == "tinker://sess-0123456789ab:train:3/sampler_weights/step-10"
    assert TinkerPath.from_store_name("my-grpc-checkpoint") is None
    for bad in ("s3://x/y", "tinker://x/weights/n", "tinker://sess-0123456789ab:train:3/other/n"):
        with pytest.raises(BadRequest):
            TinkerPath.parse(bad)
    with pytest.raises(BadRequest, match="must start with a letter or digit"):
        TinkerPath.of("sess-0123456789ab:train:3", "state", "../x")


async def test_seq_order_runs_in_order_once_and_skips_refusals() -> None:
    order = SeqOrder(gap_timeout_s=0.5)
    ran: list[int] = []

    async def work(n: int) -> int:
        ran.append(n)
        return n

    third = asyncio.create_task(order.run_in_turn(3, lambda: work(3)))
    second = asyncio.create_task(order.run_in_turn(2, lambda: work(2)))
    await asyncio.sleep(0.01)
    assert ran == []
    order.skip(1)  # seq 1 refused at submission
    assert await asyncio.gather(second, third) == [2, 3]
    assert ran == [2, 3]
    order.claim(4, "fp", "req-4")
    assert order.claimed(4, "fp") == "req-4"
    with pytest.raises(Conflict, match="already used by a different request"):
        order.claimed(4, "other")
    with pytest.raises(Conflict, match="behind"):
        order.claimed(2, "fp")
    with pytest.raises(SeqGapError, match=r"seq_id 6 waited 0\.5 s for seq_id 4"):
        await order.run_in_turn(6, lambda: work(6))
    assert ran == [2, 3] and order.next_seq == 7


def test_http_listener_sends_without_nagle_delay() -> None:
    """asyncio disables Nagle only on sockets whose proto is TCP; without it every response waits ~40 ms."""
    import socket

    from trainer_server.frontends.tinker.serving import _listen

    sock = _listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()
