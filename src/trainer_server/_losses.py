"""Built-in losses, computed on the server from per-token logprobs.

Each loss takes the batch's concatenated target logprobs (``requires_grad``) and the
validated batch, and returns a scalar loss plus metrics. Losses are token sums, not
means, as in the Tinker SDK, so gradients add up across calls in an accumulation window.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from trainer_server._batch import Batch
from trainer_server._errors import invalid_argument

__all__ = ["LOSSES", "LossResult", "cross_entropy"]

LossResult = tuple[torch.Tensor, dict[str, float]]


def cross_entropy(logprobs: torch.Tensor, batch: Batch, config: Mapping[str, float]) -> LossResult:
    """Weighted negative log-likelihood: ``-sum(weights * logprobs)``.

    Raises:
        ServiceError: INVALID_ARGUMENT when a config key is given (it takes none).
    """
    if config:
        raise invalid_argument(f"cross_entropy takes no loss_fn_config, got {sorted(config)}")
    weights = batch.flat_weights().to(logprobs.device)
    loss = -(weights * logprobs).sum()
    total_weight = float(weights.sum())
    return loss, {
        "loss:sum": float(loss.detach()),
        "weights:sum": total_weight,
        "nll:mean": float(loss.detach()) / total_weight if total_weight else 0.0,
    }


LOSSES: dict[str, Callable[[torch.Tensor, Batch, Mapping[str, float]], LossResult]] = {
    "cross_entropy": cross_entropy,
}
"""Built-in losses by the name clients send in ``ForwardBackwardStart.loss_fn``."""
