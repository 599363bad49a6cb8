"""The official ``tinker`` SDK, unmodified, training the tiny models of a real server.

One ``TrainerServer`` (gRPC on port 0, Tinker HTTP on port 0, two API keys) runs on its
own event loop in a thread; the SDK, which blocks, drives it from the test thread, like a
user's script. Loops follow tinker-cookbook's ``recipes/sl_loop.py`` and
``recipes/rl_loop.py`` bodies with local data. The same work through our gRPC client must
give the same numbers.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

tinker = pytest.importorskip("tinker")
from conftest import LLAMA, make_config  # noqa: E402
from tinker import types  # noqa: E402

import trainer_client  # noqa: E402
from trainer_server import TrainerServer  # noqa: E402

KEY_A = "tml-sdk-key-a"
KEY_B = "tml-sdk-key-b"


@dataclass
class Running:
    server: TrainerServer
    url: str
    grpc_address: str


@pytest.fixture(scope="module")
def running(llama_dir: Path, qwen_dir: Path) -> Iterator[Running]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = TrainerServer(make_config(llama_dir, qwen_dir, tinker_port=0, api_keys=frozenset({KEY_A, KEY_B})))
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(120)
    try:
        yield Running(server, f"http://127.0.0.1:{server.tinker_port}", server.address)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def sdk(running: Running, key: str = KEY_A) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=running.url, api_key=key)


def sft_datum(tokenizer: Any, prompt: str, completion: str) -> types.Datum:
    """Like tinker-cookbook's conversation_to_datum: weights 0 on the prompt, 1 on the completion."""
    p, c = tokenizer.encode(prompt), tokenizer.encode(completion)
    tokens = p + c
    weights = [0.0] * (len(p) - 1) + [1.0] * len(c)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


PAIRS = [("Question: 3 + 4 = ? Answer:", " 7"), ("Question: 2 + 2 = ? Answer:", " 4"), ("Say hi:", " hi")]


def mean_nll(result: types.ForwardBackwardOutput, batch: list[types.Datum]) -> float:
    lp = np.concatenate([o["logprobs"].to_numpy() for o in result.loss_fn_outputs])
    w = np.concatenate([d.loss_fn_inputs["weights"].to_numpy() for d in batch])
    return float(-(lp * w).sum() / w.sum())


def test_sft_loop_like_cookbook_sl_loop(running: Running) -> None:
    service_client = sdk(running)
    training_client = service_client.create_lora_training_client(base_model=LLAMA, rank=8).result()
    tokenizer = training_client.get_tokenizer()
    batch = [sft_datum(tokenizer, p, c) for p, c in PAIRS]
    n_steps, learning_rate = 6, 1e-2
    nlls = []
    for step in range(n_steps):
        lr = learning_rate * max(0.0, 1.0 - step / n_steps)
        adam_params = tinker.AdamParams(learning_rate=lr, beta1=0.9, beta2=0.95, eps=1e-8)
        fwd_bwd_future = training_client.forward_backward(batch, loss_fn="cross_entropy")
        optim_step_future = training_client.optim_step(adam_params)
        fwd_bwd_result = fwd_bwd_future.result()
        optim_step_future.result()
        nlls.append(mean_nll(fwd_bwd_result, batch))
        total = sum(
            float(np.dot(o["logprobs"].to_numpy(), d.loss_fn_inputs["weights"].to_numpy()))
            for o, d in zip(fwd_bwd_result.loss_fn_outputs, batch, strict=True)
        )
        assert fwd_bwd_result.metrics["loss:sum"] == pytest.approx(-total, rel=1e-4)
    assert nlls[-1] < nlls[0] * 0.9, nlls
    service_client.close("success").result()


