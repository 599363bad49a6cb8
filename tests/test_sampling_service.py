"""Sampling through the service: concurrent calls share decode steps without changing a seeded result,
many prompts in one call, base-model and session sampling clients, stop strings, top-k logprobs,
the call order against weight updates, and training of another session going on meanwhile."""

from __future__ import annotations

import asyncio

import torch
from conftest import LLAMA

from trainer_client import AdamParams, AsyncServiceClient, Datum, SampleOutput, SamplingParams

PROMPTS = [[3 + i, 17, 22 + i, 9, 40 + 2 * i][: 2 + i % 4] for i in range(16)]


def same(a: SampleOutput, b: SampleOutput) -> None:
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    for x, y in zip(a.sequences, b.sequences, strict=True):
        torch.testing.assert_close(x.logprobs, y.logprobs, atol=1e-5, rtol=1e-5)


async def test_concurrent_calls_give_what_each_gives_alone(service: AsyncServiceClient) -> None:
    tc = await service.create_training_client(LLAMA, lora_rank=4, seed=1)
    params = [SamplingParams(max_tokens=10, temperature=1.0, seed=100 + i) for i in range(len(PROMPTS))]
    alone = [await tc.sample(p, 1, s) for p, s in zip(PROMPTS, params, strict=True)]
    together = await asyncio.gather(*(tc.sample(p, 1, s) for p, s in zip(PROMPTS, params, strict=True)))
    for a, b in zip(alone, together, strict=True):
        same(a, b)
    # The sampled logprobs are the model's: a forward over prompt + sample gives the same numbers.
    seq = alone[5].sequences[0]
    (forward,) = await tc.compute_logprobs([PROMPTS[5] + seq.tokens])
    torch.testing.assert_close(forward[len(PROMPTS[5]) - 1 :], seq.logprobs, atol=1e-5, rtol=1e-5)


async def test_many_prompts_in_one_call(service: AsyncServiceClient) -> None:
    sampler = service.create_sampling_client(base_model=LLAMA)
    params = SamplingParams(max_tokens=6, seed=7)
    outs = await sampler.sample_many(
        [(PROMPTS[0], 2), (PROMPTS[1], 3), PROMPTS[2]], params, include_prompt_logprobs=True
    )
    assert [len(o.sequences) for o in outs] == [2, 3, 1]
    for prompt, out, n in zip(PROMPTS[:3], outs, (2, 3, 1), strict=True):
        same(out, await sampler.sample(prompt, n, params))
        assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt) - 1


async def test_base_model_sampling_equals_an_untrained_session(service: AsyncServiceClient) -> None:
    base = service.create_sampling_client(base_model=LLAMA)
    tc = await service.create_training_client(LLAMA, lora_rank=4)  # LoRA starts as the identity
    params = SamplingParams(max_tokens=8, seed=3)
    same(await base.sample(PROMPTS[4], 2, params), await tc.sample(PROMPTS[4], 2, params))
    logprobs = await base.compute_logprobs(PROMPTS[4])
    assert logprobs[0] is None and len(logprobs) == len(PROMPTS[4])
    (forward,) = await tc.compute_logprobs([PROMPTS[4]])
    torch.testing.assert_close(torch.tensor(logprobs[1:]), forward, atol=1e-5, rtol=1e-5)


async def test_greedy_top_logprobs_and_stop_strings(service: AsyncServiceClient) -> None:
    tc = await service.create_training_client(LLAMA, lora_rank=4)
    tok = await tc.get_tokenizer()
    out = await tc.sample(PROMPTS[3], 1, SamplingParams(max_tokens=12, temperature=0.0, top_logprobs=3))
    (seq,) = out.sequences
    assert seq.top_logprobs is not None and tuple(seq.top_logprobs.token_ids.shape) == (len(seq.tokens), 3)
    assert seq.top_logprobs.token_ids[:, 0].tolist() == seq.tokens  # greedy: each token is the most likely
    torch.testing.assert_close(seq.top_logprobs.logprobs[:, 0], seq.logprobs)
    assert bool((seq.top_logprobs.logprobs[:, :-1] >= seq.top_logprobs.logprobs[:, 1:]).all())
    text = tok.decode(seq.tokens, skip_special_tokens=True)
    if len(text) >= 2:  # stop on the greedy text's second character: the sample ends where it appears
        stopped = await tc.sample(PROMPTS[3], 1, SamplingParams(max_tokens=12, temperature=0.0, stop_strings=[text[1]]))
        (s,) = stopped.sequences
        assert s.finish_reason == "stop" and s.tokens == seq.tokens[: len(s.tokens)]
        assert text[1] in tok.decode(s.tokens, skip_special_tokens=True)


