"""Datums from the wire, validated into a :class:`Batch` before any model work.

Every check here runs before a call waits for its turn, so bad input is refused at once,
with a message that names the datum, the field and the position, and never touches the
session's state.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trainer_server._config import Limits
from trainer_server._models import BaseModel
from trainer_server.core.errors import echo, invalid_argument, resource_exhausted
from trainer_server.core.types import RawDatum

__all__ = ["Batch", "parse_datums", "shard_bounds"]

_INT_DTYPES = (torch.int64, torch.int32)


@dataclass(frozen=True)
class Batch:
    """Validated datums: per-datum token ids, targets, weights and extra loss inputs."""

    tokens: list[torch.Tensor]
    targets: list[torch.Tensor]
    weights: list[torch.Tensor]
    extras: list[dict[str, torch.Tensor]]

    @property
    def lengths(self) -> list[int]:
        """Targets per datum."""
        return [len(t) for t in self.targets]

    @property
    def num_tokens(self) -> int:
        """Targets in the whole batch."""
        return sum(self.lengths)

    def select(self, start: int, stop: int) -> Batch:
        """Datums ``start:stop`` as a batch of their own (a rank's shard)."""
        return Batch(
            tokens=self.tokens[start:stop],
            targets=self.targets[start:stop],
            weights=self.weights[start:stop],
            extras=self.extras[start:stop],
        )

    def flat_weights(self) -> torch.Tensor:
        """All weights concatenated, in datum order."""
        return torch.cat(self.weights)

    def flat_extra(self, name: str) -> torch.Tensor:
        """One extra loss input concatenated over datums.

        Raises:
            ServiceError: INVALID_ARGUMENT when a datum lacks it.
        """
        for i, extra in enumerate(self.extras):
            if name not in extra:
                raise invalid_argument(f"datum {i}: loss_fn_inputs[{echo(name)}] is required by this loss")
        return torch.cat([e[name] for e in self.extras])


def shard_bounds(lengths: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Split datums into ``parts`` contiguous ranges with about equal token counts.

    Contiguous ranges keep datum order when the ranks' logprobs are concatenated back.
    Each cut goes where the running token count is nearest to its ideal share, so a long
    datum does not pile everything after it onto one rank. A batch with fewer datums than
    parts leaves the last ranges empty.

    Returns:
        ``parts`` ``(start, stop)`` datum index ranges covering ``range(len(lengths))``.
    """
    total = sum(lengths)
    cuts = [0]
    running = 0
    i = 0
    for part in range(1, parts):
        ideal = total * part / parts
        while i < len(lengths) and abs(running + lengths[i] - ideal) <= abs(running - ideal):
            running += lengths[i]
            i += 1
        if i == cuts[-1] and i < len(lengths):  # never leave a rank empty while datums remain
            running += lengths[i]
            i += 1
        cuts.append(i)
    cuts.append(len(lengths))
    return list(itertools.pairwise(cuts))


def _check_ids(ids: torch.Tensor, field: str, vocab_size: int) -> torch.Tensor:
    if ids.dtype not in _INT_DTYPES:
        raise invalid_argument(f"{field} must be int64 or int32, got {ids.dtype}")
    bad = ((ids < 0) | (ids >= vocab_size)).nonzero()
    if len(bad):
        pos = int(bad[0, 0])
        raise invalid_argument(
            f"{field}: token id {int(ids[pos])} at position {pos} is outside the vocabulary [0, {vocab_size})"
        )
    return ids.to(torch.int64)


def parse_datums(datums: Sequence[RawDatum], base: BaseModel, limits: Limits) -> Batch:
    """Validate a call's datums against the model and the limits.

    Raises:
        ServiceError: INVALID_ARGUMENT for malformed datums, RESOURCE_EXHAUSTED over a limit.
    """
    if not datums:
        raise invalid_argument("the batch has no datums; send at least one")
    if len(datums) > limits.max_datums_per_call:
        raise resource_exhausted(
            f"{len(datums)} datums in one call is over the limit max_datums_per_call={limits.max_datums_per_call}"
        )
    total = sum(d.model_input.numel() for d in datums)
    if total > limits.max_tokens_per_call:
        raise resource_exhausted(
            f"{total} tokens in one call is over the limit max_tokens_per_call={limits.max_tokens_per_call}"
        )
    tokens, targets, weights, extras = [], [], [], []
    for i, d in enumerate(datums):
        where = f"datum {i}"
        ids = d.model_input
        if ids.dim() != 1 or len(ids) == 0:
            raise invalid_argument(f"{where}: model_input must be a non-empty 1-D tensor, got shape {list(ids.shape)}")
        n = len(ids)
        if n > base.max_sequence_length:
            raise invalid_argument(
                f"{where}: sequence of {n} tokens is longer than the model's maximum of {base.max_sequence_length}"
            )
        ids = _check_ids(ids, f"{where}: model_input", base.vocab_size)
        inputs = dict(d.loss_fn_inputs)
        for name, t in inputs.items():
            if t.shape != (n,):
                raise invalid_argument(
                    f"{where}: loss_fn_inputs[{echo(name)}] has shape {list(t.shape)}, "
                    f"expected [{n}] (one per input token)"
                )
        if "target_tokens" not in inputs:
            raise invalid_argument(f"{where}: loss_fn_inputs['target_tokens'] is required")
        tgt = _check_ids(inputs.pop("target_tokens"), f"{where}: loss_fn_inputs['target_tokens']", base.vocab_size)
        w = inputs.pop("weights", None)
        if w is None:
            w = torch.ones(n, dtype=torch.float32)
        elif not w.is_floating_point():
            raise invalid_argument(f"{where}: loss_fn_inputs['weights'] must be a float tensor, got {w.dtype}")
        w = w.to(torch.float32)
        for name, t in [("weights", w), *inputs.items()]:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise invalid_argument(f"{where}: loss_fn_inputs[{echo(name)}] contains NaN or Inf")
        tokens.append(ids)
        targets.append(tgt)
        weights.append(w)
        extras.append({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in inputs.items()})
    return Batch(tokens=tokens, targets=targets, weights=weights, extras=extras)
