"""Lossless DELTA checkpoints: per-tensor change coding against a base, compressed with zstd.

A delta records how a set of tensors (the *new* weights) differs from a *base* set with the same
names, shapes and dtypes, such that applying it to the base rebuilds the new tensors **bit for
bit**. Each element is viewed as an unsigned integer *word* of its width (2 bytes for bf16/fp16,
4 for fp32, ...). Words that did not change cost almost nothing; for those that did, a training
step mostly moves a float by one or a few units in the last place, so their integer difference
``new - base`` (a sign and a small magnitude) or the XOR of the two words (mostly zero high
bytes) compresses well.

On-disk format, version 2 (a delta directory)
---------------------------------------------

``delta.json`` (compact UTF-8 JSON object, one line, written last)
    ``format``
        ``"trainer-ckpt-delta"``.
    ``version``
        ``2``.
    ``base_weights_sha256`` / ``new_sha256``
        :func:`weights_sha256` of the base and of the new tensors: a canonical hash over names,
        dtypes, shapes and bytes that does not depend on how a safetensors file orders or aligns
        its tensors (see below). Applying refuses any base whose hash differs, before decoding
        anything, and checks the whole rebuilt result against ``new_sha256``.
    ``zstd_level``
        The zstd compression level of the blobs (informational).
    ``blobs_size`` / ``index_size``
        Sizes in bytes of the two parts of ``delta.bin``.
    ``delta_bin_sha256``
        sha256 of ``delta.bin``: checked before anything is decoded, so a corrupt or truncated
        delta is refused before a single weight changes (zstd's own checksums cover decoded
        content, and a flipped bit in a compressed stream may decode to the same content).

``delta.bin``
    The compressed blobs of all tensors, concatenated in index order with no padding, header or
    gaps (``blobs_size`` bytes), followed by the *index* (``index_size`` bytes). Each non-empty
    blob is exactly one zstd frame with content size and content checksum; a frame of several
    sections ends a zstd block after each section (so each gets its own entropy tables).

The index
    One zstd frame (content size and checksum, level 19) holding compact UTF-8 JSON with one
    list per field, each with one item per tensor in sorted name order (Python ``str`` order):
    ``name_prefix`` and ``name_suffix`` (front-coded names: name ``i`` is the first
    ``name_prefix[i]`` characters of name ``i - 1`` followed by ``name_suffix[i]``), ``dtypes``
    (safetensors codes ``F32``, ``BF16``, ...), ``shapes`` (lists of ints), ``encodings``,
    ``lengths`` (blob sizes; offsets are their running sums) and ``changed`` (number of words
    that differ from the base). Column lists compress to a few bytes per tensor;
    per-tensor integrity comes from each frame's checksum and exact content size, and the whole
    result is checked against ``new_sha256``.

Encodings of one tensor's change (``n`` words of ``w`` bytes, ``c`` of them changed); the encoder
computes the candidates ``xor``, ``sparse-diff`` (when few words changed) and ``mask-diff`` and
keeps the smallest (ties go to the earlier one here):

``zero``
    Nothing changed: nothing is stored, ``length == 0``.
``xor``
    ``zstd(base ^ new as raw little-endian words)``: the plain XOR+zstd baseline.
``planes``
    ``zstd(planes(base ^ new))`` where plane ``k`` holds byte ``k`` (little-endian order) of every
    word, in element order, and planes are concatenated ``0, 1, ..., w-1``. Only for ``w > 1``.
    Read, but no longer chosen by the encoder (``mask-diff`` is smaller on trained weights).
``sparse-diff``
    ``zstd(planes(gaps) | values)``: ``gaps`` are the distances between the flat indices of the
    ``c`` changed words (``gap[0] = idx[0]``, ``gap[i] = idx[i] - idx[i-1] - 1``) as ``uint32``
    (``uint64`` for tensors of more than ``2**32`` elements); ``values`` as below. Tried when
    ``c <= n / 4``.
``mask-diff``
    ``zstd(mask | values)``: ``mask`` is ``ceil(n / 8)`` bytes, bit ``i % 8`` (least significant
    first) of byte ``i // 8`` set where word ``i`` changed.
``joined``
    Small tensors (at most 64 KiB each) that follow each other in name order and have the same
    word width may be coded together, as if their words were concatenated into one tensor, when
    that is smaller than coding each alone (a zstd frame costs about a dozen bytes, and models
    have hundreds of tiny norm and bias tensors). The first tensor of such a *run* holds the
    run's encoding and blob; each following one has encoding ``joined`` and length 0. A run
    holds at most 1 MiB of words; its ``changed`` counts are still per tensor.

``values`` of the ``c`` changed words, in element order: the difference ``d = new - base``
modulo ``2**(8w)``, read as a signed integer, is split into its sign and magnitude ``a = |d|``
(at least 1; a training step mostly moves a float by one unit in the last place) and stored as
three sections: ``ceil(c / 8)`` bytes of sign bits (set where ``d < 0``), ``ceil(c / 8)`` bytes
of "big" bits (set where ``a > 1``), then ``planes(a - 2)`` of the big words only. Bits are
packed least significant first, padding bits are 0. Applying adds ``d`` back modulo ``2**(8w)``.
Within one frame, zstd ends a block after each section, so each has entropy tables of its own.

Version 1 (read, never written) had a pretty-printed ``delta.json`` listing every tensor with a
sha256 each, the base identified by the sha256 of its *file* and a ``sparse`` encoding with XOR
values; :func:`apply_delta` still applies such deltas. Other versions are refused with a message
naming the version.

Invariants
----------

- Lossless: ``apply_delta(base, write_delta(base, new))`` equals ``new`` bit for bit (NaN
  payloads, signed zeros and subnormals included), for every supported dtype.
- Never larger than plain XOR+zstd per tensor: ``xor`` (that baseline) is always a candidate,
  and a run of joined tensors is kept only when smaller than its tensors coded one by one.
- Deterministic: equal inputs and level give byte-identical ``delta.bin`` and ``delta.json``
  (for a given zstd library version). Candidates of large tensors are compressed concurrently on
  a small thread pool; that changes the speed, never the bytes.
- Verified: applying checks the header, ``delta.bin``'s size and sha256 and the base's
  canonical hash before anything else, that the blobs and the index tile ``delta.bin``
  exactly, that every zstd frame decodes (checksum included) to exactly the expected size with
  the recorded number of changed words, and finally :func:`weights_sha256` of the whole result.
  Any mismatch, truncation or flipped byte raises :class:`DeltaError`; a wrong result is never
  returned, and :func:`apply_delta_inplace` restores the weights it had already changed before
  raising.
- Bounded: decoding never allocates more than a tensor's size (plus its index or mask) per blob,
  whatever ``delta.bin`` claims; the index is at most 256 MiB decoded.
- ``write_delta`` fsyncs ``delta.bin``, then writes and fsyncs ``delta.json``, then fsyncs the
  directory. It does not make the directory appear atomically: the caller writes into a
  temporary directory and renames it.

Canonical weights hash (:func:`weights_sha256`)
-----------------------------------------------

sha256 over the ASCII bytes ``trainer-ckpt-weights-v1`` and a line feed, followed by, for each
tensor in sorted name order: ``u64 len(name) || name (UTF-8) || u64 len(dtype) || dtype (ASCII
safetensors code) || u64 ndim || u64 dim... || u64 nbytes || raw little-endian bytes``, all
integers little-endian.

The module runs on little-endian hosts only (as safetensors and every common accelerator host).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import mmap
import os
import shutil
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol, cast

import numpy as np
import numpy.typing as npt
import torch
import zstandard

__all__ = [
    "DELTA_BIN",
    "DELTA_JSON",
    "ENCODINGS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "WEIGHTS_FILE",
    "DeltaBlob",
    "DeltaError",
    "DeltaStats",
    "Encoding",
    "Progress",
    "TensorDelta",
    "apply_delta",
    "apply_delta_inplace",
    "apply_delta_to_dir",
    "decode_delta",
    "encode_delta",
    "fsync_dir",
    "read_manifest",
    "weights_sha256",
    "write_delta",
    "xor_zstd_baseline_size",
]

FORMAT_NAME: Final = "trainer-ckpt-delta"
"""Value of ``format`` in ``delta.json``."""
FORMAT_VERSION: Final = 2
"""Version written by :func:`write_delta`."""
READABLE_VERSIONS: Final = (1, 2)
"""Versions :func:`apply_delta` reads; others are refused with a message naming the version."""
DELTA_BIN: Final = "delta.bin"
"""File name of the compressed blobs and the index."""
DELTA_JSON: Final = "delta.json"
"""File name of the header."""
WEIGHTS_FILE: Final = "model.safetensors"
"""Name of the weights file in a Hugging Face model directory."""

Encoding = Literal["zero", "xor", "planes", "sparse-diff", "mask-diff", "joined", "sparse"]
"""How one tensor's change is stored (``sparse`` only in version 1 deltas)."""
ENCODINGS: Final[tuple[Encoding, ...]] = ("zero", "xor", "planes", "sparse-diff", "mask-diff", "joined")
"""The encodings written, in tie-break order (an earlier one wins a tie in size; ``joined`` is
not chosen by size but marks a small tensor coded together with the ones before it)."""
_V1_ENCODINGS: Final[tuple[Encoding, ...]] = ("zero", "xor", "planes", "sparse")

