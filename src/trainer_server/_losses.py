"""Built-in losses, computed on the server from per-token logprobs.

Each loss takes the batch's concatenated target logprobs (``requires_grad``) and the
validated batch, and returns a scalar loss plus metrics. Losses are token sums, not
means, as in the Tinker SDK, so gradients add up across calls in an accumulation window.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from trainer_server._batch import Batch
from trainer_server._errors import echo, invalid_argument

__all__ = ["LOSSES", "LossResult", "cispo", "cross_entropy", "dro", "importance_sampling", "ppo", "validate"]

LossResult = tuple[torch.Tensor, dict[str, float]]

CONFIG_DEFAULTS: dict[str, dict[str, float]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "dro": {"beta": 0.05},
}
REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": (),
    "importance_sampling": ("logprobs", "advantages"),
    "ppo": ("logprobs", "advantages"),
    "cispo": ("logprobs", "advantages"),
    "dro": ("logprobs", "advantages"),
}
"""Each loss's loss_fn_config keys and defaults, and the loss_fn_inputs it needs besides target_tokens."""


def cross_entropy(logprobs: torch.Tensor, batch: Batch, config: Mapping[str, float]) -> LossResult:
    """Weighted negative log-likelihood: ``-sum(weights * logprobs)``.

    Raises:
        ServiceError: INVALID_ARGUMENT when a config key is given (it takes none).
    """
    _config("cross_entropy", config, CONFIG_DEFAULTS["cross_entropy"])
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
        listed = ", ".join(echo(key) for key in unknown[:5]) + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        )
        raise invalid_argument(f"{name} does not take {listed}; its loss_fn_config keys are {sorted(defaults)}")
    cfg = {**defaults, **config}
    for key, value in cfg.items():
        if not math.isfinite(value):
            raise invalid_argument(f"{name}: loss_fn_config[{echo(key)}] must be finite, got {value}")
    if "clip_low_threshold" in cfg and not 0 <= cfg["clip_low_threshold"] <= cfg["clip_high_threshold"]:
        raise invalid_argument(
            f"{name}: need 0 <= clip_low_threshold <= clip_high_threshold, got "
            f"{cfg['clip_low_threshold']} and {cfg['clip_high_threshold']}"
        )
    if cfg.get("beta", 0.0) < 0:
        raise invalid_argument(f"{name}: loss_fn_config['beta'] must be >= 0, got {cfg['beta']}")
    return cfg


def _rl_inputs(logprobs: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampler logprobs, advantages and weights, flat and on the logprobs' device."""
    device = logprobs.device
    sampled = batch.flat_extra("logprobs").to(device)
    advantages = batch.flat_extra("advantages").to(device)
    return sampled, advantages, batch.flat_weights().to(device)


def _ratio_metrics(ratio: torch.Tensor, loss: torch.Tensor, weights: torch.Tensor) -> dict[str, float]:
    """Loss, and ratio statistics over the tokens that count (weight != 0; prompt tokens do not)."""
    live = weights != 0
    r = ratio.detach()[live] if bool(live.any()) else ratio.detach()
    return {"loss:sum": float(loss.detach()), "ratio:mean": float(r.mean()), "ratio:max": float(r.max())}


def importance_sampling(logprobs: torch.Tensor, batch: Batch, config: Mapping[str, float]) -> LossResult:
    """Policy gradient with an importance weight: ``-sum(exp(lp - lp_sampler) * A)``.

    Inputs per datum: ``target_tokens``, ``logprobs`` (from the sampler), ``advantages``;
    ``weights`` (default ones) masks tokens.
    """
    _config("importance_sampling", config, CONFIG_DEFAULTS["importance_sampling"])
    sampled, advantages, weights = _rl_inputs(logprobs, batch)
    ratio = torch.exp(logprobs - sampled)
    loss = -(weights * ratio * advantages).sum()
    return loss, _ratio_metrics(ratio, loss, weights)


def ppo(logprobs: torch.Tensor, batch: Batch, config: Mapping[str, float]) -> LossResult:
    """PPO's clipped objective: ``-sum(min(r * A, clip(r, low, high) * A))``.

    Config: ``clip_low_threshold`` (default 0.8) and ``clip_high_threshold`` (default 1.2).
    """
    cfg = _config("ppo", config, CONFIG_DEFAULTS["ppo"])
    sampled, advantages, weights = _rl_inputs(logprobs, batch)
    ratio = torch.exp(logprobs - sampled)
    clipped = torch.clamp(ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"])
    objective = torch.minimum(ratio * advantages, clipped * advantages)
    loss = -(weights * objective).sum()
    metrics = _ratio_metrics(ratio, loss, weights)
    live = weights != 0
    metrics["clipped:fraction"] = float(((ratio != clipped) & live).sum() / live.sum().clamp_min(1))
    return loss, metrics


def cispo(logprobs: torch.Tensor, batch: Batch, config: Mapping[str, float]) -> LossResult:
    """CISPO: ``-sum(sg(clip(r, low, high)) * lp * A)``; the clipped ratio carries no gradient.

    Config: ``clip_low_threshold`` (default 0.8) and ``clip_high_threshold`` (default 1.2).
    """
    cfg = _config("cispo", config, CONFIG_DEFAULTS["cispo"])
    sampled, advantages, weights = _rl_inputs(logprobs, batch)
    ratio = torch.exp(logprobs - sampled)
    clipped = torch.clamp(ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"]).detach()
    loss = -(weights * clipped * logprobs * advantages).sum()
    return loss, _ratio_metrics(ratio, loss, weights)


def dro(logprobs: torch.Tensor, batch: Batch, config: Mapping[str, float]) -> LossResult:
    """DRO: ``-sum(lp * A - beta / 2 * (lp - lp_sampler) ** 2)``.

    Config: ``beta`` (default 0.05).
    """
    cfg = _config("dro", config, CONFIG_DEFAULTS["dro"])
    sampled, advantages, weights = _rl_inputs(logprobs, batch)
    objective = logprobs * advantages - 0.5 * cfg["beta"] * (logprobs - sampled) ** 2
    loss = -(weights * objective).sum()
    return loss, {"loss:sum": float(loss.detach())}


def validate(name: str, batch: Batch, config: Mapping[str, float]) -> None:
    """Check a call's loss config and inputs before it waits for its turn (no model work).

    Raises:
        ServiceError: INVALID_ARGUMENT for an unknown or out-of-range config key or a
            missing loss input.
    """
    _config(name, config, CONFIG_DEFAULTS[name])
    for key in REQUIRED_INPUTS[name]:
        batch.flat_extra(key)


LOSSES: dict[str, Callable[[torch.Tensor, Batch, Mapping[str, float]], LossResult]] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
}
"""Built-in losses by the name clients send in ``ForwardBackwardStart.loss_fn``."""
