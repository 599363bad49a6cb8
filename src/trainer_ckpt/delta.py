"""Lossless DELTA checkpoints: XOR of bit patterns against a base, compressed with zstd.

A delta records how a set of tensors (the *new* weights) differs from a *base* set with the same
names, shapes and dtypes, such that applying it to the base rebuilds the new tensors **bit for
bit**. For each tensor, the bit patterns are XORed word by word (a word being one element, viewed
as an unsigned integer of the element's width: 2 bytes for bf16/fp16, 4 for fp32, ...); the XOR
is zero wherever a value did not change and otherwise has mostly zero high bytes (sign, exponent
and high mantissa bits rarely change in a training step), which compresses well.

On-disk format (a delta directory)
----------------------------------

``delta.bin``
    The compressed blobs of all tensors, concatenated in ``delta.json`` order with no padding,
    header or gaps. Each non-empty blob is exactly one zstd frame (with content size and content
    checksum) produced by ``zstandard`` at the recorded level.

``delta.json`` (UTF-8 JSON object, written after ``delta.bin``)
    ``format``
        ``"trainer-ckpt-delta"``.
    ``version``
        ``1``.
    ``base_sha256``
        sha256 of the bytes of the base weights *file* (a safetensors file) the delta was made
        against; :func:`apply_delta` refuses any other base.
    ``base_weights_sha256`` / ``new_sha256``
        :func:`weights_sha256` of the base and the new tensors (a canonical hash that does not
        depend on how a safetensors file orders or aligns its tensors, see below).
    ``zstd_level``
        The zstd compression level used (informational).
    ``delta_bin_size``
        Size of ``delta.bin`` in bytes.
    ``tensors``
        One object per tensor, sorted by name (Python ``str`` order), with ``name``, ``dtype``
        (safetensors code: ``F32``, ``BF16``, ``F16``, ...), ``shape`` (list of ints),
        ``encoding`` (see below), ``offset`` and ``length`` (the blob's byte range in
        ``delta.bin``), ``changed`` (number of words whose bits differ from the base) and
        ``sha256`` (of the new tensor's raw little-endian bytes).

Encodings of one tensor's XOR words (``n`` words of ``w`` bytes); the encoder computes every
applicable candidate and keeps the smallest (ties go to the earlier one in this list):

``zero``
    The XOR is all zeros (the tensor is unchanged): nothing is stored, ``length == 0``.
``xor``
    ``zstd(xor words as raw little-endian bytes)``: the plain XOR+zstd baseline.
``planes``
    ``zstd(plane 0 || plane 1 || ... || plane w-1)`` where plane ``k`` holds byte ``k`` (in
    little-endian order) of every word, in element order. Only for ``w > 1``.
``sparse``
    ``zstd(planes(gaps) || planes(values))`` with ``changed`` entries each: ``values`` are the
    nonzero XOR words in element order and ``gaps`` the distances between their flat indices,
    ``gap[0] = idx[0]``, ``gap[i] = idx[i] - idx[i-1] - 1``, as ``uint32`` (``uint64`` for
    tensors of more than 2**32 elements), byte-planed like ``planes``.

Invariants
----------

- Lossless: ``apply_delta(base, write_delta(base, new))`` equals ``new`` bit for bit (NaN
  payloads, signed zeros and subnormals included), for every supported dtype.
- Never larger than plain XOR+zstd per tensor: each tensor is stored with the smallest of its
  candidates, and ``xor`` (that baseline) is always one of them.
- Deterministic: equal inputs and level give byte-identical ``delta.bin`` and ``delta.json``
  (for a given zstd library version). The candidates of large tensors are compressed
  concurrently on a small thread pool; that changes the speed, never the bytes.
- Verified: applying checks the base file's sha256 before anything else, that the blobs tile
  ``delta.bin`` exactly, that every zstd frame decodes (checksum included) to exactly the expected
  size, the sha256 of every rebuilt tensor and finally :func:`weights_sha256` of the whole
  result. Any mismatch, truncation or flipped byte raises :class:`DeltaError`; a wrong result is
  never returned.
- Bounded: decoding never allocates more than a tensor's size (plus its sparse index) per blob,
  whatever ``delta.bin`` claims.
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
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, cast

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
    "WEIGHTS_FILE",
    "DeltaBlob",
    "DeltaError",
    "DeltaStats",
    "Encoding",
    "TensorDelta",
    "apply_delta",
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
FORMAT_VERSION: Final = 1
"""Value of ``version`` in ``delta.json``; readers refuse other versions."""
DELTA_BIN: Final = "delta.bin"
"""File name of the concatenated compressed blobs."""
DELTA_JSON: Final = "delta.json"
"""File name of the manifest."""
WEIGHTS_FILE: Final = "model.safetensors"
"""Name of the weights file in a Hugging Face model directory."""

Encoding = Literal["zero", "xor", "planes", "sparse"]
"""How one tensor's XOR words are stored."""
ENCODINGS: Final[tuple[Encoding, ...]] = ("zero", "xor", "planes", "sparse")
"""All encodings, in tie-break order (an earlier one wins a tie in size)."""

