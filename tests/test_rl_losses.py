"""Built-in RL losses: gradients through the service equal a reference written here.

Each loss is implemented below from Tinker's documented formulas, written per token and
branch by branch (not the server's vectorised form), and run on an in-process fp32 copy
of the model the server loaded. Sampler logprobs are the model's own plus random
perturbations, so importance ratios spread well outside the clip thresholds; the tests
assert that every clipping branch is exercised before comparing gradients.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import LLAMA, server_session, state_hash
from transformers import AutoModelForCausalLM

from trainer_client import AsyncServiceClient, AsyncTrainingClient, Datum, InvalidArgumentError
from trainer_server import TrainerServer

ATOL = 1e-5
RTOL = 1e-4
SEED = 7
NOISE = 0.5
"""Standard deviation of the perturbation of the sampler logprobs (ratios spread to ~exp(+-1))."""

CONFIGS: dict[str, dict[str, float]] = {
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.7, "clip_high_threshold": 1.3},
    "cispo": {"clip_low_threshold": 0.6, "clip_high_threshold": 1.25},
    "dro": {"beta": 0.3},
}
"""Non-default settings for each loss (the defaults are 0.8 / 1.2 and beta 0.05)."""

DEFAULTS: dict[str, dict[str, float]] = {
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "dro": {"beta": 0.05},
}


# ---- reference -------------------------------------------------------------------------


def load_reference(path: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()  # type: ignore[no-untyped-call]
    model.requires_grad_(True)
    return model


def ref_logprobs(model: torch.nn.Module, data: list[Datum]) -> list[torch.Tensor]:
    """Per datum, unpadded, with the autograd graph."""
    out = []
    for d in data:
        logits = model(input_ids=d.model_input[None]).logits.float()[0]
        out.append(F.log_softmax(logits, dim=-1).gather(-1, d.target_tokens[:, None])[:, 0])
    return out


def token_objective(name: str, cfg: dict[str, float], lp: torch.Tensor, sampled: float, adv: float) -> torch.Tensor:
    """The objective of one token (to be maximised); ``lp`` is a scalar tensor with grad."""
    ratio = torch.exp(lp - sampled)
    if name == "importance_sampling":
        return ratio * adv
    if name == "ppo":
        # min(r A, clip(r) A): for A >= 0 the ratio is capped above, for A < 0 below.
        low, high = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
        if adv >= 0:
            return torch.clamp(ratio, max=high) * adv
        return torch.clamp(ratio, min=low) * adv
    if name == "cispo":
        # The clipped ratio is a constant weight on the policy-gradient term lp * A.
        weight = min(max(math.exp(float(lp.detach()) - sampled), cfg["clip_low_threshold"]), cfg["clip_high_threshold"])
        return weight * lp * adv
    if name == "dro":
        return lp * adv - 0.5 * cfg["beta"] * (lp - sampled) ** 2
    raise AssertionError(name)


def reference_loss(name: str, cfg: dict[str, float], data: list[Datum], logprobs: list[torch.Tensor]) -> torch.Tensor:
    """``-sum over every token of objective``: a token sum that ignores ``weights``, as Tinker's RL losses do."""
    total = torch.zeros(())
    for d, lp in zip(data, logprobs, strict=True):
        sampled = d.loss_fn_inputs["logprobs"].tolist()
        advantages = d.loss_fn_inputs["advantages"].tolist()
        for i in range(len(lp)):
            total = total - token_objective(name, cfg, lp[i], sampled[i], advantages[i])
    return total


# ---- data ------------------------------------------------------------------------------


