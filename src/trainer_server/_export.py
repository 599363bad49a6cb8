"""Checkpoint contents: what each kind writes, and how a STATE is loaded back.

Saving is split in two. On the device thread, :func:`take_snapshot` copies what a BASE, DELTA
or STATE checkpoint holds to CPU tensors (a sharded (FSDP) session's tensors are gathered whole
first, on every rank, one at a time; the ranks that only take part keep nothing); then
:func:`write_snapshot` writes the files from that copy on any thread, while training goes on.
An ADAPTER is small and PEFT writes it from the live model: :func:`write_adapter` runs on the
device thread. Files land in a temp directory that
:class:`~trainer_server._checkpoints.CheckpointStore` commits atomically.

- BASE: ``config.json``, ``model.safetensors`` (LoRA merged, in the export dtype) and every
  tokenizer and generation file of the base model's directory (``generation_config.json``,
  ``chat_template.jinja``, ... see ``_models.TOKENIZER_FILES``), as the base model had them: a
  plain Hugging Face directory that keeps its chat template and EOS tokens. A large BASE logs
  its progress (gathered bytes, then the write) on the ``trainer_server.export`` logger.
- DELTA: ``delta.json`` + ``delta.bin`` from :mod:`trainer_ckpt.delta`, against the
  session's last BASE file (bitwise XOR of the stored dtype, compressed).
- ADAPTER: PEFT's own ``save_pretrained`` layout (``adapter_config.json``,
  ``adapter_model.safetensors``) plus the same tokenizer and generation files.
- STATE: ``trainable.safetensors`` (exact trainable tensors), ``optimizer.pt`` (AdamW
  state and the torch RNG state, loaded back with ``weights_only=True``) and
  ``state.json`` (step, mode, seed, base model, last BASE).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trainer_server._engine import SessionModel
from trainer_server._fsdp import full, sharded_like
from trainer_server._models import BaseModel
from trainer_server.core.errors import invalid_argument
from trainer_server.core.types import LoraSpec

__all__ = [
    "STATE_FILE",
    "Snapshot",
    "base_dtype",
    "load_state",
    "merged_state_dict",
    "read_state_info",
    "take_snapshot",
    "write_adapter",
    "write_snapshot",
]

log = logging.getLogger("trainer_server.export")

_PROGRESS_MIN_BYTES = 256 << 20
"""Exports at least this large log their progress (every tenth of the bytes)."""

STATE_FILE = "state.json"
_TRAINABLE = "trainable.safetensors"
_OPTIMIZER = "optimizer.pt"
_GRADIENTS = "gradients.safetensors"
"""STATE only, when gradients were accumulated and not yet applied by an optimizer step."""
WEIGHTS_FILE = "model.safetensors"


def merged_state_dict(state: SessionModel) -> Iterator[tuple[str, torch.Tensor]]:
    """The session's weights under the base model's own names, LoRA merged in, one at a time.

    Merging is computed (``W + scale * B @ A`` per adapted layer), never done in place:
    LoRA sessions share the base tensors, which must not change. Tensors come as the session
    holds them (sharded under FSDP; the parameters themselves, so tied weights come as one
    object under two names); each merged weight exists only while it is yielded.
    """
    if state.lora is None:
        yield from state.model.state_dict(keep_vars=True).items()
        return
    from peft.tuners.lora import LoraLayer

    inner = state.model.get_base_model()
    layers = {name: module for name, module in inner.named_modules() if isinstance(module, LoraLayer)}
    for key, value in inner.state_dict(keep_vars=True).items():
        if ".lora_" in key:
            continue
        clean = key.replace(".base_layer.", ".")
        module_name, _, param = clean.rpartition(".")
        layer = layers.get(module_name) if param == "weight" else None
        delta = None if layer is None else layer.get_delta_weight("default").to(value.dtype)  # type: ignore[attr-defined]
        yield clean, (value if delta is None else value + delta)


class _Progress:
    """Logs every tenth of ``total_bytes`` done, for exports big enough to take a while."""

    def __init__(self, what: str, total_bytes: int) -> None:
        self.what = what
        self.total = total_bytes
        self.done = 0
        self.next_tenth = 1
        self.start = time.monotonic()
        self.on = total_bytes >= _PROGRESS_MIN_BYTES
        if self.on:
            log.info("%s: %.2f GiB to gather", what, total_bytes / 2**30)

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        while self.on and self.next_tenth <= 10 and self.done * 10 >= self.total * self.next_tenth:
            log.info(
                "%s: %d%% gathered (%.2f of %.2f GiB, %.0f s)",
                self.what,
                10 * self.next_tenth,
                self.done / 2**30,
                self.total / 2**30,
                time.monotonic() - self.start,
            )
            self.next_tenth += 1


def _whole(
    tensors: Iterable[tuple[str, torch.Tensor]],
    keep: bool,
    dtype: torch.dtype | None = None,
    *,
    copy: bool = True,
    progress: _Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Copies of whole tensors on the CPU (in ``dtype``), gathered one at a time when sharded (collective).

    A rank that only takes part in the gathers (``keep=False``) drops each tensor at once, so
    no rank but the writer ever holds more than one whole tensor. One tensor object under
    several names (tied weights) is gathered once and stays one tensor, so ``save_pretrained``
    stores it once, as it would for the unsharded model.
    """
    out: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor | None] = {}  # by parameter: alive in the model, so ids are not reused
    with torch.no_grad():
        for name, tensor in tensors:
            key = id(tensor) if isinstance(tensor, torch.nn.Parameter) else None
            if key is None or key not in done:
                whole = full(tensor).detach()
                # By default a copy, never a view of the live tensor: training may change that while
                # the files are written.
                result = whole.to(device="cpu", dtype=dtype or whole.dtype, copy=copy).contiguous() if keep else None
                if key is not None:
                    done[key] = result
            else:
                result = done[key]
            if progress is not None and result is not None:
                progress.add(result.numel() * result.element_size())
            if keep:
                out[name] = cast(torch.Tensor, result)
    return out


