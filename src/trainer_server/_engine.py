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
from trainer_server._fsdp import FsdpPlan, full, shard
from trainer_server._models import BaseModel
from trainer_server.core.errors import ErrorCode, ServiceError, invalid_argument
from trainer_server.core.types import LoraSpec

__all__ = ["AdamSettings", "SessionModel", "default_lora_targets", "share_base_copy"]

_ADAM_FIELDS = frozenset({"learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"})


class AdamSettings:
    """AdamW hyperparameters with defaults and range checks.

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
        if self.lr < 0:
            raise invalid_argument(f"adam_params.learning_rate must be >= 0, got {self.lr}")
        for name, beta in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0.0 <= beta < 1.0:
                raise invalid_argument(f"adam_params.{name} must be in [0, 1), got {beta}")
        if self.eps <= 0:
            raise invalid_argument(f"adam_params.eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise invalid_argument(f"adam_params.weight_decay must be >= 0, got {self.weight_decay}")
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

    def backward(self, logprobs: torch.Tensor, grad_output: torch.Tensor) -> None:
        """Finish the backward pass from d_loss/d_logprobs; gradients accumulate."""
        torch.autograd.backward(logprobs, grad_output.to(device=logprobs.device, dtype=logprobs.dtype))

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

    def optim_step(self, settings: AdamSettings) -> tuple[int, float]:
        """Apply AdamW to the accumulated gradients, clear them; return (step, grad norm).

        Raises:
            ServiceError: FAILED_PRECONDITION when the gradient norm is not finite (the
                step is not applied and the gradients are kept for inspection).
        """
        grads = [p.grad for p in self.params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        norm = float(full(total))  # sharded gradients: the norm is gathered (every rank asks)
        if not math.isfinite(norm):
            raise ServiceError(
                ErrorCode.FAILED_PRECONDITION, f"gradient norm is {norm}; the optimizer step was not applied"
            )
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr)
        for group in self.optimizer.param_groups:
            group.update(
                lr=settings.lr,
                betas=(settings.beta1, settings.beta2),
                eps=settings.eps,
                weight_decay=settings.weight_decay,
            )
        if settings.grad_clip_norm > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(self.params, settings.grad_clip_norm, total)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return self.step, norm
