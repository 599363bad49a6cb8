"""A custom-loss call between its forward and its gradient (see ``TrainingCore.forward_backward_custom``)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeVar

import torch

from trainer_server.core.errors import ErrorCode, ServiceError, invalid_argument
from trainer_server.core.sessions import SequencedCall, Session
from trainer_server.core.types import CustomResult, ForwardResult

if TYPE_CHECKING:
    from trainer_server.core.service import TrainingCore

__all__ = ["CustomReplay", "HeldForward"]

log = logging.getLogger("trainer_server.core")

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class CustomReplay:
    """What a finished custom-loss call keeps for a retry: its logprobs, result and gradient fingerprint."""

    forward: ForwardResult
    result: CustomResult
    final_fingerprint: bytes


class HeldForward:
    """A custom-loss call between its forward and its gradient; see :meth:`TrainingCore.forward_backward_custom`.

    Attributes:
        result: the forward's logprobs (to send to the client).
        replay: for a retry of a finished call, what it stored (``finish`` then checks the
            gradient is the same and answers with the stored result).
    """

    def __init__(
        self,
        core: TrainingCore,
        session: Session,
        call: SequencedCall,
        result: ForwardResult,
        *,
        replay: CustomReplay | None = None,
    ) -> None:
        self._core = core
        self._session = session
        self._call = call
        self.result = result
        self.replay = replay
        self.handle = 0
        """The held graph's handle while it is held (0 once applied or for a replay)."""

    async def receive(self, gradient: Awaitable[T]) -> T:
        """Wait for the client's gradient (the front end's read of it) for at most ``held_graph_timeout_s``.

        Raises:
            ServiceError: DEADLINE_EXCEEDED when it does not arrive in time; the graph is then
                released (when the block ends) and nothing is applied.
        """
        timeout_s = self._core.config.held_graph_timeout_s
        try:
            return await asyncio.wait_for(gradient, timeout_s)
        except TimeoutError:
            log.warning(
                "session %s: call %d: no gradient within %gs; releasing its forward",
                self._session.id,
                self._call.seq,
                timeout_s,
            )
            raise ServiceError(
                ErrorCode.DEADLINE_EXCEEDED,
                f"session {self._session.id}: call {self._call.seq}: the gradient did not arrive within "
                f"held_graph_timeout_s={timeout_s:g}s of the logprobs; its forward graph was freed and nothing "
                "was applied",
            ) from None

    async def finish(self, grad: torch.Tensor, final_fingerprint: bytes = b"") -> CustomResult:
        """Apply d_loss/d_logprobs (flat float32, one per logprob): backward, gradients accumulate.

        Args:
            grad: the gradient, in the logprobs' layout.
            final_fingerprint: the request's fingerprint including the gradient (tells a
                retry that resends the same gradient from one that sends another).

        Raises:
            ServiceError: INVALID_ARGUMENT for a gradient of the wrong size or with a
                non-finite value (nothing is applied); ALREADY_EXISTS when a retry of a
                finished call sends a different gradient.
        """
        if self.replay is not None:
            if final_fingerprint != self.replay.final_fingerprint:
                raise ServiceError(
                    ErrorCode.ALREADY_EXISTS,
                    f"session {self._session.id}: call {self._call.seq} was already applied with a different gradient",
                )
            return self.replay.result
        _check_gradient(grad, self.result.lengths)
        call, core, session = self._call, self._core, self._session
        await call.wait_turn(core.config.sequence_gap_timeout_s, queued=True)  # gradients accumulate in order
        handle, self.handle = self.handle, 0  # from here the backward owns the graph

        async def apply() -> CustomResult:
            await core._backward(session, handle, grad)
            result = CustomResult(call.seq, self.result.num_tokens)
            session.record(call.seq, call.fingerprint, CustomReplay(self.result, result, final_fingerprint))
            return result

        return await call.commit(apply())


def _check_gradient(grad: torch.Tensor, lengths: list[int]) -> None:
    """Refuse a gradient whose size does not match the logprobs, or with a non-finite value."""
    if grad.dim() != 1 or grad.numel() != sum(lengths):
        raise invalid_argument(
            f"gradient has shape {list(grad.shape)}, but the logprobs have {sum(lengths)} values "
            f"in {len(lengths)} datums"
        )
    finite = torch.isfinite(grad)
    if not bool(finite.all()):
        index = int((~finite).nonzero()[0, 0])
        datum, offset = 0, index
        while offset >= lengths[datum]:
            offset -= lengths[datum]
            datum += 1
        raise invalid_argument(
            f"gradient contains {float(grad[index])} at datum {datum}, position {offset}; nothing was applied"
        )
