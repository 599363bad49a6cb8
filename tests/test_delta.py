"""Tests for the lossless DELTA checkpoint codec (trainer_ckpt.delta) and its command line."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import zstandard
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from trainer_ckpt import (
    DELTA_BIN,
    DELTA_JSON,
    DeltaError,
    apply_delta,
    apply_delta_inplace,
    apply_delta_to_dir,
    decode_delta,
    encode_delta,
    read_manifest,
    weights_sha256,
    write_delta,
    xor_zstd_baseline_size,
)
from trainer_ckpt import delta as d
from trainer_ckpt.__main__ import main as cli_main

REPO = Path(__file__).resolve().parent.parent
LRS = (1e-6, 1e-5, 1e-4)
STEPS = (1, 10)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern as integers of the same width."""
    return t.reshape(-1).view(INT_VIEW[t.element_size()])


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name, t in a.items():
        assert t.dtype == b[name].dtype, name
        assert t.shape == b[name].shape, name
        assert torch.equal(bits(t), bits(b[name])), name


def cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype).contiguous() for k, v in tensors.items()}


# --------------------------------------------------------------------------------------------
# Fixtures: a tiny model trained with AdamW at three learning rates
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def snapshots(llama_dir: Path) -> dict[float, dict[int, dict[str, torch.Tensor]]]:
    """fp32 weights at steps 0, 1 and 10 of AdamW on random tokens, per learning rate."""
    out: dict[float, dict[int, dict[str, torch.Tensor]]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains faster on one thread, and far faster on a busy machine
    try:
        for lr in LRS:
            out[lr] = _train(llama_dir, lr)
    finally:
        torch.set_num_threads(threads)
    return out


def _train(llama_dir: Path, lr: float) -> dict[int, dict[str, torch.Tensor]]:
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    snaps = {0: {k: v.detach().clone() for k, v in model.state_dict().items()}}
    for step in range(1, max(STEPS) + 1):
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step in STEPS:
            snaps[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return snaps


@pytest.fixture
def pair(
    snapshots: dict[float, dict[int, dict[str, torch.Tensor]]], tmp_path: Path
) -> tuple[Path, dict[str, torch.Tensor], Path]:
    """(base file, new tensors, delta dir) for bf16, lr 1e-5, 10 steps; the delta is written."""
    base = cast(snapshots[1e-5][0], torch.bfloat16)
    new = cast(snapshots[1e-5][10], torch.bfloat16)
    base_file = tmp_path / "base.safetensors"
    save_file(base, str(base_file), metadata={"format": "pt"})
    delta_dir = tmp_path / "delta"
    write_delta(base_file, new, delta_dir)
    return base_file, new, delta_dir


def random_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(64, 48, generator=gen),
        "b.bias": torch.randn(48, generator=gen).to(torch.bfloat16),
        "c.half": torch.randn(33, 7, generator=gen).to(torch.float16),
        "d.double": torch.randn(20, generator=gen, dtype=torch.float64),
    }


# --------------------------------------------------------------------------------------------
# Round trips and sizes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("lr", LRS)
def test_roundtrip_after_training_is_bitwise_and_beats_baseline(
    snapshots: dict[float, dict[int, dict[str, torch.Tensor]]], tmp_path: Path, lr: float, dtype_name: str
) -> None:
    dtype = DTYPES[dtype_name]
    base = cast(snapshots[lr][0], dtype)
    base_file = tmp_path / "base.safetensors"
    save_file(base, str(base_file), metadata={"format": "pt"})
    for step in STEPS:
        new = cast(snapshots[lr][step], dtype)
        delta_dir = tmp_path / f"delta-{step}"
        stats = write_delta(base_file, new, delta_dir)
        rebuilt = apply_delta(base_file, delta_dir)
        assert_bitwise_equal(rebuilt, new)

        whole = sum(p.stat().st_size for p in delta_dir.iterdir())
        assert sorted(p.name for p in delta_dir.iterdir()) == [DELTA_BIN, DELTA_JSON]
        assert stats.total_bytes == whole
        assert stats.compressed_bytes + stats.manifest_bytes == whole
        assert stats.raw_bytes == sum(t.numel() * t.element_size() for t in new.values())
        assert stats.tensors == len(new) and sum(stats.encodings.values()) == len(new)
        assert stats.ratio == pytest.approx(stats.raw_bytes / whole)
        assert stats.compressed_bytes <= xor_zstd_baseline_size(base, new, per_tensor=True)
        assert whole <= xor_zstd_baseline_size(base, new), "the whole directory, metadata included"

        # Tensors the optimizer cannot move in bf16 within the step store nothing ("zero", or
        # "joined" to the small tensors before them); changed tensors store something.
        header, entries = read_manifest(delta_dir)
        for e in entries:
            unchanged = torch.equal(bits(base[e.name]), bits(new[e.name]))
            if e.encoding == "zero" or not unchanged:
                assert (e.encoding == "zero") == unchanged, e.name
            assert e.changed == int((bits(base[e.name]) != bits(new[e.name])).sum())
            assert e.sha256 is None  # version 2: one digest of the whole result
        assert header["version"] == 2 and "base_sha256" not in header
        assert header["manifest_bytes"] == stats.manifest_bytes
        assert header["new_sha256"] == weights_sha256(new)
        assert header["base_weights_sha256"] == weights_sha256(base)

        # The in-memory codec makes the same bytes.
        blob = encode_delta(base, new)
        assert blob.data == (delta_dir / DELTA_BIN).read_bytes()[: header["blobs_size"]]
        assert blob.tensors == entries
        assert_bitwise_equal(decode_delta(base, blob), new)


def test_encoding_choice_and_ordering() -> None:
    gen = torch.Generator().manual_seed(3)
    n = 40_000  # over 64 KiB in either dtype: coded alone, never joined to a neighbour
    base = {
        "dense32": torch.randn(n, generator=gen),
        "sparse16": torch.randn(n, generator=gen).to(torch.bfloat16),
        "same": torch.randn(100, generator=gen),
        "z_empty": torch.empty(0, 5),
        "scalar": torch.tensor(1.5),
    }
    new = {k: v.clone() for k, v in base.items()}
    new["dense32"] = base["dense32"] * (1 + 1e-5 * torch.randn(n, generator=gen))
    new["sparse16"][torch.randperm(n, generator=gen)[:20]] += 1.0
    new["scalar"] = torch.tensor(-1.5)
    blob = encode_delta(base, new, level=1)
    enc = {e.name: e.encoding for e in blob.tensors}
    assert enc == {
        "dense32": "mask-diff",
        "sparse16": "sparse-diff",
        "same": "zero",
        "z_empty": "zero",
        "scalar": "xor",
    }
    assert [e.name for e in blob.tensors] == sorted(base)
    changed = {e.name: e.changed for e in blob.tensors}
    assert changed["sparse16"] == 20 and changed["same"] == 0 and changed["scalar"] == 1
    assert_bitwise_equal(decode_delta(base, blob), new)
    assert blob.stats.encodings == {"zero": 2, "xor": 1, "planes": 0, "sparse-diff": 1, "mask-diff": 1, "joined": 0}


def test_small_tensors_are_joined_when_that_is_smaller(tmp_path: Path) -> None:
    """Hundreds of tiny tensors share blobs (runs of at most 1 MiB of one word width).

    A tensor of another word width ends a run: models that alternate dtypes tensor by tensor
    (F32 norms between BF16 weights) gain less from joining.
    """
    gen = torch.Generator().manual_seed(4)
    base = {f"layer.{i:04d}.norm": torch.randn(64, generator=gen).to(torch.bfloat16) for i in range(1500)}
    base |= {f"layer.{i:04d}.scale": torch.randn(3, generator=gen) for i in range(0, 1500, 100)}  # F32 ends runs
    base["w.big"] = torch.randn(300, 300, generator=gen).to(torch.bfloat16)  # 176 KiB: alone
    new = {k: v.clone() for k, v in base.items()}
    for name, t in new.items():
        if not name.endswith("1.norm"):  # some tensors stay unchanged inside runs
            t.reshape(-1)[::17] += 0.01
    save_file(base, str(tmp_path / "base.safetensors"))
    stats = write_delta(tmp_path / "base.safetensors", new, tmp_path / "d")
    _, entries = read_manifest(tmp_path / "d")
    units: list[list[Any]] = []
    for e in entries:
        if e.encoding == "joined":
            assert units and e.length == 0 and e.itemsize == units[-1][0].itemsize
            units[-1].append(e)
        else:
            units.append([e])
    assert len(units) < len(entries) / 3
    assert max(sum(e.raw_bytes for e in u) for u in units) <= 1 << 20
    assert next(e for e in entries if e.name == "w.big").encoding not in ("joined", "zero")
    assert_bitwise_equal(apply_delta(tmp_path / "base.safetensors", tmp_path / "d"), new)
    assert_bitwise_equal(decode_delta(base, encode_delta(base, new)), new)
    assert stats.total_bytes < 0.8 * xor_zstd_baseline_size(base, new)
    assert stats.compressed_bytes <= xor_zstd_baseline_size(base, new, per_tensor=True)


def test_identical_weights_give_an_empty_delta(tmp_path: Path) -> None:
    base = random_tensors()
    save_file(base, str(tmp_path / "base.safetensors"))
    stats = write_delta(tmp_path / "base.safetensors", base, tmp_path / "d")
    assert stats.compressed_bytes == 0 and stats.encodings["zero"] == len(base)
    header, _ = read_manifest(tmp_path / "d")
    assert header["blobs_size"] == 0 and (tmp_path / "d" / DELTA_BIN).stat().st_size == header["index_size"]
    assert_bitwise_equal(apply_delta(tmp_path / "base.safetensors", tmp_path / "d"), base)


def test_special_values_and_all_dtypes_roundtrip_bitwise(tmp_path: Path) -> None:
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-40, 3.4e38])
    payload_nan = torch.tensor([0x7FC00001, 0xFFC12345 - (1 << 32)], dtype=torch.int32).view(torch.float32)
    base = {
        "f32": torch.cat([specials, payload_nan]),
        "bf16": torch.tensor([0x7FC1, -0x0001, 0x0001, 0x8000 - (1 << 16)], dtype=torch.int16).view(torch.bfloat16),
        "f16": torch.tensor([0.0, 6e-8, 65504.0, float("nan")], dtype=torch.float16),
        "f64": torch.tensor([0.0, -0.0, 5e-324, float("nan")], dtype=torch.float64),
        "i64": torch.tensor([0, -1, 2**62], dtype=torch.int64),
        "i32": torch.tensor([5, -7], dtype=torch.int32),
        "i16": torch.tensor([300], dtype=torch.int16),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.tensor([255, 0], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
    }
    new = {k: bits(v).flip(0).view(v.dtype).reshape(v.shape).clone() for k, v in base.items()}
    new["f32"][3] = float("nan")
    new["bool"] = torch.tensor([False, False, True])
    save_file(base, str(tmp_path / "base.safetensors"))
    write_delta(tmp_path / "base.safetensors", new, tmp_path / "d")
    assert_bitwise_equal(apply_delta(tmp_path / "base.safetensors", tmp_path / "d"), new)
    assert_bitwise_equal(decode_delta(base, encode_delta(base, new)), new)


def test_new_tensors_may_be_non_contiguous_views(tmp_path: Path) -> None:
    base = {"w": torch.randn(16, 8)}
    new = {"w": (base["w"] + 1e-3).t().contiguous().t()}  # same shape, column-major strides
    assert not new["w"].is_contiguous()
    save_file(base, str(tmp_path / "base.safetensors"))
    write_delta(tmp_path / "base.safetensors", new, tmp_path / "d")
    assert_bitwise_equal(apply_delta(tmp_path / "base.safetensors", tmp_path / "d"), {"w": new["w"].contiguous()})


def test_write_is_deterministic(pair: tuple[Path, dict[str, torch.Tensor], Path], tmp_path: Path) -> None:
    base_file, new, delta_dir = pair
    write_delta(base_file, new, tmp_path / "again")
    for name in (DELTA_BIN, DELTA_JSON):
        assert (tmp_path / "again" / name).read_bytes() == (delta_dir / name).read_bytes()


def test_large_tensors_encode_concurrently_with_identical_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer_ckpt import delta as delta_module

    gen = torch.Generator().manual_seed(5)
    base = {"big": torch.randn(400_000, generator=gen), "big16": torch.randn(700_000, generator=gen).half()}
    new = {"big": base["big"] * (1 + 1e-6 * torch.randn(400_000, generator=gen)), "big16": base["big16"].clone()}
    new["big16"][::1000] += 1
    assert all(t.nbytes >= delta_module._PARALLEL_MIN_BYTES for t in base.values())
    parallel = encode_delta(base, new)
    monkeypatch.setattr(delta_module, "_PARALLEL_MIN_BYTES", 1 << 62)
    serial = encode_delta(base, new)
    assert parallel == serial
    assert {e.name: e.encoding for e in parallel.tensors} == {"big": "mask-diff", "big16": "sparse-diff"}
    assert_bitwise_equal(decode_delta(base, parallel), new)


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.uint8, torch.bool]
)
def test_every_encoding_decodes_whatever_the_encoder_would_pick(dtype: torch.dtype, dense: bool) -> None:
    """Force each encoding onto the same change and decode it (including sparse of a fully dense change)."""
    import numpy as np

    from trainer_ckpt import DeltaBlob, TensorDelta

    gen = torch.Generator().manual_seed(7)
    base_t = (torch.rand(3, 1001, generator=gen) * 200).to(dtype)  # 3003 words: the mask ends mid-byte
    new_t = base_t.clone()
    flat = bits(new_t)
    step = 1 if dense else 37
    if dtype == torch.bool:
        new_t.reshape(-1)[::step] = ~base_t.reshape(-1)[::step]
    else:
        flat[::step] ^= 1  # flips the lowest bit: every (or every 37th) word changes
        flat[1] ^= -1  # and one word changes in every bit: differences of every size
    base, new = {"t": base_t}, {"t": new_t}
    width = base_t.element_size()
    word = d._WORD[width]
    base_w, new_w = bits(base_t).numpy().view(word), bits(new_t).numpy().view(word)
    xor = np.bitwise_xor(base_w, new_w)
    changed = int(np.count_nonzero(xor))
    assert (changed == xor.size) == dense
    mask_sections, sparse_sections = d._diff_sections(base_w, new_w, xor, changed, True)
    assert sparse_sections is not None
    payloads = {
        "xor": d._compress(3, xor.view(np.uint8)),
        "planes": d._compress(3, d._to_planes(xor)),
        "sparse-diff": d._compress_sections(3, sparse_sections),
        "mask-diff": d._compress_sections(3, mask_sections),
    }
    diff = (new_w - base_w)[xor != 0]
    entry = TensorDelta("t", d._CODE_OF_TORCH[dtype], (3, 1001), "mask-diff", 0, 0, changed)  # type: ignore[arg-type]
    sections = np.concatenate(d._value_sections(diff))
    assert np.array_equal(d._values_from_sections(sections, changed, width, entry), diff)
    for encoding, payload in payloads.items():
        if encoding == "planes" and width == 1:
            continue
        entry = TensorDelta("t", d._CODE_OF_TORCH[dtype], (3, 1001), encoding, 0, len(payload), changed)  # type: ignore[arg-type]
        blob = DeltaBlob((entry,), payload, weights_sha256(base), weights_sha256(new), 3)
        assert_bitwise_equal(decode_delta(base, blob), new)


