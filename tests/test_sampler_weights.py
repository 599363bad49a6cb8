"""Sampling from saved weights: an ADAPTER checkpoint (the cheap sampler weights of a LoRA session)
samples exactly like the session it was saved from."""

from __future__ import annotations

import torch
from conftest import LLAMA

from trainer_client import AdamParams, AsyncServiceClient, Datum, SamplingParams


async def test_an_adapter_checkpoint_samples_like_its_session(service: AsyncServiceClient) -> None:
    tc = await service.create_training_client(LLAMA, lora_rank=8, seed=4)
    gen = torch.Generator().manual_seed(3)
    data = [Datum.from_sequence(torch.randint(3, 60, (16,), generator=gen)) for _ in range(2)]
    for _ in range(2):
        await tc.forward_backward(data, "cross_entropy")
        await tc.optim_step(AdamParams(learning_rate=5e-2))
    name = f"sampler-{tc.session_id}"
    info = await tc.save_checkpoint(name, "adapter")
    assert info.kind == "adapter"
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=9)
    prompt = [3, 17, 22, 9]
    live = await tc.sample(prompt, num_samples=3, params=params, return_prompt_logprobs=True)
    saved = await service.sample_from_checkpoint(name, prompt, 3, params, return_prompt_logprobs=True)
    assert [s.tokens for s in saved.sequences] == [s.tokens for s in live.sequences]
    for a, b in zip(saved.sequences, live.sequences, strict=True):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)
    assert saved.prompt_logprobs is not None and live.prompt_logprobs is not None
    torch.testing.assert_close(saved.prompt_logprobs, live.prompt_logprobs, atol=1e-5, rtol=1e-5)
