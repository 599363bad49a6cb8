"""Poisoned weights: no call can make a session's weights, gradients or optimizer state non-finite.

A backward whose gradients would overflow is refused with the gradients accumulated before it
kept bit for bit; a step that would make a weight or an AdamW moment non-finite is undone; in
both cases the session then trains on as if the bad call had never been made.
Hyperparameters out of range are covered with the other bad input in test_bad_input.py.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
import torch
from conftest import LLAMA, server_session, state_hash

from trainer_client import (
    AdamParams,
    AsyncServiceClient,
    AsyncTrainingClient,
    Datum,
    InvalidArgumentError,
)
from trainer_proto import pb
from trainer_server import TrainerServer
from trainer_server._engine import AdamSettings, SessionModel
from trainer_server._models import load_base_model
from trainer_server.core.errors import ErrorCode, ServiceError

TIMEOUT_S = 60.0
HUGE = 3e38  # finite in float32; times any chain-rule factor above 1.2 it overflows


def datum(start: int = 10, n: int = 8) -> Datum:
    tokens = list(range(start, start + n + 1))
    return Datum.from_tokens(tokens[:3], tokens[3:])


def nll(data: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    loss = -torch.cat(logprobs).mean()
    return loss, {}


def huge_gradient(data: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """A loss whose value is 0 (finite) but whose gradient is 3e38 for every logprob."""
    lp = torch.cat(logprobs)
    return ((lp - lp.detach()) * HUGE).sum(), {}


def heavy_weights(start: int = 10, n: int = 8) -> Datum:
    """A built-in cross_entropy datum whose finite weights make the gradient overflow (1e25 per token)."""
    base = datum(start, n)
    inputs = {**base.loss_fn_inputs, "weights": torch.full((n,), 1e25)}
    return Datum(model_input=base.model_input, loss_fn_inputs=inputs)


async def _train_on(tc: AsyncTrainingClient, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        out = await asyncio.wait_for(tc.forward_backward([datum(), datum(30)], "cross_entropy"), TIMEOUT_S)
        step = await asyncio.wait_for(tc.optim_step(AdamParams(learning_rate=1e-2)), TIMEOUT_S)
        assert torch.isfinite(torch.tensor(step.grad_norm)), step
        losses.append(out.loss)
    return losses


@pytest.mark.parametrize("lora_rank", [None, 8], ids=["full", "lora"])
@pytest.mark.parametrize("path", ["custom", "builtin"])
async def test_overflowing_backward_is_refused_and_undone(
    server: TrainerServer, service: AsyncServiceClient, lora_rank: int | None, path: str
) -> None:
    tc = await service.create_training_client(LLAMA, lora_rank=lora_rank, seed=3)
    twin = await service.create_training_client(LLAMA, lora_rank=lora_rank, seed=3)  # never sees the bad call
    session = server_session(server, tc)
    for client in (tc, twin):  # an accumulated gradient that the refusal must keep as it is
        await client.forward_backward([datum()], "cross_entropy")
    before = state_hash(session)
    assert before == state_hash(server_session(server, twin))

    with pytest.raises(InvalidArgumentError) as ei:
        if path == "custom":
            await asyncio.wait_for(tc.forward_backward_custom([datum(20)], huge_gradient), TIMEOUT_S)
        else:
            await asyncio.wait_for(tc.forward_backward([heavy_weights(20)], "cross_entropy"), TIMEOUT_S)
    assert "the backward would make the parameter gradients non-finite" in ei.value.details, ei.value.details
    assert "gradients accumulated before it are kept" in ei.value.details
    assert state_hash(session) == before, "a refused backward changed the session"
    assert all(bool(torch.isfinite(p.grad).all()) for p in session.state.params if p.grad is not None)

    # the session trains on exactly like its twin that never saw the bad call
    assert await _train_on(tc, 3) == await _train_on(twin, 3)
    assert state_hash(session) == state_hash(server_session(server, twin))
    out = await tc.forward([datum()])
    assert bool(torch.isfinite(out.logprobs[0]).all())


async def test_refused_backward_then_step_is_normal(server: TrainerServer, service: AsyncServiceClient) -> None:
    """The stuck session of the issue: an overflowing backward, then steps keep working."""
    tc = await service.create_training_client(LLAMA, lora_rank=None, seed=4)
    with pytest.raises(InvalidArgumentError):
        await tc.forward_backward_custom([datum()], huge_gradient)
    step = await tc.optim_step(AdamParams(learning_rate=1e-3))  # no gradient: a no-op step, not a stuck session
    assert step.grad_norm == 0.0
    losses = await _train_on(tc, 4)
    assert losses[-1] < losses[0]


# ---- the step itself: undone when it would make weights or AdamW state non-finite ----------------


@pytest.fixture(scope="module")
def base(llama_dir: Path):  # type: ignore[no-untyped-def]
    return load_base_model(LLAMA, llama_dir, torch.device("cpu"), "float32")


def _adam(**fields: float) -> AdamSettings:
    return AdamSettings(fields)


def _everything(model: SessionModel) -> str:
    """Hash of weights, gradients, AdamW state and step counter."""
    h = hashlib.sha256()
    for p in model.params:
        h.update(p.detach().numpy().tobytes())
        if p.grad is not None:
            h.update(b"grad" + p.grad.numpy().tobytes())
        state = model.optimizer.state.get(p, {}) if model.optimizer is not None else {}
        for key in sorted(state):
            h.update(key.encode() + state[key].numpy().tobytes())
    h.update(f"{model.step} {model.optimizer is None}".encode())
    return h.hexdigest()


def _accumulate(model: SessionModel, scale: float = 1.0) -> None:
    for p in model.params:
        p.grad = torch.full_like(p, scale)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("clip", [0.0, 1e-3], ids=["no-clip", "clip"])
def test_overflowing_step_is_undone(base, lora: bool, clip: float) -> None:  # type: ignore[no-untyped-def]
    model = SessionModel(base, pb.LoraConfig(rank=4) if lora else None, seed=0)
    with torch.no_grad():
        for p in model.params:
            p.view(-1)[0] = 3.3e38  # a weight near float32's largest; a step that grows it past 3.4e38 overflows
    for first in (True, False):  # before any AdamW state exists, then with state to restore
        if not first:
            _accumulate(model, -1.0)
            model.optim_step(_adam(learning_rate=1e-3))
        _accumulate(model, -1e-3)  # negative gradients: AdamW grows the weights
        before = _everything(model)
        overflow = _adam(learning_rate=1e-3, grad_clip_norm=clip)
        overflow.lr = 3e37  # past the range check: only a bug, a new dtype or a future range could get here
        with pytest.raises(ServiceError) as ei:
            model.optim_step(overflow)
        assert ei.value.code == ErrorCode.FAILED_PRECONDITION
        assert "would make weights or optimizer state non-finite" in ei.value.message
        assert _everything(model) == before, "a refused step changed something"
        overflow.lr = 1e38  # lr / bias correction overflows inside torch's AdamW, after some tensors changed
        with pytest.raises(RuntimeError, match="overflow"):
            model.optim_step(overflow)
        assert _everything(model) == before, "a step that raised half-way changed something"
        step, norm = model.optim_step(_adam(learning_rate=1e-3, grad_clip_norm=clip))
        assert norm > 0
        assert step == (1 if first else 3)
        assert all(bool(torch.isfinite(p).all()) for p in model.params)


def test_step_matches_plain_adamw(base) -> None:  # type: ignore[no-untyped-def]
    """The guarded step is torch's AdamW, bit for bit."""
    model = SessionModel(base, None, seed=0)
    reference = [p.detach().clone().requires_grad_(True) for p in model.params]
    adam = torch.optim.AdamW(reference, lr=1e-3, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.01)
    for k in range(3):
        grads = [torch.randn_like(p, generator=torch.Generator().manual_seed(k)) for p in model.params]
        for p, r, g in zip(model.params, reference, grads, strict=True):
            p.grad, r.grad = g.clone(), g.clone()
        model.optim_step(_adam(learning_rate=1e-3, weight_decay=0.01))
        adam.step()
        adam.zero_grad()
    assert all(torch.equal(p, r) for p, r in zip(model.params, reference, strict=True))
