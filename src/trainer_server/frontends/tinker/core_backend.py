"""The Tinker front end's backend over the server's core: the same sessions, limits, keys and checkpoints.

Each Tinker training model is one core session. The front end already runs a model's
calls one at a time in Tinker's ``seq_id`` order, so this adapter numbers the core calls
of a session 1, 2, 3 ... in the order it makes them (the core's own sequencing then sees
a gap-free order); Tinker's ids never reach the core.

Mappings (see docs/TINKER.md):
- LoRA ``train_attn`` / ``train_mlp`` / ``train_unembed`` become target modules: the
  model's linear layers under attention blocks, under MLP blocks, and its output layer.
  All three (Tinker's default) is the core's default (every linear layer).
- Sampler weights are STATE checkpoints (exact weights: sampled logprobs equal training
  logprobs); ephemeral ones are deleted when their model closes.
- Sampling from a base model runs on a hidden LoRA session of the owner (LoRA starts as
  the identity, so it is the base model exactly).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from trainer_server._export import read_state_info
from trainer_server._sampling import SampleRequest, SamplingSettings
from trainer_server.core.errors import ErrorCode, ServiceError
from trainer_server.core.service import TrainingCore
from trainer_server.core.types import CallRef, RawDatum, SessionSpec
from trainer_server.core.types import LoraSpec as CoreLora
from trainer_server.frontends.tinker import backend as be

__all__ = ["CoreBackend"]

log = logging.getLogger(__name__)

_ERRORS: dict[ErrorCode, type[be.BackendError]] = {
    ErrorCode.INVALID_ARGUMENT: be.InvalidInput,
    ErrorCode.OUT_OF_RANGE: be.InvalidInput,
    ErrorCode.FAILED_PRECONDITION: be.InvalidInput,
    ErrorCode.NOT_FOUND: be.NotFound,
    ErrorCode.ALREADY_EXISTS: be.Conflict,
    ErrorCode.ABORTED: be.Conflict,
    ErrorCode.RESOURCE_EXHAUSTED: be.LimitExceeded,
    ErrorCode.UNAVAILABLE: be.Unavailable,
}


@dataclass
class _Live:
    session_id: str
    owner: str
    info: be.ModelInfo
    seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    ephemeral: list[str] = field(default_factory=list)


class CoreBackend:
    """:class:`~trainer_server.tinker.backend.TinkerBackend` over a :class:`TrainingCore`."""

    def __init__(self, core: TrainingCore) -> None:
        self.core = core
        self._live: dict[str, _Live] = {}
        self._ephemeral = itertools.count()

    # ---- errors ---------------------------------------------------------------------

    @staticmethod
    def _translate(exc: ServiceError) -> be.BackendError:
        return _ERRORS.get(exc.code, be.BackendError)(exc.message)

    # ---- models ---------------------------------------------------------------------

    def base_models(self) -> Sequence[be.BaseModelInfo]:
        """See :meth:`TinkerBackend.base_models`."""
        out = []
        for summary in self.core.server_summary().models:
            path = self.core.model(summary.name).path
            out.append(
                be.BaseModelInfo(
                    summary.name, summary.max_sequence_length, summary.vocab_size, summary.architecture, str(path)
                )
            )
        return out

    def ready(self) -> bool:
        """See :meth:`TinkerBackend.ready`."""
        return bool(self.core.ready)

    def _live_of(self, model: be.ModelHandle) -> _Live:
        live = self._live.get(model.key)
        if live is None:
            raise be.NotFound("the model was closed")
        return live

    def _call(self, live: _Live) -> CallRef:
        return CallRef(live.owner, live.session_id, next(live.seq))

    def _targets(self, base_model: str, lora: be.LoraSpec) -> tuple[str, ...]:
        if lora.train_attn and lora.train_mlp and lora.train_unembed:
            return ()
        model = self.core.model(base_model).model
        out_layer = model.get_output_embeddings()
        names: list[str] = []
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            parts = name.lower().split(".")
            if module is out_layer:
                wanted = lora.train_unembed
            elif any("attn" in p or "attention" in p for p in parts):
                wanted = lora.train_attn
            elif any("mlp" in p or "feed_forward" in p or "ffn" in p for p in parts):
                wanted = lora.train_mlp
            else:
                wanted = False
            if wanted:
                names.append(name)
        if not names:
            raise be.InvalidInput(f"no layers of {base_model!r} match train_attn/train_mlp/train_unembed as given")
        return tuple(names)

    async def create_model(self, owner: str, spec: be.ModelSpec) -> be.ModelHandle:
        """See :meth:`TinkerBackend.create_model`."""
        lora = None
        if spec.lora is not None:
            try:
                lora = CoreLora(spec.lora.rank, 0.0, self._targets(spec.base_model, spec.lora))
            except ServiceError as exc:
                raise self._translate(exc) from None
        try:
            session = await self.core.create_session(owner, SessionSpec(spec.base_model, lora, spec.seed or 0))
        except ServiceError as exc:
            raise self._translate(exc) from None
        self._live[session.id] = _Live(session.id, owner, be.ModelInfo(spec.base_model, spec.lora))
        return be.ModelHandle(session.id)

    async def load_model(self, owner: str, checkpoint: str, *, with_optimizer: bool) -> be.ModelHandle:
        """See :meth:`TinkerBackend.load_model`."""
        try:
            session = await self.core.resume_session(owner, checkpoint, with_optimizer=with_optimizer)
        except ServiceError as exc:
            raise self._translate(exc) from None
        info = self.checkpoint(owner, checkpoint)
        self._live[session.id] = _Live(session.id, owner, be.ModelInfo(info.base_model, info.lora))
        return be.ModelHandle(session.id)

    def model_info(self, model: be.ModelHandle) -> be.ModelInfo:
        """See :meth:`TinkerBackend.model_info`."""
        return self._live_of(model).info

    def keep_alive(self, model: be.ModelHandle) -> None:
        """See :meth:`TinkerBackend.keep_alive`."""
        live = self._live.get(model.key)
        if live is not None:
            with contextlib.suppress(ServiceError):  # loading or shutting down: nothing to renew
                self.core.heartbeat(live.owner, [live.session_id])

    async def close_model(self, model: be.ModelHandle) -> None:
        """See :meth:`TinkerBackend.close_model`."""
        live = self._live.pop(model.key, None)
        if live is None:
            return
        try:
            await self.core.end_session(live.owner, live.session_id)
        except ServiceError as exc:
            log.info("closing session %s: %s", live.session_id, exc.message)
        store = self.core.checkpoint_store(live.owner)
        for name in live.ephemeral:
            if store.exists(name):
                await asyncio.to_thread(store.delete, name)

    # ---- training -------------------------------------------------------------------

    async def forward_backward(
        self, model: be.ModelHandle, data: Sequence[be.TrainDatum], loss: be.LossSpec, *, backward: bool
    ) -> be.ForwardBackwardResult:
        """See :meth:`TinkerBackend.forward_backward`."""
        live = self._live_of(model)
        raw = [
            RawDatum(
                torch.from_numpy(d.tokens), {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.inputs.items()}
            )
            for d in data
        ]
        try:
            if backward:
                result = await self.core.forward_backward(self._call(live), raw, loss.name, loss.config)
                logprobs = _split(result.logprobs, result.lengths)
                if result.elementwise_loss is not None:
                    elementwise = _split(result.elementwise_loss, result.lengths)
                else:
                    elementwise = [np.zeros_like(lp) for lp in logprobs]
                metrics = {**result.metrics, "loss:sum": result.loss}
            else:
                fwd = await self.core.forward(self._call(live), raw)
                logprobs = _split(fwd.logprobs, fwd.lengths)
                elementwise, metrics = _forward_loss(loss, data, logprobs)
        except ServiceError as exc:
            raise self._translate(exc) from None
        outputs = [{"logprobs": lp, "elementwise_loss": el} for lp, el in zip(logprobs, elementwise, strict=True)]
        return be.ForwardBackwardResult(outputs, metrics)

    async def optim_step(self, model: be.ModelHandle, adam: be.AdamSettings) -> be.OptimResult:
        """See :meth:`TinkerBackend.optim_step`."""
        live = self._live_of(model)
        params = {
            "learning_rate": adam.learning_rate,
            "beta1": adam.beta1,
            "beta2": adam.beta2,
            "eps": adam.eps,
            "weight_decay": adam.weight_decay,
            "grad_clip_norm": adam.grad_clip_norm,
        }
        try:
            result = await self.core.optim_step(self._call(live), params)
        except ServiceError as exc:
            raise self._translate(exc) from None
        return be.OptimResult(result.step, {"grad_norm:mean": result.grad_norm, "step:max": float(result.step)})

    async def _save(self, live: _Live, name: str, kind: str, dtype: str = "") -> be.CheckpointInfo:
        try:
            await self.core.save_checkpoint(self._call(live), name, kind, dtype)
        except ServiceError as exc:
            raise self._translate(exc) from None
        return self.checkpoint(live.owner, name)

    async def save_state(self, model: be.ModelHandle, name: str) -> be.CheckpointInfo:
        """See :meth:`TinkerBackend.save_state`."""
        return await self._save(self._live_of(model), name, "state")

    async def save_sampler_weights(self, model: be.ModelHandle, name: str | None) -> str:
        """See :meth:`TinkerBackend.save_sampler_weights`."""
        live = self._live_of(model)
        if name is None:
            name = f"{live.session_id}.ephemeral-sampler-{next(self._ephemeral)}"
            live.ephemeral.append(name)
        # A LoRA model's sampler weights are its adapter alone (float32, laid over the served
        # base when sampled); a full fine-tune's are its STATE.
        await self._save(live, name, "adapter" if live.info.lora is not None else "state")
        return name

    async def save_external(self, model: be.ModelHandle, name: str) -> be.CheckpointInfo:
        """See :meth:`TinkerBackend.save_external`."""
        return await self._save(self._live_of(model), name, "base")

    async def load_state(self, model: be.ModelHandle, checkpoint: str, *, with_optimizer: bool) -> None:
        """See :meth:`TinkerBackend.load_state`."""
        live = self._live_of(model)
        try:
            await self.core.load_checkpoint(self._call(live), checkpoint, with_optimizer=with_optimizer)
        except ServiceError as exc:
            raise self._translate(exc) from None

    # ---- sampling -------------------------------------------------------------------

    async def sample(
        self,
        owner: str,
        source: str,
        prompt: Any,
        num_samples: int,
        spec: be.SampleSpec,
        *,
        prompt_logprobs: bool,
        topk_prompt_logprobs: int,
    ) -> be.SampleResult:
        """See :meth:`TinkerBackend.sample`."""
        limits = self.core.config.limits
        prompt_t = torch.as_tensor(np.asarray(prompt, dtype=np.int64))

        def prepare(base: Any) -> list[SampleRequest]:
            checked = self.core.validate_prompt(prompt_t, base)
            settings = _settings(spec, num_samples, len(checked), base, limits.max_samples_per_call)
            return [
                SampleRequest(
                    checked, settings, prompt_logprobs=prompt_logprobs, prompt_top_logprobs=topk_prompt_logprobs
                )
            ]

        try:
            if any(m.name == source for m in self.core.server_summary().models):
                (result,) = await self.core.sample_base(source, prepare)
            else:
                (result,) = await self.core.sample_checkpoint(owner, source, prepare)
        except ServiceError as exc:
            raise self._translate(exc) from None
        sequences = [
            be.SampledSequence(
                np.asarray(s.tokens, dtype=np.int64),
                np.asarray(s.logprobs, dtype=np.float32),
                "stop" if s.finish_reason == "stop" else "length",
            )
            for s in result.samples
        ]
        lp = top_ids = top_lp = None
        if result.prompt_logprobs is not None:
            lp = np.concatenate([[np.nan], result.prompt_logprobs.numpy()]).astype(np.float32)
        if result.prompt_top_logprobs is not None:  # Tinker's layout: one row per prompt token, row 0 empty
            ids, values = result.prompt_top_logprobs.token_ids.numpy(), result.prompt_top_logprobs.logprobs.numpy()
            top_ids = np.concatenate([np.zeros((1, ids.shape[1]), dtype=np.int64), ids]).astype(np.int64)
            top_lp = np.concatenate([np.full((1, ids.shape[1]), -99999.0), values]).astype(np.float32)
        return be.SampleResult(sequences, lp, top_ids, top_lp)

    # ---- checkpoints ----------------------------------------------------------------

    def _info(self, owner: str, manifest: Any) -> be.CheckpointInfo:
        lora: be.LoraSpec | None = None
        directory = self.core.checkpoint_store(owner).path(manifest.name)
        if manifest.kind == "state":
            _, core_lora = read_state_info(directory)
            lora = None if core_lora is None else _tinker_lora(core_lora)
        elif manifest.kind == "adapter":
            config = json.loads((directory / "adapter_config.json").read_text())
            targets = config.get("target_modules") or ()
            names = () if isinstance(targets, str) else tuple(targets)  # PEFT may write "all-linear"
            lora = _tinker_lora(CoreLora(int(config["r"]), 0.0, names))
        kind: Literal["state", "adapter", "external"] = (
            manifest.kind if manifest.kind in ("state", "adapter") else "external"
        )
        return be.CheckpointInfo(
            manifest.name, kind, manifest.created_at, manifest.total_bytes, manifest.base_model, lora
        )

    def list_checkpoints(self, owner: str) -> Sequence[be.CheckpointInfo]:
        """See :meth:`TinkerBackend.list_checkpoints`."""
        return [self._info(owner, m) for m in self.core.checkpoint_store(owner).all()]

    def checkpoint(self, owner: str, name: str) -> be.CheckpointInfo:
        """See :meth:`TinkerBackend.checkpoint`."""
        try:
            return self._info(owner, self.core.checkpoint_store(owner).manifest(name))
        except ServiceError as exc:
            raise self._translate(exc) from None

    async def delete_checkpoint(self, owner: str, name: str) -> None:
        """See :meth:`TinkerBackend.delete_checkpoint`."""
        try:
            await asyncio.to_thread(self.core.checkpoint_store(owner).delete, name)
        except ServiceError as exc:
            raise self._translate(exc) from None

    def checkpoint_files(self, owner: str, name: str) -> Sequence[be.CheckpointFile]:
        """See :meth:`TinkerBackend.checkpoint_files`."""
        store = self.core.checkpoint_store(owner)
        try:
            manifest = store.manifest(name)
        except ServiceError as exc:
            raise self._translate(exc) from None
        root = store.path(name)
        return [be.CheckpointFile(f.path, f.size, root / f.path) for f in manifest.files]


def _tinker_lora(lora: CoreLora) -> be.LoraSpec:
    """Tinker's view of a core LoRA spec (no target list: every layer)."""
    names = [m.lower() for m in lora.target_modules]
    if not names:
        return be.LoraSpec(lora.rank)
    return be.LoraSpec(
        lora.rank,
        train_mlp=any("mlp" in n or ("proj" in n and ("gate" in n or "up" in n or "down" in n)) for n in names),
        train_attn=any("attn" in n or "attention" in n for n in names),
        train_unembed=any("lm_head" in n for n in names),
    )


