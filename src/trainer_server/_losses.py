"""Built-in losses, computed on the server from per-token logprobs, as the Tinker SDK defines them.

Each loss takes the batch's concatenated target logprobs (``requires_grad``) and the
validated batch, and returns the per-token terms whose **sum** is the loss (token sums, not
means, so gradients add up across calls in an accumulation window), plus metrics.
:func:`compute` sums the terms and adds ``loss:sum`` (the name the Tinker SDK reads).

As in Tinker: ``cross_entropy`` weighs each token by ``weights``; the RL losses
(``importance_sampling``, ``ppo``, ``cispo``, ``dro``) do **not** read ``weights``: a token
that must not count (a prompt token) carries advantage 0. Inputs besides ``target_tokens``:
``logprobs`` (the sampler's logprobs of the targets) and ``advantages``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from trainer_server._batch import Batch
from trainer_server.core.errors import echo, invalid_argument

__all__ = [
    "LOSSES",
    "LossResult",
    "cispo",
    "compute",
    "cross_entropy",
    "dro",
    "importance_sampling",
    "ppo",
    "validate",
]

Terms = tuple[torch.Tensor, dict[str, float]]
"""A loss's per-token terms (their sum is the loss) and its metrics."""


@dataclass(frozen=True)
class LossResult:
    """A computed loss: the scalar (with its graph), each token's term (detached) and metrics."""

    loss: torch.Tensor
    elementwise: torch.Tensor
    metrics: dict[str, float]


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


def cross_entropy(logprobs: torch.Tensor, batch: Batch, config: Mapping[str, float]) -> Terms:
    """Weighted negative log-likelihood: terms ``-weights * logprobs``.

    Raises:
        ServiceError: INVALID_ARGUMENT when a config key is given (it takes none).
    """
    _config("cross_entropy", config, CONFIG_DEFAULTS["cross_entropy"])
    weights = batch.flat_weights().to(logprobs.device)
    terms = -(weights * logprobs)
    total_weight = float(weights.sum())
    nll = float(terms.detach().sum())
    return terms, {"weights:sum": total_weight, "nll:mean": nll / total_weight if total_weight else 0.0}


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


def _rl_inputs(logprobs: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampler logprobs and advantages, flat and on the logprobs' device."""
    device = logprobs.device
    return batch.flat_extra("logprobs").to(device), batch.flat_extra("advantages").to(device)


def _ratio_metrics(ratio: torch.Tensor, advantages: torch.Tensor) -> dict[str, float]:
    """Ratio statistics over the tokens that count (advantage != 0; prompt tokens carry 0)."""
    live = advantages != 0
    r = ratio.detach()[live] if bool(live.any()) else ratio.detach()
    return {"ratio:mean": float(r.mean()), "ratio:max": float(r.max())}


def importance_sampling(logprobs: torch.Tensor, batch: Batch, config: Mapping[str, float]) -> Terms:
    """Policy gradient with an importance weight: terms ``-exp(lp - lp_sampler) * A``."""
    _config("importance_sampling", config, CONFIG_DEFAULTS["importance_sampling"])
    sampled, advantages = _rl_inputs(logprobs, batch)
    ratio = torch.exp(logprobs - sampled)
    return -(ratio * advantages), _ratio_metrics(ratio, advantages)


def ppo(logprobs: torch.Tensor, batch: Batch, config: Mapping[str, float]) -> Terms:
    """PPO's clipped objective: terms ``-min(r * A, clip(r, low, high) * A)``.

    Config: ``clip_low_threshold`` (default 0.8) and ``clip_high_threshold`` (default 1.2).
    """
    cfg = _config("ppo", config, CONFIG_DEFAULTS["ppo"])
    sampled, advantages = _rl_inputs(logprobs, batch)
    ratio = torch.exp(logprobs - sampled)
    clipped = torch.clamp(ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"])
    terms = -torch.minimum(ratio * advantages, clipped * advantages)
    metrics = _ratio_metrics(ratio, advantages)
    live = advantages != 0
    metrics["clipped:fraction"] = float(((ratio != clipped) & live).sum() / live.sum().clamp_min(1))
    return terms, metrics


def cispo(logprobs: torch.Tensor, batch: Batch, config: Mapping[str, float]) -> Terms:
    """CISPO: terms ``-sg(clip(r, low, high)) * lp * A``; the clipped ratio carries no gradient.

    Config: ``clip_low_threshold`` (default 0.8) and ``clip_high_threshold`` (default 1.2).
    """
    cfg = _config("cispo", config, CONFIG_DEFAULTS["cispo"])
    sampled, advantages = _rl_inputs(logprobs, batch)
    ratio = torch.exp(logprobs - sampled)
    clipped = torch.clamp(ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"]).detach()
    return -(clipped * logprobs * advantages), _ratio_metrics(ratio, advantages)


def dro(logprobs: torch.Tensor, batch: Batch, config: Mapping[str, float]) -> Terms:
    """DRO: terms ``-(lp * A - beta / 2 * (lp - lp_sampler) ** 2)``.

    Config: ``beta`` (default 0.05).
    """
    cfg = _config("dro", config, CONFIG_DEFAULTS["dro"])
    sampled, advantages = _rl_inputs(logprobs, batch)
    return -(logprobs * advantages - 0.5 * cfg["beta"] * (logprobs - sampled) ** 2), {}


def validate(name: str, batch: Batch, config: Mapping[str, float]) -> None:
    """Check a call's loss config and inputs before it waits for its turn (no model work).

    Raises:
        ServiceError: INVALID_ARGUMENT for an unknown or out-of-range config key or a
            missing loss input.
    """
    _config(name, config, CONFIG_DEFAULTS[name])
    for key in REQUIRED_INPUTS[name]:
        batch.flat_extra(key)


LOSSES: dict[str, Callable[[torch.Tensor, Batch, Mapping[str, float]], Terms]] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
}
"""Built-in losses by the name clients send (``ForwardBackwardStart.loss_fn``, Tinker's ``loss_fn``)."""


def compute(name: str, logprobs: torch.Tensor, batch: Batch, config: Mapping[str, float]) -> LossResult:
    """Run loss ``name``: the sum of its terms, the terms themselves, and metrics with ``loss:sum``."""
    terms, metrics = LOSSES[name](logprobs, batch, config)
    loss = terms.sum()
    return LossResult(loss, terms.detach(), {"loss:sum": float(loss.detach()), **metrics})