_HASH_PREFIX: Final = b"trainer-ckpt-weights-v1\n"
_U64: Final = struct.Struct("<Q")
_MIN_LEVEL: Final = 1
_MAX_LEVEL: Final = 22

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

_Bytes = npt.NDArray[np.uint8]
_Words = npt.NDArray[np.unsignedinteger[Any]]


class DeltaError(Exception):
    """A delta cannot be made or applied: mismatched inputs, wrong base, or a corrupt delta."""


@dataclass(frozen=True)
class TensorDelta:
    """How one tensor is stored in a delta (one entry of ``delta.json``'s ``tensors``).

    Attributes:
        name: Tensor name.
        dtype: safetensors dtype code (``F32``, ``BF16``, ``F16``, ...).
        shape: Tensor shape.
        encoding: One of :data:`ENCODINGS`.
        offset: Start of the blob in ``delta.bin`` (or in :attr:`DeltaBlob.data`).
        length: Blob length in bytes; 0 for ``zero``.
        changed: Number of elements whose bit pattern differs from the base.
        sha256: sha256 (hex) of the new tensor's raw little-endian bytes.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    encoding: Encoding
    offset: int
    length: int
    changed: int
    sha256: str

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

    def to_json(self) -> dict[str, Any]:
        """Return the ``delta.json`` entry of this tensor."""
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "encoding": self.encoding,
            "offset": self.offset,
            "length": self.length,
            "changed": self.changed,
            "sha256": self.sha256,
        }


@dataclass(frozen=True)
class DeltaStats:
    """Summary of a delta.

    Attributes:
        tensors: Number of tensors.
        raw_bytes: Total raw size of the new tensors.
        compressed_bytes: Total size of the compressed blobs (``delta.bin``).
        manifest_bytes: Size of ``delta.json`` (0 for an in-memory :class:`DeltaBlob`).
        encodings: Number of tensors per encoding (every encoding present, possibly 0).
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
    def ratio(self) -> float:
        """``raw_bytes / compressed_bytes`` (``inf`` when nothing changed)."""
        return self.raw_bytes / self.compressed_bytes if self.compressed_bytes else math.inf

    @property
    def changed_fraction(self) -> float:
        """Fraction of elements whose bit pattern changed (0.0 for no elements)."""
        return self.changed_elements / self.total_elements if self.total_elements else 0.0

    @classmethod
    def from_entries(cls, entries: Sequence[TensorDelta], *, manifest_bytes: int = 0) -> DeltaStats:
        """Summarise a list of tensor entries.

        Args:
            entries: The tensors of a delta.
            manifest_bytes: Size of ``delta.json``, if written.

        Returns:
            The statistics.
        """
        counts: dict[str, int] = dict.fromkeys(ENCODINGS, 0)
        for e in entries:
            counts[e.encoding] += 1
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
        data: The concatenated compressed blobs (what ``delta.bin`` holds).
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


def _gap_width(numel: int) -> int:
    return 4 if numel <= 1 << 32 else 8


_PARALLEL_MIN_BYTES: Final = 1 << 20
_local = threading.local()


def _compress(level: int, data: _Bytes) -> bytes:
    """zstd-compress ``data`` into one frame with content size and checksum (a compressor per thread)."""
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return cctx.compress(data.data)