def _tensor(array: Any) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def _split(flat: torch.Tensor, lengths: Sequence[int]) -> list[np.ndarray]:
    values = flat.detach().to(torch.float32).cpu().numpy()
    ends = np.cumsum(lengths)
    return [values[e - n : e] for e, n in zip(ends, lengths, strict=True)]


def _forward_loss(
    loss: be.LossSpec, data: Sequence[be.TrainDatum], logprobs: list[np.ndarray]
) -> tuple[list[np.ndarray], dict[str, float]]:
    """A forward-only call's cross-entropy terms (what Tinker reports for ``forward``)."""
    elementwise = []
    for d, lp in zip(data, logprobs, strict=True):
        w = np.asarray(d.inputs.get("weights", np.ones_like(lp)), dtype=np.float32)
        elementwise.append((-w * lp).astype(np.float32) if loss.name == "cross_entropy" else np.zeros_like(lp))
    return elementwise, {"loss:sum": float(sum(e.sum() for e in elementwise))}


def _settings(spec: be.SampleSpec, n: int, prompt_len: int, base: Any, max_samples: int) -> SamplingSettings:
    if n > max_samples:
        raise ServiceError(
            ErrorCode.RESOURCE_EXHAUSTED, f"num_samples {n} is over the limit max_samples_per_call={max_samples}"
        )
    room = base.max_sequence_length - prompt_len
    if not 1 <= spec.max_tokens <= room:
        raise ServiceError(
            ErrorCode.INVALID_ARGUMENT,
            f"max_tokens must be in [1, {room}] for a {prompt_len}-token prompt "
            f"(model maximum length {base.max_sequence_length}), got {spec.max_tokens}",
        )
    return SamplingSettings(
        num_samples=n,
        max_tokens=spec.max_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        top_k=max(spec.top_k, 0),
        stop=tuple((int(t),) for t in spec.stop_tokens),
        seed=spec.seed,
        stop_strings=tuple(s for s in spec.stop_strings if s),
    )