@dataclass
class Snapshot:
    """What a BASE, DELTA or STATE checkpoint holds, copied off the session (rank 0's copy).

    Nothing in it is shared with the live session, so :func:`write_snapshot` may run on any
    thread while the session trains on.
    """

    kind: str  # base, delta or state
    dtype: torch.dtype  # of the exported weights (base, delta); float32 for state
    step: int
    base: BaseModel  # the base model: config, tokenizer files and layout (never trained)
    tensors: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    rng: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    gradients: dict[str, torch.Tensor] = field(default_factory=dict)


def take_snapshot(
    state: SessionModel, kind: str, dtype: torch.dtype, *, keep: bool, base_model: str = "", last_base: str = ""
) -> Snapshot | None:
    """Copy what a checkpoint of ``kind`` holds (device thread; collective when sharded).

    Args:
        state: the session.
        kind: "base", "delta" (merged weights in ``dtype``) or "state".
        dtype: the export dtype of base and delta weights.
        keep: False on ranks that only take part in the gathers: nothing is kept, None returned.
        base_model: the base model's name, recorded in a STATE's ``state.json``.
        last_base: the session's last BASE checkpoint, recorded there too.
    """
    optimizer, rng, info, gradients = None, None, {}, {}
    if kind in ("base", "delta"):
        total = sum(p.numel() for p in state.base.model.parameters()) * dtype.itemsize
        progress = _Progress(f"{kind.upper()} export of {state.base.name}", total) if keep else None
        tensors = _whole(merged_state_dict(state), keep, dtype, progress=progress)
    elif kind == "state":
        tensors = _whole(((n, p) for n, p in state.model.named_parameters() if p.requires_grad), keep)
        optimizer = _optimizer_state(state, keep)
        # Gradients accumulated since the last step: resuming mid-window continues exactly.
        pending = [(n, p.grad) for n, p in state.model.named_parameters() if p.requires_grad and p.grad is not None]
        gradients = _whole(((n, g) for n, g in pending), keep)
        rng = torch.get_rng_state()
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
        dtype = torch.float32
    else:
        raise ValueError(f"no snapshot for {kind!r} checkpoints")
    if not keep:
        return None
    return Snapshot(kind, dtype, state.step, state.base, tensors, optimizer, rng, info, gradients)


