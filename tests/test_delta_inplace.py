"""Applying a delta to weights in memory (serving replicas), compact metadata and the CLI progress bar."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from trainer_ckpt import (
    DELTA_BIN,
    DELTA_JSON,
    DeltaError,
    apply_delta,
    apply_delta_inplace,
    encode_delta,
    read_manifest,
    write_delta,
    xor_zstd_baseline_size,
)
from trainer_ckpt.__main__ import main as cli_main

INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(INT_VIEW[t.element_size()]).cpu()


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(bits(a[k]), bits(b[k])) for k in a
    )


def snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


def adam_like_step(tensors: dict[str, torch.Tensor], lr: float, seed: int) -> dict[str, torch.Tensor]:
    """What one Adam step does to each weight: w - lr * sign(random gradient), in the weights' dtype."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in tensors.items():
        step = lr * torch.randn(t.shape, generator=gen).sign()
        out[name] = (t.float() - step).to(t.dtype) if t.is_floating_point() else t.clone()
    return out


@pytest.fixture
def weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "embed.weight": (0.02 * torch.randn(300, 64, generator=gen)).to(torch.bfloat16),
        "layers.0.attn.weight": (0.02 * torch.randn(64, 64, generator=gen)).to(torch.bfloat16),
        "layers.0.norm.weight": torch.ones(64, dtype=torch.bfloat16),
        "layers.1.mlp.weight": (0.02 * torch.randn(1000, 80, generator=gen)).to(torch.bfloat16),
        "step": torch.tensor([3], dtype=torch.int64),
        "head.fp32": 0.02 * torch.randn(50, 70, generator=gen),
    }


@pytest.fixture
def delta_pair(weights: dict[str, torch.Tensor], tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor], Path]:
    """(base file, new weights, delta dir) for one Adam-like step at lr 1e-3."""
    base_file = tmp_path / "base.safetensors"
    save_file(weights, str(base_file))
    new = adam_like_step(weights, 1e-3, seed=1)
    write_delta(base_file, new, tmp_path / "delta")
    return base_file, new, tmp_path / "delta"


# --------------------------------------------------------------------------------------------
# In-place apply
# --------------------------------------------------------------------------------------------


def test_inplace_on_a_dict_is_bit_exact(
    weights: dict[str, torch.Tensor], delta_pair: tuple[Path, dict[str, torch.Tensor], Path]
) -> None:
    _, new, delta_dir = delta_pair
    live = snapshot(weights)
    storage = {k: v.data_ptr() for k, v in live.items()}
    seen: list[int] = []
    stats = apply_delta_inplace(live, delta_dir, progress=seen.append)
    assert same_bits(live, new)
    assert {k: v.data_ptr() for k, v in live.items()} == storage, "updated in place, not replaced"
    assert sum(seen) == stats.raw_bytes == sum(t.nbytes for t in new.values())
    assert stats.manifest_bytes == read_manifest(delta_dir)[0]["manifest_bytes"]
    # The same from an in-memory delta.
    live = snapshot(weights)
    apply_delta_inplace(live, encode_delta(weights, new))
    assert same_bits(live, new)


def test_inplace_on_a_transformers_model_matches_a_model_loaded_from_the_new_weights(
    llama_dir: Path, tmp_path: Path
) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16)  # from_pretrained returns eval mode
    base = snapshot(model.state_dict())
    base_file = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.items()}, str(base_file))
    new = adam_like_step(base, 1e-3, seed=2)
    write_delta(base_file, new, tmp_path / "delta")

    apply_delta_inplace(model, tmp_path / "delta")  # duck-typed through state_dict()
    assert same_bits(snapshot(model.state_dict()), new)
    reference = AutoModelForCausalLM.from_pretrained(
        llama_dir, dtype=torch.bfloat16
    )  # from_pretrained returns eval mode
    reference.load_state_dict(new)
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    with pytest.raises(DeltaError, match="was made against base weights sha256"):
        apply_delta_inplace(model, tmp_path / "delta")  # already applied: no longer the base


def test_inplace_refuses_a_wrong_base_and_changes_nothing(
    weights: dict[str, torch.Tensor], delta_pair: tuple[Path, dict[str, torch.Tensor], Path]
) -> None:
    _, _, delta_dir = delta_pair
    live = snapshot(weights)
    live["layers.1.mlp.weight"].reshape(-1)[5] += 1
    before = snapshot(live)
    with pytest.raises(DeltaError, match=r"delta was made against base weights sha256 [0-9a-f]{64}, but these"):
        apply_delta_inplace(live, delta_dir)
    assert same_bits(live, before)

    missing = {k: v for k, v in snapshot(weights).items() if k != "step"}
    with pytest.raises(DeltaError, match="the weights lack tensors the delta changes: 'step'"):
        apply_delta_inplace(missing, delta_dir)
    wrong_dtype = {**snapshot(weights), "head.fp32": weights["head.fp32"].to(torch.bfloat16)}
    with pytest.raises(DeltaError, match=r"tensor 'head.fp32' is BF16 \[50, 70\] in the weights but F32"):
        apply_delta_inplace(wrong_dtype, delta_dir)
    tied = snapshot(weights)
    tied["layers.0.attn.weight"] = tied["embed.weight"][:64]
    with pytest.raises(DeltaError, match="share memory"):
        apply_delta_inplace(tied, encode_delta(weights, weights))


def test_inplace_leaves_extra_tensors_alone(
    weights: dict[str, torch.Tensor], delta_pair: tuple[Path, dict[str, torch.Tensor], Path]
) -> None:
    """A model's state dict may hold more than the file (a tied head, buffers): those are untouched."""
    _, new, delta_dir = delta_pair
    extra = torch.arange(10.0)
    live = {**snapshot(weights), "rotary.inv_freq": extra}
    apply_delta_inplace(live, delta_dir)
    assert same_bits({k: v for k, v in live.items() if k != "rotary.inv_freq"}, new)
    assert torch.equal(live["rotary.inv_freq"], torch.arange(10.0))