def test_rl_loop_like_cookbook_rl_loop(running: Running) -> None:
    service_client = sdk(running)
    training_client = service_client.create_lora_training_client(base_model=LLAMA, rank=8, seed=1).result()
    tokenizer = training_client.get_tokenizer()
    target = tokenizer.encode(" 7")[-1]
    sampling_params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=0)
    adam_params = types.AdamParams(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8)
    rewards_per_step = []
    for step, loss_fn in enumerate(["importance_sampling", "ppo", "importance_sampling", "ppo"]):
        sampling_client = training_client.save_weights_and_get_sampling_client().result()
        prompts = [types.ModelInput.from_ints(tokenizer.encode(p)) for p, _ in PAIRS[:2]]
        futures = [sampling_client.sample(prompt=p, num_samples=4, sampling_params=sampling_params) for p in prompts]
        datums, rewards = [], []
        for future, prompt in zip(futures, prompts, strict=True):
            sample_result = future.result()
            group = [(s.tokens, s.logprobs, float(s.tokens.count(target))) for s in sample_result.sequences]
            mean_reward = sum(r for _, _, r in group) / len(group)
            rewards.append(mean_reward)
            for tokens, logprobs, reward in group:
                assert logprobs is not None and len(logprobs) == len(tokens)
                ob_len = prompt.length - 1
                model_input = prompt.append(types.EncodedTextChunk(tokens=tokens[:-1]))
                datums.append(
                    types.Datum(
                        model_input=model_input,
                        loss_fn_inputs={
                            "target_tokens": [0] * ob_len + tokens,
                            "logprobs": [0.0] * ob_len + logprobs,
                            "advantages": [0.0] * ob_len + [reward - mean_reward] * len(tokens),
                        },
                    )
                )
        rewards_per_step.append(float(np.mean(rewards)))
        config = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2} if loss_fn == "ppo" else None
        fwd_bwd = training_client.forward_backward(datums, loss_fn=loss_fn, loss_fn_config=config)
        optim = training_client.optim_step(adam_params)
        out = fwd_bwd.result()
        optim.result()
        assert np.isfinite(out.metrics["loss:sum"]), (step, out.metrics)
        # The trainer's logprobs of the sampled tokens equal the sampler's (same weights, step 0 of this batch).
        if step == 0:
            for d, o in zip(datums, out.loss_fn_outputs, strict=True):
                adv = d.loss_fn_inputs["advantages"].to_numpy()
                mask = np.arange(len(adv)) >= len(adv) - 4
                np.testing.assert_allclose(
                    o["logprobs"].to_numpy()[mask], d.loss_fn_inputs["logprobs"].to_numpy()[mask], atol=1e-4
                )
    assert len(rewards_per_step) == 4
    service_client.close("success").result()


def logprobs_of(tc: Any, batch: list[types.Datum]) -> np.ndarray:
    out = tc.forward(batch, "cross_entropy").result()
    return np.concatenate([o["logprobs"].to_numpy() for o in out.loss_fn_outputs])


def _trained_with_checkpoint(service_client: tinker.ServiceClient) -> tuple[Any, list[types.Datum], str]:
    """A model after 2 steps, saved, then 2 more steps; its batch; the checkpoint's path."""
    tc = service_client.create_lora_training_client(base_model=LLAMA, rank=4, seed=3).result()
    batch = [sft_datum(tc.get_tokenizer(), p, c) for p, c in PAIRS]
    for _ in range(2):
        tc.forward_backward(batch, "cross_entropy")
        tc.optim_step(ADAM).result()
    path = tc.save_state("mid").result().path
    for _ in range(2):
        tc.forward_backward(batch, "cross_entropy")
        tc.optim_step(ADAM).result()
    return tc, batch, path


ADAM = types.AdamParams(learning_rate=5e-3)


def test_save_state_and_resume_with_optimizer_equals_uninterrupted(running: Running) -> None:
    service_client = sdk(running)
    tc, batch, path = _trained_with_checkpoint(service_client)
    resumed = service_client.create_training_client_from_state_with_optimizer(path).result()
    for _ in range(2):
        resumed.forward_backward(batch, "cross_entropy")
        resumed.optim_step(ADAM).result()
    np.testing.assert_array_equal(logprobs_of(resumed, batch), logprobs_of(tc, batch))
    service_client.close("success").result()


def test_create_from_state_without_optimizer_starts_fresh_moments(running: Running) -> None:
    service_client = sdk(running)
    tc, batch, path = _trained_with_checkpoint(service_client)
    weights_only = service_client.create_training_client_from_state(path).result()
    resumed = service_client.create_training_client_from_state_with_optimizer(path).result()
    np.testing.assert_array_equal(logprobs_of(weights_only, batch), logprobs_of(resumed, batch))  # same weights
    for _ in range(2):
        weights_only.forward_backward(batch, "cross_entropy")
        weights_only.optim_step(ADAM).result()
    assert not np.array_equal(logprobs_of(weights_only, batch), logprobs_of(tc, batch))  # fresh Adam moments
    service_client.close("success").result()