def test_bad_level_rejected(tmp_path: Path) -> None:
    base = random_tensors()
    with pytest.raises(ValueError, match="zstd level"):
        encode_delta(base, base, level=0)


# --------------------------------------------------------------------------------------------
# Mismatches, wrong bases and corruption
# --------------------------------------------------------------------------------------------


def test_name_shape_dtype_mismatches_rejected_before_writing(tmp_path: Path) -> None:
    base = random_tensors()
    base_file = tmp_path / "base.safetensors"
    save_file(base, str(base_file))
    out = tmp_path / "d"

    missing = {k: v for k, v in base.items() if k != "b.bias"}
    with pytest.raises(DeltaError, match=r"tensor names differ from the base; missing from the new weights: 'b.bias'"):
        write_delta(base_file, missing, out)
    extra = {**base, "zz": torch.zeros(1)}
    with pytest.raises(DeltaError, match=r"not in the base: 'zz'"):
        write_delta(base_file, extra, out)
    shape = {**base, "a.weight": base["a.weight"].reshape(48, 64)}
    with pytest.raises(
        DeltaError, match=re.escape("tensor 'a.weight' has shape [48, 64] in the new weights but [64, 48]")
    ):
        write_delta(base_file, shape, out)
    dtype = {**base, "b.bias": base["b.bias"].float()}
    with pytest.raises(
        DeltaError, match=re.escape("tensor 'b.bias' has dtype F32 in the new weights but BF16 in the base")
    ):
        write_delta(base_file, dtype, out)
    unsupported = {**base, "a.weight": base["a.weight"].to(torch.complex64)}
    with pytest.raises(DeltaError, match="unsupported dtype"):
        encode_delta(base, unsupported)
    with pytest.raises(DeltaError, match="missing from the new weights"):
        encode_delta(base, missing)
    assert not out.exists()  # nothing written on a mismatch
    with pytest.raises(DeltaError, match="does not exist"):
        write_delta(tmp_path / "nope.safetensors", base, out)
    with pytest.raises(DeltaError, match="is a directory"):
        write_delta(tmp_path, base, out)
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(DeltaError, match="not a safetensors file"):
        write_delta(tmp_path / "junk.safetensors", base, out)


