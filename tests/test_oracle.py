"""Correctness oracle: what the service computes equals in-process torch on the same model.

Every test builds a local fp32 reference model from the same Hugging Face directory the
server loaded (for LoRA, with the same peft config and seed, checked to start from the
same weights), runs the same batch through it one unpadded datum at a time, and compares
logprobs, losses, gradients, gradient norms and the weights after AdamW steps with what
the server session holds.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import LLAMA, QWEN, server_session
from transformers import AutoModelForCausalLM

from trainer_client import AdamParams, AsyncServiceClient, AsyncTrainingClient, Datum
from trainer_server import TrainerServer
from trainer_server._engine import default_lora_targets

ATOL = 1e-5
RTOL = 1e-4
BATCH = 4
ADAM = AdamParams(learning_rate=1e-3, weight_decay=0.01, grad_clip_norm=1.0)
LORA_RANK = 4
SEED = 1234

Loss = Callable[[list[Datum], list[torch.Tensor]], tuple[torch.Tensor, Mapping[str, float]]]


# ---- helpers ---------------------------------------------------------------------------


def prefixed(prefix: str) -> Callable[[str], str]:
    """An assert_close ``msg`` that keeps torch's mismatch report and says what was compared."""
    return lambda report: f"{prefix}: {report}" if prefix else report


def close(actual: Any, expected: Any, msg: str = "", *, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=RTOL, msg=prefixed(msg))


def close_grad(actual: torch.Tensor, expected: torch.Tensor, msg: str) -> None:
    """Gradients: float32 summation order differs (padded batch vs one datum at a time), so the
    absolute tolerance is ATOL relative to the tensor's largest entry (when that is above 1)."""
    close(actual, expected, msg, atol=ATOL * max(1.0, float(expected.abs().max())))


def model_dir(name: str, llama_dir: Path, qwen_dir: Path) -> Path:
    return {LLAMA: llama_dir, QWEN: qwen_dir}[name]


async def vocab_size(service: AsyncServiceClient, name: str) -> int:
    info = await service.get_server_info()
    (model,) = [m for m in info.models if m.name == name]
    return model.vocab_size


def make_batch(gen: torch.Generator, vocab: int, n: int = BATCH, *, min_len: int = 5, max_len: int = 30) -> list[Datum]:
    """``n`` datums of random token ids, total lengths in [min_len, max_len]."""
    data = []
    for _ in range(n):
        total = int(torch.randint(min_len, max_len + 1, (), generator=gen))
        prompt_len = int(torch.randint(1, total, (), generator=gen))
        tokens = torch.randint(0, vocab, (total,), generator=gen)
        data.append(Datum.from_tokens(tokens[:prompt_len], tokens[prompt_len:]))
    return data


def make_pairs(gen: torch.Generator, vocab: int, n_pairs: int = 2) -> list[Datum]:
    """Preference pairs [chosen0, rejected0, chosen1, rejected1, ...] sharing a prompt per pair."""
    data = []
    for _ in range(n_pairs):
        prompt = torch.randint(0, vocab, (int(torch.randint(3, 12, (), generator=gen)),), generator=gen)
        for _ in range(2):
            response = torch.randint(0, vocab, (int(torch.randint(2, 15, (), generator=gen)),), generator=gen)
            data.append(Datum.from_tokens(prompt, response))
    return data


