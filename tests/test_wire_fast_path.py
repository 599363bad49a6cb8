"""The chunk fast path writes exactly protobuf's bytes and reads them back without protobuf.

Anything not in protobuf's canonical chunk layout takes the protobuf path, so other clients
(grpcurl, other languages) interoperate, and malformed bytes fail as protobuf fails.
"""

from __future__ import annotations

import pytest
import torch
from google.protobuf.message import DecodeError

from trainer_proto import pb, wire

CASES = [
    (method, side) for method in wire.STREAM_CODECS for side in (0, 1) if wire.STREAM_CODECS[method][side].chunk_field
]


def codec(method: str, side: int) -> wire.ChunkCodec:
    return wire.STREAM_CODECS[method][side]


@pytest.mark.parametrize(("method", "side"), CASES)
@pytest.mark.parametrize("numel", [1, 3, 70_000, 262_144])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_equal_protobufs_and_parse_back(method: str, side: int, numel: int, dtype: torch.dtype) -> None:
    c = codec(method, side)
    assert c.chunk_field is not None
    t = torch.randn(numel).to(dtype)
    chunk_bytes = 100_000
    expected = [c.message_class(**{c.chunk_field: ch}).SerializeToString() for ch in wire.chunk_tensor(t, chunk_bytes)]
    got = list(c.chunk_messages(t, chunk_bytes))
    assert got == expected
    header = wire.stream_header(t, [numel])
    assembler = wire.ChunkAssembler(header, "x", max_bytes=1 << 30)
    for raw in got:
        msg = c.deserialize(raw)
        assert isinstance(msg, wire.RawChunkMessage)  # the fast path took it
        assert msg.WhichOneof("message") == c.chunk_field
        assert msg.SerializeToString(deterministic=True) == raw
        parsed = getattr(c.message_class.FromString(raw), c.chunk_field)
        chunk = getattr(msg, c.chunk_field)
        assert (chunk.offset, bytes(chunk.data)) == (parsed.offset, parsed.data)
        assembler.add(chunk)
    assert torch.equal(assembler.tensor(), t)


def test_other_messages_and_other_layouts_take_the_protobuf_path() -> None:
    c = codec("ForwardBackwardCustom", 0)
    req = pb.ForwardBackwardCustomRequest
    tag = bytes([c.message_class.DESCRIPTOR.fields_by_name["grad_chunk"].number << 3 | 2])
    header = req(grad_header=pb.TensorStreamHeader(dtype=pb.DATA_TYPE_FLOAT32, lengths=[1], total_bytes=4))
    assert isinstance(c.deserialize(header.SerializeToString()), req)
    zero_offset = tag + bytes([8]) + b"\x08\x00\x12\x04abcd"  # an explicit offset 0: legal, not canonical
    data_first = tag + bytes([8]) + b"\x12\x04abcd\x08\x05"  # fields in another order: legal
    unknown_after = tag + bytes([8]) + b"\x12\x04abcd\x18\x01"  # an unknown field: legal, kept by protobuf
    for raw, offset in ((zero_offset, 0), (data_first, 5), (unknown_after, 0)):
        msg = c.deserialize(raw)
        assert isinstance(msg, req), raw
        assert (msg.grad_chunk.offset, msg.grad_chunk.data) == (offset, b"abcd")
    empty = tag + bytes([2]) + b"\x12\x00"  # an empty chunk: protobuf's business (the assembler refuses it)
    assert isinstance(c.deserialize(empty), req)
    for truncated in (tag, tag + b"\x80", tag + bytes([8]) + b"\x12\x04ab", tag + bytes([6]) + b"\x08\x80\x80"):
        with pytest.raises(DecodeError):
            c.deserialize(truncated)


def test_serialize_passes_bytes_and_encodes_messages() -> None:
    c = codec("Forward", 1)
    msg = pb.ForwardResponse(result=pb.ForwardResult(seq=3, num_tokens=9))
    assert c.serialize(msg) == msg.SerializeToString()
    assert c.serialize(b"ready") == b"ready"
    with pytest.raises(ValueError, match="no chunk field"):
        next(codec("Forward", 0).chunk_messages(torch.ones(2)))