def rl_batch(model: torch.nn.Module, gen: torch.Generator, vocab: int) -> list[Datum]:
    """Four datums: random prompts and completions, sampler logprobs = model's + noise.

    Prompt targets have weight 0, sampler logprob 0 and advantage 0, as an RL loop builds
    them; completion targets have random weights in [0.5, 1.5] (which the RL losses must
    ignore, as Tinker's do) and random advantages of both signs. The last datum has no
    ``weights``.
    """
    data = []
    for i in range(4):
        prompt = torch.randint(0, vocab, (int(torch.randint(2, 7, (), generator=gen)),), generator=gen)
        completion = torch.randint(0, vocab, (int(torch.randint(6, 14, (), generator=gen)),), generator=gen)
        d = Datum.from_tokens(prompt, completion)
        with torch.no_grad():
            (lp,) = ref_logprobs(model, [d])
        n_prompt = len(prompt) - 1
        is_completion = torch.arange(len(d)) >= n_prompt
        sampled = torch.where(is_completion, lp + NOISE * torch.randn(len(d), generator=gen), 0.0)
        advantages = torch.where(is_completion, torch.randn(len(d), generator=gen), 0.0)
        inputs = {"target_tokens": d.target_tokens, "logprobs": sampled, "advantages": advantages}
        if i < 3:
            inputs["weights"] = torch.where(is_completion, 0.5 + torch.rand(len(d), generator=gen), 0.0)
        data.append(Datum(model_input=d.model_input, loss_fn_inputs=inputs))
    return data


def clip_regions(data: list[Datum], logprobs: list[torch.Tensor], low: float, high: float) -> dict[str, int]:
    """How many tokens with an advantage fall in each (ratio region, advantage sign) cell."""
    counts = {"above+": 0, "above-": 0, "below+": 0, "below-": 0, "inside": 0}
    for d, lp in zip(data, logprobs, strict=True):
        ratio = torch.exp(lp.detach() - d.loss_fn_inputs["logprobs"])
        adv = d.loss_fn_inputs["advantages"]
        live = adv != 0
        for r, a, keep in zip(ratio.tolist(), adv.tolist(), live.tolist(), strict=True):
            if not keep:
                continue
            region = "above" if r > high else "below" if r < low else "inside"
            counts[region + ("" if region == "inside" else "+" if a >= 0 else "-")] += 1
    return counts


# ---- comparison ------------------------------------------------------------------------


def close(actual: torch.Tensor, expected: torch.Tensor, msg: str, *, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=RTOL, msg=lambda report: f"{msg}: {report}")


def assert_same_grads(server: TrainerServer, tc: AsyncTrainingClient, ref: torch.nn.Module) -> None:
    remote = dict(server_session(server, tc).state.model.named_parameters())
    local = dict(ref.named_parameters())
    assert remote.keys() == local.keys()
    nonzero = 0
    for name, p in local.items():
        r = remote[name].grad
        if p.grad is None:
            assert r is None or not r.any(), f"{name}: server has a gradient, the reference none"
            continue
        assert r is not None, f"{name}: no gradient on the server"
        # float32 summation order differs (padded batch vs one datum at a time).
        close(r, p.grad, f"grad of {name}", atol=ATOL * max(1.0, float(p.grad.abs().max())))
        nonzero += int(bool(p.grad.any()))
    assert nonzero > len(local) // 2, "the gradients are trivially zero"


async def full_session(
    service: AsyncServiceClient, server: TrainerServer, llama_dir: Path
) -> tuple[AsyncTrainingClient, torch.nn.Module]:
    tc = await service.create_training_client(LLAMA, lora_rank=None, seed=SEED)
    ref = load_reference(llama_dir)
    remote = server_session(server, tc).state.model.state_dict()
    assert all(torch.equal(remote[k], v) for k, v in ref.state_dict().items()), "the session does not start at the base"
    return tc, ref


