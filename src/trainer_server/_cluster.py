"""The processes one server runs on: one alone, or N ranks started by ``accelerate launch``.

Under ``accelerate launch`` (or ``torchrun``) every process runs ``trainer-server``;
:func:`init_cluster` joins the process group through accelerate's ``PartialState``, on
NCCL for GPUs or gloo on CPU, with a long timeout so idle ranks do not give up waiting for
work. Rank 0 serves gRPC; the others run :func:`trainer_server.core.ops.serve_worker`.

Python objects (operations, batches, per-rank results) travel over a gloo group, which
works beside NCCL and supports ``gather_object``; parameter gradients are summed with
``all_reduce`` on the default group (NCCL on GPUs). Any failure of a collective (a rank
that died, or did not answer within the timeout) is raised as :class:`ClusterFailure`:
the ranks can no longer be trusted to be in step, so the server stops training.

Under ``accelerate launch --use_fsdp --fsdp_version 2`` the cluster carries an
:class:`~trainer_server._fsdp.FsdpPlan` and session models are sharded instead of replicated.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from trainer_server._fsdp import FsdpPlan, plan_from_env

__all__ = ["DEFAULT_TIMEOUT_S", "Cluster", "ClusterFailure", "init_cluster", "pick_device"]

log = logging.getLogger("trainer_server.cluster")

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 1800.0
"""How long a rank waits in a collective (for work, or for a slow peer) before it fails."""

_UNSUPPORTED = {
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
}


class ClusterFailure(RuntimeError):
    """A collective failed: a rank died, hung past the timeout, or the group broke."""


def pick_device(requested: str | None) -> torch.device:
    """The configured device, or CUDA when available, else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Cluster:
    """Where this process stands among the server's processes, and the collectives between them.

    A single-process server is a cluster of one: every method works and moves nothing.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: pick_device(None))
    mode: str = "single"
    """``single``, accelerate's distributed type (``MULTI_GPU``, ``MULTI_CPU`` ...), or ``FSDP``."""
    backend: str = ""
    fsdp: FsdpPlan | None = None
    """How session models are sharded; None: every rank holds a whole replica."""
    _objects: Any = None  # the process group objects travel on

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def model_device(self) -> torch.device:
        """Where base models load: the CPU under FSDP (sessions shard from there), else the device."""
        return torch.device("cpu") if self.fsdp is not None else self.device

    def agree(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank (same shape and dtype everywhere)."""
        if self.distributed:
            self._collective("broadcast", lambda: dist.broadcast(tensor, src=0))  # the device's own backend
        return tensor

    def _collective(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as exc:  # gloo/NCCL raise RuntimeError (and subclasses) on a lost peer or timeout
            raise ClusterFailure(f"{what} across {self.world_size} processes failed: {exc}") from exc

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (the others pass nothing)."""
        if not self.distributed:
            return obj
        box = [obj]
        self._collective("broadcast", lambda: dist.broadcast_object_list(box, src=0, group=self._objects))
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` on rank 0, in rank order (other ranks get an empty list)."""
        if not self.distributed:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        self._collective("gather", lambda: dist.gather_object(obj, out, dst=0, group=self._objects))
        return out or []

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the ranks, in place, on every rank."""
        if self.distributed:
            self._collective("all_reduce", lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM))

    def close(self) -> None:
        """Leave the process group."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_cluster(device: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Cluster:
    """Join the launcher's process group, or return a cluster of one when not launched.

    Args:
        device: the device requested on the command line; in a process group each rank
            uses accelerate's device for it (``cuda:LOCAL_RANK``, or the CPU).
        timeout_s: how long a collective may wait.

    Raises:
        ValueError: for an accelerate configuration this server does not run (FSDP version 1,
            DeepSpeed, Megatron-LM): failing at start beats silently doing something else.
    """
    if _launched_world_size() <= 1:
        return Cluster(device=pick_device(device))
    for env, name in _UNSUPPORTED.items():
        if os.environ.get(env, "false").lower() in ("1", "true"):
            raise ValueError(
                f"this server replicates or FSDP-shards the model; {name} is not supported yet. "
                "Launch without it (see docs/DISTRIBUTED.md)."
            )
    fsdp = plan_from_env() if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true") else None
    cpu = device == "cpu" or not torch.cuda.is_available()
    if fsdp is not None and fsdp.offloads and cpu:
        raise ValueError("fsdp_offload_params moves parameters from GPUs to the CPU; these ranks run on the CPU")
    from accelerate import PartialState

    timeout = datetime.timedelta(seconds=timeout_s)
    state = PartialState(cpu=cpu, timeout=timeout)
    if state.num_processes <= 1:  # pragma: no cover - accelerate fell back to one process
        raise ValueError(f"launched with WORLD_SIZE={_launched_world_size()}, but accelerate formed no process group")
    rank_device = torch.device(state.device)
    if rank_device.type == "cpu":
        rank_device = torch.device("cpu")  # accelerate says "cpu:0", which some libraries (safetensors) refuse
    if rank_device.type == "cuda":
        torch.cuda.set_device(rank_device)
    backend = str(dist.get_backend())
    objects = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    cluster = Cluster(
        rank=state.process_index,
        world_size=state.num_processes,
        device=rank_device,
        mode="FSDP" if fsdp is not None else str(state.distributed_type.value),
        backend=backend,
        fsdp=fsdp,
        _objects=objects,
    )
    if fsdp is not None:
        log.info("session models are sharded: %s", fsdp.describe())
    log.info("rank %d of %d on %s (%s, %s)", cluster.rank, cluster.world_size, rank_device, cluster.mode, backend)
    return cluster