def test_wrong_base_rejected(pair: tuple[Path, dict[str, torch.Tensor], Path], tmp_path: Path) -> None:
    base_file, _, delta_dir = pair
    other = load_file(str(base_file))
    name = sorted(other)[0]
    other[name] = other[name].clone()
    other[name].reshape(-1)[0] += 1
    other_file = tmp_path / "other.safetensors"
    save_file(other, str(other_file), metadata={"format": "pt"})
    want, got = weights_sha256(load_file(str(base_file))), weights_sha256(other)
    with pytest.raises(DeltaError) as info:
        apply_delta(other_file, delta_dir)
    assert str(info.value) == f"delta was made against base weights sha256 {want}, but {other_file} holds weights {got}"
    # The same weights saved in another tensor order and with other metadata are the same base.
    reordered = tmp_path / "reordered.safetensors"
    save_file(dict(reversed(load_file(str(base_file)).items())), str(reordered), metadata={"x": "y"})
    assert reordered.read_bytes() != base_file.read_bytes()
    assert_bitwise_equal(apply_delta(reordered, delta_dir), pair[1])
    # In memory, the base is identified by its canonical weights hash.
    blob = encode_delta(load_file(str(base_file)), pair[1])
    with pytest.raises(DeltaError, match="delta was made against base weights sha256"):
        decode_delta(other, blob)


