"""Bad input: a precise status and message, the session's state untouched, the server still serving.

Every case first accumulates a real gradient on a full fine-tune session, so "unchanged"
covers accumulated gradients as well as weights and the step counter. Client-side cases
check the typed exception class; raw-stub cases (things the client would never send)
check the gRPC status code directly.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import pytest
import torch
from conftest import LLAMA, QWEN, server_session, state_hash

from trainer_client import (
    AdamParams,
    APIStatusError,
    AsyncServiceClient,
    AsyncTrainingClient,
    Datum,
    InvalidArgumentError,
    NotFoundError,
    PreviousCallFailedError,
    ResourceExhaustedError,
)
from trainer_proto import pb, pb_grpc, wire
from trainer_server import TrainerServer

VOCAB = 512  # the tiny models' vocabulary (checked against the server in `trained`)
MAX_LEN = 64  # conftest builds the models with max_position_embeddings=64
TIMEOUT_S = 30.0


# ---- helpers ----------------------------------------------------------------------------


def good_datum(n: int = 8, start: int = 10) -> Datum:
    """A valid datum with ``n`` input tokens (up to 3 prompt tokens, the rest response)."""
    tokens = list(range(start, start + n + 1))
    k = min(3, n)
    return Datum.from_tokens(tokens[:k], tokens[k:])


def raw_datum(n: int = 8, start: int = 10) -> pb.Datum:
    return good_datum(n, start).to_proto()


def take_seq(tc: AsyncTrainingClient) -> int:
    """Reserve the training client's next sequence number for a raw-stub call."""
    seq = tc._next_seq
    tc._next_seq += 1
    return seq


def header(tc: AsyncTrainingClient, seq: int) -> pb.CallHeader:
    return pb.CallHeader(session_id=tc.session_id, seq=seq)


async def send(call: Any, *msgs: Any, done: bool = True) -> None:
    """Write messages; stop quietly if the server already ended the call (its status is checked later)."""
    try:
        for msg in msgs:
            await call.write(msg)
        if done:
            await call.done_writing()
    except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
        pass


async def read_logprobs(call: Any) -> torch.Tensor:
    """Read a logprobs header and its chunks from a raw ForwardBackwardCustom call."""
    msg = await call.read()
    assert msg.WhichOneof("message") == "logprobs_header", msg
    assembler = wire.ChunkAssembler(msg.logprobs_header, "logprobs", max_bytes=1 << 30)
    while not assembler.done:
        msg = await call.read()
        assert msg.WhichOneof("message") == "logprobs_chunk", msg
        assembler.add(msg.logprobs_chunk)
    return assembler.tensor().clone()


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    code = await asyncio.wait_for(call.code(), TIMEOUT_S)
    details = await call.details()
    return code, details or ""


def assert_clean_message(details: str) -> None:
    """A user-facing message: no stack trace, no internal-error wording."""
    assert "Traceback" not in details
    assert "internal error" not in details


async def collected_graphs(server: TrainerServer, *, timeout_s: float = 10.0) -> int:
    """Held autograd graphs once the server has dropped what it should.

    Reference counting normally empties the set at once. A full ``gc.collect()`` costs most
    of a second with torch and transformers loaded, so it runs only after a second of
    polling, for graphs that a reference cycle keeps alive.
    """
    assert server.core is not None
    held = server.core.held_graphs
    loop = asyncio.get_running_loop()
    start = loop.time()
    while len(held) and loop.time() - start < timeout_s:
        await asyncio.sleep(0.01)
        if loop.time() - start > 1.0:
            gc.collect()
    return len(held)