def write_snapshot(snapshot: Snapshot, out: Path, base_dir: Path | None = None) -> dict[str, Any]:
    """Write a snapshot's files into ``out`` (any thread); returns the manifest's extra fields.

    Args:
        snapshot: from :func:`take_snapshot`.
        out: the (temp) checkpoint directory.
        base_dir: for a DELTA, the BASE checkpoint it is taken against.
    """
    if snapshot.kind == "base":
        _write_base(snapshot, out)
        return {}
    if snapshot.kind == "delta":
        if base_dir is None:
            raise ValueError("a DELTA is written against a BASE directory")
        return _write_delta(snapshot, out, base_dir)
    _write_state(snapshot, out)
    return {}


def _write_base(snapshot: Snapshot, out: Path) -> None:
    """A Hugging Face model directory with the session's (merged) weights."""
    model = snapshot.base.model
    nbytes = sum(t.numel() * t.element_size() for t in snapshot.tensors.values())
    started = time.monotonic()
    loud = nbytes >= _PROGRESS_MIN_BYTES
    if loud:
        log.info("BASE export of %s: writing %.2f GiB to %s", snapshot.base.name, nbytes / 2**30, out)
    model.save_pretrained(out, state_dict=snapshot.tensors, safe_serialization=True)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    if config.get("tie_word_embeddings") and _untied(model, snapshot.tensors):
        config["tie_word_embeddings"] = False  # LoRA on the output layer: loading must not re-tie it
    dtype_name = str(snapshot.dtype).removeprefix("torch.")
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _write_model_files(snapshot.base, out)
    if loud:
        log.info("BASE export of %s: written in %.1f s", snapshot.base.name, time.monotonic() - started)


def _write_model_files(base: BaseModel, out: Path) -> None:
    """Copy the base model's tokenizer and generation files (chat template, EOS list) into an export."""
    for name, data in base.tokenizer_files.items():
        (out / name).write_bytes(data)