def _apply_must_fail(base_file: Path, delta_dir: Path) -> str:
    try:
        apply_delta(base_file, delta_dir)
    except DeltaError as exc:
        return str(exc)
    raise AssertionError("a corrupt delta was applied without an error")


def test_flipped_bytes_in_delta_bin_rejected(pair: tuple[Path, dict[str, torch.Tensor], Path]) -> None:
    """Any flipped bit fails delta.bin's sha256; with a matching digest, the blob's own checks or the result's hash."""
    base_file, new, delta_dir = pair
    good = (delta_dir / DELTA_BIN).read_bytes()
    header, entries = read_manifest(delta_dir)
    stored = [e for e in entries if e.length]
    blobs_size = header["blobs_size"]
    # Frame header (magic, descriptor, content size), the middle, and the checksum at the end;
    # the same in the index after the blobs.
    positions = {e.offset + k for e in stored for k in (0, 4, 5, e.length // 2, e.length - 1)}
    positions |= {blobs_size + k for k in (0, 4, 5, header["index_size"] // 2, header["index_size"] - 1)}
    gen = torch.Generator().manual_seed(0)
    positions |= {int(i) for i in torch.randint(0, len(good), (20,), generator=gen)}
    head = json.loads((delta_dir / DELTA_JSON).read_text())
    equivalent = 0
    for i, pos in enumerate(sorted(positions)):
        for mask in (0x01, 0x80) if i % 4 == 0 else (1 << (i % 8),):
            bad = bytearray(good)
            bad[pos] ^= mask
            (delta_dir / DELTA_BIN).write_bytes(bytes(bad))
            (delta_dir / DELTA_JSON).write_text(json.dumps(head))
            assert "delta.bin is corrupt: its sha256 is" in _apply_must_fail(base_file, delta_dir)
            # A writer that hashed the corrupt bytes: the frames' checks, then the result's hash.
            (delta_dir / DELTA_JSON).write_text(
                json.dumps({**head, "delta_bin_sha256": hashlib.sha256(bad).hexdigest()})
            )
            try:
                rebuilt = apply_delta(base_file, delta_dir)
            except DeltaError as exc:
                message = str(exc)
                if pos >= blobs_size:
                    assert "the index of" in message and "is corrupt" in message, (pos, message)
                else:
                    owner = next(e for e in stored if e.offset <= pos < e.offset + e.length)
                    assert f"tensor {owner.name!r}" in message or "new_sha256" in message, (pos, message)
            else:  # a bit zstd never reads (padding, an unused table entry): the same content
                assert_bitwise_equal(rebuilt, new)
                equivalent += 1
    assert equivalent < len(positions) / 4
    (delta_dir / DELTA_BIN).write_bytes(good)
    (delta_dir / DELTA_JSON).write_text(json.dumps(head))
    apply_delta(base_file, delta_dir)


def test_truncated_or_extended_delta_bin_rejected(pair: tuple[Path, dict[str, torch.Tensor], Path]) -> None:
    base_file, _, delta_dir = pair
    good = (delta_dir / DELTA_BIN).read_bytes()
    for size in (0, 1, len(good) // 2, len(good) - 1):
        (delta_dir / DELTA_BIN).write_bytes(good[:size])
        message = _apply_must_fail(base_file, delta_dir)
        assert "is truncated" in message and f"{size} bytes" in message
    (delta_dir / DELTA_BIN).write_bytes(good + b"\0")
    assert "is corrupt" in _apply_must_fail(base_file, delta_dir)
    (delta_dir / DELTA_BIN).unlink()
    assert "delta.bin is missing" in _apply_must_fail(base_file, delta_dir)


def _read_parts(delta_dir: Path) -> tuple[dict[str, Any], bytes, dict[str, Any]]:
    """(header, blobs, index columns) of a version 2 delta, read by hand."""
    header = json.loads((delta_dir / DELTA_JSON).read_text())
    data = (delta_dir / DELTA_BIN).read_bytes()
    blobs = data[: header["blobs_size"]]
    columns = json.loads(zstandard.ZstdDecompressor().decompress(data[header["blobs_size"] :]))
    columns["names"] = d._front_decode(columns.pop("name_prefix"), columns.pop("name_suffix"), "index")
    return header, blobs, columns


def _write_parts(
    delta_dir: Path, header: dict[str, Any], blobs: bytes, columns: dict[str, Any], *, index_size: int | None = None
) -> None:
    """Write a version 2 delta by hand, the header's sizes made consistent (or ``index_size`` forced)."""
    if isinstance(columns.get("names"), list):
        prefix, suffix = d._front_code(columns["names"])
        columns = {k: v for k, v in columns.items() if k != "names"} | {"name_prefix": prefix, "name_suffix": suffix}
    index = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(json.dumps(columns).encode())
    (delta_dir / DELTA_BIN).write_bytes(blobs + index)
    size = len(index) if index_size is None else index_size
    header = {**header, "delta_bin_sha256": hashlib.sha256(blobs + index).hexdigest()}
    (delta_dir / DELTA_JSON).write_text(
        json.dumps({**header, "blobs_size": len(blobs) - size + len(index), "index_size": size})
    )


def test_blob_decoding_errors_are_delta_errors(pair: tuple[Path, dict[str, torch.Tensor], Path]) -> None:
    """A blob replaced by a valid zstd frame of the wrong content fails its checks, not zstd's."""
    base_file, _, delta_dir = pair
    header, blobs, columns = _read_parts(delta_dir)
    i = next(i for i, n in enumerate(columns["lengths"]) if n)
    name, offset, length = columns["names"][i], sum(columns["lengths"][:i]), columns["lengths"][i]
    raw_len = len(zstandard.ZstdDecompressor().decompress(blobs[offset : offset + length]))
    cases = {
        "frame holds": zstandard.ZstdCompressor(level=3).compress(b"\0" * (4 * raw_len + 64)),  # more than any coding
        "its changed count": zstandard.ZstdCompressor(level=3, write_checksum=True).compress(b"\1" * raw_len),
        "not a zstd frame": b"\0" * 32,
    }
    for expected, blob in cases.items():
        lengths = list(columns["lengths"])
        lengths[i] = len(blob)
        _write_parts(
            delta_dir, header, blobs[:offset] + blob + blobs[offset + length :], columns | {"lengths": lengths}
        )
        message = _apply_must_fail(base_file, delta_dir)
        assert expected in message and repr(name) in message, message
    _write_parts(delta_dir, header, blobs, columns)
    apply_delta(base_file, delta_dir)


def test_corrupt_header_and_index_rejected(pair: tuple[Path, dict[str, torch.Tensor], Path]) -> None:
    base_file, _, delta_dir = pair
    header, blobs, columns = _read_parts(delta_dir)

    def edit(head: dict[str, Any] | None = None, /, **changes: Any) -> str:
        _write_parts(delta_dir, {**header, **(head or {})}, blobs, {**columns, **changes})
        return _apply_must_fail(base_file, delta_dir)

    stored = next(i for i, n in enumerate(columns["lengths"]) if n)
    name = columns["names"][stored]
    for i, n in enumerate(columns["lengths"]):
        if n:
            miscounted = list(columns["changed"])
            miscounted[i] -= 1
            message = edit(changed=miscounted)
            assert "corrupt" in message and f"tensor {columns['names'][i]!r}" in message, message
    shifted = list(columns["lengths"])
    shifted[stored] += 1
    assert "describes" in edit(lengths=shifted)
    assert "new_sha256" in edit({"new_sha256": "1" * 64})
    assert "was made against base weights sha256" in edit({"base_weights_sha256": "2" * 64})
    assert "format version 3; this reader supports versions 1, 2" in edit({"version": 3})
    assert "unknown encoding 'lz4'" in edit(encodings=["lz4", *columns["encodings"][1:]])
    assert "not sorted" in edit(**{k: list(reversed(v)) for k, v in columns.items()})
    assert "differ in length" in edit(names=columns["names"][:-1])
    prefix, suffix = d._front_code(columns["names"])
    prefix[1] = 10**6
    bad_names = {k: v for k, v in columns.items() if k != "names"} | {"name_prefix": prefix, "name_suffix": suffix}
    _write_parts(delta_dir, header, blobs, bad_names)
    assert "the name of tensor 1 is malformed" in _apply_must_fail(base_file, delta_dir)
    assert "lacks the lists" in edit(shapes=None)
    assert "base_weights_sha256 is not a sha256" in edit({"base_weights_sha256": "abc"})
    other_shape = [list(s) for s in columns["shapes"]]
    other_shape[stored] = [*other_shape[stored], 1]
    assert "lists other tensors than the base file" in edit(shapes=other_shape)
    dims = [list(s) for s in columns["shapes"]]
    dims[stored] = [-1]
    assert f"a dimension of tensor {name!r} is not a non-negative integer" in edit(shapes=dims)
    _write_parts(delta_dir, header, blobs, columns, index_size=3)
    assert "is corrupt" in _apply_must_fail(base_file, delta_dir)
    (delta_dir / DELTA_JSON).write_text("{not json")
    assert "is corrupt" in _apply_must_fail(base_file, delta_dir)
    (delta_dir / DELTA_JSON).unlink()
    assert "delta.json is missing" in _apply_must_fail(base_file, delta_dir)


def test_version_1_deltas_still_apply(tmp_path: Path) -> None:
    """A delta written by the version 1 writer (checked in) applies, with its own checks."""
    data = REPO / "tests" / "data" / "delta_v1"
    want = load_file(str(data / "new.safetensors"))
    header, entries = read_manifest(data / "delta")
    assert header["version"] == 1 and "base_sha256" in header
    assert {e.encoding for e in entries} == {"zero", "xor", "planes", "sparse"}
    assert all(e.sha256 is not None for e in entries)
    assert_bitwise_equal(apply_delta(data / "base.safetensors", data / "delta"), want)
    inplace = load_file(str(data / "base.safetensors"))
    apply_delta_inplace(inplace, data / "delta")
    assert_bitwise_equal(inplace, want)
    # Its per-tensor sha256 still catches a lying manifest.
    shutil.copytree(data / "delta", tmp_path / "d")
    manifest = json.loads((tmp_path / "d" / DELTA_JSON).read_text())
    target = next(t for t in manifest["tensors"] if t["encoding"] == "sparse")
    target["sha256"] = "0" * 64
    (tmp_path / "d" / DELTA_JSON).write_text(json.dumps(manifest))
    assert f"tensor {target['name']!r} does not match its checksum" in _apply_must_fail(
        data / "base.safetensors", tmp_path / "d"
    )
    other = tmp_path / "other.safetensors"
    save_file({k: v.clone() for k, v in want.items()}, str(other))
    assert "delta was made against base sha256" in _apply_must_fail(other, data / "delta")


# --------------------------------------------------------------------------------------------
# Full model directories, transformers and the command line
# --------------------------------------------------------------------------------------------


def _model_dir(src: Path, tensors: dict[str, torch.Tensor], out: Path) -> Path:
    """A Hugging Face directory: src's config and tokenizer with ``tensors`` as weights."""
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_apply_delta_to_dir_loads_with_transformers_and_matches_logits(
    snapshots: dict[float, dict[int, dict[str, torch.Tensor]]], llama_dir: Path, tmp_path: Path, dtype_name: str
) -> None:
    dtype = DTYPES[dtype_name]
    base = cast(snapshots[1e-4][0], dtype)
    new = cast(snapshots[1e-4][10], dtype)
    base_dir = _model_dir(llama_dir, base, tmp_path / "base")
    (base_dir / "manifest.json").write_text("{}")  # a checkpoint store's manifest: not copied
    ref_dir = _model_dir(llama_dir, new, tmp_path / "ref")
    write_delta(base_dir / "model.safetensors", new, tmp_path / "delta")

    out = apply_delta_to_dir(base_dir, tmp_path / "delta", tmp_path / "out")
    assert out == tmp_path / "out"
    assert_bitwise_equal(load_file(str(out / "model.safetensors")), new)
    expected = {p.name for p in llama_dir.iterdir()}
    assert {p.name for p in out.iterdir()} == expected
    for name in expected - {"model.safetensors"}:
        assert (out / name).read_bytes() == (llama_dir / name).read_bytes(), name
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left

    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
        want = AutoModelForCausalLM.from_pretrained(ref_dir)(input_ids=ids).logits
    assert torch.equal(got, want)

    with pytest.raises(DeltaError, match="already exists"):
        apply_delta_to_dir(base_dir, tmp_path / "delta", out)
    with pytest.raises(DeltaError, match=r"has no model\.safetensors"):
        apply_delta_to_dir(tmp_path / "delta", tmp_path / "delta", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_cli_apply_inspect_make(
    pair: tuple[Path, dict[str, torch.Tensor], Path],
    llama_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base_file, new, _ = pair
    base_dir = _model_dir(llama_dir, load_file(str(base_file)), tmp_path / "base")
    new_dir = _model_dir(llama_dir, new, tmp_path / "new")

    assert cli_main(["make-delta", str(base_dir), str(new_dir), str(tmp_path / "d"), "--level", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert cli_main(["inspect", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "model.embed_tokens.weight" in out and "total:" in out
    assert any(enc in out for enc in ("mask-diff", "sparse-diff"))

    assert cli_main(["apply-delta", str(base_dir), str(tmp_path / "d"), str(tmp_path / "out")]) == 0
    assert f"wrote {tmp_path / 'out'}" in capsys.readouterr().out
    assert_bitwise_equal(load_file(str(tmp_path / "out" / "model.safetensors")), new)

    # Errors: exit status 2 and "error: ..." on stderr.
    assert cli_main(["apply-delta", str(new_dir), str(tmp_path / "d"), str(tmp_path / "out3")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: delta was made against base weights sha256 ")
    assert cli_main(["apply-delta", str(base_dir), str(tmp_path / "d"), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(SystemExit) as info:
        cli_main(["frobnicate"])
    assert info.value.code == 2


def test_cli_runs_as_module(pair: tuple[Path, dict[str, torch.Tensor], Path]) -> None:
    _, _, delta_dir = pair
    proc = subprocess.run(
        [sys.executable, "-m", "trainer_ckpt", "inspect", str(delta_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "total:" in proc.stdout


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_delta", REPO / "scripts" / "bench_delta.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_delta"] = module
    spec.loader.exec_module(module)
    return module


def _parse_size(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20}[unit]


def test_bench_quick(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load_bench()
    assert bench.main(["--quick"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]
    assert len(rows) == 4
    ours, baseline, ok = header.index("ours (whole delta)"), header.index("XOR+zstd"), header.index("ok")
    meta, base = header.index("of it metadata"), header.index("BASE")
    for row in rows:
        assert row[ok] == "yes", row
        assert _parse_size(row[ours]) <= _parse_size(row[baseline]), row
        assert 0 < _parse_size(row[meta]) < _parse_size(row[ours]), row
        ratio = float(row[header.index("base/ours")].strip("*x"))
        assert ratio == pytest.approx(_parse_size(row[base]) / _parse_size(row[ours]), rel=0.02), row