def _sparse_payload(xor: _Words, changed: int) -> _Bytes:
    """Return ``planes(gaps) || planes(values)`` of the ``changed`` nonzero words of ``xor``."""
    gap_word = _WORD[_gap_width(xor.size)]
    if changed == xor.size:  # every word changed: all gaps are 0 and the values are the XOR itself
        return np.concatenate([np.zeros(changed * np.dtype(gap_word).itemsize, np.uint8), _to_planes(xor)])
    nonzero = np.flatnonzero(xor)
    gaps = (np.diff(nonzero, prepend=-1) - 1).astype(gap_word)
    return np.concatenate([_to_planes(gaps), _to_planes(xor[nonzero])])


def _encode_tensor(
    base: _Bytes, new: _Bytes, itemsize: int, level: int, pool: ThreadPoolExecutor | None
) -> tuple[Encoding, bytes, int]:
    """Encode one tensor's change; return ``(encoding, blob, changed)``.

    Every candidate is computed (concurrently on ``pool`` for large tensors) and the smallest kept.
    """
    xor = np.bitwise_xor(_words(base, itemsize), _words(new, itemsize))
    changed = int(np.count_nonzero(xor))
    if changed == 0:
        return "zero", b"", 0
    makers: list[tuple[Encoding, Callable[[], bytes]]] = [("xor", lambda: _compress(level, xor.view(np.uint8)))]
    if itemsize > 1:
        makers.append(("planes", lambda: _compress(level, _to_planes(xor))))
    makers.append(("sparse", lambda: _compress(level, _sparse_payload(xor, changed))))
    if pool is None or xor.nbytes < _PARALLEL_MIN_BYTES:
        candidates = [(encoding, make()) for encoding, make in makers]
    else:
        futures = [(encoding, pool.submit(make)) for encoding, make in makers]
        candidates = [(encoding, future.result()) for encoding, future in futures]
    encoding, blob = min(candidates, key=lambda c: len(c[1]))  # min keeps the first of equal sizes
    return encoding, blob, changed


