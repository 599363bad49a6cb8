"""Tensors on the wire: raw little-endian bytes plus a spec, chunked with offsets.

Both the client and the server use this module, so the encoding has one definition.

Invariants:
- A tensor's bytes are exactly ``numel * itemsize`` long; a spec that says otherwise is
  rejected with :class:`WireError` naming the field, before any tensor is built.
- Chunked tensors arrive as a :class:`trainer_pb2.TensorStreamHeader` followed by
  :class:`trainer_pb2.TensorChunk` messages whose offsets are contiguous; the
  :class:`ChunkAssembler` writes each chunk straight into one preallocated buffer and
  the finished tensor is a view over that buffer (no extra copy).
- Decoding never trusts a declared size beyond the caller's ``max_bytes``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from google.protobuf.message import Message

from trainer_proto import options
from trainer_proto.trainer.v1 import trainer_pb2 as pb

if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts in use
    raise ImportError("trainer_proto.wire assumes a little-endian host")

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "FLOAT_DTYPES",
    "STREAM_CODECS",
    "ChunkAssembler",
    "ChunkCodec",
    "RawChunk",
    "RawChunkMessage",
    "WireError",
    "chunk_tensor",
    "dtype_from_wire",
    "dtype_to_wire",
    "split_by_lengths",
    "stream_header",
    "tensor_from_wire",
    "tensor_to_wire",
]

DEFAULT_CHUNK_BYTES = options.DEFAULT_CHUNK_BYTES
"""Chunk size for streamed tensors (see :data:`trainer_proto.options.DEFAULT_CHUNK_BYTES`)."""

_TO_TORCH: dict[int, torch.dtype] = {
    pb.DATA_TYPE_FLOAT32: torch.float32,
    pb.DATA_TYPE_BFLOAT16: torch.bfloat16,
    pb.DATA_TYPE_FLOAT16: torch.float16,
    pb.DATA_TYPE_INT64: torch.int64,
    pb.DATA_TYPE_INT32: torch.int32,
}
_TO_WIRE: dict[torch.dtype, pb.DataType.ValueType] = {v: k for k, v in _TO_TORCH.items()}  # type: ignore[misc]

FLOAT_DTYPES = frozenset({pb.DATA_TYPE_FLOAT32, pb.DATA_TYPE_BFLOAT16, pb.DATA_TYPE_FLOAT16})
"""Wire dtypes allowed for logprobs and gradients."""


class WireError(ValueError):
    """A tensor spec or chunk that does not describe a valid tensor."""


def dtype_from_wire(dtype: int, field: str = "dtype") -> torch.dtype:
    """Map a wire ``DataType`` to a torch dtype.

    Raises:
        WireError: the value is unspecified or unknown.
    """
    try:
        return _TO_TORCH[dtype]
    except KeyError:
        raise WireError(f"{field}: unsupported data type {dtype}") from None


def dtype_to_wire(dtype: torch.dtype) -> pb.DataType.ValueType:
    """Map a torch dtype to its wire ``DataType``.

    Raises:
        WireError: the dtype has no wire form.
    """
    try:
        return _TO_WIRE[dtype]
    except KeyError:
        raise WireError(f"dtype {dtype} cannot be sent") from None


def _contiguous_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as a flat memoryview (no copy when already contiguous on CPU)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    # bfloat16 has no numpy dtype: view the storage as raw bytes instead.
    return t.view(torch.uint8).numpy().data.cast("B") if t.numel() else memoryview(b"")


def tensor_to_wire(tensor: torch.Tensor) -> pb.TensorData:
    """Encode a small tensor inline (dtype, shape, raw bytes)."""
    return pb.TensorData(
        dtype=dtype_to_wire(tensor.dtype),
        shape=list(tensor.shape),
        data=bytes(_contiguous_bytes(tensor)),
    )


def tensor_from_wire(msg: pb.TensorData, field: str, max_bytes: int | None = None) -> torch.Tensor:
    """Decode an inline tensor, validating its spec against its bytes.

    The result shares memory with ``msg.data`` (read-only bytes), so it is cloned
    only where it will be written to.

    Args:
        msg: the tensor message.
        field: the field's name, used in error messages.
        max_bytes: refuse tensors larger than this.

    Raises:
        WireError: unknown dtype, negative dimension, or a byte count that does not
            match the shape.
    """
    dtype = dtype_from_wire(msg.dtype, f"{field}.dtype")
    shape = list(msg.shape)
    if any(d < 0 for d in shape):
        raise WireError(f"{field}.shape has a negative dimension: {shape}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if max_bytes is not None and expected > max_bytes:
        raise WireError(f"{field} declares {expected} bytes, over the limit of {max_bytes}")
    if len(msg.data) != expected:
        raise WireError(f"{field}: shape {shape} of {dtype} needs {expected} bytes, got {len(msg.data)}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=dtype).reshape(shape)


def stream_header(tensor: torch.Tensor, lengths: Sequence[int]) -> pb.TensorStreamHeader:
    """Header announcing ``tensor`` (1-D, the concatenation of per-datum pieces)."""
    return pb.TensorStreamHeader(
        dtype=dtype_to_wire(tensor.dtype),
        lengths=list(lengths),
        total_bytes=tensor.numel() * tensor.element_size(),
    )


def chunk_tensor(tensor: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[pb.TensorChunk]:
    """Yield a tensor's bytes as contiguous chunks of at most ``chunk_bytes``."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    view = _contiguous_bytes(tensor)
    for offset in range(0, len(view), chunk_bytes):
        yield pb.TensorChunk(offset=offset, data=bytes(view[offset : offset + chunk_bytes]))


