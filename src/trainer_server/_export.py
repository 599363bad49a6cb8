"""Checkpoint contents: what each kind writes, and how a STATE is loaded back.

Every function here runs on the device thread (it reads or writes a session's tensors)
and writes into a temp directory that :class:`~trainer_server._checkpoints.CheckpointStore`
commits atomically.

- BASE: ``config.json``, ``model.safetensors`` (LoRA merged, in the export dtype),
  ``generation_config.json`` and the tokenizer files: a plain Hugging Face directory.
- DELTA: ``delta.json`` + ``delta.bin`` from :mod:`trainer_ckpt.delta`, against the
  session's last BASE file (bitwise XOR of the stored dtype, compressed).
- ADAPTER: PEFT's own ``save_pretrained`` layout (``adapter_config.json``,
  ``adapter_model.safetensors``).
- STATE: ``trainable.safetensors`` (exact trainable tensors), ``optimizer.pt`` (AdamW
  state and the torch RNG state, loaded back with ``weights_only=True``) and
  ``state.json`` (step, mode, seed, base model, last BASE).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trainer_proto import pb
from trainer_server._engine import SessionModel
from trainer_server._errors import invalid_argument

__all__ = [
    "STATE_FILE",
    "base_dtype",
    "load_state",
    "merged_state_dict",
    "read_state_info",
    "write_adapter",
    "write_base",
    "write_delta",
    "write_state",
]

STATE_FILE = "state.json"
_TRAINABLE = "trainable.safetensors"
_OPTIMIZER = "optimizer.pt"
WEIGHTS_FILE = "model.safetensors"


def merged_state_dict(state: SessionModel) -> dict[str, torch.Tensor]:
    """The session's weights under the base model's own names, LoRA merged in.

    Merging is computed (``W + scale * B @ A`` per adapted layer), never done in place:
    LoRA sessions share the base tensors, which must not change.
    """
    if state.lora is None:
        return {k: v.detach() for k, v in state.model.state_dict().items()}
    from peft.tuners.lora import LoraLayer

    inner = state.model.get_base_model()
    deltas = {
        name: module.get_delta_weight("default")  # type: ignore[attr-defined]
        for name, module in inner.named_modules()
        if isinstance(module, LoraLayer)
    }
    merged: dict[str, torch.Tensor] = {}
    for key, value in inner.state_dict().items():
        if ".lora_" in key:
            continue
        clean = key.replace(".base_layer.", ".")
        module_name, _, param = clean.rpartition(".")
        delta = deltas.get(module_name) if param == "weight" else None
        merged[clean] = (value if delta is None else value + delta.to(value.dtype)).detach()
    return merged


def _export(state: SessionModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(device="cpu", dtype=dtype).contiguous() for k, v in merged_state_dict(state).items()}


def write_base(state: SessionModel, out: Path, dtype: torch.dtype) -> None:
    """Write a Hugging Face model directory with the session's (merged) weights."""
    tensors = _export(state, dtype)
    state.base.model.save_pretrained(out, state_dict=tensors, safe_serialization=True)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    dtype_name = str(dtype).removeprefix("torch.")
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name, data in state.base.tokenizer_files.items():
        (out / name).write_bytes(data)


def base_dtype(base_dir: Path) -> torch.dtype:
    """The dtype a BASE checkpoint's weights were exported in."""
    with safe_open(str(base_dir / WEIGHTS_FILE), framework="pt") as f:
        dtype: torch.dtype = f.get_tensor(next(iter(f.keys()))).dtype
    return dtype


def write_delta(state: SessionModel, out: Path, base_dir: Path) -> dict[str, Any]:
    """Write a lossless delta of the session's weights against a BASE checkpoint."""
    from trainer_ckpt import delta

    dtype = base_dtype(base_dir)
    tensors = _export(state, dtype)
    with safe_open(str(base_dir / WEIGHTS_FILE), framework="pt") as f:
        names = list(f.keys())
    missing = [n for n in names if n not in tensors]
    if missing:
        raise invalid_argument(f"the base checkpoint has tensors this session lacks: {missing[:5]}")
    stats = delta.write_delta(base_dir / WEIGHTS_FILE, {n: tensors[n] for n in names}, out)
    ratio = stats.ratio if math.isfinite(stats.ratio) else None  # inf (nothing changed) is not valid JSON
    return {"ratio": ratio, "raw_bytes": stats.raw_bytes, "compressed_bytes": stats.compressed_bytes}


def write_adapter(state: SessionModel, out: Path) -> None:
    """Write the LoRA adapter in PEFT layout."""
    state.model.save_pretrained(out, safe_serialization=True)


def write_state(state: SessionModel, out: Path, *, base_model: str, last_base: str) -> None:
    """Write everything needed to resume the session exactly."""
    named = {n: p.detach().cpu().contiguous() for n, p in state.model.named_parameters() if p.requires_grad}
    save_file(named, str(out / _TRAINABLE), metadata={"format": "pt"})
    torch.save(
        {
            "optimizer": state.optimizer.state_dict() if state.optimizer is not None else None,
            "cpu_rng": torch.get_rng_state(),
        },
        out / _OPTIMIZER,
    )
    lora = state.lora
    info = {
        "base_model": base_model,
        "step": state.step,
        "seed": state.seed,
        "last_base": last_base,
        "lora": None
        if lora is None
        else {"rank": lora.rank, "alpha": lora.alpha, "target_modules": list(lora.target_modules)},
    }
    (out / STATE_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def read_state_info(state_dir: Path) -> tuple[dict[str, Any], pb.LoraConfig | None]:
    """Read a STATE checkpoint's ``state.json``: the info dict and the LoRA config (or None)."""
    info: dict[str, Any] = json.loads((state_dir / STATE_FILE).read_text())
    lora = info.get("lora")
    config = None if lora is None else pb.LoraConfig(**lora)
    return info, config


def load_state(state: SessionModel, state_dir: Path, info: dict[str, Any], *, restore_rng: bool = True) -> None:
    """Load trainable weights, optimizer state and step (and the RNG) into a fresh session."""
    tensors = load_file(str(state_dir / _TRAINABLE), device=str(state.device))
    named = {n: p for n, p in state.model.named_parameters() if p.requires_grad}
    if set(named) != set(tensors):
        raise invalid_argument("the STATE checkpoint's trainable tensors do not match this session's")
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(tensors[name])
    extra = torch.load(state_dir / _OPTIMIZER, weights_only=True, map_location=state.device)
    if extra["optimizer"] is not None:
        state.optimizer = torch.optim.AdamW(state.params)
        state.optimizer.load_state_dict(extra["optimizer"])
    if restore_rng:
        torch.set_rng_state(extra["cpu_rng"])
    state.step = int(info["step"])