def _decompress(entry: TensorDelta, blob: bytes, expected: int) -> _Bytes:
    """Decompress one blob, which must be a single zstd frame of exactly ``expected`` bytes."""
    where = f"tensor {entry.name!r} (bytes {entry.offset}..{entry.offset + entry.length} of {DELTA_BIN})"
    try:
        params = zstandard.get_frame_parameters(blob)
    except zstandard.ZstdError as exc:
        raise DeltaError(f"{where} is corrupt: not a zstd frame ({exc})") from None
    if params.content_size != expected:
        raise DeltaError(f"{where} is corrupt: frame holds {params.content_size} bytes, expected {expected}")
    try:
        out = zstandard.ZstdDecompressor().decompress(blob, max_output_size=expected, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise DeltaError(f"{where} is corrupt: {exc}") from None
    if len(out) != expected:
        raise DeltaError(f"{where} is corrupt: decoded {len(out)} bytes, expected {expected}")
    return np.frombuffer(out, dtype=np.uint8)


def _decode_tensor(entry: TensorDelta, base: _Bytes, blob: bytes) -> _Bytes:
    """Rebuild one new tensor's raw bytes from its base bytes and blob; checks its sha256."""
    itemsize, numel = entry.itemsize, entry.numel
    base_words = _words(base, itemsize)
    if entry.encoding == "zero":
        new_words = base_words.copy()
    elif entry.encoding in ("xor", "planes"):
        payload = _decompress(entry, blob, numel * itemsize)
        xor = _words(payload, itemsize) if entry.encoding == "xor" else _from_planes(payload, itemsize)
        if int(np.count_nonzero(xor)) != entry.changed:
            raise DeltaError(f"tensor {entry.name!r} is corrupt: its changed count does not match {DELTA_BIN}")
        new_words = np.bitwise_xor(base_words, xor)
    else:  # sparse
        gap_width = _gap_width(numel)
        payload = _decompress(entry, blob, entry.changed * (gap_width + itemsize))
        split = entry.changed * gap_width
        gaps = _from_planes(payload[:split], gap_width)
        values = _from_planes(payload[split:], itemsize)
        if entry.changed and int(gaps.max()) >= numel:
            raise DeltaError(f"tensor {entry.name!r} is corrupt: sparse index out of range")
        index = np.cumsum(gaps.astype(np.int64) + 1) - 1
        if entry.changed and int(index[-1]) >= numel:
            raise DeltaError(f"tensor {entry.name!r} is corrupt: sparse index out of range")
        if int(np.count_nonzero(values)) != entry.changed:
            raise DeltaError(f"tensor {entry.name!r} is corrupt: a sparse value is zero")
        new_words = base_words.copy()
        new_words[index] ^= values
    raw = cast(_Bytes, new_words.view(np.uint8))
    digest = _sha256_hex(raw)
    if digest != entry.sha256:
        raise DeltaError(
            f"tensor {entry.name!r} does not match its checksum after applying the delta "
            f"(sha256 {digest}, expected {entry.sha256}): the delta or the base is corrupt"
        )
    return raw


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


def _encode_all(
    names_base: Iterator[tuple[str, _Bytes]],
    new: Mapping[str, torch.Tensor],
    codes: Mapping[str, str],
    level: int,
    sink: Any,
) -> tuple[list[TensorDelta], str]:
    """Encode tensors in the given (sorted) order, passing each blob to ``sink.write``."""
    hasher = _WeightsHasher()
    entries: list[TensorDelta] = []
    offset = 0
    workers = min(3, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="delta-encode") as pool:
        for name, base_raw in names_base:
            t = new[name]
            new_raw = _tensor_bytes(t)
            itemsize = _DTYPES[codes[name]][1]
            encoding, blob, changed = _encode_tensor(base_raw, new_raw, itemsize, level, pool if workers > 1 else None)
            shape = tuple(t.shape)
            hasher.add(name, codes[name], shape, new_raw)
            entries.append(
                TensorDelta(name, codes[name], shape, encoding, offset, len(blob), changed, _sha256_hex(new_raw))
            )
            sink.write(blob)
            offset += len(blob)
    return entries, hasher.hexdigest()


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


def _validate_tiling(entries: Sequence[TensorDelta], total: int) -> None:
    offset = 0
    for e in entries:
        if e.offset != offset or e.length < 0:
            raise DeltaError(f"{DELTA_JSON} is corrupt: tensor {e.name!r} does not start where the previous blob ends")
        if (e.encoding == "zero") != (e.length == 0) or (e.encoding == "zero") != (e.changed == 0):
            raise DeltaError(f"{DELTA_JSON} is corrupt: tensor {e.name!r} has an inconsistent {e.encoding} entry")
        if not 0 <= e.changed <= e.numel:
            raise DeltaError(f"{DELTA_JSON} is corrupt: tensor {e.name!r} has {e.changed} changed of {e.numel}")
        offset += e.length
    if offset != total:
        raise DeltaError(f"{DELTA_JSON} describes {offset} bytes of blobs but {DELTA_BIN} holds {total}")


def decode_delta(base: Mapping[str, torch.Tensor], blob: DeltaBlob) -> dict[str, torch.Tensor]:
    """Apply an in-memory delta to ``base``.

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
    _validate_tiling(blob.tensors, len(blob.data))
    hasher = _WeightsHasher()
    out: dict[str, torch.Tensor] = {}
    for e in blob.tensors:
        raw = _decode_tensor(e, _tensor_bytes(base[e.name]), blob.data[e.offset : e.offset + e.length])
        hasher.add(e.name, e.dtype, e.shape, raw)
        out[e.name] = _to_tensor(raw, e.dtype, e.shape)
    if hasher.hexdigest() != blob.new_sha256:  # pragma: no cover - implied by the per-tensor checks
        raise DeltaError("the rebuilt weights do not match the delta's new_sha256")
    return out


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


def write_delta(
    base_file: Path, new_tensors: Mapping[str, torch.Tensor], out_dir: Path, *, level: int = 3
) -> DeltaStats:
    """Write a delta of ``new_tensors`` against the safetensors file ``base_file`` into ``out_dir``.

    Everything is checked before anything is written. ``delta.bin`` is streamed tensor by tensor
    (tensors may live on an accelerator; one at a time is copied to the CPU) and fsynced, then
    ``delta.json`` is written and fsynced, then ``out_dir``. Existing files of those names are
    overwritten. The directory is not committed atomically: write into a temporary directory and
    rename it.

    Args:
        base_file: The base weights file (safetensors).
        new_tensors: New tensors with exactly the base file's names, shapes and dtypes.
        out_dir: Directory to write ``delta.bin`` and ``delta.json`` into; created if missing.
        level: zstd level, 1-22 (1-3 recommended).

    Returns:
        Statistics of the written delta.

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
        entries, new_sha = _encode_all(base_iter(), new_tensors, codes, level, f)
        f.flush()
        os.fsync(f.fileno())
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "base_sha256": sf.sha256,
        "base_weights_sha256": base_hasher.hexdigest(),
        "new_sha256": new_sha,
        "zstd_level": level,
        "delta_bin_size": sum(e.length for e in entries),
        "tensors": [e.to_json() for e in entries],
    }
    text = json.dumps(manifest, indent=1) + "\n"
    with (out_dir / DELTA_JSON).open("w", encoding="utf-8") as jf:
        jf.write(text)
        jf.flush()
        os.fsync(jf.fileno())
    fsync_dir(out_dir)
    return DeltaStats.from_entries(entries, manifest_bytes=len(text.encode("utf-8")))