def test_inplace_restores_the_base_when_a_later_blob_is_corrupt(
    weights: dict[str, torch.Tensor], delta_pair: tuple[Path, dict[str, torch.Tensor], Path]
) -> None:
    _, _, delta_dir = delta_pair
    _, entries = read_manifest(delta_dir)
    stored = [e for e in entries if e.length]
    assert len(stored) >= 2
    last = stored[-1]
    data = bytearray((delta_dir / DELTA_BIN).read_bytes())
    data[last.offset + last.length - 1] ^= 0x10  # the frame's content checksum
    (delta_dir / DELTA_BIN).write_bytes(bytes(data))
    live = snapshot(weights)
    with pytest.raises(DeltaError, match=r"delta\.bin is corrupt: its sha256 is"):
        apply_delta_inplace(live, delta_dir)  # refused before any weight changes
    assert same_bits(live, weights)
    # With a digest that matches the corrupt file, the blob's own check fails after earlier
    # tensors were changed: they are restored.
    header = json.loads((delta_dir / DELTA_JSON).read_text())
    header["delta_bin_sha256"] = hashlib.sha256(data).hexdigest()
    (delta_dir / DELTA_JSON).write_text(json.dumps(header))
    with pytest.raises(DeltaError, match=f"tensor {last.name!r}"):
        apply_delta_inplace(live, delta_dir)
    assert same_bits(live, weights), "tensors applied before the corrupt blob were restored"


def test_inplace_restores_the_base_when_the_result_hash_differs(
    weights: dict[str, torch.Tensor], delta_pair: tuple[Path, dict[str, torch.Tensor], Path]
) -> None:
    _, _, delta_dir = delta_pair
    header = json.loads((delta_dir / DELTA_JSON).read_text())
    header["new_sha256"] = "3" * 64
    (delta_dir / DELTA_JSON).write_text(json.dumps(header))
    live = snapshot(weights)
    with pytest.raises(DeltaError, match="do not match new_sha256"):
        apply_delta_inplace(live, delta_dir)
    assert same_bits(live, weights)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_inplace_on_cuda_tensors(
    weights: dict[str, torch.Tensor], delta_pair: tuple[Path, dict[str, torch.Tensor], Path]
) -> None:
    _, new, delta_dir = delta_pair
    live = {k: v.to("cuda") for k, v in weights.items()}
    apply_delta_inplace(live, delta_dir)
    assert all(t.is_cuda for t in live.values())
    assert same_bits({k: v.cpu() for k, v in live.items()}, new)


# --------------------------------------------------------------------------------------------
# Compact metadata: the whole directory against the baseline
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tensors", "shape"),
    [(300, (128, 128)), (2000, (64, 64)), (3000, (16,))],
    ids=["issue-300x128x128", "2000x64x64", "3000x16"],
)
def test_whole_delta_is_at_most_the_baseline_with_many_tensors(
    tmp_path: Path, tensors: int, shape: tuple[int, ...]
) -> None:
    """The issue's reproduction (every 97th element of 300 bf16 128x128 tensors changed) and more tensors."""
    gen = torch.Generator().manual_seed(tensors)
    base = {f"model.layers.{i}.w": torch.randn(shape, generator=gen).to(torch.bfloat16) for i in range(tensors)}
    new = {k: v.clone() for k, v in base.items()}
    for t in new.values():
        t.reshape(-1)[::97] += 0.01
    save_file(base, str(tmp_path / "base.safetensors"))
    stats = write_delta(tmp_path / "base.safetensors", new, tmp_path / "d")
    whole = sum(p.stat().st_size for p in (tmp_path / "d").iterdir())
    assert whole == stats.total_bytes
    assert whole <= xor_zstd_baseline_size(base, new)
    assert (tmp_path / "d" / DELTA_JSON).stat().st_size < 400, "delta.json is a one-line header"
    assert stats.manifest_bytes < 4 * tensors, "a few bytes of metadata per tensor"
    assert same_bits(apply_delta(tmp_path / "base.safetensors", tmp_path / "d"), new)


# --------------------------------------------------------------------------------------------
# Command line progress bar, and the package without the server extras
# --------------------------------------------------------------------------------------------


def test_cli_apply_shows_a_progress_bar_on_request(
    delta_pair: tuple[Path, dict[str, torch.Tensor], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base_file, new, delta_dir = delta_pair
    base_dir = tmp_path / "base_dir"
    base_dir.mkdir()
    shutil.copy(base_file, base_dir / "model.safetensors")
    assert cli_main(["apply-delta", str(base_dir), str(delta_dir), str(tmp_path / "out1"), "--progress"]) == 0
    captured = capsys.readouterr()
    assert "apply-delta" in captured.err and "100%" in captured.err
    assert same_bits(load_file(str(tmp_path / "out1" / "model.safetensors")), new)
    # Small delta, not a terminal: no bar by default; --no-progress never shows one.
    for extra in ([], ["--no-progress"]):
        out = tmp_path / f"out{len(extra) + 2}"
        assert cli_main(["apply-delta", str(base_dir), str(delta_dir), str(out), *extra]) == 0
        assert capsys.readouterr().err == ""


def test_trainer_ckpt_imports_without_transformers() -> None:
    code = (
        "import sys; import trainer_ckpt, trainer_ckpt.__main__; "
        "assert 'transformers' not in sys.modules, 'transformers imported'; "
        "assert 'trainer_server' not in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
