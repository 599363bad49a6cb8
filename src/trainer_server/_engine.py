"""Model work for one training session; every function here runs on the device thread.

A :class:`SessionModel` owns what a session trains: a full copy of the base model, or a
LoRA adapter (peft) over the base model's own, shared, frozen tensors; the AdamW state;
and the step counter. Under FSDP the session's model (adapter and base tensors alike) is
sharded over the ranks after it is built (:mod:`trainer_server._fsdp`). Its methods are
synchronous and are only ever called from the server's single device executor, so no two
of them run at once and the event loop never blocks on torch.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch

from trainer_server._batch import Batch
from trainer_server._fsdp import FsdpPlan, full, is_sharded, shard
from trainer_server._models import BaseModel
from trainer_server.core.errors import ErrorCode, ServiceError, invalid_argument
from trainer_server.core.types import LoraSpec

__all__ = ["MAX_LEARNING_RATE", "MIN_EPS", "AdamSettings", "SessionModel", "default_lora_targets", "share_base_copy"]

_ADAM_FIELDS = frozenset({"learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"})
MAX_LEARNING_RATE = 10.0
"""Largest accepted learning rate: an AdamW step moves each weight by about the learning rate,
so a larger one leaves no trained weight meaningful (``1e30`` turned every logprob into NaN)."""
MIN_EPS = 1e-30
"""Smallest accepted ``eps``: the step divides by ``sqrt(v) + eps``, and a gradient whose square
underflows to 0 would otherwise be divided by almost nothing."""


class AdamSettings:
    """AdamW hyperparameters with defaults and range checks.

    Accepted ranges (INVALID_ARGUMENT outside them, nothing applied): every value finite;
    ``0 <= learning_rate <= MAX_LEARNING_RATE``; ``0 <= beta1, beta2 < 1``;
    ``MIN_EPS <= eps <= 1``; ``weight_decay >= 0`` with ``learning_rate * weight_decay <= 1``
    (each step multiplies the weights by ``1 - learning_rate * weight_decay``, which must not
    flip their sign); ``grad_clip_norm >= 0`` (0 disables clipping).

    Args:
        values: the hyperparameters a caller set, by their wire names (``learning_rate``,
            ``beta1``, ``beta2``, ``eps``, ``weight_decay``, ``grad_clip_norm``); the rest
            take their defaults.
    """

    def __init__(self, values: Mapping[str, float] | None = None) -> None:
        given = dict(values or {})
        unknown = sorted(set(given) - _ADAM_FIELDS)
        if unknown:
            raise invalid_argument(f"adam_params has no field(s) {unknown}; known: {sorted(_ADAM_FIELDS)}")

        def get(name: str, default: float) -> float:
            return float(given.get(name, default))

        self.lr = get("learning_rate", 1e-4)
        self.beta1 = get("beta1", 0.9)
        self.beta2 = get("beta2", 0.95)
        self.eps = get("eps", 1e-12)
        self.weight_decay = get("weight_decay", 0.0)
        self.grad_clip_norm = get("grad_clip_norm", 0.0)
        for name, value in vars(self).items():
            if not math.isfinite(value):
                field = "learning_rate" if name == "lr" else name  # the wire field's name
                raise invalid_argument(f"adam_params.{field} must be finite, got {value}")
        if not 0.0 <= self.lr <= MAX_LEARNING_RATE:
            raise invalid_argument(f"adam_params.learning_rate must be in [0, {MAX_LEARNING_RATE:g}], got {self.lr:g}")
        for name, beta in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0.0 <= beta < 1.0:
                raise invalid_argument(f"adam_params.{name} must be in [0, 1), got {beta}")
        if not MIN_EPS <= self.eps <= 1.0:
            raise invalid_argument(f"adam_params.eps must be in [{MIN_EPS:g}, 1], got {self.eps:g}")
        if self.weight_decay < 0:
            raise invalid_argument(f"adam_params.weight_decay must be >= 0, got {self.weight_decay}")
        if self.lr * self.weight_decay > 1.0:
            raise invalid_argument(
                f"adam_params.learning_rate * weight_decay must be <= 1 (each step multiplies the weights by "
                f"1 - learning_rate * weight_decay), got {self.lr:g} * {self.weight_decay:g}"
            )
        if self.grad_clip_norm < 0:
            raise invalid_argument(f"adam_params.grad_clip_norm must be >= 0 (0 disables), got {self.grad_clip_norm}")


def default_lora_targets(model: torch.nn.Module) -> list[str]:
    """Names of every linear layer, the output layer included (Tinker's ``train_unembed``).

    peft's "all-linear" leaves out the output layer; a model whose output layer is frozen
    cannot rescale its logits, which matters for small or freshly initialised models.
    """
    from transformers.pytorch_utils import Conv1D

    return sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear | Conv1D)}
    )


def share_base_copy(model: torch.nn.Module, *, new_parameters: bool = False) -> torch.nn.Module:
    """A structural copy of ``model`` over the same parameter data (no weights are copied).

    The copy's parameters are the very same objects, or with ``new_parameters`` new
    Parameter objects over the same data: then re-binding them (``fully_shard`` gives a
    parameter new data when it moves or shards it) leaves the original's parameters alone.
    """
    memo: dict[int, Any] = {
        id(p): torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad) if new_parameters else p
        for p in model.parameters()
    }
    return copy.deepcopy(model, memo)


class SessionModel:
    """What one session trains.

    Args:
        base: the base model.
        lora: LoRA settings, or None for a full fine-tune.
        seed: seeds the adapter initialisation.
        fsdp: shard the model over the ranks this way (collective: every rank builds the
            session together); None keeps a whole model here.
        device: where the session computes; by default the base model's device.
    """

    def __init__(
        self,
        base: BaseModel,
        lora: LoraSpec | None,
        seed: int,
        *,
        fsdp: FsdpPlan | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.base = base
        self.device = device or base.device
        self.sharded = fsdp is not None
        self.lora = lora
        self.seed = seed
        self.last_base = ""
        """Name of the session's last BASE checkpoint (what a DELTA is taken against)."""
        # LoRA shares the base's tensors only where they stay as they are: moving a module
        # (``.to``, or ``fully_shard`` onto a GPU) rewrites its parameters' data in place.
        share = fsdp is None and self.device == base.device
        if fsdp is not None:
            # Sharding copies each rank's rows into new tensors: no whole copy of the base is made.
            source = share_base_copy(base.model, new_parameters=True)
        elif lora is not None and share:
            source = share_base_copy(base.model)
        else:
            source = copy.deepcopy(base.model)
        if lora is None:
            self.model: Any = source
            self.model.requires_grad_(True)
        else:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=lora.rank,
                lora_alpha=cast(Any, lora.alpha or lora.rank),  # peft annotates int; floats work
                target_modules=list(lora.target_modules) or default_lora_targets(base.model),
                lora_dropout=0.0,
                bias="none",
            )
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecations inside peft
                torch.manual_seed(seed)
                self.model = get_peft_model(source, config)
        if fsdp is not None:
            # Each session shards its own copy: LoRA sessions hold 1/N of the base each, and
            # the unsharded base stays on the CPU, unchanged, as the source of every session.
            shard(self.model, fsdp)
        elif not share:
            self.model.to(self.device)  # a whole model away from the base's device (FSDP, rank 0)
        self.model.eval()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer: torch.optim.AdamW | None = None
        self.step = 0

    @property
    def has_gradients(self) -> bool:
        """Whether gradients were accumulated since the last optimizer step."""
        return any(p.grad is not None for p in self.params)

    @property
    def num_trainable(self) -> int:
        """Trainable parameter count."""
        return sum(p.numel() for p in self.params)

    @property
    def num_total(self) -> int:  # a sharded tensor's numel is its whole size
        """Parameter count of the session's model (shared base included)."""
        return sum(p.numel() for p in self.model.parameters())

    def logprobs(self, batch: Batch, *, grad: bool) -> torch.Tensor:
        """Per-target logprobs of the batch, concatenated in datum order (float32).

        Sequences are right-padded into one batch; with causal attention a real token
        never attends to the padding after it, so padding does not change the result.
        With ``grad`` the autograd graph is kept for a later :meth:`backward`.
        """
        lengths = batch.lengths
        width = max(lengths)
        ids = torch.zeros(len(lengths), width, dtype=torch.int64)
        targets = torch.zeros_like(ids)
        mask = torch.zeros(len(lengths), width, dtype=torch.bool)
        for row, (tok, tgt) in enumerate(zip(batch.tokens, batch.targets, strict=True)):
            ids[row, : len(tok)] = tok
            targets[row, : len(tgt)] = tgt
            mask[row, : len(tok)] = True
        ids, targets, mask = ids.to(self.device), targets.to(self.device), mask.to(self.device)
        with torch.set_grad_enabled(grad):
            logits: torch.Tensor = self.model(input_ids=ids, attention_mask=mask.long()).logits.float()
            target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            logprobs = target_logits - torch.logsumexp(logits, dim=-1)
            return logprobs[mask]

    def backward(
        self,
        logprobs: torch.Tensor | None,
        grad_output: torch.Tensor,
        all_reduce_sum_: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        """Finish the backward pass from d_loss/d_logprobs; gradients accumulate.

        The new gradients are computed apart from the accumulated ones and added only when
        the sum stays usable by a step: the bound ``|old| + |new|`` on its L2 norm must stay
        below the square root of the largest value of the parameters' dtype, so the norm
        the step computes, and every squared element AdamW keeps, are finite. Otherwise
        nothing is added: the gradients accumulated before stay exactly as they were and the
        session keeps training.

        Args:
            logprobs: the held forward's logprobs; None on a rank without a share of the
                batch (it still takes part in the ranks' agreement).
            grad_output: d_loss/d_logprobs, one value per logprob.
            all_reduce_sum_: for replicated ranks, sums a tensor over the ranks: every rank
                then adds or refuses together, and the sum over ranks at the step stays
                finite too. None for one process or a sharded model (whose norms are
                already global).

        Raises:
            ServiceError: INVALID_ARGUMENT when the gradients would not stay finite;
                nothing was applied.
        """
        before = [p.grad for p in self.params]
        added: list[torch.Tensor | None] = [None] * len(self.params)
        if logprobs is not None:
            for p in self.params:
                p.grad = None
            try:
                torch.autograd.backward(logprobs, grad_output.to(device=logprobs.device, dtype=logprobs.dtype))
                added = [p.grad for p in self.params]
            finally:
                for p, old in zip(self.params, before, strict=True):
                    p.grad = old
        bound = _norm(before) + _norm(added)
        check = torch.tensor([bound], dtype=torch.float64, device=self.device)
        if all_reduce_sum_ is not None:
            all_reduce_sum_(check)  # inf or NaN on any rank makes the sum so on every rank
        bound = float(check)
        limit = math.sqrt(min(torch.finfo(p.dtype).max for p in self.params)) if self.params else math.inf
        if not bound < limit:
            raise invalid_argument(
                f"the backward would make the parameter gradients non-finite (gradient norm up to {bound:.3g}, "
                f"limit {limit:.3g} for the parameters' dtype); it was not applied and the gradients accumulated "
                "before it are kept"
            )
        with torch.no_grad():
            for p, old, new in zip(self.params, before, added, strict=True):
                if old is not None and new is not None:
                    old.add_(new)  # what autograd's own accumulation does, bit for bit
                elif new is not None:
                    p.grad = new

    def sum_gradients(self, all_reduce_sum_: Callable[[torch.Tensor], None]) -> None:
        """Replace each rank's gradients by their sum over the ranks (before a step).

        A parameter keeps ``grad=None`` only when no rank has a gradient for it, so AdamW
        skips exactly the parameters a single process would skip. Gradients travel as one
        flat buffer per dtype: two collectives per step, whatever the parameter count.
        """
        present = torch.tensor([p.grad is not None for p in self.params], dtype=torch.float32, device=self.device)
        all_reduce_sum_(present)
        touched = [p for p, n in zip(self.params, present.tolist(), strict=True) if n > 0]
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in touched:
            by_dtype.setdefault(p.dtype, []).append(p)
        for params in by_dtype.values():
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            all_reduce_sum_(flat)
            offset = 0
            for p in params:
                p.grad = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()

    def optim_step(
        self, settings: AdamSettings, all_reduce_sum_: Callable[[torch.Tensor], None] | None = None
    ) -> tuple[int, float]:
        """Apply AdamW to the accumulated gradients, clear them; return (step, grad norm).

        A step that would make a weight or the optimizer's state non-finite is undone: the
        tensors it changes are saved first and put back, so a refused step changes nothing.

        Args:
            settings: the step's hyperparameters.
            all_reduce_sum_: for a sharded model, sums a tensor over the ranks, so that
                every rank keeps or undoes the step together; None otherwise (replicas take
                identical steps).

        Raises:
            ServiceError: FAILED_PRECONDITION when the gradient norm is not finite, or when
                the step would make weights or optimizer state non-finite; nothing changed.
        """
        grads = [p.grad for p in self.params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        norm = float(full(total))  # sharded gradients: the norm is gathered (every rank asks)
        if not math.isfinite(norm):
            raise ServiceError(
                ErrorCode.FAILED_PRECONDITION, f"gradient norm is {norm}; the optimizer step was not applied"
            )
        created = self.optimizer is None
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr)
        optimizer = self.optimizer
        for group in optimizer.param_groups:
            group.update(
                lr=settings.lr,
                betas=(settings.beta1, settings.beta2),
                eps=settings.eps,
                weight_decay=settings.weight_decay,
            )
        changed = [p for p in self.params if p.grad is not None]
        clip = settings.grad_clip_norm > 0 and bool(grads)
        # clipping scales the gradients by grad_clip_norm / (norm + 1e-6) when that is below 1
        saved = _StepUndo(optimizer, changed, grads=clip and norm + 1e-6 > settings.grad_clip_norm)
        try:
            if clip:
                torch.nn.utils.clip_grads_with_norm_(self.params, settings.grad_clip_norm, total)
            optimizer.step()
            finite = _all_finite(saved.touched(), all_reduce_sum_)
        except BaseException:  # e.g. a scalar overflow half-way through the parameters
            saved.restore()
            if created:
                self.optimizer = None
            raise
        if not finite:
            saved.restore()
            if created:
                self.optimizer = None
            raise ServiceError(
                ErrorCode.FAILED_PRECONDITION,
                f"the optimizer step would make weights or optimizer state non-finite (learning_rate "
                f"{settings.lr:g} too large for these gradients?); it was not applied and nothing changed",
            )
        optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return self.step, norm


def _norm(grads: list[torch.Tensor | None]) -> float:
    """L2 norm of the gradients present (gathered when sharded: every rank must ask)."""
    present = [g for g in grads if g is not None]
    return float(full(torch.nn.utils.get_total_norm(present))) if present else 0.0


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a tensor held here (a sharded DTensor's local shard, else the tensor)."""
    return cast(torch.Tensor, tensor.to_local()) if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def _all_finite(tensors: list[torch.Tensor], all_reduce_sum_: Callable[[torch.Tensor], None] | None) -> bool:
    """Whether every element of every tensor is finite (on every rank, with ``all_reduce_sum_``)."""
    local = [t for t in map(_local, tensors) if t.numel()]  # a rank's shard of a small tensor may be empty
    largest = torch._foreach_norm(local, math.inf) if local else []  # one fused pass; NaN propagates
    bad = torch.zeros((), dtype=torch.float64, device=local[0].device if local else None)
    if largest:
        bad += (~torch.isfinite(torch.stack([m.float() for m in largest]))).sum()
    if all_reduce_sum_ is not None:
        all_reduce_sum_(bad)
    return float(bad) == 0


class _StepUndo:
    """Copies of what one optimizer step changes, to put back if the step is refused.

    Only the parameters with a gradient (and their AdamW state) are copied: the step
    leaves the others alone. The gradients are copied only when the step clips them.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], *, grads: bool) -> None:
        self.optimizer = optimizer
        self.params = params
        with torch.no_grad():
            self.weights = [p.detach().clone() for p in params]
            self.grads = [cast(torch.Tensor, p.grad).clone() for p in params] if grads else None
            self.states: list[dict[str, Any] | None] = [
                {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in optimizer.state[p].items()}
                if p in optimizer.state
                else None
                for p in params
            ]

    def touched(self) -> list[torch.Tensor]:
        """The tensors the step may have changed: parameters and their optimizer state."""
        state = [v for p in self.params for v in self.optimizer.state.get(p, {}).values()]
        return [*self.params, *(v for v in state if isinstance(v, torch.Tensor) and v.is_floating_point())]

    def restore(self) -> None:
        """Put every copied tensor back."""
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(self.weights[i])
                if self.grads is not None:
                    cast(torch.Tensor, p.grad).copy_(self.grads[i])
                state = self.states[i]
                if state is None:
                    self.optimizer.state.pop(p, None)
                else:
                    self.optimizer.state[p] = state