class ChunkAssembler:
    """Reassembles a chunked tensor into one preallocated buffer.

    Args:
        header: the stream's header.
        field: name used in error messages (``"logprobs"``, ``"gradient"``).
        max_bytes: refuse a declared size over this.
        expected_lengths: when given, the header's per-datum lengths must equal these.
        allowed_dtypes: wire dtypes accepted (defaults to floats).

    Raises:
        WireError: from the constructor on a bad header, from :meth:`add` on a chunk
            that is out of order, duplicated or past the end, and from :meth:`tensor`
            when bytes are missing.
    """

    def __init__(
        self,
        header: pb.TensorStreamHeader,
        field: str,
        *,
        max_bytes: int,
        expected_lengths: Sequence[int] | None = None,
        allowed_dtypes: frozenset[int] = FLOAT_DTYPES,
    ) -> None:
        self.field = field
        if header.dtype not in allowed_dtypes:
            names = sorted(pb.DataType.Name(d) for d in allowed_dtypes)  # type: ignore[arg-type]
            raise WireError(f"{field}: data type {header.dtype} not allowed; use one of {names}")
        self.dtype = dtype_from_wire(header.dtype, f"{field}.dtype")
        self.lengths = list(header.lengths)
        if any(n < 0 for n in self.lengths):
            raise WireError(f"{field}: negative length in {self.lengths}")
        if expected_lengths is not None and self.lengths != list(expected_lengths):
            raise WireError(
                f"{field}: per-datum lengths {self.lengths} do not match the logprobs' lengths {list(expected_lengths)}"
            )
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        self.total_bytes = sum(self.lengths) * itemsize
        if header.total_bytes != self.total_bytes:
            raise WireError(
                f"{field}: total_bytes {header.total_bytes} != sum(lengths) * itemsize = {self.total_bytes}"
            )
        if self.total_bytes > max_bytes:
            raise WireError(f"{field}: {self.total_bytes} bytes is over the limit of {max_bytes}")
        self._buffer = bytearray(self.total_bytes)
        self.received = 0

    @property
    def done(self) -> bool:
        """True once every byte has arrived."""
        return self.received == self.total_bytes

    def add(self, chunk: pb.TensorChunk | RawChunk) -> None:
        """Copy one chunk into place; chunks must arrive in order without gaps."""
        if chunk.offset != self.received:
            raise WireError(f"{self.field}: chunk at offset {chunk.offset}, expected offset {self.received}")
        end = self.received + len(chunk.data)
        if end > self.total_bytes:
            raise WireError(f"{self.field}: chunk ends at byte {end}, past total_bytes {self.total_bytes}")
        if not chunk.data:
            raise WireError(f"{self.field}: empty chunk at offset {chunk.offset}")
        self._buffer[self.received : end] = chunk.data
        self.received = end

    def tensor(self) -> torch.Tensor:
        """The finished 1-D tensor, a view over the assembled buffer."""
        if not self.done:
            raise WireError(f"{self.field}: got {self.received} of {self.total_bytes} bytes")
        if self.total_bytes == 0:
            return torch.empty(0, dtype=self.dtype)
        return torch.frombuffer(self._buffer, dtype=self.dtype)


