"""Tinker's wire encodings: protobuf forward_backward requests, and the replies the SDK parses.

Requests: ``forward_backward`` bodies are ``tinker_public.ForwardBackwardRequest``
protobuf (``Content-Type: application/x-protobuf``, optionally ``Content-Encoding: zstd``):
token ids as int32 bytes, ``loss_fn_inputs`` as dense (or CSR) tensors of float32/int64.
Replies: ``ForwardBackwardOutput`` and ``SampleResponse`` go back as protobuf when the
poll sends ``Accept: application/x-protobuf`` (the SDK requires it for those two), every
other reply as JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard
from google.protobuf.message import DecodeError

from trainer_server.frontends.tinker import backend
from trainer_server.frontends.tinker.errors import BadRequest, PayloadTooLarge
from trainer_server.frontends.tinker.wire import tinker_wire_pb2 as wire

__all__ = [
    "ForwardBackwardCall",
    "ForwardBackwardReply",
    "JsonReply",
    "SampleReply",
    "decompress",
    "forward_backward_call",
    "parse_forward_backward",
    "tinker_metrics",
]

_DTYPES: dict[int, np.dtype[Any]] = {
    wire.DTYPE_FLOAT32: np.dtype("<f4"),
    wire.DTYPE_INT64: np.dtype("<i8"),
    wire.DTYPE_INT32: np.dtype("<i4"),
}
_INT_INPUTS = frozenset({"target_tokens"})
EMPTY_TOPK_LOGPROB = -99999.0
"""Tinker's filler for empty top-k cells."""