Progress = Callable[[int], None]
"""Called after each tensor is applied, with that tensor's size in bytes."""

_HASH_PREFIX: Final = b"trainer-ckpt-weights-v1\n"
_U64: Final = struct.Struct("<Q")
_MIN_LEVEL: Final = 1
_MAX_LEVEL: Final = 22
_INDEX_LEVEL: Final = 19
_MAX_INDEX_BYTES: Final = 1 << 28

# safetensors dtype code -> (torch dtype, bytes per element).
_DTYPES: Final[dict[str, tuple[torch.dtype, int]]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
_CODE_OF_TORCH: Final[dict[torch.dtype, str]] = {t: code for code, (t, _) in _DTYPES.items()}
_WORD: Final[dict[int, type[np.unsignedinteger[Any]]]] = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SIGNED: Final[dict[int, type[np.signedinteger[Any]]]] = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}

_Bytes = npt.NDArray[np.uint8]
_Words = npt.NDArray[np.unsignedinteger[Any]]


class DeltaError(Exception):
    """A delta cannot be made or applied: mismatched inputs, wrong base, or a corrupt delta."""


@dataclass(frozen=True)
class TensorDelta:
    """How one tensor is stored in a delta (one entry of the index).

    Attributes:
        name: Tensor name.
        dtype: safetensors dtype code (``F32``, ``BF16``, ``F16``, ...).
        shape: Tensor shape.
        encoding: One of :data:`ENCODINGS` (or ``sparse`` in a version 1 delta).
        offset: Start of the blob in ``delta.bin`` (or in :attr:`DeltaBlob.data`).
        length: Blob length in bytes; 0 for ``zero``.
        changed: Number of elements whose bit pattern differs from the base.
        sha256: sha256 (hex) of the new tensor's raw bytes; only version 1 deltas record it.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    encoding: Encoding
    offset: int
    length: int
    changed: int
    sha256: str | None = None

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return _DTYPES[self.dtype][1]

    @property
    def raw_bytes(self) -> int:
        """Size of the tensor's raw data in bytes."""
        return self.numel * self.itemsize


@dataclass(frozen=True)
class DeltaStats:
    """Summary of a delta.

    Attributes:
        tensors: Number of tensors.
        raw_bytes: Total raw size of the new tensors.
        compressed_bytes: Total size of the compressed blobs.
        manifest_bytes: Size of the metadata: ``delta.json`` plus the index (0 for an in-memory
            :class:`DeltaBlob`).
        encodings: Number of tensors per encoding (every written encoding present, possibly 0).
        changed_elements: Elements whose bit pattern differs from the base.
        total_elements: Elements in all tensors.
    """

    tensors: int
    raw_bytes: int
    compressed_bytes: int
    manifest_bytes: int
    encodings: dict[str, int]
    changed_elements: int
    total_elements: int

    @property
    def total_bytes(self) -> int:
        """Size of the whole delta: blobs plus metadata (the whole directory on disk)."""
        return self.compressed_bytes + self.manifest_bytes

    @property
    def ratio(self) -> float:
        """``raw_bytes / total_bytes`` (``inf`` when nothing is stored)."""
        return self.raw_bytes / self.total_bytes if self.total_bytes else math.inf

    @property
    def changed_fraction(self) -> float:
        """Fraction of elements whose bit pattern changed (0.0 for no elements)."""
        return self.changed_elements / self.total_elements if self.total_elements else 0.0

    @classmethod
    def from_entries(cls, entries: Sequence[TensorDelta], *, manifest_bytes: int = 0) -> DeltaStats:
        """Summarise a list of tensor entries.

        Args:
            entries: The tensors of a delta.
            manifest_bytes: Size of the metadata (``delta.json`` and the index), if written.

        Returns:
            The statistics.
        """
        counts: dict[str, int] = dict.fromkeys(ENCODINGS, 0)
        for e in entries:
            counts[e.encoding] = counts.get(e.encoding, 0) + 1
        return cls(
            tensors=len(entries),
            raw_bytes=sum(e.raw_bytes for e in entries),
            compressed_bytes=sum(e.length for e in entries),
            manifest_bytes=manifest_bytes,
            encodings=counts,
            changed_elements=sum(e.changed for e in entries),
            total_elements=sum(e.numel for e in entries),
        )


@dataclass(frozen=True)
class DeltaBlob:
    """An in-memory delta, as made by :func:`encode_delta` and applied by :func:`decode_delta`.

    Attributes:
        tensors: Per-tensor entries, sorted by name; offsets index into :attr:`data`.
        data: The concatenated compressed blobs (what ``delta.bin`` holds before its index).
        base_weights_sha256: :func:`weights_sha256` of the base tensors.
        new_sha256: :func:`weights_sha256` of the new tensors.
        level: zstd level used.
    """

    tensors: tuple[TensorDelta, ...]
    data: bytes = field(repr=False)
    base_weights_sha256: str
    new_sha256: str
    level: int

    @property
    def stats(self) -> DeltaStats:
        """Summary of this delta."""
        return DeltaStats.from_entries(self.tensors)


# --------------------------------------------------------------------------------------------
# Raw bytes of tensors and files
# --------------------------------------------------------------------------------------------


def _check_host() -> None:
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise DeltaError("trainer_ckpt.delta needs a little-endian host")


def _tensor_code(name: str, tensor: torch.Tensor, what: str) -> str:
    code = _CODE_OF_TORCH.get(tensor.dtype)
    if code is None:
        supported = ", ".join(str(t).removeprefix("torch.") for t, _ in _DTYPES.values())
        raise DeltaError(
            f"tensor {name!r} in the {what} weights has unsupported dtype {tensor.dtype}; supported: {supported}"
        )
    return code