async def test_samples_see_the_weights_of_their_place_in_the_order(service: AsyncServiceClient) -> None:
    tc = await service.create_training_client(LLAMA, lora_rank=8, seed=2)
    twin = await service.create_training_client(LLAMA, lora_rank=8, seed=2)
    params = SamplingParams(max_tokens=8, seed=11)
    data = [Datum.from_sequence([5, 6, 7, 8, 9, 10, 11])]
    before = tc.sample(PROMPTS[6], 2, params)  # submitted, not awaited: all four run concurrently
    fb = tc.forward_backward(data, "cross_entropy")
    step = tc.optim_step(AdamParams(learning_rate=0.5))
    after = tc.sample(PROMPTS[6], 2, params)
    await fb
    await step
    same(await before, await twin.sample(PROMPTS[6], 2, params))  # the weights before the step
    await twin.forward_backward(data, "cross_entropy")
    await twin.optim_step(AdamParams(learning_rate=0.5))
    same(await after, await twin.sample(PROMPTS[6], 2, params))  # the weights after it


async def test_training_of_another_session_runs_while_one_samples(service: AsyncServiceClient) -> None:
    sampler = await service.create_training_client(LLAMA, lora_rank=4)
    trainer = await service.create_training_client(LLAMA, lora_rank=4)
    data = [Datum.from_sequence(list(range(3, 40)))]
    await trainer.forward_backward(data, "cross_entropy")  # warm
    long = asyncio.ensure_future(
        asyncio.gather(*(sampler.sample(p, 4, SamplingParams(max_tokens=40, seed=1)) for p in PROMPTS))
    )
    await asyncio.sleep(0.2)  # the sampling batch is running
    steps = 0
    while not long.done() and steps < 3:
        await trainer.forward_backward(data, "cross_entropy")
        await trainer.optim_step(AdamParams(learning_rate=1e-3))
        steps += 1
    assert steps == 3 and not long.done(), "training waited for the whole sampling batch"
    outs = await long
    assert all(len(o.sequences) == 4 for o in outs)


async def test_prompt_top_logprobs(service: AsyncServiceClient) -> None:
    sampler = service.create_sampling_client(base_model=LLAMA)
    prompt = PROMPTS[7] + [31, 8, 12]
    out = await sampler.sample(
        prompt, 1, SamplingParams(max_tokens=2, seed=0), include_prompt_logprobs=True, topk_prompt_logprobs=3
    )
    top, lp = out.prompt_top_logprobs, out.prompt_logprobs
    assert top is not None and lp is not None
    assert tuple(top.token_ids.shape) == tuple(top.logprobs.shape) == (len(prompt) - 1, 3)
    assert bool((top.logprobs[:, :-1] >= top.logprobs[:, 1:]).all())  # most likely first
    assert bool((top.logprobs[:, 0] >= lp - 1e-6).all())  # nothing beats the most likely token
    for i, token in enumerate(prompt[1:]):  # where the prompt's token is among the top 3, its logprob matches
        hits = (top.token_ids[i] == token).nonzero()
        if len(hits):
            torch.testing.assert_close(top.logprobs[i, int(hits[0, 0])], lp[i], atol=1e-5, rtol=1e-5)
    (multi,) = await sampler.sample_many([(prompt, 1)], SamplingParams(max_tokens=2, seed=0), topk_prompt_logprobs=3)
    assert multi.prompt_top_logprobs is not None
    assert torch.equal(multi.prompt_top_logprobs.token_ids, top.token_ids)