def load_reference(path: Path, lora_rank: int | None, seed: int = SEED) -> torch.nn.Module:
    """The local fp32 model, built exactly like ``SessionModel.__init__`` builds the session's."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()  # type: ignore[no-untyped-call]
    if lora_rank is None:
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    config = LoraConfig(
        r=lora_rank, lora_alpha=lora_rank, target_modules=default_lora_targets(model), lora_dropout=0.0, bias="none"
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecations inside peft
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    peft_model.eval()
    return peft_model


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def ref_logprobs(model: torch.nn.Module, data: list[Datum]) -> list[torch.Tensor]:
    """Per datum, unpadded: log_softmax of the logits gathered at the targets."""
    out = []
    for d in data:
        logits = model(input_ids=d.model_input[None]).logits.float()
        lp = F.log_softmax(logits, dim=-1)[0].gather(-1, d.target_tokens[:, None]).squeeze(-1)
        out.append(lp)
    return out


def ref_backward(model: torch.nn.Module, data: list[Datum], loss_fn: Loss) -> float:
    """Local forward + loss + backward (gradients accumulate in ``.grad``); returns the loss."""
    loss, _ = loss_fn(data, ref_logprobs(model, data))
    loss.backward()  # type: ignore[no-untyped-call]
    return float(loss.detach())


def ref_step(model: torch.nn.Module, opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> float:
    """Clip, AdamW step, zero grads; returns the pre-clip gradient norm."""
    norm = float(torch.nn.utils.clip_grad_norm_(params, ADAM.grad_clip_norm))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def make_optimizer(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        params, lr=ADAM.learning_rate, betas=(ADAM.beta1, ADAM.beta2), eps=ADAM.eps, weight_decay=ADAM.weight_decay
    )


def server_model(server: TrainerServer, tc: AsyncTrainingClient) -> torch.nn.Module:
    return server_session(server, tc).state.model  # type: ignore[no-any-return]


def assert_same_weights(server: TrainerServer, tc: AsyncTrainingClient, ref: torch.nn.Module, *, exact: bool) -> None:
    remote = server_model(server, tc).state_dict()
    local = ref.state_dict()
    assert remote.keys() == local.keys()
    for name, value in local.items():
        if exact:
            assert torch.equal(remote[name], value), f"{name} differs"
        else:
            # Tighter than ATOL/RTOL so that weight decay (lr * wd * w ~ 1e-5 * w per step) is checked too.
            torch.testing.assert_close(remote[name], value, atol=1e-6, rtol=1e-5, msg=prefixed(name))


def assert_same_grads(server: TrainerServer, tc: AsyncTrainingClient, ref: torch.nn.Module) -> None:
    remote = trainable(server_model(server, tc))
    local = trainable(ref)
    assert remote.keys() == local.keys()
    for name, p in local.items():
        r = remote[name].grad
        if p.grad is None:
            assert r is None or not r.any(), f"{name}: server has a gradient, the reference none"
            continue
        assert r is not None, f"{name}: no gradient on the server"
        close_grad(r, p.grad, f"grad of {name}")


async def session(
    service: AsyncServiceClient, server: TrainerServer, name: str, path: Path, lora_rank: int | None
) -> tuple[AsyncTrainingClient, torch.nn.Module]:
    """A server session and its local reference, checked to start from bitwise equal weights."""
    tc = await service.create_training_client(name, lora_rank=lora_rank, seed=SEED)
    ref = load_reference(path, lora_rank)
    assert sorted(trainable(ref)) == sorted(trainable(server_model(server, tc)))
    assert_same_weights(server, tc, ref, exact=True)
    return tc, ref


# ---- losses (the same function runs on the client and on the reference) ------------------


def weighted_square(data: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Not cross-entropy: sum over tokens of ``w * lp**2`` (scaled position-dependently)."""
    total = torch.zeros(())
    for d, lp in zip(data, logprobs, strict=True):
        scale = 1.0 + torch.arange(len(lp), dtype=torch.float32) / len(lp)
        total = total + (d.weights * scale * lp**2).sum()
    return total, {"tokens": float(sum(len(lp) for lp in logprobs))}