def test_load_state_into_a_live_training_client(running: Running) -> None:
    service_client = sdk(running)
    tc, batch, path = _trained_with_checkpoint(service_client)
    other = service_client.create_lora_training_client(base_model=LLAMA, rank=4, seed=99).result()
    other.forward_backward(batch, "cross_entropy")  # pending gradients are dropped by the load
    other.load_state_with_optimizer(path).result()
    for _ in range(2):
        other.forward_backward(batch, "cross_entropy")
        other.optim_step(ADAM).result()
    np.testing.assert_array_equal(logprobs_of(other, batch), logprobs_of(tc, batch))
    wrong = service_client.create_lora_training_client(base_model=LLAMA, rank=8).result()
    with pytest.raises(tinker.RequestFailedError, match="LoRA rank 4"):
        wrong.load_state(path).result()
    service_client.close("success").result()


def test_sampling_client_logprobs_equal_compute_logprobs(running: Running) -> None:
    service_client = sdk(running)
    tc = service_client.create_lora_training_client(base_model=LLAMA, rank=4).result()
    tokenizer = tc.get_tokenizer()
    batch = [sft_datum(tokenizer, p, c) for p, c in PAIRS]
    tc.forward_backward(batch, "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt_tokens = tokenizer.encode("Question: 3 + 4 = ? Answer:")
    prompt = types.ModelInput.from_ints(prompt_tokens)
    params = types.SamplingParams(max_tokens=5, seed=11, temperature=1.0)
    first = sampler.sample(prompt, 3, params).result()
    again = sampler.sample(prompt, 3, params).result()
    assert [s.tokens for s in first.sequences] == [s.tokens for s in again.sequences]  # seeded
    for seq in first.sequences:
        scored = sampler.compute_logprobs(types.ModelInput.from_ints(prompt_tokens + seq.tokens)).result()
        np.testing.assert_allclose(scored[len(prompt_tokens) :], seq.logprobs, atol=1e-5)
    stop = tokenizer.decode(first.sequences[0].tokens[:1])
    stopped = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=5, seed=11, stop=[stop])).result()
    assert stopped.sequences[0].stop_reason == "stop"
    base = service_client.create_sampling_client(base_model=LLAMA).result()
    assert base.sample(prompt, 1, params).result().sequences[0].stop_reason in ("stop", "length")
    service_client.close("success").result()


def test_sdk_and_grpc_client_give_equal_numbers(running: Running) -> None:
    """LoRA and full fine-tune: the same steps through the SDK and through trainer_client agree."""
    service_client = sdk(running)
    with trainer_client.ServiceClient(running.grpc_address, api_key=KEY_A) as ours:
        for rank in (4, 0):  # 0: full fine-tune (this server's extension of LoraConfig)
            tc = service_client.create_lora_training_client(base_model=LLAMA, rank=rank, seed=5).result()
            tokenizer = tc.get_tokenizer()
            pairs = [(tokenizer.encode(p), tokenizer.encode(c)) for p, c in PAIRS]
            batch = [sft_datum(tokenizer, p, c) for p, c in PAIRS]
            mine = ours.create_training_client(LLAMA, lora_rank=rank or None, seed=5)
            our_batch = [trainer_client.Datum.from_tokens(p, c) for p, c in pairs]
            adam = types.AdamParams(learning_rate=1e-2, grad_clip_norm=1.0)
            our_adam = trainer_client.AdamParams(learning_rate=1e-2, grad_clip_norm=1.0)
            for _ in range(2):
                sdk_out = tc.forward_backward(batch, "cross_entropy").result()
                tc.optim_step(adam).result()
                our_out = mine.forward_backward(our_batch, "cross_entropy").result(timeout=60)
                mine.optim_step(our_adam).result(timeout=60)
                assert sdk_out.metrics["loss:sum"] == pytest.approx(our_out.loss, rel=1e-5)
            after = mine.forward(our_batch).result(timeout=60)
            ours_lp = torch.cat(list(after.logprobs)).numpy()
            np.testing.assert_allclose(logprobs_of(tc, batch), ours_lp, rtol=1e-5, atol=1e-6)
            mine.close()
    service_client.close("success").result()