def split_by_lengths(flat: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    """Split a concatenated 1-D tensor into per-datum views."""
    return list(torch.split(flat, list(lengths)))


# ---- the chunk fast path -------------------------------------------------------------------
#
# A chunk message (say ForwardBackwardCustomRequest{grad_chunk: TensorChunk{offset, data}}) is
# one length-delimited oneof field holding two fields. Writing its few header bytes by hand and
# joining them with a view of the tensor costs one copy, where chunk_tensor + a message +
# SerializeToString cost three; parsing those header bytes and taking a memoryview of the
# payload costs none, where FromString + ``.data`` cost two. The bytes on the wire are exactly
# protobuf's (tests/test_wire_fast_path.py checks), so any gRPC client (grpcurl included)
# interoperates; a message in any other layout simply takes the protobuf path.


class RawChunk(NamedTuple):
    """A chunk parsed without protobuf: ``data`` is a view into the received message bytes."""

    offset: int
    data: memoryview


class RawChunkMessage:
    """A received chunk message, standing in for the protobuf message it encodes.

    It answers the parts of the message API that readers of chunk streams use:
    ``WhichOneof``, the chunk field (a :class:`RawChunk`), and ``SerializeToString``
    (the received bytes themselves, which are protobuf's canonical encoding).
    """

    __slots__ = ("_field", "chunk", "raw")

    def __init__(self, field: str, chunk: RawChunk, raw: bytes) -> None:
        self._field = field
        self.chunk = chunk
        self.raw = raw

    def WhichOneof(self, group: str) -> str:
        """The oneof field that is set: always the chunk field."""
        return self._field

    def __getattr__(self, name: str) -> RawChunk:
        if name == self._field:
            return self.chunk
        raise AttributeError(name)

    def SerializeToString(self, deterministic: bool = False) -> bytes:
        """The received bytes (canonical: only that layout is parsed this way)."""
        return self.raw


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while shift < 64:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i
    raise IndexError("varint too long")


class ChunkCodec:
    """gRPC (de)serializers for a streaming method whose messages may carry a tensor chunk.

    Args:
        message_class: the method's request or response message class.
        chunk_field: its oneof field holding a ``TensorChunk`` (None: no chunks flow this way).

    ``serialize`` takes a message or bytes already encoded (:meth:`chunk_messages`);
    ``deserialize`` returns a :class:`RawChunkMessage` for a chunk in protobuf's canonical
    layout, else the parsed message.
    """

    def __init__(self, message_class: Any, chunk_field: str | None) -> None:
        self.message_class = message_class
        self.chunk_field = chunk_field
        number = message_class.DESCRIPTOR.fields_by_name[chunk_field].number if chunk_field else 0
        self._tag = number << 3 | 2 if chunk_field else -1
        if self._tag > 0x7F:  # pragma: no cover - field numbers here are small
            raise ValueError(f"{chunk_field}: field number {number} needs a multi-byte tag")

    @staticmethod
    def serialize(message: Message | bytes) -> bytes:
        """A message's bytes; bytes pass through."""
        return message if isinstance(message, bytes) else message.SerializeToString()

    def deserialize(self, raw: bytes) -> Any:
        """A :class:`RawChunkMessage` when ``raw`` is a canonical chunk message, else the message."""
        if self.chunk_field and raw and raw[0] == self._tag:
            chunk = self._parse_chunk(raw)
            if chunk is not None:
                return RawChunkMessage(self.chunk_field, chunk, raw)
        return self.message_class.FromString(raw)

    @staticmethod
    def _parse_chunk(raw: bytes) -> RawChunk | None:
        """Canonical layout only: tag, length, [0x08 offset], 0x12 length data, and nothing else."""
        try:
            size, i = _read_varint(raw, 1)
            if i + size != len(raw):
                return None
            offset = 0
            if raw[i] == 0x08:
                offset, i = _read_varint(raw, i + 1)
                if offset == 0:
                    return None  # protobuf omits a zero offset; let it parse this one
            if raw[i] != 0x12:
                return None
            n, i = _read_varint(raw, i + 1)
            if i + n != len(raw) or n == 0:
                return None
        except IndexError:
            return None
        return RawChunk(offset, memoryview(raw)[i:])

    def chunk_messages(self, tensor: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
        """Encoded messages carrying ``tensor``'s bytes in chunks, as protobuf would write them."""
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        if self._tag < 0:
            raise ValueError(f"{self.message_class.__name__} has no chunk field")
        view = _contiguous_bytes(tensor)
        tag = bytes([self._tag])
        for offset in range(0, len(view), chunk_bytes):
            part = view[offset : offset + chunk_bytes]
            inner = (b"\x08" + _varint(offset) if offset else b"") + b"\x12" + _varint(len(part))
            yield b"".join((tag, _varint(len(inner) + len(part)), inner, part))


STREAM_CODECS: dict[str, tuple[ChunkCodec, ChunkCodec]] = {
    "Forward": (ChunkCodec(pb.ForwardRequest, None), ChunkCodec(pb.ForwardResponse, "logprobs_chunk")),
    "ForwardBackward": (
        ChunkCodec(pb.ForwardBackwardRequest, None),
        ChunkCodec(pb.ForwardBackwardResponse, "logprobs_chunk"),
    ),
    "ForwardBackwardCustom": (
        ChunkCodec(pb.ForwardBackwardCustomRequest, "grad_chunk"),
        ChunkCodec(pb.ForwardBackwardCustomResponse, "logprobs_chunk"),
    ),
}
"""(request codec, response codec) of each tensor-streaming method; both ends use these."""