def cross_entropy(data: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    total = torch.zeros(())
    for d, lp in zip(data, logprobs, strict=True):
        total = total - (d.weights * lp).sum()
    return total, {}


def make_dpo(reference_sums: list[float], beta: float = 0.5) -> Loss:
    """DPO over [chosen, rejected] pairs, against fixed reference-policy response logprob sums."""

    def dpo(data: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        sums = [(d.weights * lp).sum() for d, lp in zip(data, logprobs, strict=True)]
        total = torch.zeros(())
        margins = []
        for i in range(0, len(sums), 2):
            chosen = sums[i] - reference_sums[i]
            rejected = sums[i + 1] - reference_sums[i + 1]
            margin = beta * (chosen - rejected)
            margins.append(float(margin.detach()))
            total = total - F.logsigmoid(margin)
        return total, {"margin:mean": sum(margins) / len(margins)}

    return dpo


# ---- tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [LLAMA, QWEN])
@pytest.mark.parametrize("lora_rank", [None, LORA_RANK], ids=["full", "lora"])
async def test_custom_loss_gradients_match(
    server: TrainerServer,
    service: AsyncServiceClient,
    llama_dir: Path,
    qwen_dir: Path,
    name: str,
    lora_rank: int | None,
) -> None:
    """(a, f) A non-cross-entropy custom loss: loss value and every parameter gradient match."""
    tc, ref = await session(service, server, name, model_dir(name, llama_dir, qwen_dir), lora_rank)
    data = make_batch(torch.Generator().manual_seed(1), await vocab_size(service, name))
    out = await tc.forward_backward_custom(data, weighted_square)
    expected_loss = ref_backward(ref, data, weighted_square)
    close(torch.tensor(out.loss), torch.tensor(expected_loss), "loss")
    assert out.num_tokens == sum(len(d) for d in data)
    assert out.metrics == {"tokens": float(out.num_tokens)}
    close(out.logprobs, [lp.detach() for lp in ref_logprobs(ref, data)], "logprobs")
    assert_same_grads(server, tc, ref)


@pytest.mark.parametrize(
    ("name", "lora_rank"),
    [(LLAMA, None), (LLAMA, LORA_RANK), (QWEN, LORA_RANK)],
    ids=["llama-full", "llama-lora", "qwen-lora"],
)
async def test_dpo_pairwise_gradients_match(
    server: TrainerServer,
    service: AsyncServiceClient,
    llama_dir: Path,
    qwen_dir: Path,
    name: str,
    lora_rank: int | None,
) -> None:
    """(b, f) A DPO-style loss coupling datums in pairs: loss and gradients match."""
    tc, ref = await session(service, server, name, model_dir(name, llama_dir, qwen_dir), lora_rank)
    vocab = await vocab_size(service, name)
    data = make_pairs(torch.Generator().manual_seed(2), vocab)
    # Frozen reference-policy response logprob sums: the initial policy's, offset per datum so
    # that the pair margins (and so the sigmoid weights of the pairs) differ from zero.
    with torch.no_grad():
        initial = ref_logprobs(ref, data)
    reference_sums = [
        float((d.weights * lp).sum()) + 0.3 * i for i, (d, lp) in enumerate(zip(data, initial, strict=True))
    ]
    loss_fn = make_dpo(reference_sums)
    out = await tc.forward_backward_custom(data, loss_fn)
    expected_loss = ref_backward(ref, data, loss_fn)
    close(torch.tensor(out.loss), torch.tensor(expected_loss), "loss")
    assert_same_grads(server, tc, ref)
    # The gradient is not trivially zero (with LoRA, B starts at zero, so only B gets gradient).
    grads = [p.grad for p in trainable(server_model(server, tc)).values() if p.grad is not None]
    assert any(bool(g.abs().max() > 0) for g in grads)


async def _train_and_compare(
    server: TrainerServer,
    service: AsyncServiceClient,
    name: str,
    path: Path,
    lora_rank: int | None,
    *,
    builtin: bool,
    steps: int = 3,
) -> AsyncTrainingClient:
    tc, ref = await session(service, server, name, path, lora_rank)
    params = list(trainable(ref).values())
    opt = make_optimizer(params)
    gen = torch.Generator().manual_seed(3)
    vocab = await vocab_size(service, name)
    for step in range(1, steps + 1):
        data = make_batch(gen, vocab)
        if builtin:
            out = await tc.forward_backward(data, "cross_entropy")
            expected_loss = ref_backward(ref, data, cross_entropy)
            assert out.metrics["loss:sum"] == pytest.approx(out.loss)
        else:
            out = await tc.forward_backward_custom(data, weighted_square)
            expected_loss = ref_backward(ref, data, weighted_square)
        close(torch.tensor(out.loss), torch.tensor(expected_loss), f"loss at step {step}")
        if step == 1:
            assert_same_grads(server, tc, ref)
        result = await tc.optim_step(ADAM)
        expected_norm = ref_step(ref, opt, params)
        assert result.step == step
        close(torch.tensor(result.grad_norm), torch.tensor(expected_norm), f"grad norm at step {step}")
        assert result.grad_norm > ADAM.grad_clip_norm or step > 1  # clipping is exercised
        assert all(p.grad is None for p in trainable(server_model(server, tc)).values())
    assert_same_weights(server, tc, ref, exact=False)
    return tc


@pytest.mark.parametrize("name", [LLAMA, QWEN])
async def test_full_finetune_custom_loss_steps_match(
    server: TrainerServer, service: AsyncServiceClient, llama_dir: Path, qwen_dir: Path, name: str
) -> None:
    """(c, f) Weights after 3 AdamW steps (clipped, weight decay) of a custom loss match."""
    tc = await _train_and_compare(server, service, name, model_dir(name, llama_dir, qwen_dir), None, builtin=False)
    # Training moved every parameter tensor, so the comparison is not vacuous.
    original = AutoModelForCausalLM.from_pretrained(model_dir(name, llama_dir, qwen_dir), dtype=torch.float32)
    params = dict(server_model(server, tc).named_parameters())
    unmoved = [n for n, p in params.items() if torch.equal(p, original.get_parameter(n))]
    assert not unmoved, f"parameters that did not change: {unmoved}"


async def test_full_finetune_builtin_cross_entropy_steps_match(
    server: TrainerServer, service: AsyncServiceClient, llama_dir: Path, qwen_dir: Path
) -> None:
    """(d) Built-in cross_entropy: loss is -sum(weights * logprobs); weights after 3 steps match."""
    await _train_and_compare(server, service, LLAMA, llama_dir, None, builtin=True)


@pytest.mark.parametrize("name", [LLAMA, QWEN])
async def test_lora_steps_match_and_base_untouched(
    server: TrainerServer, service: AsyncServiceClient, llama_dir: Path, qwen_dir: Path, name: str
) -> None:
    """(e, f) LoRA: gradients and weights after 3 steps match; only adapter tensors change."""
    path = model_dir(name, llama_dir, qwen_dir)
    tc = await _train_and_compare(server, service, name, path, LORA_RANK, builtin=False)
    original = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    remote = server_model(server, tc).state_dict()
    adapters = {k for k in remote if ".lora_" in k}
    assert adapters and adapters == set(trainable(server_model(server, tc)))
    base_keys = set()
    for key, value in remote.items():
        if key in adapters:
            continue
        orig_key = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert torch.equal(value, original[orig_key]), f"base weight {key} changed"
        base_keys.add(orig_key)
    assert base_keys == set(original)
    # The shared base model itself is untouched too.
    assert server.core is not None
    shared = server.core.models[name].model.state_dict()
    assert all(torch.equal(shared[k], original[k]) for k in original)
    # Every adapter tensor moved (lora_A gets gradient from step 2 on, lora_B from step 1).
    fresh = load_reference(path, LORA_RANK).state_dict()
    unchanged = [k for k in adapters if torch.equal(remote[k], fresh[k])]
    assert not unchanged, f"adapter tensors did not change: {unchanged[:3]}"


@pytest.mark.parametrize("name", [LLAMA, QWEN])
async def test_forward_logprobs_match(
    server: TrainerServer, service: AsyncServiceClient, llama_dir: Path, qwen_dir: Path, name: str
) -> None:
    """(g) forward() logprobs equal the reference in float32, and are bf16-rounded on request."""
    tc, ref = await session(service, server, name, model_dir(name, llama_dir, qwen_dir), LORA_RANK)
    data = make_batch(torch.Generator().manual_seed(4), await vocab_size(service, name), n=5, min_len=2)
    with torch.no_grad():
        expected = ref_logprobs(ref, data)
    out = await tc.forward(data)
    assert out.num_tokens == sum(len(d) for d in data)
    assert [len(lp) for lp in out.logprobs] == [len(d) for d in data]
    assert all(lp.dtype == torch.float32 for lp in out.logprobs)
    close(out.logprobs, expected, "float32 logprobs")

    out16 = await tc.forward(data, logprobs_dtype="bfloat16")
    for got, want in zip(out16.logprobs, expected, strict=True):
        assert torch.equal(got, got.to(torch.bfloat16).float()), "values are not bf16-representable"
        torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-5)
    # Forward keeps nothing: no gradient, no step.
    assert all(p.grad is None for p in trainable(server_model(server, tc)).values())
    assert server_session(server, tc).state.step == 0


@pytest.mark.parametrize("lora_rank", [None, LORA_RANK], ids=["full", "lora"])
async def test_gradient_accumulation_over_calls(
    server: TrainerServer, service: AsyncServiceClient, llama_dir: Path, lora_rank: int | None
) -> None:
    """(h) Two calls on the halves of a batch then a step == one call on the whole batch then a step."""
    vocab = await vocab_size(service, LLAMA)
    gen = torch.Generator().manual_seed(5)
    batches = [make_batch(gen, vocab) for _ in range(2)]
    split = await service.create_training_client(LLAMA, lora_rank=lora_rank, seed=SEED)
    whole = await service.create_training_client(LLAMA, lora_rank=lora_rank, seed=SEED)
    for data in batches:
        a = await split.forward_backward_custom(data[:2], weighted_square)
        b = await split.forward_backward_custom(data[2:], weighted_square)
        c = await whole.forward_backward_custom(data, weighted_square)
        close(torch.tensor(a.loss + b.loss), torch.tensor(c.loss), "loss")
        grads_whole = {k: p.grad for k, p in trainable(server_model(server, whole)).items()}
        for k, p in trainable(server_model(server, split)).items():
            g = grads_whole[k]
            if g is None:
                assert p.grad is None or not p.grad.any(), k
            else:
                assert p.grad is not None, k
                close_grad(p.grad, g, f"accumulated gradient of {k}")
        ra, rb = await split.optim_step(ADAM), await whole.optim_step(ADAM)
        close(torch.tensor(ra.grad_norm), torch.tensor(rb.grad_norm), "grad norm")
    weights_split, weights_whole = server_model(server, split).state_dict(), server_model(server, whole).state_dict()
    torch.testing.assert_close(weights_split, weights_whole, atol=1e-6, rtol=1e-5, msg=prefixed("weights"))
    # The steps really changed the trainable weights.
    fresh = load_reference(llama_dir, lora_rank).state_dict()
    remote = server_model(server, whole).state_dict()
    assert any(not torch.equal(remote[k], fresh[k]) for k in trainable(server_model(server, whole)))