def _untied(model: Any, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether the exported output layer is no longer the input embedding (a tied model's)."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(module): name for name, module in model.named_modules()}
    if inputs is None or outputs is None or id(inputs) not in names or id(outputs) not in names:
        return False
    out_weight = tensors.get(f"{names[id(outputs)]}.weight")
    return out_weight is not None and out_weight is not tensors.get(f"{names[id(inputs)]}.weight")


def base_dtype(base_dir: Path) -> torch.dtype:
    """The dtype a BASE checkpoint's weights were exported in."""
    with safe_open(str(base_dir / WEIGHTS_FILE), framework="pt") as f:
        dtype: torch.dtype = f.get_tensor(next(iter(f.keys()))).dtype
    return dtype


def _write_delta(snapshot: Snapshot, out: Path, base_dir: Path) -> dict[str, Any]:
    """A lossless delta of the snapshot's weights against a BASE checkpoint of the same dtype."""
    from trainer_ckpt import delta

    tensors = snapshot.tensors
    with safe_open(str(base_dir / WEIGHTS_FILE), framework="pt") as f:
        names = list(f.keys())
    missing = [n for n in names if n not in tensors]
    if missing:
        raise invalid_argument(f"the base checkpoint has tensors this session lacks: {missing[:5]}")
    stats = delta.write_delta(base_dir / WEIGHTS_FILE, {n: tensors[n] for n in names}, out)
    ratio = stats.ratio if math.isfinite(stats.ratio) else None  # inf (nothing changed) is not valid JSON
    # compressed_bytes: the whole delta (delta.bin with its index, and delta.json), as ratio counts it.
    return {"ratio": ratio, "raw_bytes": stats.raw_bytes, "compressed_bytes": stats.total_bytes}


def write_adapter(state: SessionModel, out: Path | None) -> None:
    """Write the LoRA adapter in PEFT layout (device thread; ``out=None``: only take part in the gathers)."""
    # Written at once, so no copies; PEFT picks from the whole state dict what it saves.
    tensors = _whole(state.model.state_dict(keep_vars=True).items(), out is not None, copy=False)
    if out is not None:
        state.model.save_pretrained(out, state_dict=tensors, safe_serialization=True)
        _write_model_files(state.base, out)


def load_adapter(base: BaseModel, directory: Path, device: torch.device) -> Any:
    """A PEFT adapter checkpoint laid over the base model's own (shared, frozen) tensors, for sampling."""
    from peft import PeftModel

    from trainer_server._engine import share_base_copy

    model = PeftModel.from_pretrained(share_base_copy(base.model), str(directory), is_trainable=False)
    if device != base.device:
        model.to(device)
    model.eval()
    return model


def _optimizer_state(state: SessionModel, keep: bool) -> dict[str, Any] | None:
    """AdamW's state dict with whole tensors (parameters by index, as torch numbers them)."""
    if state.optimizer is None:
        return None
    sd = state.optimizer.state_dict()
    sd["state"] = {i: _whole(moments.items(), keep) for i, moments in sd["state"].items()}
    return sd


def _write_state(snapshot: Snapshot, out: Path) -> None:
    """Everything needed to resume the session exactly."""
    save_file(snapshot.tensors, str(out / _TRAINABLE), metadata={"format": "pt"})
    if snapshot.gradients:
        save_file(snapshot.gradients, str(out / _GRADIENTS), metadata={"format": "pt"})
    torch.save({"optimizer": snapshot.optimizer, "cpu_rng": snapshot.rng}, out / _OPTIMIZER)
    (out / STATE_FILE).write_text(json.dumps(snapshot.info, indent=2, sort_keys=True) + "\n")


def read_state_info(state_dir: Path) -> tuple[dict[str, Any], LoraSpec | None]:
    """Read a STATE checkpoint's ``state.json``: the info dict and the LoRA config (or None)."""
    info: dict[str, Any] = json.loads((state_dir / STATE_FILE).read_text())
    lora = info.get("lora")
    config = None if lora is None else LoraSpec(int(lora["rank"]), float(lora["alpha"]), tuple(lora["target_modules"]))
    return info, config


def load_state(
    state: SessionModel,
    state_dir: Path,
    info: dict[str, Any],
    *,
    restore_rng: bool = True,
    with_optimizer: bool = True,
) -> None:
    """Load a STATE checkpoint into a session: trainable weights, and the rest of its training state.

    With ``with_optimizer`` (resuming), also the AdamW state, pending gradients, step and RNG;
    without (Tinker's weights-only load), the optimizer starts afresh and no gradient is pending.
    The session's LoRA layout must be the checkpoint's.
    """
    tensors = load_file(str(state_dir / _TRAINABLE), device=str(state.device))
    named = {n: p for n, p in state.model.named_parameters() if p.requires_grad}
    if set(named) != set(tensors):
        raise invalid_argument(
            "the STATE checkpoint's trainable tensors do not match this session's (another LoRA rank or targets, "
            "or LoRA against full fine-tune)"
        )
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(sharded_like(tensors[name], p))
            p.grad = None
    state.optimizer = None
    if not with_optimizer:
        return
    extra = torch.load(state_dir / _OPTIMIZER, weights_only=True, map_location=state.device)
    optimizer = extra["optimizer"]
    if optimizer is not None:
        for i, moments in optimizer["state"].items():  # laid out as the parameters are
            for k, v in moments.items():
                if k != "step":
                    moments[k] = sharded_like(v, state.params[i])
        state.optimizer = torch.optim.AdamW(state.params)
        state.optimizer.load_state_dict(optimizer)
    if (state_dir / _GRADIENTS).is_file():
        grads = load_file(str(state_dir / _GRADIENTS), device=str(state.device))
        unknown = sorted(set(grads) - set(named))
        if unknown:
            raise invalid_argument(f"the STATE checkpoint has gradients for unknown tensors: {unknown[:5]}")
        for name, g in grads.items():
            named[name].grad = sharded_like(g, named[name]).clone()
    if restore_rng:
        torch.set_rng_state(extra["cpu_rng"])
    state.step = int(info["step"])