@pytest.fixture
async def stub(server: TrainerServer) -> Any:
    """A raw stub on a channel of its own."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield pb_grpc.TrainerServiceStub(channel)


@pytest.fixture
async def trained(server: TrainerServer, service: AsyncServiceClient) -> AsyncTrainingClient:
    """A full fine-tune session with one good forward_backward accumulated."""
    tc = await service.create_training_client(LLAMA, lora_rank=None, seed=1)
    session = server_session(server, tc)
    assert session.base.vocab_size == VOCAB
    assert session.base.max_sequence_length == MAX_LEN
    await tc.forward_backward([good_datum(), good_datum(6, start=40)])
    assert any(p.grad is not None for p in session.state.params)
    return tc


async def assert_still_serves(
    server: TrainerServer, service: AsyncServiceClient, tc: AsyncTrainingClient, before: str
) -> None:
    """State unchanged, then a good call on the same session and GetServerInfo both work."""
    session = server_session(server, tc)
    assert state_hash(session) == before, "bad input changed the session's state"
    out = await asyncio.wait_for(tc.forward([good_datum()]), TIMEOUT_S)
    assert out.num_tokens == 8
    assert bool(torch.isfinite(out.logprobs[0]).all())
    info = await service.get_server_info()
    assert {m.name for m in info.models} == {LLAMA, QWEN}
    assert state_hash(session) == before, "a forward changed the session's state"
    assert await collected_graphs(server) == 0


async def run_cases(names: Sequence[str], check: Callable[[str], Awaitable[None]]) -> None:
    """Run ``check`` for every case on one server and session; report every failing case, not only the first."""
    failures = []
    for name in names:
        try:
            await check(name)
        except (Exception, pytest.fail.Exception) as exc:  # pytest.raises' "DID NOT RAISE" is not an Exception
            failures.append(f"[{name}] {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)


# ---- datums through the client --------------------------------------------------------

BadCall = Callable[[AsyncTrainingClient], Awaitable[Any]]


def _datum(n: int = 8, **inputs: torch.Tensor) -> Datum:
    """A good datum of ``n`` tokens with some loss inputs replaced."""
    base = good_datum(n)
    return Datum(model_input=base.model_input, loss_fn_inputs={**base.loss_fn_inputs, **inputs})


def _with_input(model_input: Sequence[int]) -> Datum:
    base = good_datum(len(model_input))
    return Datum(model_input=torch.tensor(list(model_input)), loss_fn_inputs=dict(base.loss_fn_inputs))


def _targets(values: Sequence[int] | torch.Tensor) -> Datum:
    base = good_datum(len(values))
    t = values if isinstance(values, torch.Tensor) else torch.tensor(list(values))
    return Datum(model_input=base.model_input, loss_fn_inputs={"target_tokens": t, "weights": base.weights})


def _sum_loss(data: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    return -torch.cat(logprobs).sum(), {}


CLIENT_CASES: dict[str, tuple[BadCall, type[APIStatusError], str]] = {
    "weights_shorter_than_targets": (
        lambda tc: tc.forward_backward([_datum(weights=torch.ones(7))]),
        InvalidArgumentError,
        "loss_fn_inputs['weights'] has shape [7], expected [8]",
    ),
    "targets_shorter_than_input": (
        lambda tc: tc.forward_backward([_datum(target_tokens=torch.arange(10, 17))]),
        InvalidArgumentError,
        "loss_fn_inputs['target_tokens'] has shape [7], expected [8]",
    ),
    "input_token_eq_vocab": (
        lambda tc: tc.forward_backward([_with_input([10, 11, 12, VOCAB, 14, 15])]),
        InvalidArgumentError,
        f"model_input: token id {VOCAB} at position 3 is outside the vocabulary [0, {VOCAB})",
    ),
    "input_token_far_over_vocab": (
        lambda tc: tc.forward_backward([good_datum(), _with_input([10, 2**40])]),
        InvalidArgumentError,
        f"datum 1: model_input: token id {2**40} at position 1 is outside the vocabulary",
    ),
    "target_token_over_vocab": (
        lambda tc: tc.forward_backward([_targets([10, 11, VOCAB + 7, 13])]),
        InvalidArgumentError,
        f"loss_fn_inputs['target_tokens']: token id {VOCAB + 7} at position 2 is outside the vocabulary",
    ),
    "negative_input_token": (
        lambda tc: tc.forward_backward([_with_input([10, -1, 12])]),
        InvalidArgumentError,
        "model_input: token id -1 at position 1 is outside the vocabulary",
    ),
    "negative_target_token": (
        lambda tc: tc.forward_backward([_targets([-5, 11, 12])]),
        InvalidArgumentError,
        "loss_fn_inputs['target_tokens']: token id -5 at position 0 is outside the vocabulary",
    ),
    "empty_batch": (
        lambda tc: tc.forward_backward([]),
        InvalidArgumentError,
        "no datums",
    ),
    "sequence_over_max_length": (
        lambda tc: tc.forward_backward([good_datum(MAX_LEN + 1)]),
        InvalidArgumentError,
        f"sequence of {MAX_LEN + 1} tokens is longer than the model's maximum of {MAX_LEN}",
    ),
    "over_tokens_per_call": (
        lambda tc: tc.forward_backward([good_datum(60) for _ in range(70)]),
        ResourceExhaustedError,
        "4200 tokens in one call is over the limit max_tokens_per_call=4096",
    ),
    "unknown_loss": (
        lambda tc: tc.forward_backward([good_datum()], loss_fn="no_such_loss"),
        InvalidArgumentError,
        "unknown loss_fn 'no_such_loss'; built-in losses:",
    ),
    "float_target_tokens": (
        lambda tc: tc.forward_backward([_targets(torch.arange(10, 18, dtype=torch.float32))]),
        InvalidArgumentError,
        "loss_fn_inputs['target_tokens'] must be int64 or int32, got torch.float32",
    ),
    "int_weights": (
        lambda tc: tc.forward_backward([_datum(weights=torch.ones(8, dtype=torch.int64))]),
        InvalidArgumentError,
        "loss_fn_inputs['weights'] must be a float tensor, got torch.int64",
    ),
    "nan_weights": (
        lambda tc: tc.forward_backward([_datum(weights=torch.tensor([1.0] * 7 + [float("nan")]))]),
        InvalidArgumentError,
        "loss_fn_inputs['weights'] contains NaN or Inf",
    ),
    "missing_target_tokens": (
        lambda tc: tc.forward_backward([Datum(model_input=torch.arange(10, 18))]),
        InvalidArgumentError,
        "loss_fn_inputs['target_tokens'] is required",
    ),
    "forward_over_vocab": (
        lambda tc: tc.forward([_with_input([VOCAB + 1, 11])]),
        InvalidArgumentError,
        "outside the vocabulary",
    ),
    "custom_over_vocab": (
        lambda tc: tc.forward_backward_custom([_targets([10, VOCAB])], _sum_loss),
        InvalidArgumentError,
        "outside the vocabulary",
    ),
    "custom_over_max_length": (
        lambda tc: tc.forward_backward_custom([good_datum(MAX_LEN + 3)], _sum_loss),
        InvalidArgumentError,
        "longer than the model's maximum",
    ),
    "negative_learning_rate": (
        lambda tc: tc.optim_step(AdamParams(learning_rate=-1e-3)),
        InvalidArgumentError,
        "adam_params.learning_rate must be in [0, 10], got -0.001",
    ),
    "nan_learning_rate": (
        lambda tc: tc.optim_step(AdamParams(learning_rate=float("nan"))),
        InvalidArgumentError,
        "must be finite, got nan",  # the field's exact name: see test_non_finite_adam_param_names_the_wire_field
    ),
    "inf_beta2": (
        lambda tc: tc.optim_step(AdamParams(beta2=float("inf"))),
        InvalidArgumentError,
        "adam_params.beta2 must be finite, got inf",
    ),
    "beta1_one": (
        lambda tc: tc.optim_step(AdamParams(beta1=1.0)),
        InvalidArgumentError,
        "adam_params.beta1 must be in [0, 1)",
    ),
    "beta2_negative": (
        lambda tc: tc.optim_step(AdamParams(beta2=-0.1)),
        InvalidArgumentError,
        "adam_params.beta2 must be in [0, 1)",
    ),
    "eps_zero": (
        lambda tc: tc.optim_step(AdamParams(eps=0.0)),
        InvalidArgumentError,
        "adam_params.eps must be in [1e-30, 1], got 0",
    ),
    "huge_learning_rate": (
        lambda tc: tc.optim_step(AdamParams(learning_rate=1e30)),
        InvalidArgumentError,
        "adam_params.learning_rate must be in [0, 10], got 1e+30",
    ),
    "float_max_learning_rate": (
        lambda tc: tc.optim_step(AdamParams(learning_rate=1e38)),
        InvalidArgumentError,
        "adam_params.learning_rate must be in [0, 10], got 1e+38",
    ),
    "denormal_eps": (
        lambda tc: tc.optim_step(AdamParams(eps=1e-45)),
        InvalidArgumentError,
        "adam_params.eps must be in [1e-30, 1], got 1e-45",
    ),
    "eps_over_one": (
        lambda tc: tc.optim_step(AdamParams(eps=2.0)),
        InvalidArgumentError,
        "adam_params.eps must be in [1e-30, 1], got 2",
    ),
    "decay_flips_weights": (
        lambda tc: tc.optim_step(AdamParams(learning_rate=1.0, weight_decay=3.0)),
        InvalidArgumentError,
        "adam_params.learning_rate * weight_decay must be <= 1",
    ),
    "negative_weight_decay": (
        lambda tc: tc.optim_step(AdamParams(weight_decay=-0.01)),
        InvalidArgumentError,
        "adam_params.weight_decay must be >= 0",
    ),
    "negative_grad_clip": (
        lambda tc: tc.optim_step(AdamParams(grad_clip_norm=-1.0)),
        InvalidArgumentError,
        "adam_params.grad_clip_norm must be >= 0",
    ),
}


CLIENT_GROUPS = {
    "vocabulary": [
        "input_token_eq_vocab",
        "input_token_far_over_vocab",
        "target_token_over_vocab",
        "negative_input_token",
        "negative_target_token",
        "forward_over_vocab",
        "custom_over_vocab",
    ],
    "shapes_and_dtypes": [
        "weights_shorter_than_targets",
        "targets_shorter_than_input",
        "float_target_tokens",
        "int_weights",
        "nan_weights",
        "missing_target_tokens",
        "unknown_loss",
    ],
    "limits": ["empty_batch", "sequence_over_max_length", "over_tokens_per_call", "custom_over_max_length"],
    "adam_params": [
        "negative_learning_rate",
        "nan_learning_rate",
        "inf_beta2",
        "beta1_one",
        "beta2_negative",
        "eps_zero",
        "huge_learning_rate",
        "float_max_learning_rate",
        "denormal_eps",
        "eps_over_one",
        "decay_flips_weights",
        "negative_weight_decay",
        "negative_grad_clip",
    ],
}


def test_client_groups_cover_every_case() -> None:
    grouped = [name for names in CLIENT_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(CLIENT_CASES)


@pytest.mark.parametrize("group", list(CLIENT_GROUPS))
async def test_bad_call_through_client(
    server: TrainerServer, service: AsyncServiceClient, trained: AsyncTrainingClient, group: str
) -> None:
    async def check(case: str) -> None:
        make_call, error_class, phrase = CLIENT_CASES[case]
        before = state_hash(server_session(server, trained))
        with pytest.raises(error_class) as ei:
            await asyncio.wait_for(make_call(trained), TIMEOUT_S)
        err = ei.value
        assert type(err) is error_class
        assert err.code == error_class.code
        assert phrase in err.details, err.details
        assert_clean_message(err.details)
        await assert_still_serves(server, service, trained, before)

    await run_cases(CLIENT_GROUPS[group], check)


async def test_non_finite_adam_param_names_the_wire_field(trained: AsyncTrainingClient) -> None:
    with pytest.raises(InvalidArgumentError) as ei:
        await trained.optim_step(AdamParams(learning_rate=float("nan")))
    assert "adam_params.learning_rate must be finite" in ei.value.details, ei.value.details


async def test_unknown_loss_lists_builtin_losses(
    server: TrainerServer, service: AsyncServiceClient, trained: AsyncTrainingClient
) -> None:
    before = state_hash(server_session(server, trained))
    with pytest.raises(InvalidArgumentError) as ei:
        await trained.forward_backward([good_datum()], loss_fn="Cross-Entropy")
    losses = (await service.get_server_info()).loss_functions
    assert "cross_entropy" in losses
    for name in losses:
        assert repr(name) in ei.value.details
    await assert_still_serves(server, service, trained, before)


# ---- non-finite and malformed gradients ---------------------------------------------


def _poison_loss(value: float) -> Callable[[list[Datum], list[torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]:
    """A loss whose gradient is ``value`` (NaN or Inf) at datum 1, position 2, finite elsewhere."""

    def loss_fn(data: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return -torch.cat(logprobs).sum() + logprobs[1][2] * value, {}

    return loss_fn


async def test_non_finite_gradient_is_refused(
    server: TrainerServer, service: AsyncServiceClient, trained: AsyncTrainingClient
) -> None:
    values = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf")}

    async def check(shown: str) -> None:
        before = state_hash(server_session(server, trained))
        with pytest.raises(InvalidArgumentError) as ei:
            await asyncio.wait_for(
                trained.forward_backward_custom([good_datum(), good_datum(5)], _poison_loss(values[shown])), TIMEOUT_S
            )
        assert f"gradient contains {shown} at datum 1, position 2; nothing was applied" in ei.value.details
        assert ei.value.method == "ForwardBackwardCustom"
        assert await collected_graphs(server) == 0
        await assert_still_serves(server, service, trained, before)

    await run_cases(list(values), check)


async def test_whole_nan_loss_is_refused(
    server: TrainerServer, service: AsyncServiceClient, trained: AsyncTrainingClient
) -> None:
    """The brief's plain form: ``(lp * nan).sum()`` makes every gradient entry NaN."""
    before = state_hash(server_session(server, trained))

    def loss_fn(data: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return (torch.cat(logprobs) * float("nan")).sum(), {}

    with pytest.raises(InvalidArgumentError, match=r"gradient contains nan at datum 0, position 0"):
        await trained.forward_backward_custom([good_datum()], loss_fn)
    await assert_still_serves(server, service, trained, before)


async def _open_custom(stub: Any, tc: AsyncTrainingClient, datums: list[pb.Datum]) -> tuple[Any, torch.Tensor]:
    """Open a raw ForwardBackwardCustom call and read its logprobs; the graph is then held."""
    call = stub.ForwardBackwardCustom(timeout=TIMEOUT_S)
    req = pb.ForwardBackwardCustomRequest
    start = pb.ForwardStart(call=header(tc, take_seq(tc)), num_datums=len(datums))
    await call.write(req(start=start))
    await call.write(req(datums=pb.DatumBatch(datums=datums)))
    logprobs = await read_logprobs(call)
    return call, logprobs


def _grad_bytes(n: int) -> bytes:
    return torch.full((n,), -1.0, dtype=torch.float32).numpy().tobytes()


GRAD_CASES: dict[str, tuple[Callable[[int], list[pb.ForwardBackwardCustomRequest]], str]] = {
    # n = total logprobs of the call's two datums (8 + 5); lengths = [8, 5]
    "lengths_one_short": (
        lambda n: [
            pb.ForwardBackwardCustomRequest(
                grad_header=pb.TensorStreamHeader(dtype=pb.DATA_TYPE_FLOAT32, lengths=[8, 4], total_bytes=12 * 4)
            )
        ],
        "gradient has 12 values in 2 datums, but the logprobs have 13 in 2",
    ),
    "lengths_one_datum_missing": (
        lambda n: [
            pb.ForwardBackwardCustomRequest(
                grad_header=pb.TensorStreamHeader(dtype=pb.DATA_TYPE_FLOAT32, lengths=[13], total_bytes=13 * 4)
            )
        ],
        "gradient has 13 values in 1 datums, but the logprobs have 13 in 2",
    ),
    "total_bytes_lies": (
        lambda n: [
            pb.ForwardBackwardCustomRequest(
                grad_header=pb.TensorStreamHeader(dtype=pb.DATA_TYPE_FLOAT32, lengths=[8, 5], total_bytes=n * 4 + 4)
            )
        ],
        "gradient: total_bytes 56 != sum(lengths) * itemsize = 52",
    ),
    "integer_dtype": (
        lambda n: [
            pb.ForwardBackwardCustomRequest(
                grad_header=pb.TensorStreamHeader(dtype=pb.DATA_TYPE_INT64, lengths=[8, 5], total_bytes=n * 8)
            )
        ],
        "gradient: data type 4 not allowed",
    ),
    "too_many_bytes": (
        lambda n: [
            pb.ForwardBackwardCustomRequest(
                grad_header=pb.TensorStreamHeader(dtype=pb.DATA_TYPE_FLOAT32, lengths=[8, 5], total_bytes=n * 4)
            ),
            pb.ForwardBackwardCustomRequest(grad_chunk=pb.TensorChunk(offset=0, data=_grad_bytes(n + 1))),
        ],
        "gradient: chunk ends at byte 56, past total_bytes 52",
    ),
    "too_few_bytes_then_end": (
        lambda n: [
            pb.ForwardBackwardCustomRequest(
                grad_header=pb.TensorStreamHeader(dtype=pb.DATA_TYPE_FLOAT32, lengths=[8, 5], total_bytes=n * 4)
            ),
            pb.ForwardBackwardCustomRequest(grad_chunk=pb.TensorChunk(offset=0, data=_grad_bytes(n - 1))),
        ],
        "the request stream ended while waiting for gradient bytes (48 of 52 received)",
    ),
    "chunks_out_of_order": (
        lambda n: [
            pb.ForwardBackwardCustomRequest(
                grad_header=pb.TensorStreamHeader(dtype=pb.DATA_TYPE_FLOAT32, lengths=[8, 5], total_bytes=n * 4)
            ),
            pb.ForwardBackwardCustomRequest(grad_chunk=pb.TensorChunk(offset=16, data=_grad_bytes(n - 4))),
            pb.ForwardBackwardCustomRequest(grad_chunk=pb.TensorChunk(offset=0, data=_grad_bytes(4))),
        ],
        "gradient: chunk at offset 16, expected offset 0",
    ),
    "duplicated_offset": (
        lambda n: [
            pb.ForwardBackwardCustomRequest(
                grad_header=pb.TensorStreamHeader(dtype=pb.DATA_TYPE_FLOAT32, lengths=[8, 5], total_bytes=n * 4)
            ),
            pb.ForwardBackwardCustomRequest(grad_chunk=pb.TensorChunk(offset=0, data=_grad_bytes(4))),
            pb.ForwardBackwardCustomRequest(grad_chunk=pb.TensorChunk(offset=0, data=_grad_bytes(n - 4))),
        ],
        "gradient: chunk at offset 0, expected offset 16",
    ),
    "empty_chunk": (
        lambda n: [
            pb.ForwardBackwardCustomRequest(
                grad_header=pb.TensorStreamHeader(dtype=pb.DATA_TYPE_FLOAT32, lengths=[8, 5], total_bytes=n * 4)
            ),
            pb.ForwardBackwardCustomRequest(grad_chunk=pb.TensorChunk(offset=0, data=b"")),
        ],
        "gradient: empty chunk at offset 0",
    ),
    "datums_instead_of_gradient": (
        lambda n: [pb.ForwardBackwardCustomRequest(datums=pb.DatumBatch(datums=[raw_datum()]))],
        "expected 'grad_header' after the logprobs, got 'datums'",
    ),
    "end_instead_of_gradient": (
        lambda n: [],
        "the request stream ended while waiting for the gradient header",
    ),
}


async def test_malformed_gradient_stream(
    server: TrainerServer, service: AsyncServiceClient, trained: AsyncTrainingClient, stub: Any
) -> None:
    assert server.core is not None
    session = server_session(server, trained)

    async def check(case: str) -> None:
        make_msgs, phrase = GRAD_CASES[case]
        before = state_hash(session)
        call, logprobs = await _open_custom(stub, trained, [raw_datum(8), raw_datum(5, start=30)])
        n = len(logprobs)
        assert n == 13
        assert len(server.core.held_graphs) == 1  # type: ignore[union-attr]  # held while the gradient is awaited
        await send(call, *make_msgs(n))
        code, details = await status_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert phrase in details, details
        assert_clean_message(details)
        assert await collected_graphs(server) == 0, "the held graph was not released"
        await assert_still_serves(server, service, trained, before)

    await run_cases(list(GRAD_CASES), check)


# ---- malformed streams and tensors (raw stub) ------------------------------------------


async def test_first_message_not_start(
    server: TrainerServer, service: AsyncServiceClient, trained: AsyncTrainingClient, stub: Any
) -> None:
    before = state_hash(server_session(server, trained))
    for method, request in [
        ("Forward", pb.ForwardRequest),
        ("ForwardBackward", pb.ForwardBackwardRequest),
        ("ForwardBackwardCustom", pb.ForwardBackwardCustomRequest),
    ]:
        call = getattr(stub, method)(timeout=TIMEOUT_S)
        await send(call, request(datums=pb.DatumBatch(datums=[raw_datum()])))
        code, details = await status_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
        assert "the first message must be 'start', got 'datums'" in details
        # an empty stream is refused the same way
        call = getattr(stub, method)(timeout=TIMEOUT_S)
        await send(call)
        code, details = await status_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "the request stream ended while waiting for the start message" in details
    # these never reached the session, so its next sequence number is still free
    await assert_still_serves(server, service, trained, before)


def _lying(d: pb.Datum, field: str, delta: int) -> pb.Datum:
    bad = pb.Datum()
    bad.CopyFrom(d)
    t = bad.model_input if field == "model_input" else bad.loss_fn_inputs[field]
    t.data = t.data[:delta] if delta < 0 else t.data + b"\0" * delta
    return bad


RAW_DATUM_CASES: dict[str, tuple[Callable[[], list[pb.Datum]], str]] = {
    "model_input_bytes_short": (
        lambda: [_lying(raw_datum(8), "model_input", -3)],
        "datum 0: model_input: shape [8] of torch.int64 needs 64 bytes, got 61",
    ),
    "model_input_bytes_long": (
        lambda: [raw_datum(), _lying(raw_datum(8), "model_input", 8)],
        "datum 1: model_input: shape [8] of torch.int64 needs 64 bytes, got 72",
    ),
    "weights_bytes_short": (
        lambda: [_lying(raw_datum(8), "weights", -4)],
        "datum 0: loss_fn_inputs['weights']: shape [8] of torch.float32 needs 32 bytes, got 28",
    ),
    "unknown_dtype": (
        lambda: [pb.Datum(model_input=pb.TensorData(dtype=99, shape=[2], data=b"\0" * 16))],
        "datum 0: model_input.dtype: unsupported data type 99",
    ),
    "unspecified_dtype": (
        lambda: [pb.Datum(model_input=pb.TensorData(shape=[2], data=b"\0" * 16))],
        "unsupported data type 0",
    ),
    "huge_declared_shape": (
        lambda: [pb.Datum(model_input=pb.TensorData(dtype=pb.DATA_TYPE_INT64, shape=[1, 2**40], data=b""))],
        f"datum 0: model_input declares {2**40 * 8} bytes, over the limit of",
    ),
    "two_dimensional_input": (
        lambda: [pb.Datum(model_input=wire.tensor_to_wire(torch.arange(10, 18).reshape(2, 4)))],
        "datum 0: model_input must be a non-empty 1-D tensor, got shape [2, 4]",
    ),
    "missing_model_input": (
        lambda: [pb.Datum()],
        "datum 0: model_input is missing",
    ),
}


async def test_malformed_tensor_raw(
    server: TrainerServer, service: AsyncServiceClient, trained: AsyncTrainingClient, stub: Any
) -> None:
    async def check(case: str) -> None:
        make_datums, phrase = RAW_DATUM_CASES[case]
        before = state_hash(server_session(server, trained))
        datums = make_datums()
        call = stub.ForwardBackward(timeout=TIMEOUT_S)
        start = pb.ForwardBackwardStart(
            call=header(trained, take_seq(trained)), num_datums=len(datums), loss_fn="cross_entropy"
        )
        batch = pb.DatumBatch(datums=datums)
        await send(call, pb.ForwardBackwardRequest(start=start), pb.ForwardBackwardRequest(datums=batch))
        code, details = await status_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert phrase in details, details
        assert_clean_message(details)
        await assert_still_serves(server, service, trained, before)

    await run_cases(list(RAW_DATUM_CASES), check)


async def test_num_datums_mismatch_raw(
    server: TrainerServer, service: AsyncServiceClient, trained: AsyncTrainingClient, stub: Any
) -> None:
    before = state_hash(server_session(server, trained))
    # fewer datums than announced, then the stream ends
    call = stub.ForwardBackward(timeout=TIMEOUT_S)
    start = pb.ForwardBackwardStart(call=header(trained, take_seq(trained)), num_datums=3, loss_fn="cross_entropy")
    batch = pb.DatumBatch(datums=[raw_datum()])
    await send(call, pb.ForwardBackwardRequest(start=start), pb.ForwardBackwardRequest(datums=batch))
    code, details = await status_of(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "the request stream ended while waiting for datums (1 of 3 received)" in details
    # more datums than announced
    call = stub.ForwardBackward(timeout=TIMEOUT_S)
    start = pb.ForwardBackwardStart(call=header(trained, take_seq(trained)), num_datums=1, loss_fn="cross_entropy")
    batch = pb.DatumBatch(datums=[raw_datum(), raw_datum()])
    await send(call, pb.ForwardBackwardRequest(start=start), pb.ForwardBackwardRequest(datums=batch))
    code, details = await status_of(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "got 2 datums, but start.num_datums is 1" in details
    await assert_still_serves(server, service, trained, before)


# ---- unknown sessions and models, bad session settings ----------------------------------


async def test_unknown_session_raw(
    server: TrainerServer, service: AsyncServiceClient, trained: AsyncTrainingClient, stub: Any
) -> None:
    before = state_hash(server_session(server, trained))
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.OptimStep(pb.OptimStepRequest(call=pb.CallHeader(session_id="nope", seq=1)), timeout=TIMEOUT_S)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    assert "session 'nope' does not exist" in (ei.value.details() or "")

    call = stub.Forward(timeout=TIMEOUT_S)
    start = pb.ForwardStart(call=pb.CallHeader(session_id="nope", seq=1), num_datums=1)
    await send(call, pb.ForwardRequest(start=start), pb.ForwardRequest(datums=pb.DatumBatch(datums=[raw_datum()])))
    code, details = await status_of(call)
    assert code == grpc.StatusCode.NOT_FOUND
    assert "session 'nope' does not exist" in details

    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.OptimStep(pb.OptimStepRequest(call=pb.CallHeader(session_id="", seq=1)), timeout=TIMEOUT_S)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "call.session_id is required" in (ei.value.details() or "")
    await assert_still_serves(server, service, trained, before)


async def test_closed_session_is_not_found(
    server: TrainerServer, service: AsyncServiceClient, trained: AsyncTrainingClient
) -> None:
    session_id = trained.session_id
    other = await service.create_training_client(LLAMA, lora_rank=None)
    other_before = state_hash(server_session(server, other))
    # a second handle on the same session, as another process holding the id would have
    twin = AsyncTrainingClient(
        service, pb.CreateSessionResponse(session_id=session_id, base_model=LLAMA, next_seq=trained._next_seq + 1)
    )
    await trained.close()
    with pytest.raises(RuntimeError, match="is closed"):
        trained.forward([good_datum()])
    for make_call in (
        lambda: twin.forward([good_datum()]),
        lambda: twin.forward_backward([good_datum()]),
        lambda: twin.forward_backward_custom([good_datum()], _sum_loss),
        twin.optim_step,
    ):
        with pytest.raises(NotFoundError) as ei:
            await make_call()
        assert f"session {session_id!r} does not exist" in ei.value.details
    # other sessions are untouched and the server keeps serving
    await assert_still_serves(server, service, other, other_before)


BAD_SESSION_SETTINGS: dict[str, tuple[dict[str, Any], str]] = {
    "lora_rank_zero": ({"lora_rank": 0}, "lora.rank must be in [1, 1024], got 0"),
    "lora_rank_huge": ({"lora_rank": 4096}, "lora.rank must be in [1, 1024], got 4096"),
    "lora_alpha_negative": ({"lora_rank": 4, "lora_alpha": -1.0}, "lora.alpha must be >= 0"),
    "lora_unknown_module": ({"lora_rank": 4, "lora_target_modules": ["no_such_module"]}, "cannot build the session"),
}


async def test_bad_create_session(
    server: TrainerServer, service: AsyncServiceClient, trained: AsyncTrainingClient, stub: Any
) -> None:
    assert server.core is not None
    before = state_hash(server_session(server, trained))
    sessions = len(server.core.sessions)

    with pytest.raises(NotFoundError) as ei:
        await service.create_training_client("gpt-17", lora_rank=None)
    assert "unknown base model 'gpt-17'" in ei.value.details
    assert repr(sorted([LLAMA, QWEN])) in ei.value.details, ei.value.details  # names the served models

    async def check(case: str) -> None:
        kwargs, phrase = BAD_SESSION_SETTINGS[case]
        with pytest.raises(InvalidArgumentError) as ei:
            await service.create_training_client(LLAMA, **kwargs)
        assert phrase in ei.value.details, ei.value.details
        assert_clean_message(ei.value.details)

    await run_cases(list(BAD_SESSION_SETTINGS), check)

    for request, phrase in [
        (pb.CreateSessionRequest(base_model=LLAMA), "mode is required"),
        (pb.CreateSessionRequest(full=pb.FullFineTune()), "base_model is required"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as raw:
            await stub.CreateSession(request, timeout=TIMEOUT_S)
        assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert phrase in (raw.value.details() or "")

    assert len(server.core.sessions) == sessions, "a refused CreateSession left a session behind"
    await assert_still_serves(server, service, trained, before)


async def test_seq_zero_and_reused_seq_raw(
    server: TrainerServer, service: AsyncServiceClient, trained: AsyncTrainingClient, stub: Any
) -> None:
    before = state_hash(server_session(server, trained))
    for seq, code, phrase in [
        (0, grpc.StatusCode.INVALID_ARGUMENT, "call.seq is required and starts at 1"),
        (1, grpc.StatusCode.ALREADY_EXISTS, "sequence number 1 was already used"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.OptimStep(pb.OptimStepRequest(call=header(trained, seq)), timeout=TIMEOUT_S)
        assert ei.value.code() == code
        assert phrase in (ei.value.details() or "")
    await assert_still_serves(server, service, trained, before)


# ---- futures: errors are never lost --------------------------------------------------


async def _wait_done(fut: Any) -> None:
    for _ in range(int(TIMEOUT_S / 0.01)):
        if fut.done():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{fut!r} did not finish")


async def test_unretrieved_failure_raises_on_next_call(
    server: TrainerServer, service: AsyncServiceClient, trained: AsyncTrainingClient
) -> None:
    before = state_hash(server_session(server, trained))
    fut = trained.forward_backward([_with_input([VOCAB])])
    await _wait_done(fut)
    assert not fut.error_retrieved

    with pytest.raises(PreviousCallFailedError) as ei:
        trained.forward([good_datum()])
    message = str(ei.value)
    assert "forward_backward #2" in message
    assert trained.session_id in message
    del ei  # the traceback holds the failed future
    # the session is usable again, the failure is reported once
    await assert_still_serves(server, service, trained, before)

    with pytest.warns(RuntimeWarning, match="never retrieved"):
        del fut
        gc.collect()


async def test_unretrieved_failure_names_the_original_error(trained: AsyncTrainingClient) -> None:
    fut = trained.forward_backward([_with_input([VOCAB])])
    await _wait_done(fut)
    with pytest.raises(PreviousCallFailedError) as ei:
        trained.optim_step()
    # keep no reference to the exceptions: their tracebacks hold the future
    cause_type, cause_text, message = type(ei.value.__cause__), repr(ei.value.__cause__), str(ei.value)
    del ei
    with pytest.warns(RuntimeWarning, match="never retrieved"):
        del fut
        gc.collect()
    assert issubclass(cause_type, InvalidArgumentError), cause_text
    assert "outside the vocabulary" in message


async def test_submitted_calls_behind_a_bad_one_still_run(
    server: TrainerServer, service: AsyncServiceClient, trained: AsyncTrainingClient
) -> None:
    """A refused call uses up its sequence number; calls submitted after it are not held up."""
    session = server_session(server, trained)
    before = state_hash(session)
    bad = trained.forward_backward([_with_input([-3])])
    good = trained.forward([good_datum()])
    out = await asyncio.wait_for(good, TIMEOUT_S)
    assert out.num_tokens == 8
    with pytest.raises(InvalidArgumentError, match="token id -3"):
        await bad
    assert state_hash(session) == before
