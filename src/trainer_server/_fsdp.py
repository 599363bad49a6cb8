"""FSDP: session models sharded over the ranks (``accelerate launch --use_fsdp --fsdp_version 2``).

The configuration is accelerate's own: :func:`plan_from_env` builds accelerate's
``FullyShardedDataParallelPlugin`` from the launcher's environment (reshard after forward,
CPU offload, mixed precision, auto-wrap policy and layer classes), and :func:`shard` applies
torch's FSDP2 ``fully_shard`` by it: one FSDP unit per wrapped layer (by default the model's
``_no_split_modules``, e.g. ``LlamaDecoderLayer``) and one for the rest. accelerate's own
``Accelerator`` only sets FSDP up on GPUs; applying the plugin here gives one code path on
GPUs (NCCL) and on CPUs (gloo, where the tests run).

Gradients are reduce-scattered as a **sum** (divide factor 1, sum-only collectives, which
gloo needs), so a sharded session's gradients equal one process's on the whole batch, as
with the replicated (DDP-style) mode. Everything that reads whole tensors (checkpoints,
gradient norms) calls :func:`full`, a collective: every rank must make the same calls in
the same order, which the op protocol (:mod:`trainer_server.core.ops`) guarantees.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

__all__ = ["FsdpPlan", "full", "is_sharded", "plan_from_env", "shard", "sharded_like"]

log = logging.getLogger("trainer_server.fsdp")


class FsdpPlan:
    """How session models are sharded: accelerate's FSDP plugin, read from the environment.

    Args:
        plugin: an ``accelerate.utils.FullyShardedDataParallelPlugin`` with ``fsdp_version=2``.
    """

    def __init__(self, plugin: Any) -> None:
        self.plugin = plugin

    @property
    def reshard_after_forward(self) -> bool:
        """Free the gathered parameters after each unit's forward (accelerate's default: yes)."""
        return bool(self.plugin.reshard_after_forward)

    @property
    def offloads(self) -> bool:
        """Parameters live on the CPU between uses (``fsdp_offload_params``)."""
        from torch.distributed.fsdp import CPUOffloadPolicy

        return isinstance(self.plugin.cpu_offload, CPUOffloadPolicy)

    def describe(self) -> str:
        """One line for the log."""
        offload = type(self.plugin.cpu_offload).__name__
        mp = self.plugin.mixed_precision_policy
        return f"FSDP2, reshard_after_forward={self.reshard_after_forward}, offload={offload}, mixed_precision={mp}"


def plan_from_env() -> FsdpPlan:
    """The FSDP configuration accelerate's launcher put in the launcher's environment.

    Raises:
        ValueError: FSDP version 1 (this server shards with FSDP2 only).
    """
    from accelerate.utils import FullyShardedDataParallelPlugin

    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ValueError(
            "this server shards models with FSDP2: set fsdp_version: 2 in the accelerate config "
            "(or pass --fsdp_version 2 to accelerate launch)"
        )
    plugin = FullyShardedDataParallelPlugin()
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mixed in ("bf16", "fp16") and plugin.mixed_precision_policy is None:
        plugin.set_mixed_precision(mixed)
    if plugin.activation_checkpointing:
        log.warning("FSDP activation checkpointing is not applied by this server (it is ignored)")
    return FsdpPlan(plugin)


def shard(model: torch.nn.Module, plan: FsdpPlan) -> None:
    """Shard ``model`` in place over every rank of the default process group (collective).

    Parameters move to this rank's device (``fully_shard`` moves CPU parameters to the
    mesh's device); each rank keeps 1/N of every tensor.
    """
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    plugin = plan.plugin
    kwargs: dict[str, Any] = {
        "reshard_after_forward": plan.reshard_after_forward,
        "offload_policy": plugin.cpu_offload,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
    }
    wrap = fsdp2_prepare_auto_wrap_policy(plugin, model) or _no_split_policy(model)
    for module in reversed(list(model.modules())):  # innermost first, as FSDP2 expects
        if module is not model and wrap(module) and not isinstance(module, FSDPModule):
            fully_shard(module, **kwargs)
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})  # the root runs first in backward
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def _no_split_policy(model: torch.nn.Module) -> Any:
    """Wrap the model's ``_no_split_modules`` classes (transformers' decoder layers)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return lambda module: type(module).__name__ in names


def is_sharded(tensor: torch.Tensor) -> bool:
    """A DTensor (an FSDP parameter, gradient or optimizer moment)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank when sharded (collective), else itself."""
    if is_sharded(tensor):
        gathered: torch.Tensor = tensor.full_tensor()  # type: ignore[attr-defined]
        return gathered
    return tensor


def sharded_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor, the same on every rank) laid out as ``like`` is: sharded or not."""
    if not is_sharded(like):
        return value.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    mesh, placements = like.device_mesh, like.placements  # type: ignore[attr-defined]
    return distribute_tensor(value.to(mesh.device_type), mesh, placements, src_data_rank=None)