def decompress(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    """Undo ``Content-Encoding`` (identity or zstd), refusing output over ``max_bytes``.

    Raises:
        BadRequest: An unknown encoding or corrupt zstd data.
        PayloadTooLarge: The decompressed body exceeds ``max_bytes``.
    """
    if encoding in (None, "", "identity"):
        return body
    if encoding != "zstd":
        raise BadRequest(f"Content-Encoding {encoding!r} is not supported (use zstd or none)")
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(body)
        out = reader.read(max_bytes + 1)
    except zstandard.ZstdError as exc:
        raise BadRequest(f"body is not valid zstd data ({exc})") from None
    if len(out) > max_bytes:
        raise PayloadTooLarge(f"decompressed body exceeds the server's limit of {max_bytes} bytes")
    return out


@dataclass(frozen=True)
class ForwardBackwardCall:
    """A decoded ``forward_backward`` request.

    Attributes:
        model_id: Tinker model id.
        seq_id: Its place in the model's order.
        loss: Loss name and config.
        forward_only: Compute outputs without gradients.
        data: The datums.
    """

    model_id: str
    seq_id: int
    loss: backend.LossSpec
    forward_only: bool
    data: list[backend.TrainDatum]


def parse_forward_backward(body: bytes) -> wire.ForwardBackwardRequest:
    """Parse a protobuf ``ForwardBackwardRequest`` (no validation of its content yet).

    Raises:
        BadRequest: Not a valid message, or no model_id.
    """
    msg = wire.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as exc:
        raise BadRequest(f"forward_backward: body is not a valid ForwardBackwardRequest protobuf ({exc})") from None
    if not msg.model_id:
        raise BadRequest("forward_backward: model_id is missing")
    return msg


def forward_backward_call(msg: wire.ForwardBackwardRequest) -> ForwardBackwardCall:
    """Validate a parsed request and convert it to domain datums.

    Raises:
        BadRequest: No data, a non-numeric config value, or a datum that is empty, not
            text, or whose inputs are mis-typed, not 1-D, or of another length than its tokens.
    """
    if not msg.data:
        raise BadRequest("forward_backward: data is empty")
    config: dict[str, float] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():
        if value.WhichOneof("value") != "number":
            raise BadRequest(f"forward_backward: loss_fn_config[{key!r}] must be a number for this server's losses")
        config[key] = value.number
    data = [_datum(i, d) for i, d in enumerate(msg.data)]
    return ForwardBackwardCall(
        model_id=msg.model_id,
        seq_id=msg.seq_id,
        loss=backend.LossSpec(msg.loss_fn or "cross_entropy", config),
        forward_only=msg.forward_only,
        data=data,
    )


def tinker_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Metrics named as the SDK reduces them: ``name:reduction`` with exactly one colon.

    The SDK splits every key on ``:`` when it combines chunks; a key without a
    reduction is reported as a mean, extra colons become underscores.
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name, _, reduction = key.rpartition(":")
        out[f"{name.replace(':', '_')}:{reduction}" if name else f"{key}:mean"] = float(value)
    return out


def _datum(index: int, msg: wire.Datum) -> backend.TrainDatum:
    where = f"forward_backward: data[{index}]"
    parts: list[npt.NDArray[np.int64]] = []
    for chunk in msg.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise BadRequest(f"{where}: model_input chunks of type {kind!r} are not supported by this server")
        raw = chunk.encoded_text.tokens
        if len(raw) % 4:
            raise BadRequest(f"{where}: encoded_text tokens are {len(raw)} bytes, not a whole number of int32")
        parts.append(np.frombuffer(raw, dtype="<i4").astype(np.int64))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if tokens.size == 0:
        raise BadRequest(f"{where}: model_input has no tokens")
    inputs: dict[str, npt.NDArray[np.generic]] = {}
    for name, tensor in msg.loss_fn_inputs.items():
        array = _tensor(f"{where}.loss_fn_inputs[{name!r}]", tensor)
        if array.ndim != 1:
            raise BadRequest(
                f"{where}.loss_fn_inputs[{name!r}]: shape {list(array.shape)} is not supported; "
                "this server takes 1-D inputs, one entry per input token"
            )
        if array.shape[0] != tokens.shape[0]:
            raise BadRequest(
                f"{where}.loss_fn_inputs[{name!r}]: {array.shape[0]} entries for {tokens.shape[0]} input tokens"
            )
        if name in _INT_INPUTS:
            if array.dtype.kind != "i":
                raise BadRequest(f"{where}.loss_fn_inputs[{name!r}]: must be int64, got {array.dtype}")
            array = array.astype(np.int64)
        else:
            array = array.astype(np.float32)
            if not np.isfinite(array).all():
                raise BadRequest(f"{where}.loss_fn_inputs[{name!r}]: holds NaN or infinity")
        inputs[name] = array
    if "target_tokens" not in inputs:
        raise BadRequest(f"{where}: loss_fn_inputs['target_tokens'] is missing")
    return backend.TrainDatum(tokens=tokens, inputs=inputs)


def _tensor(where: str, msg: wire.Tensor) -> npt.NDArray[np.generic]:
    dtype = _DTYPES.get(msg.dtype)
    if dtype is None:
        raise BadRequest(f"{where}: dtype {wire.DType.Name(msg.dtype)} is not supported (float32 or int64)")
    shape = [int(s) for s in msg.shape]
    if any(s < 0 for s in shape):
        raise BadRequest(f"{where}: negative shape {shape}")
    if msg.WhichOneof("encoding") == "sparse_csr":
        return _sparse(where, msg, dtype, shape)
    raw = msg.dense
    if len(raw) % dtype.itemsize:
        raise BadRequest(f"{where}: {len(raw)} bytes is not a whole number of {dtype.name}")
    flat = np.frombuffer(raw, dtype=dtype)
    if not shape:
        shape = [flat.size]
    if math.prod(shape) != flat.size:
        raise BadRequest(f"{where}: shape {shape} needs {math.prod(shape)} values, got {flat.size}")
    return flat.reshape(shape)


def _sparse(where: str, msg: wire.Tensor, dtype: np.dtype[Any], shape: list[int]) -> npt.NDArray[np.generic]:
    csr = msg.sparse_csr
    if len(shape) != 2:
        raise BadRequest(f"{where}: a sparse tensor must be 2-D, got shape {shape}")
    values = np.frombuffer(csr.values, dtype=dtype) if len(csr.values) % dtype.itemsize == 0 else None
    crow = np.frombuffer(csr.crow_indices, dtype="<i8") if len(csr.crow_indices) % 8 == 0 else None
    col = np.frombuffer(csr.col_indices, dtype="<i8") if len(csr.col_indices) % 8 == 0 else None
    if values is None or crow is None or col is None:
        raise BadRequest(f"{where}: sparse tensor buffers are not whole numbers of their dtypes")
    rows, cols = shape
    if (
        crow.size != rows + 1
        or col.size != values.size
        or (crow.size and (crow[0] != 0 or crow[-1] != values.size or (np.diff(crow) < 0).any()))
        or (col.size and (col.min() < 0 or col.max() >= cols))
    ):
        raise BadRequest(f"{where}: inconsistent sparse CSR indices for shape {shape}")
    dense = np.zeros(shape, dtype=dtype)
    row_of = np.repeat(np.arange(rows), np.diff(crow))
    dense[row_of, col] = values
    return dense


@dataclass(frozen=True)
class JsonReply:
    """A reply that Tinker sends as JSON only."""

    body: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The body."""
        return self.body

    def to_proto(self) -> bytes | None:
        """None: JSON only."""
        return None


@dataclass(frozen=True)
class ForwardBackwardReply:
    """A ``ForwardBackwardOutput``: per-datum arrays in one ``ArrayRecord``, plus metrics."""

    result: backend.ForwardBackwardResult

    def to_proto(self) -> bytes:
        """One ArrayRecord holding every field as a BatchedTensor (byte offsets per datum)."""
        outputs = self.result.outputs
        record = wire.ArrayRecord(type_tag="ArrayRecord", num_datums=len(outputs))
        for name in _field_names(outputs):
            arrays = [np.ascontiguousarray(o[name], dtype="<f4").reshape(-1) for o in outputs]
            ends = np.cumsum([a.nbytes for a in arrays], dtype=np.int64)
            record.fields[name].CopyFrom(
                wire.BatchedTensor(
                    data=b"".join(a.tobytes() for a in arrays),
                    offsets=np.concatenate([[0], ends]).astype("<i8").tobytes(),
                    dtype=wire.DTYPE_FLOAT32,
                )
            )
        out = wire.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", metrics=tinker_metrics(self.result.metrics))
        out.loss_fn_outputs.append(record)
        return out.SerializeToString()

    def to_json(self) -> dict[str, Any]:
        """The same in Tinker's JSON shape (``TensorData`` objects)."""
        return {
            "loss_fn_output_type": "ArrayRecord",
            "loss_fn_outputs": [
                {name: _tensor_json(np.asarray(array, dtype=np.float32)) for name, array in o.items()}
                for o in self.result.outputs
            ],
            "metrics": tinker_metrics(self.result.metrics),
        }


def _field_names(outputs: Sequence[Mapping[str, Any]]) -> list[str]:
    names = list(outputs[0]) if outputs else []
    for o in outputs:
        if list(o) != names:
            raise ValueError("every datum's outputs must have the same fields")
    return names


def _tensor_json(array: npt.NDArray[np.generic]) -> dict[str, Any]:
    dtype = "int64" if array.dtype.kind == "i" else "float32"
    return {"data": array.reshape(-1).tolist(), "dtype": dtype, "shape": list(array.shape)}


@dataclass(frozen=True)
class SampleReply:
    """A ``SampleResponse``."""

    result: backend.SampleResult

    def to_proto(self) -> bytes:
        """Tokens as int32 bytes, logprobs as float32 bytes, top-k as dense N x K matrices."""
        out = wire.SampleResponse()
        for seq in self.result.sequences:
            out.sequences.append(
                wire.SampledSequence(
                    stop_reason=wire.STOP_REASON_STOP if seq.stop_reason == "stop" else wire.STOP_REASON_LENGTH,
                    tokens=np.asarray(seq.tokens, dtype="<i4").tobytes(),
                    logprobs=np.asarray(seq.logprobs, dtype="<f4").tobytes(),
                )
            )
        if self.result.prompt_logprobs is not None:
            out.prompt_logprobs = np.asarray(self.result.prompt_logprobs, dtype="<f4").tobytes()
        ids, lps = self.result.topk_prompt_ids, self.result.topk_prompt_logprobs
        if ids is not None and lps is not None and ids.size:
            out.topk_prompt_logprobs.CopyFrom(
                wire.TopkLogprobs(
                    token_ids=np.asarray(ids, dtype="<i4").tobytes(),
                    logprobs=np.asarray(lps, dtype="<f4").tobytes(),
                    k=ids.shape[1],
                    length=ids.shape[0],
                )
            )
        return out.SerializeToString()

    def to_json(self) -> dict[str, Any]:
        """The same in Tinker's JSON shape (NaN prompt logprobs as null)."""
        body: dict[str, Any] = {
            "type": "sample",
            "sequences": [
                {
                    "stop_reason": s.stop_reason,
                    "tokens": np.asarray(s.tokens).tolist(),
                    "logprobs": np.asarray(s.logprobs, dtype=np.float64).tolist(),
                }
                for s in self.result.sequences
            ],
        }
        if self.result.prompt_logprobs is not None:
            body["prompt_logprobs"] = [None if math.isnan(v) else v for v in self.result.prompt_logprobs.tolist()]
        ids, lps = self.result.topk_prompt_ids, self.result.topk_prompt_logprobs
        if ids is not None and lps is not None:
            body["topk_prompt_logprobs"] = [
                None if i == 0 else list(zip(ids[i].tolist(), lps[i].tolist(), strict=True)) for i in range(len(ids))
            ]
        return body