# ---- tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("loss_fn", sorted(CONFIGS))
async def test_rl_loss_gradients_match_reference(
    server: TrainerServer, service: AsyncServiceClient, llama_dir: Path, loss_fn: str
) -> None:
    tc, ref = await full_session(service, server, llama_dir)
    vocab = ref.get_input_embeddings().num_embeddings
    data = rl_batch(ref, torch.Generator().manual_seed(11), vocab)
    cfg = CONFIGS[loss_fn]

    logprobs = ref_logprobs(ref, data)
    if "clip_low_threshold" in cfg:
        counts = clip_regions(data, logprobs, cfg["clip_low_threshold"], cfg["clip_high_threshold"])
        # Every branch: clipped (no gradient in PPO) and unclipped outside the range, and inside.
        assert all(n >= 2 for n in counts.values()), counts
    expected = reference_loss(loss_fn, cfg, data, logprobs)
    expected.backward()  # type: ignore[no-untyped-call]

    out = await tc.forward_backward(data, loss_fn, cfg, return_logprobs=True)
    close(torch.tensor(out.loss), expected.detach(), "loss")
    assert out.metrics["loss:sum"] == pytest.approx(out.loss)
    assert out.num_tokens == sum(len(d) for d in data)
    close(torch.cat(out.logprobs), torch.cat([lp.detach() for lp in logprobs]), "logprobs")
    assert_same_grads(server, tc, ref)
    if loss_fn == "ppo":
        assert 0 < out.metrics["clipped:fraction"] <= 1

    # The defaults, when loss_fn_config is omitted (loss value only; gradients keep accumulating).
    default = await tc.forward_backward(data, loss_fn)
    with torch.no_grad():
        expected_default = reference_loss(loss_fn, DEFAULTS[loss_fn], data, ref_logprobs(ref, data))
    close(torch.tensor(default.loss), expected_default, "loss with the default config")


async def test_clipping_changes_the_gradient(
    server: TrainerServer, service: AsyncServiceClient, llama_dir: Path
) -> None:
    """PPO and CISPO differ from plain importance sampling on the same batch (clipping is not a no-op)."""
    ref = load_reference(llama_dir)
    data = rl_batch(ref, torch.Generator().manual_seed(11), ref.get_input_embeddings().num_embeddings)
    grads = {}
    for loss_fn in ("importance_sampling", "ppo"):
        tc = await service.create_training_client(LLAMA, lora_rank=None, seed=SEED)
        await tc.forward_backward(data, loss_fn, CONFIGS[loss_fn])
        grad = server_session(server, tc).state.model.get_output_embeddings().weight.grad
        assert grad is not None
        grads[loss_fn] = grad.clone()
        await tc.close()
    assert not torch.allclose(grads["importance_sampling"], grads["ppo"], atol=1e-4)


async def test_rl_loss_bad_inputs(server: TrainerServer, service: AsyncServiceClient, llama_dir: Path) -> None:
    """Missing inputs and unknown config keys: INVALID_ARGUMENT naming them; nothing applied."""
    tc, ref = await full_session(service, server, llama_dir)
    data = rl_batch(ref, torch.Generator().manual_seed(3), ref.get_input_embeddings().num_embeddings)[:2]
    session = server_session(server, tc)
    before = state_hash(session)

    def without(name: str) -> list[Datum]:
        return [
            Datum(model_input=d.model_input, loss_fn_inputs={k: v for k, v in d.loss_fn_inputs.items() if k != name})
            for d in data
        ]

    for loss_fn in sorted(CONFIGS):
        for missing in ("advantages", "logprobs"):
            with pytest.raises(InvalidArgumentError, match=rf"loss_fn_inputs\['{missing}'\]"):
                await tc.forward_backward(without(missing), loss_fn, CONFIGS[loss_fn])
        with pytest.raises(InvalidArgumentError, match="clip_low") as excinfo:
            await tc.forward_backward(data, loss_fn, {"clip_low": 0.5})
        if loss_fn != "importance_sampling":
            # The message lists the keys the loss does take.
            assert all(key in str(excinfo.value) for key in DEFAULTS[loss_fn]), str(excinfo.value)
    assert state_hash(session) == before, "a refused call changed the session"

    # The session is not stuck behind the refused calls.
    out = await tc.forward_backward(data, "ppo")
    assert math.isfinite(out.loss)
    assert state_hash(session) != before