def _tensor_bytes(tensor: torch.Tensor) -> _Bytes:
    """Return a tensor's raw bytes as a flat uint8 array (a view when already contiguous on CPU)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return cast(_Bytes, flat.view(torch.uint8).numpy())


def _to_tensor(raw: _Bytes, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    torch_dtype = _DTYPES[dtype][0]
    if not raw.flags.writeable:
        raw = raw.copy()
    return torch.from_numpy(raw).view(torch_dtype).reshape(shape)


def _words(raw: _Bytes, itemsize: int) -> _Words:
    return raw.view(_WORD[itemsize])


def _sha256_hex(raw: _Bytes) -> str:
    return hashlib.sha256(raw.data).hexdigest()


class _WeightsHasher:
    """Incremental :func:`weights_sha256`; tensors must be fed in sorted name order."""

    def __init__(self) -> None:
        self._h = hashlib.sha256(_HASH_PREFIX)
        self._last: str | None = None

    def add(self, name: str, dtype: str, shape: Sequence[int], raw: _Bytes) -> None:
        if self._last is not None and name <= self._last:  # pragma: no cover - internal misuse
            raise AssertionError("tensors must be hashed in strictly increasing name order")
        self._last = name
        name_b, dtype_b = name.encode("utf-8"), dtype.encode("ascii")
        h = self._h
        h.update(_U64.pack(len(name_b)) + name_b + _U64.pack(len(dtype_b)) + dtype_b + _U64.pack(len(shape)))
        h.update(b"".join(_U64.pack(d) for d in shape) + _U64.pack(raw.nbytes))
        h.update(raw.data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def weights_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """Return the canonical sha256 of a set of named tensors.

    The hash covers names, dtypes, shapes and raw bytes (see the module docstring for the exact
    serialisation); it does not depend on the mapping's order, devices or strides.

    Args:
        tensors: Named tensors of supported dtypes.

    Returns:
        The hex digest.

    Raises:
        DeltaError: If a tensor has an unsupported dtype.
    """
    _check_host()
    hasher = _WeightsHasher()
    for name in sorted(tensors):
        t = tensors[name]
        hasher.add(name, _tensor_code(name, t, "given"), tuple(t.shape), _tensor_bytes(t))
    return hasher.hexdigest()


@dataclass(frozen=True)
class _FileTensor:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class _SafetensorsFile:
    """A safetensors file mapped read-only, its header validated, tensors as zero-copy byte views.

    The file's sha256 (computed on first use) covers the same mapped bytes the tensors are read from.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise DeltaError(f"{path} is not a safetensors file: {size} bytes")
                self._buf = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
        except FileNotFoundError:
            raise DeltaError(f"weights file {path} does not exist") from None
        except IsADirectoryError:
            raise DeltaError(f"weights file {path} is a directory") from None
        (header_len,) = _U64.unpack(self._buf[:8].tobytes())
        if header_len > size - 8:
            raise DeltaError(f"{path} is not a safetensors file: header length {header_len} exceeds the file")
        try:
            header = json.loads(self._buf[8 : 8 + header_len].tobytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DeltaError(f"{path} is not a safetensors file: bad header ({exc})") from None
        if not isinstance(header, dict):
            raise DeltaError(f"{path} is not a safetensors file: header is not a JSON object")
        meta = header.pop("__metadata__", None)
        self.metadata: dict[str, str] | None = (
            {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else None
        )
        data_start = 8 + header_len
        self.tensors: dict[str, _FileTensor] = {}
        for name, info in header.items():
            try:
                dtype, shape_list, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
                shape = tuple(int(d) for d in shape_list)
                begin, end = int(begin), int(end)
            except (KeyError, TypeError, ValueError):
                raise DeltaError(f"{path} is not a safetensors file: bad header entry for {name!r}") from None
            if dtype not in _DTYPES:
                raise DeltaError(f"tensor {name!r} in {path} has unsupported dtype {dtype}")
            if any(d < 0 for d in shape) or end - begin != math.prod(shape) * _DTYPES[dtype][1] or begin < 0:
                raise DeltaError(f"{path} is not a safetensors file: tensor {name!r} has inconsistent offsets")
            if data_start + end > size:
                raise DeltaError(f"{path} is truncated: tensor {name!r} ends past the end of the file")
            self.tensors[name] = _FileTensor(dtype, shape, data_start + begin, data_start + end)

    @functools.cached_property
    def sha256(self) -> str:
        """sha256 (hex) of the whole file."""
        return hashlib.sha256(self._buf.data).hexdigest()

    def raw(self, name: str) -> _Bytes:
        t = self.tensors[name]
        return self._buf[t.begin : t.end]


# --------------------------------------------------------------------------------------------
def _file_weights_sha256(sf: _SafetensorsFile) -> str:
    """:func:`weights_sha256` of the tensors of a safetensors file."""
    hasher = _WeightsHasher()
    for name in sorted(sf.tensors):
        t = sf.tensors[name]
        hasher.add(name, t.dtype, t.shape, sf.raw(name))
    return hasher.hexdigest()


# --------------------------------------------------------------------------------------------
# Encoding and decoding one tensor
# --------------------------------------------------------------------------------------------


def _to_planes(words: _Words) -> _Bytes:
    """Return the byte planes of ``words``: all byte-0s, then all byte-1s, ... (little-endian)."""
    width = words.dtype.itemsize
    if width == 1:
        return cast(_Bytes, words.view(np.uint8))
    return np.ascontiguousarray(words.view(np.uint8).reshape(-1, width).T).reshape(-1)


def _from_planes(planes: _Bytes, width: int) -> _Words:
    """Invert :func:`_to_planes`."""
    if width == 1:
        return planes
    return np.ascontiguousarray(planes.reshape(width, -1).T).reshape(-1).view(_WORD[width])


def _value_sections(diff: _Words) -> list[_Bytes]:
    """Code nonzero differences (modulo 2**bits) as sign bits, "bigger than 1" bits and the rest.

    Most changed words moved by one unit in the last place: their cost is then one sign bit plus
    a "big" bit that is almost always 0, both packed eight to a byte, which zstd's entropy coder
    brings close to their entropy (it cannot code a whole byte per word in less than one bit).
    """
    width = diff.dtype.itemsize
    negative = diff.view(_SIGNED[width]) < 0
    magnitude = np.where(negative, ~diff + diff.dtype.type(1), diff)
    big = magnitude > 1
    rest = magnitude[big] - diff.dtype.type(2)
    return [
        cast(_Bytes, np.packbits(negative, bitorder="little")),
        cast(_Bytes, np.packbits(big, bitorder="little")),
        _to_planes(rest),
    ]


def _bits(packed: _Bytes, count: int, entry: TensorDelta) -> npt.NDArray[np.uint8]:
    """Unpack ``count`` bits (least significant first); the padding bits must be 0."""
    if count % 8 and packed.size and packed[-1] >> (count % 8):
        raise DeltaError(f"tensor {entry.name!r} is corrupt: padding bits are set")
    return np.unpackbits(packed, count=count, bitorder="little")


def _values_from_sections(payload: _Bytes, count: int, itemsize: int, entry: TensorDelta) -> _Words:
    """Invert :func:`_value_sections` for ``count`` values; ``payload`` must hold exactly them."""
    packed = (count + 7) // 8
    if payload.size < 2 * packed:
        raise DeltaError(f"tensor {entry.name!r} is corrupt: its change is truncated")
    negative = _bits(payload[:packed], count, entry).view(np.bool_)
    big = _bits(payload[packed : 2 * packed], count, entry).view(np.bool_)
    n_big = int(np.count_nonzero(big))
    if payload.size != 2 * packed + n_big * itemsize:
        raise DeltaError(f"tensor {entry.name!r} is corrupt: it holds {payload.size} bytes of change, expected "
                         f"{2 * packed + n_big * itemsize}")  # fmt: skip
    word = _WORD[itemsize]
    magnitude = np.ones(count, dtype=word)
    magnitude[big] = _from_planes(payload[2 * packed :], itemsize) + word(2)
    return cast(_Words, np.where(negative, ~magnitude + word(1), magnitude))


def _gap_width(numel: int) -> int:
    return 4 if numel <= 1 << 32 else 8


_PARALLEL_MIN_BYTES: Final = 1 << 20
_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """A compressor with content size and checksum for ``level`` (one per thread and level)."""
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return cctx


def _compress(level: int, data: _Bytes) -> bytes:
    """zstd-compress ``data`` into one frame with content size and checksum."""
    return _compressor(level).compress(data.data)


def _compress_sections(level: int, sections: Sequence[_Bytes]) -> bytes:
    """Compress ``sections`` back to back into one frame, ending a zstd block after each one.

    A new block gets its own entropy tables, so a bit mask and the byte planes after it are each
    coded with statistics of their own (about 4% smaller than one run of blocks over both).
    """
    if len(sections) == 1:
        return _compress(level, sections[0])
    cobj = _compressor(level).compressobj(size=sum(s.nbytes for s in sections))
    out: list[bytes] = []
    for i, section in enumerate(sections):
        out.append(cobj.compress(section.data))
        last = i == len(sections) - 1
        out.append(cobj.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH if last else zstandard.COMPRESSOBJ_FLUSH_BLOCK))
    return b"".join(out)


def _gaps(index: npt.NDArray[np.intp], numel: int) -> _Words:
    return (np.diff(index, prepend=-1) - 1).astype(_WORD[_gap_width(numel)])


def _diff_sections(
    base: _Words, new: _Words, xor: _Words, changed: int, sparse: bool
) -> tuple[list[_Bytes], list[_Bytes] | None]:
    """Return the sections of ``mask-diff`` and (when ``sparse``) of ``sparse-diff``."""
    mask = xor != 0
    index = np.flatnonzero(mask)
    values = _value_sections(new[index] - base[index])
    mask_sections = [cast(_Bytes, np.packbits(mask, bitorder="little")), *values]
    sparse_sections = [_to_planes(_gaps(index, xor.size)), *values] if sparse else None
    return mask_sections, sparse_sections


def _encode_tensor(
    base: _Bytes, new: _Bytes, itemsize: int, level: int, pool: ThreadPoolExecutor | None
) -> tuple[Encoding, bytes, int]:
    """Encode one tensor's change; return ``(encoding, blob, changed)``.

    The applicable candidates are compressed (concurrently on ``pool`` for large tensors) and the
    smallest kept.
    """
    base_w, new_w = _words(base, itemsize), _words(new, itemsize)
    xor = np.bitwise_xor(base_w, new_w)
    changed = int(np.count_nonzero(xor))
    if changed == 0:
        return "zero", b"", 0
    sparse = changed <= xor.size // 4
    mask_sections, sparse_sections = _diff_sections(base_w, new_w, xor, changed, sparse)
    # "planes" (XOR byte planes) is still read but no longer tried: mask-diff beat it on every
    # row of scripts/bench_delta.py, and it cost a whole extra compression pass per tensor.
    makers: list[tuple[Encoding, Callable[[], bytes]]] = [("xor", lambda: _compress(level, xor.view(np.uint8)))]
    if sparse_sections is not None:
        makers.append(("sparse-diff", lambda: _compress_sections(level, sparse_sections)))
    makers.append(("mask-diff", lambda: _compress_sections(level, mask_sections)))
    if pool is None or xor.nbytes < _PARALLEL_MIN_BYTES:
        candidates = [(encoding, make()) for encoding, make in makers]
    else:
        futures = [(encoding, pool.submit(make)) for encoding, make in makers]
        candidates = [(encoding, future.result()) for encoding, future in futures]
    order = {e: i for i, e in enumerate(ENCODINGS)}
    encoding, blob = min(candidates, key=lambda c: (len(c[1]), order[c[0]]))
    return encoding, blob, changed


def _where(entry: TensorDelta) -> str:
    return f"tensor {entry.name!r} (bytes {entry.offset}..{entry.offset + entry.length} of {DELTA_BIN})"


def _decompress(entry: TensorDelta, blob: bytes, expected: int, *, at_least: int | None = None) -> _Bytes:
    """Decompress one blob, which must be a single zstd frame of exactly ``expected`` bytes.

    With ``at_least``, any size from ``at_least`` to ``expected`` is accepted.
    """
    where = _where(entry)
    try:
        params = zstandard.get_frame_parameters(blob)
    except zstandard.ZstdError as exc:
        raise DeltaError(f"{where} is corrupt: not a zstd frame ({exc})") from None
    size = params.content_size
    low = expected if at_least is None else at_least
    if not low <= size <= expected:
        want = f"{expected}" if at_least is None else f"{at_least} to {expected}"
        raise DeltaError(f"{where} is corrupt: frame holds {size} bytes, expected {want}")
    expected = size
    try:
        out = zstandard.ZstdDecompressor().decompress(blob, max_output_size=expected, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise DeltaError(f"{where} is corrupt: {exc}") from None
    if len(out) != expected:  # pragma: no cover - zstd checks the content size itself
        raise DeltaError(f"{where} is corrupt: decoded {len(out)} bytes, expected {expected}")
    return np.frombuffer(out, dtype=np.uint8)


def _miscount(entry: TensorDelta) -> DeltaError:
    return DeltaError(f"tensor {entry.name!r} is corrupt: its changed count does not match {DELTA_BIN}")


def _decode_tensor(entry: TensorDelta, base: _Bytes, blob: bytes, *, undo: bool = False) -> _Bytes:
    """Rebuild one tensor's new raw bytes from its base bytes and blob (a new array).

    With ``undo``, ``base`` holds the *new* bytes and the base bytes are rebuilt instead. A
    version 1 entry's sha256 is checked.
    """
    itemsize, numel = entry.itemsize, entry.numel
    base_words = _words(base, itemsize)
    if entry.encoding == "zero":
        new_words = base_words.copy()
    elif entry.encoding in ("xor", "planes"):
        payload = _decompress(entry, blob, numel * itemsize)
        xor = _words(payload, itemsize) if entry.encoding == "xor" else _from_planes(payload, itemsize)
        if int(np.count_nonzero(xor)) != entry.changed:
            raise _miscount(entry)
        new_words = np.bitwise_xor(base_words, xor)
    else:
        index, values = _sparse_change(entry, blob)
        if entry.encoding == "sparse":  # version 1: XOR values
            new_words = base_words.copy()
            new_words[index] ^= values
        elif index is None:  # mask-diff: values cover every word
            new_words = base_words - values if undo else base_words + values
        else:
            new_words = base_words.copy()
            if undo:
                new_words[index] -= values
            else:
                new_words[index] += values
    raw = cast(_Bytes, new_words.view(np.uint8))
    if entry.sha256 is not None and not undo:
        digest = _sha256_hex(raw)
        if digest != entry.sha256:
            raise DeltaError(
                f"tensor {entry.name!r} does not match its checksum after applying the delta "
                f"(sha256 {digest}, expected {entry.sha256}): the delta or the base is corrupt"
            )
    return raw


def _sparse_change(entry: TensorDelta, blob: bytes) -> tuple[npt.NDArray[np.int64] | None, _Words]:
    """Decode a ``sparse``, ``sparse-diff`` or ``mask-diff`` blob.

    Returns ``(index, values)``: the flat indices of the changed words and their XOR (version 1
    ``sparse``) or difference, or for ``mask-diff`` ``(None, dense)`` with the differences
    expanded to every word (0 where unchanged): a gather over the running count of the mask,
    several times faster than scattering.
    """
    itemsize, numel, changed = entry.itemsize, entry.numel, entry.changed
    values_min, values_max = 2 * ((changed + 7) // 8), 2 * ((changed + 7) // 8) + changed * itemsize
    if entry.encoding == "mask-diff":
        mask_bytes = (numel + 7) // 8
        payload = _decompress(entry, blob, mask_bytes + values_max, at_least=mask_bytes + values_min)
        mask = _bits(payload[:mask_bytes], numel, entry)
        rank = np.cumsum(mask, dtype=np.intp)
        if (int(rank[-1]) if numel else 0) != changed:
            raise _miscount(entry)
        values = _values_from_sections(payload[mask_bytes:], changed, itemsize, entry)
        if int(np.count_nonzero(values)) != changed:
            raise DeltaError(f"tensor {entry.name!r} is corrupt: a changed value is zero")
        dense = np.concatenate([np.zeros(1, values.dtype), values]).take(rank)
        dense *= mask.astype(dense.dtype, copy=False)
        return None, dense
    gap_width = _gap_width(numel)
    split = changed * gap_width
    if entry.encoding == "sparse":  # version 1: planes of the gaps, then planes of the XOR values
        payload = _decompress(entry, blob, changed * (gap_width + itemsize))
        values = _from_planes(payload[split:], itemsize)
    else:
        payload = _decompress(entry, blob, split + values_max, at_least=split + values_min)
        values = _values_from_sections(payload[split:], changed, itemsize, entry)
    gaps = _from_planes(payload[:split], gap_width)
    if changed and int(gaps.max()) >= numel:
        raise DeltaError(f"tensor {entry.name!r} is corrupt: sparse index out of range")
    index = np.cumsum(gaps.astype(np.int64) + 1) - 1
    if changed and int(index[-1]) >= numel:
        raise DeltaError(f"tensor {entry.name!r} is corrupt: sparse index out of range")
    if int(np.count_nonzero(values)) != changed:
        raise DeltaError(f"tensor {entry.name!r} is corrupt: a changed value is zero")
    return index, values


# --------------------------------------------------------------------------------------------
# Checking inputs
# --------------------------------------------------------------------------------------------


def _check_level(level: int) -> None:
    if not _MIN_LEVEL <= level <= _MAX_LEVEL:
        raise ValueError(f"zstd level must be in {_MIN_LEVEL}..{_MAX_LEVEL} (1-3 recommended); got {level}")


def _fmt_names(names: Collection[str], limit: int = 5) -> str:
    ordered = sorted(names)
    shown = ", ".join(repr(n) for n in ordered[:limit])
    return shown + (f", ... ({len(ordered)} in all)" if len(ordered) > limit else "")


def _check_match(base: Mapping[str, tuple[str, tuple[int, ...]]], new: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Check that ``new`` has exactly the base's names, shapes and dtypes; return new dtype codes."""
    missing, extra = base.keys() - new.keys(), new.keys() - base.keys()
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing from the new weights: {_fmt_names(missing)}")
        if extra:
            parts.append(f"not in the base: {_fmt_names(extra)}")
        raise DeltaError("tensor names differ from the base; " + "; ".join(parts))
    codes: dict[str, str] = {}
    for name in sorted(new):
        t = new[name]
        code = _tensor_code(name, t, "new")
        base_code, base_shape = base[name]
        if tuple(t.shape) != base_shape:
            raise DeltaError(
                f"tensor {name!r} has shape {list(t.shape)} in the new weights but {list(base_shape)} in the base"
            )
        if code != base_code:
            raise DeltaError(f"tensor {name!r} has dtype {code} in the new weights but {base_code} in the base")
        codes[name] = code
    return codes


_JOIN_MAX_TENSOR: Final = 64 << 10
_JOIN_MAX_RUN: Final = 1 << 20


@dataclass
class _Pending:
    """A small tensor waiting to be coded, alone or joined with its neighbours."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    base: _Bytes
    new: _Bytes


class _Encoder:
    """Encodes tensors in sorted name order into entries and blobs (written to ``sink``)."""

    def __init__(self, level: int, sink: Any, pool: ThreadPoolExecutor | None) -> None:
        self.level, self.sink, self.pool = level, sink, pool
        self.entries: list[TensorDelta] = []
        self.offset = 0
        self.run: list[_Pending] = []

    def add(self, name: str, dtype: str, shape: tuple[int, ...], base: _Bytes, new: _Bytes) -> None:
        itemsize = _DTYPES[dtype][1]
        if new.nbytes > _JOIN_MAX_TENSOR:
            self.flush()
            self._single((name, dtype, shape), _encode_tensor(base, new, itemsize, self.level, self.pool))
            return
        run_bytes = sum(p.new.nbytes for p in self.run)
        if self.run and (_DTYPES[self.run[0].dtype][1] != itemsize or run_bytes + new.nbytes > _JOIN_MAX_RUN):
            self.flush()
        # Copies: the new tensor's bytes may be a temporary CPU copy, and the base a mapped file.
        self.run.append(_Pending(name, dtype, shape, base, new.copy()))

    def flush(self) -> None:
        run, self.run = self.run, []
        if not run:
            return
        itemsize = _DTYPES[run[0].dtype][1]
        singles = [_encode_tensor(p.base, p.new, itemsize, self.level, None) for p in run]
        if len(run) > 1:
            base = np.concatenate([p.base for p in run])
            new = np.concatenate([p.new for p in run])
            encoding, blob, _ = _encode_tensor(base, new, itemsize, self.level, None)
            if encoding != "zero" and len(blob) < sum(len(b) for _, b, _ in singles):
                for i, (p, (_, _, changed)) in enumerate(zip(run, singles, strict=True)):
                    coded: tuple[Encoding, bytes, int] = (
                        (encoding, blob, changed) if i == 0 else ("joined", b"", changed)
                    )
                    self._single((p.name, p.dtype, p.shape), coded)
                return
        for p, single in zip(run, singles, strict=True):
            self._single((p.name, p.dtype, p.shape), single)

    def _single(self, meta: tuple[str, str, tuple[int, ...]], coded: tuple[Encoding, bytes, int]) -> None:
        (name, dtype, shape), (encoding, blob, changed) = meta, coded
        self.entries.append(TensorDelta(name, dtype, shape, encoding, self.offset, len(blob), changed))
        self.sink.write(blob)
        self.offset += len(blob)


def _encode_all(
    names_base: Iterator[tuple[str, _Bytes]],
    new: Mapping[str, torch.Tensor],
    codes: Mapping[str, str],
    level: int,
    sink: Any,
) -> tuple[list[TensorDelta], str]:
    """Encode tensors in the given (sorted) order, passing each blob to ``sink.write``."""
    hasher = _WeightsHasher()
    workers = min(3, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="delta-encode") as pool:
        encoder = _Encoder(level, sink, pool if workers > 1 else None)
        for name, base_raw in names_base:
            t = new[name]
            new_raw = _tensor_bytes(t)
            shape = tuple(t.shape)
            hasher.add(name, codes[name], shape, new_raw)
            encoder.add(name, codes[name], shape, base_raw, new_raw)
        encoder.flush()
    return encoder.entries, hasher.hexdigest()


def _units(entries: Sequence[TensorDelta]) -> list[list[TensorDelta]]:
    """Group entries into units that share one blob: a tensor and the ``joined`` ones after it."""
    units: list[list[TensorDelta]] = []
    for e in entries:
        if e.encoding == "joined" and units:
            units[-1].append(e)
        else:
            units.append([e])
    return units


def _decode_unit(
    unit: Sequence[TensorDelta], bases: Sequence[_Bytes], blob: bytes, *, undo: bool = False
) -> list[_Bytes]:
    """Rebuild the new raw bytes of a unit's tensors (with ``undo``: the base bytes from the new)."""
    if len(unit) == 1:
        return [_decode_tensor(unit[0], bases[0], blob, undo=undo)]
    head = unit[0]
    joined = TensorDelta(
        head.name, head.dtype, (sum(e.numel for e in unit),), head.encoding, head.offset, head.length,
        sum(e.changed for e in unit),
    )  # fmt: skip
    rebuilt = _decode_tensor(joined, np.concatenate(bases), blob, undo=undo)
    out: list[_Bytes] = []
    pos = 0
    for e, base in zip(unit, bases, strict=True):
        part = rebuilt[pos : pos + e.raw_bytes]
        pos += e.raw_bytes
        if int(np.count_nonzero(_words(part, e.itemsize) ^ _words(base, e.itemsize))) != e.changed:
            raise _miscount(e)
        out.append(part)
    return out


def _validate_tiling(entries: Sequence[TensorDelta], total: int, where: str) -> None:
    offset = 0
    for e in entries:
        if e.offset != offset or e.length < 0:
            raise DeltaError(f"{where} is corrupt: tensor {e.name!r} does not start where the previous blob ends")
        if not 0 <= e.changed <= e.numel:
            raise DeltaError(f"{where} is corrupt: tensor {e.name!r} has {e.changed} changed of {e.numel}")
        if e.encoding == "planes" and e.itemsize == 1:
            raise DeltaError(f"{where} is corrupt: tensor {e.name!r} of 1-byte words has a planes entry")
        offset += e.length
    for unit in _units(entries):
        head = unit[0]
        stored = head.encoding not in ("zero", "joined")
        if (
            stored != (head.length > 0)
            or (head.encoding == "zero" and head.changed)
            or (stored and not sum(e.changed for e in unit))
            or head.encoding == "joined"
            or (len(unit) > 1 and not stored)
            or any(e.length or e.itemsize != head.itemsize for e in unit[1:])
        ):
            raise DeltaError(f"{where} is corrupt: tensor {head.name!r} has an inconsistent {head.encoding} entry")
    if offset != total:
        raise DeltaError(f"{where} describes {offset} bytes of blobs but {DELTA_BIN} holds {total}")


# --------------------------------------------------------------------------------------------
# In-memory API
# --------------------------------------------------------------------------------------------


class _BytesSink:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(data)


def encode_delta(base: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor], *, level: int = 3) -> DeltaBlob:
    """Encode the change from ``base`` to ``new`` in memory.

    Args:
        base: Base tensors.
        new: New tensors: the same names, shapes and dtypes as ``base`` (any device).
        level: zstd level, 1-22 (1-3 recommended: higher levels gain little at a large cost).

    Returns:
        The delta; :func:`decode_delta` with the same base rebuilds ``new`` bit for bit.

    Raises:
        DeltaError: If names, shapes or dtypes differ, or a dtype is unsupported.
        ValueError: If ``level`` is out of range.
    """
    _check_host()
    _check_level(level)
    base_meta = {n: (_tensor_code(n, t, "base"), tuple(t.shape)) for n, t in base.items()}
    codes = _check_match(base_meta, new)
    base_hasher = _WeightsHasher()

    def base_iter() -> Iterator[tuple[str, _Bytes]]:
        for name in sorted(base):
            raw = _tensor_bytes(base[name])
            base_hasher.add(name, base_meta[name][0], base_meta[name][1], raw)
            yield name, raw

    sink = _BytesSink()
    entries, new_sha = _encode_all(base_iter(), new, codes, level, sink)
    return DeltaBlob(tuple(entries), b"".join(sink.parts), base_hasher.hexdigest(), new_sha, level)


def decode_delta(base: Mapping[str, torch.Tensor], blob: DeltaBlob) -> dict[str, torch.Tensor]:
    """Apply an in-memory delta to ``base``, returning new tensors (``base`` is not modified).

    Args:
        base: The base tensors the delta was made against.
        blob: A delta from :func:`encode_delta`.

    Returns:
        The new tensors (on CPU, in name order), equal bit for bit to those encoded.

    Raises:
        DeltaError: If ``base`` is not the base the delta was made against, or the delta is corrupt.
    """
    _check_host()
    base_sha = weights_sha256(base)
    if base_sha != blob.base_weights_sha256:
        raise DeltaError(
            f"delta was made against base weights sha256 {blob.base_weights_sha256}, "
            f"but these base weights are {base_sha}"
        )
    _validate_tiling(blob.tensors, len(blob.data), "the delta")
    hasher = _WeightsHasher()
    out: dict[str, torch.Tensor] = {}
    for unit in _units(blob.tensors):
        head = unit[0]
        raws = _decode_unit(
            unit, [_tensor_bytes(base[e.name]) for e in unit], blob.data[head.offset : head.offset + head.length]
        )
        for e, raw in zip(unit, raws, strict=True):
            hasher.add(e.name, e.dtype, e.shape, raw)
            out[e.name] = _to_tensor(raw, e.dtype, e.shape)
    if hasher.hexdigest() != blob.new_sha256:
        raise DeltaError("the rebuilt weights do not match the delta's new_sha256: the delta is corrupt")
    return out


class _HasStateDict(Protocol):
    def state_dict(self) -> Mapping[str, torch.Tensor]: ...


def apply_delta_inplace(
    target: MutableMapping[str, torch.Tensor] | _HasStateDict,
    delta: DeltaBlob | Path | str,
    *,
    progress: Progress | None = None,
) -> DeltaStats:
    """Apply a delta to weights already in memory, changing their tensors in place.

    For a serving replica that holds the base weights (a ``safetensors``-style dict of tensors, a
    ``torch.nn.Module`` such as a loaded transformers model, or anything with ``state_dict()``
    whose tensors share storage with the live weights): it is updated without reading a full
    base from disk. Tensors may live on any device; each changed one is copied to the CPU,
    rebuilt there and copied back. Tensors the delta does not name (for example a tied
    ``lm_head.weight``) are left alone; a tied tensor named once is updated once.

    The base is checked first (the canonical hash of the named tensors must equal the delta's
    ``base_weights_sha256``), then every blob as it is decoded, then the canonical hash of the
    result. If any check fails after some tensors were changed, those tensors are restored bit
    for bit before :class:`DeltaError` is raised, so the weights are either the new ones or the
    untouched base. Readers of the weights (a sampler) must pause while this runs.

    Args:
        target: The base weights, updated in place.
        delta: A delta directory written by :func:`write_delta` (version 1 or 2), or a
            :class:`DeltaBlob` from :func:`encode_delta`.
        progress: Called with each tensor's size in bytes once it is applied.

    Returns:
        Statistics of the applied delta.

    Raises:
        DeltaError: If the weights are not the delta's base (names, dtypes, shapes or values),
            two named tensors share memory, or the delta is missing or corrupt.
    """
    _check_host()
    tensors: Mapping[str, torch.Tensor] = (
        target.state_dict() if not isinstance(target, Mapping) else target  # type: ignore[union-attr]
    )
    with _Source(delta) as src:
        missing = [e.name for e in src.entries if e.name not in tensors]
        if missing:
            raise DeltaError(f"the weights lack tensors the delta changes: {_fmt_names(missing)}")
        named = {e.name: tensors[e.name] for e in src.entries}
        for e in src.entries:
            t = named[e.name]
            code = _tensor_code(e.name, t, "target")
            if (code, tuple(t.shape)) != (e.dtype, e.shape):
                raise DeltaError(
                    f"tensor {e.name!r} is {code} {list(t.shape)} in the weights but {e.dtype} {list(e.shape)} "
                    "in the delta"
                )
        _check_no_shared_memory(named)
        have = weights_sha256(named)
        if have != src.base_weights_sha256:
            raise DeltaError(
                f"delta was made against base weights sha256 {src.base_weights_sha256}, but these weights are {have}"
            )
        applied: list[list[TensorDelta]] = []
        try:
            hasher = _WeightsHasher()
            for unit in _units(src.entries):
                raws = [_tensor_bytes(named[e.name]) for e in unit]
                if unit[0].length:
                    raws = _decode_unit(unit, raws, src.blob(unit[0]))
                    for e, raw in zip(unit, raws, strict=True):
                        _write_into(named[e.name], raw)
                    applied.append(unit)
                for e, raw in zip(unit, raws, strict=True):
                    hasher.add(e.name, e.dtype, e.shape, raw)
                    if progress is not None:
                        progress(e.raw_bytes)
            if hasher.hexdigest() != src.new_sha256:
                raise DeltaError(f"the rebuilt weights do not match new_sha256 of {src.where}: the delta is corrupt")
        except BaseException:
            for unit in reversed(applied):  # every blob here decoded once already, so it decodes again
                raws = [_tensor_bytes(named[e.name]) for e in unit]
                for e, raw in zip(unit, _decode_unit(unit, raws, src.blob(unit[0]), undo=True), strict=True):
                    _write_into(named[e.name], raw)
            raise
        return DeltaStats.from_entries(src.entries, manifest_bytes=src.manifest_bytes)


def _check_no_shared_memory(tensors: Mapping[str, torch.Tensor]) -> None:
    seen: dict[tuple[torch.device, int], str] = {}
    for name, t in tensors.items():
        if t.numel() == 0:
            continue
        key = (t.device, t.data_ptr())
        if key in seen:
            raise DeltaError(
                f"tensors {seen[key]!r} and {name!r} share memory in the weights, but the delta changes each "
                "separately; pass a mapping with one of them"
            )
        seen[key] = name


def _write_into(tensor: torch.Tensor, raw: _Bytes) -> None:
    """Copy raw bytes of the tensor's dtype and shape into ``tensor`` (any device), bit for bit."""
    src = torch.from_numpy(raw).view(tensor.dtype).reshape(tensor.shape)
    with torch.no_grad():
        tensor.copy_(src)


def xor_zstd_baseline_size(
    base: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor], *, level: int = 3, per_tensor: bool = False
) -> int:
    """Return the size of the plain XOR+zstd baseline on the same weights (for comparisons).

    Args:
        base: Base tensors.
        new: New tensors (same names, shapes and dtypes).
        level: zstd level.
        per_tensor: Compress each tensor's XOR as its own frame (summing the sizes, unchanged
            tensors included) instead of one frame over all XOR bytes concatenated in name order.

    Returns:
        Compressed size in bytes.

    Raises:
        DeltaError: If names, shapes or dtypes differ.
    """
    base_meta = {n: (_tensor_code(n, t, "base"), tuple(t.shape)) for n, t in base.items()}
    codes = _check_match(base_meta, new)
    xors = []
    for name in sorted(new):
        width = _DTYPES[codes[name]][1]
        xors.append(np.bitwise_xor(_words(_tensor_bytes(base[name]), width), _words(_tensor_bytes(new[name]), width)))
    if per_tensor:
        return sum(len(_compress(level, x.view(np.uint8))) for x in xors)
    stream = np.concatenate([x.view(np.uint8) for x in xors]) if xors else np.zeros(0, np.uint8)
    return len(_compress(level, stream))


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """Flush a directory to disk so renames and new entries in it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _front_code(names: Sequence[str]) -> tuple[list[int], list[str]]:
    """Front-code sorted names: (characters shared with the previous name, the rest)."""
    prefix: list[int] = []
    suffix: list[str] = []
    previous = ""
    for name in names:
        shared = 0
        limit = min(len(previous), len(name))
        while shared < limit and previous[shared] == name[shared]:
            shared += 1
        prefix.append(shared)
        suffix.append(name[shared:])
        previous = name
    return prefix, suffix


def _front_decode(prefix: Sequence[Any], suffix: Sequence[Any], where: str) -> list[str]:
    """Invert :func:`_front_code`, checking every item."""
    names: list[str] = []
    previous = ""
    for i, (shared, rest) in enumerate(zip(prefix, suffix, strict=True)):
        if not isinstance(rest, str) or not isinstance(shared, int) or not 0 <= shared <= len(previous):
            raise DeltaError(f"{where} is corrupt: the name of tensor {i} is malformed")
        previous = previous[:shared] + rest
        names.append(previous)
    return names


def _index_frame(entries: Sequence[TensorDelta]) -> bytes:
    """The index of a version 2 delta: column lists as compact JSON, one zstd frame."""
    prefix, suffix = _front_code([e.name for e in entries])
    columns = {
        "name_prefix": prefix,
        "name_suffix": suffix,
        "dtypes": [e.dtype for e in entries],
        "shapes": [list(e.shape) for e in entries],
        "encodings": [e.encoding for e in entries],
        "lengths": [e.length for e in entries],
        "changed": [e.changed for e in entries],
    }
    text = json.dumps(columns, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return _compress(_INDEX_LEVEL, np.frombuffer(text, dtype=np.uint8))


def write_delta(
    base_file: Path, new_tensors: Mapping[str, torch.Tensor], out_dir: Path, *, level: int = 3
) -> DeltaStats:
    """Write a delta of ``new_tensors`` against the safetensors file ``base_file`` into ``out_dir``.

    Everything is checked before anything is written. ``delta.bin`` is streamed tensor by tensor
    (tensors may live on an accelerator; one at a time is copied to the CPU), the index appended
    and the file fsynced, then ``delta.json`` is written and fsynced, then ``out_dir``. Existing
    files of those names are overwritten. The directory is not committed atomically: write into a
    temporary directory and rename it.

    Args:
        base_file: The base weights file (safetensors).
        new_tensors: New tensors with exactly the base file's names, shapes and dtypes.
        out_dir: Directory to write ``delta.bin`` and ``delta.json`` into; created if missing.
        level: zstd level, 1-22 (1-3 recommended).

    Returns:
        Statistics of the written delta (``total_bytes`` is the size of the whole directory).

    Raises:
        DeltaError: If the base file is missing or malformed, or names, shapes or dtypes differ.
        ValueError: If ``level`` is out of range.
        OSError: If writing fails.
    """
    _check_host()
    _check_level(level)
    base_file, out_dir = Path(base_file), Path(out_dir)
    sf = _SafetensorsFile(base_file)
    codes = _check_match({n: (t.dtype, t.shape) for n, t in sf.tensors.items()}, new_tensors)
    base_hasher = _WeightsHasher()

    def base_iter() -> Iterator[tuple[str, _Bytes]]:
        for name in sorted(sf.tensors):
            raw = sf.raw(name)
            base_hasher.add(name, sf.tensors[name].dtype, sf.tensors[name].shape, raw)
            yield name, raw

    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / DELTA_BIN).open("wb") as f:
        sink = _HashingWriter(f)
        entries, new_sha = _encode_all(base_iter(), new_tensors, codes, level, sink)
        index = _index_frame(entries)
        sink.write(index)
        f.flush()
        os.fsync(f.fileno())
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "base_weights_sha256": base_hasher.hexdigest(),
        "new_sha256": new_sha,
        "zstd_level": level,
        "blobs_size": sum(e.length for e in entries),
        "index_size": len(index),
        "delta_bin_sha256": sink.hexdigest(),
    }
    text = json.dumps(header, separators=(",", ":")) + "\n"
    with (out_dir / DELTA_JSON).open("w", encoding="utf-8") as jf:
        jf.write(text)
        jf.flush()
        os.fsync(jf.fileno())
    fsync_dir(out_dir)
    return DeltaStats.from_entries(entries, manifest_bytes=len(text.encode("utf-8")) + len(index))


class _HashingWriter:
    """Writes to a file and hashes what it writes (sha256)."""

    def __init__(self, f: Any) -> None:
        self._f, self._h = f, hashlib.sha256()

    def write(self, data: bytes) -> None:
        self._h.update(data)
        self._f.write(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _sha_field(value: Any, what: str, where: str = DELTA_JSON) -> str:
    if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise DeltaError(f"{where} is corrupt: {what} is not a sha256 hex digest")
    return value


def _int_field(value: Any, what: str, where: str = DELTA_JSON) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise DeltaError(f"{where} is corrupt: {what} is not a non-negative integer")
    return value


def _entry(
    name: Any, dtype: Any, shape: Any, encoding: Any, *, known: Sequence[str], where: str, index: int
) -> tuple[str, str, tuple[int, ...], Encoding]:
    """Validate one tensor's name, dtype, shape and encoding as read from a manifest."""
    if not isinstance(name, str):
        raise DeltaError(f"{where} is corrupt: tensor {index} has no name")
    what = f"tensor {name!r}"
    if dtype not in _DTYPES:
        raise DeltaError(f"{where}: {what} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list):
        raise DeltaError(f"{where} is corrupt: {what} has no shape")
    if encoding not in known:
        raise DeltaError(f"{where}: {what} has unknown encoding {encoding!r} (known: {', '.join(known)})")
    dims = tuple(_int_field(d, f"a dimension of {what}", where) for d in shape)
    return name, cast(str, dtype), dims, cast(Encoding, encoding)


def _parse_v1_entry(raw: Any, index: int) -> TensorDelta:
    if not isinstance(raw, dict):
        raise DeltaError(f"{DELTA_JSON} is corrupt: tensors[{index}] is not an object")
    name, dtype, shape, encoding = _entry(
        raw.get("name"),
        raw.get("dtype"),
        raw.get("shape"),
        raw.get("encoding"),
        known=_V1_ENCODINGS,
        where=DELTA_JSON,
        index=index,
    )
    what = f"tensor {name!r}"
    return TensorDelta(
        name=name,
        dtype=dtype,
        shape=shape,
        encoding=encoding,
        offset=_int_field(raw.get("offset"), f"the offset of {what}"),
        length=_int_field(raw.get("length"), f"the length of {what}"),
        changed=_int_field(raw.get("changed"), f"the changed count of {what}"),
        sha256=_sha_field(raw.get("sha256"), f"the sha256 of {what}"),
    )


@dataclass(frozen=True)
class _Manifest:
    version: int
    base_sha256: str | None  # version 1: sha256 of the base file
    base_weights_sha256: str
    new_sha256: str
    level: int
    blobs_size: int
    index_size: int
    manifest_bytes: int  # delta.json plus the index
    tensors: tuple[TensorDelta, ...]


def read_manifest(delta_dir: Path) -> tuple[dict[str, Any], tuple[TensorDelta, ...]]:
    """Read and validate the header and index of a delta directory.

    Args:
        delta_dir: A directory written by :func:`write_delta` (version 1 or 2).

    Returns:
        ``(header, tensors)``: the header fields (``format``, ``version``,
        ``base_weights_sha256``, ``new_sha256``, ``zstd_level``, ``blobs_size``, ``index_size``,
        ``manifest_bytes``, and ``base_sha256`` for version 1) and the per-tensor entries in order.

    Raises:
        DeltaError: If ``delta.json`` or ``delta.bin`` is missing, of another format or version,
            truncated or inconsistent.
    """
    m = _read_manifest(Path(delta_dir))
    header: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": m.version,
        "base_weights_sha256": m.base_weights_sha256,
        "new_sha256": m.new_sha256,
        "zstd_level": m.level,
        "blobs_size": m.blobs_size,
        "index_size": m.index_size,
        "manifest_bytes": m.manifest_bytes,
    }
    if m.base_sha256 is not None:
        header["base_sha256"] = m.base_sha256
    return header, m.tensors


def _read_manifest(delta_dir: Path) -> _Manifest:
    path = delta_dir / DELTA_JSON
    try:
        text = path.read_bytes()
        data = json.loads(text.decode("utf-8"))
    except FileNotFoundError:
        raise DeltaError(f"{delta_dir} is not a delta: {DELTA_JSON} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeltaError(f"{path} is corrupt: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise DeltaError(f"{path} is not a {FORMAT_NAME} manifest")
    version = data.get("version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise DeltaError(
            f"{path} has format version {version!r}; this reader supports versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (upgrade trainer-ckpt to read it)"
        )
    level = data.get("zstd_level")
    level = level if isinstance(level, int) else 0
    base_weights = _sha_field(data.get("base_weights_sha256"), "base_weights_sha256")
    new_sha = _sha_field(data.get("new_sha256"), "new_sha256")
    bin_path = delta_dir / DELTA_BIN
    if version == 1:
        tensors = data.get("tensors")
        if not isinstance(tensors, list):
            raise DeltaError(f"{path} is corrupt: tensors is not a list")
        entries = tuple(_parse_v1_entry(t, i) for i, t in enumerate(tensors))
        base_sha: str | None = _sha_field(data.get("base_sha256"), "base_sha256")
        blobs_size, index_size = _int_field(data.get("delta_bin_size"), "delta_bin_size"), 0
        _check_bin_size(bin_path, blobs_size)
    else:
        base_sha = None
        blobs_size = _int_field(data.get("blobs_size"), "blobs_size")
        index_size = _int_field(data.get("index_size"), "index_size")
        bin_sha = _sha_field(data.get("delta_bin_sha256"), "delta_bin_sha256")
        entries = _read_index(bin_path, blobs_size, index_size, bin_sha)
    names = [e.name for e in entries]
    if names != sorted(set(names)):
        raise DeltaError(f"{path if version == 1 else 'the index'} is corrupt: tensor names are not sorted and unique")
    _validate_tiling(entries, blobs_size, DELTA_JSON if version == 1 else f"the index of {DELTA_BIN}")
    return _Manifest(
        version=version,
        base_sha256=base_sha,
        base_weights_sha256=base_weights,
        new_sha256=new_sha,
        level=level,
        blobs_size=blobs_size,
        index_size=index_size,
        manifest_bytes=len(text) + index_size,
        tensors=entries,
    )


def _check_bin_size(bin_path: Path, expected: int) -> None:
    try:
        size = bin_path.stat().st_size
    except FileNotFoundError:
        raise DeltaError(f"{bin_path.parent} is not a delta: {DELTA_BIN} is missing") from None
    if size != expected:
        state = "truncated" if size < expected else "corrupt"
        raise DeltaError(f"{bin_path} is {state}: {size} bytes, but {DELTA_JSON} expects {expected}")


def _read_index(bin_path: Path, blobs_size: int, index_size: int, sha256: str) -> tuple[TensorDelta, ...]:
    """Check a version 2 ``delta.bin``'s size and sha256, then read and validate its index."""
    _check_bin_size(bin_path, blobs_size + index_size)
    where = f"the index of {bin_path}"
    with bin_path.open("rb") as f:
        have = hashlib.file_digest(f, "sha256").hexdigest()
        if have != sha256:
            raise DeltaError(f"{bin_path} is corrupt: its sha256 is {have}, but {DELTA_JSON} expects {sha256}")
        f.seek(blobs_size)
        frame = f.read(index_size)
    try:
        size = zstandard.get_frame_parameters(frame).content_size
        if not 0 <= size <= _MAX_INDEX_BYTES:
            raise DeltaError(f"{where} is corrupt: it claims {size} bytes")
        text = zstandard.ZstdDecompressor().decompress(frame, max_output_size=size, allow_extra_data=False)
        columns = json.loads(text.decode("utf-8"))
    except (zstandard.ZstdError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeltaError(f"{where} is corrupt: {exc}") from None
    keys = ("name_prefix", "name_suffix", "dtypes", "shapes", "encodings", "lengths", "changed")
    if not isinstance(columns, dict) or not all(isinstance(columns.get(k), list) for k in keys):
        raise DeltaError(f"{where} is corrupt: it lacks the lists {', '.join(keys)}")
    count = len(columns["name_prefix"])
    if any(len(columns[k]) != count for k in keys):
        raise DeltaError(f"{where} is corrupt: its lists differ in length")
    columns["names"] = _front_decode(columns["name_prefix"], columns["name_suffix"], where)
    entries: list[TensorDelta] = []
    offset = 0
    for i in range(count):
        name, dtype, shape, encoding = _entry(
            columns["names"][i], columns["dtypes"][i], columns["shapes"][i], columns["encodings"][i],
            known=ENCODINGS, where=where, index=i,
        )  # fmt: skip
        length = _int_field(columns["lengths"][i], f"the length of tensor {name!r}", where)
        changed = _int_field(columns["changed"][i], f"the changed count of tensor {name!r}", where)
        entries.append(TensorDelta(name, dtype, shape, encoding, offset, length, changed))
        offset += length
    return tuple(entries)


class _Source:
    """The tensors, hashes and blobs of a delta directory (memory-mapped) or of a :class:`DeltaBlob`."""

    def __init__(self, delta: DeltaBlob | Path | str) -> None:
        self._mmap: mmap.mmap | None = None
        self.base_sha256: str | None = None
        if isinstance(delta, DeltaBlob):
            _validate_tiling(delta.tensors, len(delta.data), "the delta")
            self.entries, self.base_weights_sha256, self.new_sha256 = (
                delta.tensors,
                delta.base_weights_sha256,
                delta.new_sha256,
            )
            self.where, self.manifest_bytes, self._data = "the delta", 0, delta.data
            return
        delta_dir = Path(delta)
        m = _read_manifest(delta_dir)
        self.entries, self.base_weights_sha256, self.new_sha256 = m.tensors, m.base_weights_sha256, m.new_sha256
        self.base_sha256, self.where, self.manifest_bytes = m.base_sha256, DELTA_JSON, m.manifest_bytes
        self.path = delta_dir / DELTA_BIN
        self._data = b""
        if m.blobs_size:
            with self.path.open("rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if len(self._mmap) != m.blobs_size + m.index_size:  # pragma: no cover - changed while reading
                raise DeltaError(f"{self.path} changed size while being read")

    def blob(self, e: TensorDelta) -> bytes:
        data = self._mmap if self._mmap is not None else self._data
        return data[e.offset : e.offset + e.length]

    def close(self) -> None:
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def apply_delta(base_file: Path, delta_dir: Path, *, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Rebuild the new tensors from the base weights file and a delta directory.

    Checks, in order: the header and index, the base (its canonical hash; for a version 1 delta
    the sha256 of the file), so a wrong base is refused before any decoding; then every blob
    (zstd frame and checksum, exact size, changed count) and finally the canonical hash of the
    whole result.

    Args:
        base_file: The base weights file (safetensors) the delta was made against.
        delta_dir: A directory written by :func:`write_delta` (version 1 or 2).
        progress: Called with each tensor's size in bytes once it is rebuilt.

    Returns:
        The new tensors on CPU, in name order, equal bit for bit to those given to :func:`write_delta`.

    Raises:
        DeltaError: If the base is not the one the delta was made against, or the delta is
            missing, truncated or corrupt. The message names the file or tensor at fault.
    """
    _check_host()
    base_file, delta_dir = Path(base_file), Path(delta_dir)
    with _Source(delta_dir) as src:
        sf = _SafetensorsFile(base_file)
        if src.base_sha256 is not None:
            if sf.sha256 != src.base_sha256:
                raise DeltaError(f"delta was made against base sha256 {src.base_sha256}, but this base is {sf.sha256}")
        else:
            have = _file_weights_sha256(sf)
            if have != src.base_weights_sha256:
                raise DeltaError(
                    f"delta was made against base weights sha256 {src.base_weights_sha256}, "
                    f"but {base_file} holds weights {have}"
                )
        if sorted(sf.tensors) != [e.name for e in src.entries] or any(
            (sf.tensors[e.name].dtype, sf.tensors[e.name].shape) != (e.dtype, e.shape) for e in src.entries
        ):  # the base hash matched, so the manifest lies about the tensors
            raise DeltaError(f"the delta's index lists other tensors than the base file {base_file}: it is corrupt")
        hasher = _WeightsHasher()
        out: dict[str, torch.Tensor] = {}
        for unit in _units(src.entries):
            for e, raw in zip(unit, _decode_unit(unit, [sf.raw(e.name) for e in unit], src.blob(unit[0])), strict=True):
                hasher.add(e.name, e.dtype, e.shape, raw)
                out[e.name] = _to_tensor(raw, e.dtype, e.shape)
                if progress is not None:
                    progress(e.raw_bytes)
    if hasher.hexdigest() != src.new_sha256:
        raise DeltaError(f"the rebuilt weights do not match new_sha256 of {DELTA_JSON}: the delta is corrupt")
    return out


def _is_weights_file(name: str) -> bool:
    return (
        name.endswith(".safetensors")
        or name.endswith(".safetensors.index.json")
        or (name.startswith("pytorch_model") and name.endswith((".bin", ".bin.index.json")))
    )


def apply_delta_to_dir(
    base_dir: Path,
    delta_dir: Path,
    out_dir: Path,
    *,
    skip: Collection[str] = ("manifest.json",),
    progress: Progress | None = None,
) -> Path:
    """Write a complete Hugging Face model directory holding the new weights.

    Rebuilds the weights with :func:`apply_delta` from ``base_dir/model.safetensors``, copies
    every other file and folder of ``base_dir`` (config, generation config, tokenizer files; not
    other weights files and not the names in ``skip``), and writes ``model.safetensors`` with the
    base file's safetensors metadata (``{"format": "pt"}`` when it had none). Everything is
    written into a temporary sibling of ``out_dir`` which is renamed to ``out_dir`` at the end, so
    ``out_dir`` appears complete or not at all.
    ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads the result.

    Args:
        base_dir: Base model directory with a single ``model.safetensors``.
        delta_dir: Delta directory made against ``base_dir/model.safetensors``.
        out_dir: Output directory; must not exist (or be an empty directory).
        skip: File names in ``base_dir`` not to copy (by default the checkpoint store's
            ``manifest.json``, which describes the base, not the result).
        progress: Passed to :func:`apply_delta`.

    Returns:
        ``out_dir``.

    Raises:
        DeltaError: If the base directory has no ``model.safetensors``, ``out_dir`` exists and
            is not empty, or :func:`apply_delta` fails.
        OSError: If copying or writing fails.
    """
    from safetensors.torch import save_file

    base_dir, delta_dir, out_dir = Path(base_dir), Path(delta_dir), Path(out_dir)
    base_file = base_dir / WEIGHTS_FILE
    if not base_file.is_file():
        raise DeltaError(f"{base_dir} has no {WEIGHTS_FILE} (only single-file weights are supported)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DeltaError(f"output directory {out_dir} already exists; choose a new one")
    tensors = apply_delta(base_file, delta_dir, progress=progress)
    metadata = _SafetensorsFile(base_file).metadata or {"format": "pt"}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for src in sorted(base_dir.iterdir()):
            if _is_weights_file(src.name) or src.name in skip:
                continue
            if src.is_dir():
                shutil.copytree(src, tmp / src.name)
            else:
                shutil.copy2(src, tmp / src.name)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                with path.open("rb") as fh:
                    os.fsync(fh.fileno())
        tmp.chmod(0o755)
        fsync_dir(tmp)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out_dir.parent)
    return out_dir