def test_sdk_forward_backward_custom_matches_our_custom_loss(running: Running) -> None:
    service_client = sdk(running)
    with trainer_client.ServiceClient(running.grpc_address, api_key=KEY_A) as ours:
        tc = service_client.create_lora_training_client(base_model=LLAMA, rank=4, seed=7).result()
        tokenizer = tc.get_tokenizer()
        pairs = [(tokenizer.encode(p), tokenizer.encode(c)) for p, c in PAIRS]
        batch = [sft_datum(tokenizer, p, c) for p, c in PAIRS]
        mine = ours.create_training_client(LLAMA, lora_rank=4, seed=7)
        our_batch = [trainer_client.Datum.from_tokens(p, c) for p, c in pairs]

        def tinker_loss(data: list[types.Datum], lps: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
            w = [d.loss_fn_inputs["weights"].to_torch() for d in data]
            loss = torch.stack([-(lp * wi).sum() / wi.sum() for lp, wi in zip(lps, w, strict=True)]).mean()
            return loss, {"nll:mean": float(loss)}

        def our_loss(
            data: list[trainer_client.Datum], lps: list[torch.Tensor]
        ) -> tuple[torch.Tensor, dict[str, float]]:
            loss = torch.stack(
                [-(lp * d.weights).sum() / d.weights.sum() for d, lp in zip(data, lps, strict=True)]
            ).mean()
            return loss, {"nll": float(loss)}

        for _ in range(2):
            sdk_out = tc.forward_backward_custom(batch, tinker_loss).result()
            tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            our_out = mine.forward_backward_custom(
                our_batch := [trainer_client.Datum.from_tokens(p, c) for p, c in pairs], our_loss
            ).result(timeout=60)
            mine.optim_step(trainer_client.AdamParams(learning_rate=1e-2)).result(timeout=60)
            assert sdk_out.metrics["loss:sum"] == pytest.approx(our_out.loss, rel=1e-5)
        after = torch.cat(list(mine.forward(our_batch).result(timeout=60).logprobs)).numpy()
        np.testing.assert_allclose(logprobs_of(tc, batch), after, rtol=1e-5, atol=1e-6)
        mine.close()
    service_client.close("success").result()


def test_errors_are_sdk_exceptions_and_keys_are_isolated(running: Running) -> None:
    with pytest.raises(tinker.AuthenticationError):
        tinker.ServiceClient(base_url=running.url, api_key="tml-wrong").create_lora_training_client(
            base_model=LLAMA, rank=2
        ).result()
    a, b = sdk(running, KEY_A), sdk(running, KEY_B)
    tc = a.create_lora_training_client(base_model=LLAMA, rank=2).result()
    batch = [sft_datum(tc.get_tokenizer(), p, c) for p, c in PAIRS]
    before = logprobs_of(tc, batch)
    with pytest.raises(tinker.RequestFailedError):
        tc.forward_backward(
            [
                types.Datum(
                    model_input=types.ModelInput.from_ints([1, 2]),
                    loss_fn_inputs={"target_tokens": [2, 10**6], "weights": [1.0, 1.0]},
                )
            ],
            "cross_entropy",
        ).result()
    with pytest.raises(tinker.RequestFailedError):
        a.create_lora_training_client(base_model="no-such-model", rank=2).result()
    path = tc.save_state("private").result().path
    with pytest.raises(tinker.NotFoundError):
        b.create_training_client_from_state(path).result()
    with pytest.raises(tinker.NotFoundError):
        b.create_rest_client().get_weights_info_by_tinker_path(path).result()
    assert b.create_rest_client().list_user_checkpoints().result().checkpoints == []
    # Raw bad input on A's model: refused with the SDK's statuses, nothing applied.
    bad = httpx.post(
        f"{running.url}/api/v1/forward_backward",
        content=b"\xff\xff",
        headers={"X-API-Key": KEY_A, "Content-Type": "application/x-protobuf"},
    )
    assert bad.status_code == 400
    reused = httpx.post(
        f"{running.url}/api/v1/optim_step",
        json={"model_id": tc.model_id, "seq_id": 1, "adam_params": {"learning_rate": 1.0}},
        headers={"X-API-Key": KEY_A},
    )
    assert reused.status_code == 409 and "seq_id 1 was already used" in reused.json()["detail"]
    foreign = httpx.post(
        f"{running.url}/api/v1/optim_step",
        json={"model_id": tc.model_id, "seq_id": 99, "adam_params": {"learning_rate": 1.0}},
        headers={"X-API-Key": KEY_B},
    )
    assert foreign.status_code == 404
    np.testing.assert_array_equal(logprobs_of(tc, batch), before)
    a.close("success").result()
    b.close("success").result()


def test_cli_flag_reaches_the_config(llama_dir: Path) -> None:
    from trainer_server.__main__ import parse_args

    assert parse_args(["--model", f"m={llama_dir}", "--tinker-port", "0"]).tinker_port == 0
    assert parse_args(["--model", f"m={llama_dir}"]).tinker_port is None
    with pytest.raises(SystemExit):
        parse_args(["--model", f"m={llama_dir}", "--tinker-port", "70000"])
