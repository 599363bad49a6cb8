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

__all__ = ["LOSSES", "LossResult", "cispo", "cross_entropy", "dro", "importance_sampling", "ppo"]

LossResult = tuple[torch.Tensor, dict[str, float]]


def cross_entropy(logprobs: torch.Tensor, batch: Batch, config: Mapping[str, float]) -> LossResult:
    """Weighted negative log-likelihood: ``-sum(weights * logprobs)``.

    Raises:
        ServiceError: INVALID_ARGUMENT when a config key is given (it takes none).
    """
    _config("cross_entropy", config, {})
    weights = batch.flat_weights().to(logprobs.device)
    loss = -(weights * logprobs).sum()
    total_weight = float(weights.sum())
    return loss, {
        "loss:sum": float(loss.detach()),
        "weights:sum": total_weight,
        "nll:mean": float(loss.detach()) / total_weight if total_weight else 0.0,
    }


def _config(name: str, config: Mapping[str, float], defaults: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise invalid_argument(f"{name} does not take {unknown}; its loss_fn_config keys are {sorted(defaults)}")
    return {**defaults, **config}


def _rl_inputs(logprobs: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampler logprobs, advantages and weights, flat and on the logprobs' device."""
    device = logprobs.device
    sampled = batch.flat_extra("logprobs").to(device)
    advantages = batch.flat_extra("advantages").to(device)
    return sampled, advantages, batch.flat_weights().to(device)


def _ratio_metrics(ratio: torch.Tensor, loss: torch.Tensor) -> dict[str, float]:
    r = ratio.detach()
    return {"loss:sum": float(loss.detach()), "ratio:mean": float(r.mean()), "ratio:max": float(r.max())}


def importance_sampling(logprobs: torch.Tensor, batch: Batch, config: Mapping[str, float]) -> LossResult:
    """Policy gradient with an importance weight: ``-sum(exp(lp - lp_sampler) * A)``.

    Inputs per datum: ``target_tokens``, ``logprobs`` (from the sampler), ``advantages``;
    ``weights`` (default ones) masks tokens.
    """
    _config("importance_sampling", config, {})
    sampled, advantages, weights = _rl_inputs(logprobs, batch)
    ratio = torch.exp(logprobs - sampled)
    loss = -(weights * ratio * advantages).sum()
    return loss, _ratio_metrics(ratio, loss)


def ppo(logprobs: torch.Tensor, batch: Batch, config: Mapping[str, float]) -> LossResult:
    """PPO's clipped objective: ``-sum(min(r * A, clip(r, low, high) * A))``.

    Config: ``clip_low_threshold`` (default 0.8) and ``clip_high_threshold`` (default 1.2).
    """
    cfg = _config("ppo", config, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2})
    sampled, advantages, weights = _rl_inputs(logprobs, batch)
    ratio = torch.exp(logprobs - sampled)
    clipped = torch.clamp(ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"])
    objective = torch.minimum(ratio * advantages, clipped * advantages)
    loss = -(weights * objective).sum()
    metrics = _ratio_metrics(ratio, loss)
    metrics["clipped:fraction"] = float(((ratio != clipped) & (weights != 0)).float().mean())
    return loss, metrics


def cispo(logprobs: torch.Tensor, batch: Batch, config: Mapping[str, float]) -> LossResult:
    """CISPO: ``-sum(sg(clip(r, low, high)) * lp * A)``; the clipped ratio carries no gradient.

    Config: ``clip_low_threshold`` (default 0.8) and ``clip_high_threshold`` (default 1.2).
    """
    cfg = _config("cispo", config, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2})
    sampled, advantages, weights = _rl_inputs(logprobs, batch)
    ratio = torch.exp(logprobs - sampled)
    clipped = torch.clamp(ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"]).detach()
    loss = -(weights * clipped * logprobs * advantages).sum()
    return loss, _ratio_metrics(ratio, loss)


def dro(logprobs: torch.Tensor, batch: Batch, config: Mapping[str, float]) -> LossResult:
    """DRO: ``-sum(lp * A - beta / 2 * (lp - lp_sampler) ** 2)``.

    Config: ``beta`` (default 0.05).
    """
    cfg = _config("dro", config, {"beta": 0.05})
    sampled, advantages, weights = _rl_inputs(logprobs, batch)
    objective = logprobs * advantages - 0.5 * cfg["beta"] * (logprobs - sampled) ** 2
    loss = -(weights * objective).sum()
    return loss, {"loss:sum": float(loss.detach())}


LOSSES: dict[str, Callable[[torch.Tensor, Batch, Mapping[str, float]], LossResult]] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
}
"""Built-in losses by the name clients send in ``ForwardBackwardStart.loss_fn``."""