def _sha_field(value: Any, what: str) -> str:
    if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise DeltaError(f"{DELTA_JSON} is corrupt: {what} is not a sha256 hex digest")
    return value


def _int_field(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise DeltaError(f"{DELTA_JSON} is corrupt: {what} is not a non-negative integer")
    return value


def _parse_entry(raw: Any, index: int) -> TensorDelta:
    if not isinstance(raw, dict):
        raise DeltaError(f"{DELTA_JSON} is corrupt: tensors[{index}] is not an object")
    name = raw.get("name")
    if not isinstance(name, str):
        raise DeltaError(f"{DELTA_JSON} is corrupt: tensors[{index}] has no name")
    what = f"tensor {name!r}"
    dtype, shape, encoding = raw.get("dtype"), raw.get("shape"), raw.get("encoding")
    if dtype not in _DTYPES:
        raise DeltaError(f"{DELTA_JSON}: {what} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list):
        raise DeltaError(f"{DELTA_JSON} is corrupt: {what} has no shape")
    if encoding not in ENCODINGS:
        raise DeltaError(f"{DELTA_JSON}: {what} has unknown encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
    return TensorDelta(
        name=name,
        dtype=dtype,
        shape=tuple(_int_field(d, f"a dimension of {what}") for d in shape),
        encoding=encoding,
        offset=_int_field(raw.get("offset"), f"the offset of {what}"),
        length=_int_field(raw.get("length"), f"the length of {what}"),
        changed=_int_field(raw.get("changed"), f"the changed count of {what}"),
        sha256=_sha_field(raw.get("sha256"), f"the sha256 of {what}"),
    )


@dataclass(frozen=True)
class _Manifest:
    base_sha256: str
    base_weights_sha256: str
    new_sha256: str
    level: int
    delta_bin_size: int
    tensors: tuple[TensorDelta, ...]


def read_manifest(delta_dir: Path) -> tuple[dict[str, Any], tuple[TensorDelta, ...]]:
    """Read and validate ``delta.json`` of a delta directory.

    Args:
        delta_dir: A directory written by :func:`write_delta`.

    Returns:
        ``(header, tensors)``: the manifest's top-level fields except ``tensors``, and the parsed
        per-tensor entries in file order.

    Raises:
        DeltaError: If the manifest is missing, not valid JSON, of another format or version, or
            inconsistent.
    """
    m = _read_manifest(Path(delta_dir))
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "base_sha256": m.base_sha256,
        "base_weights_sha256": m.base_weights_sha256,
        "new_sha256": m.new_sha256,
        "zstd_level": m.level,
        "delta_bin_size": m.delta_bin_size,
    }
    return header, m.tensors


def _read_manifest(delta_dir: Path) -> _Manifest:
    path = delta_dir / DELTA_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DeltaError(f"{delta_dir} is not a delta: {DELTA_JSON} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeltaError(f"{path} is corrupt: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise DeltaError(f"{path} is not a {FORMAT_NAME} manifest")
    if data.get("version") != FORMAT_VERSION:
        raise DeltaError(f"{path} has format version {data.get('version')!r}; this reader supports {FORMAT_VERSION}")
    tensors = data.get("tensors")
    if not isinstance(tensors, list):
        raise DeltaError(f"{path} is corrupt: tensors is not a list")
    entries = tuple(_parse_entry(t, i) for i, t in enumerate(tensors))
    names = [e.name for e in entries]
    if names != sorted(set(names)):
        raise DeltaError(f"{path} is corrupt: tensor names are not sorted and unique")
    level = data.get("zstd_level")
    m = _Manifest(
        base_sha256=_sha_field(data.get("base_sha256"), "base_sha256"),
        base_weights_sha256=_sha_field(data.get("base_weights_sha256"), "base_weights_sha256"),
        new_sha256=_sha_field(data.get("new_sha256"), "new_sha256"),
        level=level if isinstance(level, int) else 0,
        delta_bin_size=_int_field(data.get("delta_bin_size"), "delta_bin_size"),
        tensors=entries,
    )
    _validate_tiling(entries, m.delta_bin_size)
    return m


def apply_delta(base_file: Path, delta_dir: Path) -> dict[str, torch.Tensor]:
    """Rebuild the new tensors from the base weights file and a delta directory.

    Checks, in order: the manifest, the base file's sha256 (a wrong base is refused before any
    decoding), ``delta.bin``'s size, every blob (zstd frame and checksum, exact size) and every
    rebuilt tensor's sha256, then the canonical hash of the whole result.

    Args:
        base_file: The base weights file (safetensors) the delta was made against.
        delta_dir: A directory written by :func:`write_delta`.

    Returns:
        The new tensors on CPU, in name order, equal bit for bit to those given to :func:`write_delta`.

    Raises:
        DeltaError: If the base is not the one the delta was made against, or the delta is
            missing, truncated or corrupt. The message names the file or tensor at fault.
    """
    _check_host()
    base_file, delta_dir = Path(base_file), Path(delta_dir)
    m = _read_manifest(delta_dir)
    sf = _SafetensorsFile(base_file)
    if sf.sha256 != m.base_sha256:
        raise DeltaError(f"delta was made against base sha256 {m.base_sha256}, but this base is {sf.sha256}")
    if sorted(sf.tensors) != [e.name for e in m.tensors]:  # pragma: no cover - implied by the sha256
        raise DeltaError(f"{DELTA_JSON} lists other tensors than the base file {base_file}")
    bin_path = delta_dir / DELTA_BIN
    try:
        f = bin_path.open("rb")
    except FileNotFoundError:
        raise DeltaError(f"{delta_dir} is not a delta: {DELTA_BIN} is missing") from None
    hasher = _WeightsHasher()
    out: dict[str, torch.Tensor] = {}
    with f:
        size = os.fstat(f.fileno()).st_size
        if size != m.delta_bin_size:
            state = "truncated" if size < m.delta_bin_size else "corrupt"
            raise DeltaError(f"{bin_path} is {state}: {size} bytes, but {DELTA_JSON} expects {m.delta_bin_size}")
        for e in m.tensors:
            ft = sf.tensors[e.name]
            if (ft.dtype, ft.shape) != (e.dtype, e.shape):  # pragma: no cover - implied by the sha256
                raise DeltaError(f"tensor {e.name!r} differs in dtype or shape between the base and {DELTA_JSON}")
            blob = f.read(e.length)
            if len(blob) != e.length:  # pragma: no cover - file shrank while reading
                raise DeltaError(f"{bin_path} is truncated at tensor {e.name!r}")
            raw = _decode_tensor(e, sf.raw(e.name), blob)
            hasher.add(e.name, e.dtype, e.shape, raw)
            out[e.name] = _to_tensor(raw, e.dtype, e.shape)
    if hasher.hexdigest() != m.new_sha256:
        raise DeltaError(f"the rebuilt weights do not match new_sha256 of {DELTA_JSON}: the manifest is corrupt")
    return out


def _is_weights_file(name: str) -> bool:
    return (
        name.endswith(".safetensors")
        or name.endswith(".safetensors.index.json")
        or (name.startswith("pytorch_model") and name.endswith((".bin", ".bin.index.json")))
    )


def apply_delta_to_dir(
    base_dir: Path, delta_dir: Path, out_dir: Path, *, skip: Collection[str] = ("manifest.json",)
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
    tensors = apply_delta(base_file, delta_dir)
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
