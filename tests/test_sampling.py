"""Sample: logprobs equal Forward's, determinism, stopping, ordering, validation, isolation.

Sampled-token logprobs are checked against Forward on the same weights (the mismatch
Tinker users report as a bug), at temperature 1 and at 0.7: the reported logprobs are
always the model's own, at temperature 1. Within a session, a sample sees the weights as
of its place in the sequence order, and never changes training state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
import torch
from conftest import LLAMA, make_config, server_session, state_hash
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from trainer_client import (
    AdamParams,
    AsyncServiceClient,
    AsyncTrainingClient,
    Datum,
    InvalidArgumentError,
    NotFoundError,
    SampleOutput,
    SamplingParams,
)
from trainer_proto import pb, pb_grpc, wire
from trainer_server import TrainerServer

ATOL = 1e-5
SEED = 5
MAX_LENGTH = 64
"""max_position_embeddings of the test models (conftest)."""
ADAM = AdamParams(learning_rate=1e-2)


# ---- helpers ---------------------------------------------------------------------------


def eos_id(llama_dir: Path) -> int:
    tid = Tokenizer.from_file(str(llama_dir / "tokenizer.json")).token_to_id("<|eos|>")
    assert tid is not None
    return int(tid)


def make_prompt(seed: int, n: int = 6) -> list[int]:
    """Random ordinary token ids (the special tokens are 0, 1 and 2)."""
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def make_batch(seed: int, n: int = 3) -> list[Datum]:
    gen = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        tokens = torch.randint(3, 512, (int(torch.randint(6, 14, (), generator=gen)),), generator=gen)
        data.append(Datum.from_tokens(tokens[:3], tokens[3:]))
    return data


def params(**kwargs: object) -> SamplingParams:
    kwargs.setdefault("max_tokens", 10)
    kwargs.setdefault("seed", SEED)
    return SamplingParams(**kwargs)  # type: ignore[arg-type]


def close(actual: torch.Tensor, expected: torch.Tensor, msg: str) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0, msg=lambda report: f"{msg}: {report}")


def tokens_of(out: SampleOutput) -> list[list[int]]:
    return [s.tokens for s in out.sequences]


def assert_same_samples(a: SampleOutput, b: SampleOutput, msg: str) -> None:
    assert tokens_of(a) == tokens_of(b), msg
    assert [s.finish_reason for s in a.sequences] == [s.finish_reason for s in b.sequences], msg
    for i, (x, y) in enumerate(zip(a.sequences, b.sequences, strict=True)):
        close(x.logprobs, y.logprobs, f"{msg}: logprobs of sample {i}")


async def full_session(service: AsyncServiceClient, seed: int = 0) -> AsyncTrainingClient:
    return await service.create_training_client(LLAMA, lora_rank=None, seed=seed)


async def train_step(tc: AsyncTrainingClient, seed: int) -> None:
    await tc.forward_backward(make_batch(seed), "cross_entropy")
    await tc.optim_step(ADAM)


def first_stop_end(tokens: Sequence[int], stops: Sequence[Sequence[int]]) -> int | None:
    """Length of the shortest prefix of ``tokens`` that ends with one of ``stops``."""
    for end in range(1, len(tokens) + 1):
        if any(end >= len(s) and list(tokens[end - len(s) : end]) == list(s) for s in stops):
            return end
    return None


# ---- logprobs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lora_rank", "temperature"),
    [(None, 1.0), (None, 0.7), (4, 1.0)],
    ids=["full-t1", "full-t0.7", "lora-t1"],
)
async def test_sample_logprobs_equal_forward(
    service: AsyncServiceClient, lora_rank: int | None, temperature: float
) -> None:
    tc = await service.create_training_client(LLAMA, lora_rank=lora_rank, seed=1)
    await train_step(tc, 0)  # sample from trained weights, not the base model's
    prompt = make_prompt(1)
    out = await tc.sample(prompt, 4, params(max_tokens=12, temperature=temperature), return_prompt_logprobs=True)
    assert len(out.sequences) == 4
    scored = await tc.compute_logprobs([prompt + s.tokens for s in out.sequences])
    for i, (s, lp) in enumerate(zip(out.sequences, scored, strict=True)):
        assert s.logprobs.dtype == torch.float32
        assert len(s.logprobs) == len(s.tokens) > 0
        close(s.logprobs, lp[len(prompt) - 1 :], f"sample {i} vs forward")
    assert out.prompt_logprobs is not None
    close(out.prompt_logprobs, scored[0][: len(prompt) - 1], "prompt logprobs vs forward")
    # Not all samples are the same (this is sampling, not greedy decoding).
    assert len({tuple(t) for t in tokens_of(out)}) > 1


async def test_prompt_logprobs_only_when_asked(service: AsyncServiceClient) -> None:
    tc = await full_session(service)
    out = await tc.sample(make_prompt(2), 2, params(max_tokens=3))
    assert out.prompt_logprobs is None


# ---- determinism, greedy, top-k / top-p ------------------------------------------------


async def test_seed_determinism(service: AsyncServiceClient) -> None:
    tc = await full_session(service)
    prompt = make_prompt(3)
    a = await tc.sample(prompt, 4, params(seed=11))
    b = await tc.sample(prompt, 4, params(seed=11))
    c = await tc.sample(prompt, 4, params(seed=12))
    assert_same_samples(a, b, "same seed")
    assert tokens_of(a) != tokens_of(c), "a different seed gave the same samples"
    # Same seed in another session on the same weights: the same samples.
    other = await full_session(service)
    assert_same_samples(a, await other.sample(prompt, 4, params(seed=11)), "same seed, other session")


async def test_greedy_is_argmax_and_top_k_1_and_tiny_top_p_are_greedy(
    service: AsyncServiceClient, llama_dir: Path
) -> None:
    tc = await full_session(service)  # untrained: the base model's weights
    prompt = make_prompt(4)
    greedy = await tc.sample(prompt, 3, params(max_tokens=12, temperature=0.0))
    first = greedy.sequences[0]
    assert all(s.tokens == first.tokens for s in greedy.sequences), "greedy samples differ"
    assert len(first.tokens) == 12
    ref = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor([prompt + first.tokens])).logits[0].float()
    steps = logits[len(prompt) - 1 : -1]
    assert steps.argmax(dim=-1).tolist() == first.tokens
    close(first.logprobs, torch.log_softmax(steps, dim=-1).max(dim=-1).values, "greedy logprobs")
    # The seed does not matter at temperature 0; top_k=1 and a tiny top_p are greedy at any temperature.
    for variant in (
        params(max_tokens=12, temperature=0.0, seed=99),
        params(max_tokens=12, top_k=1),
        params(max_tokens=12, temperature=1.5, top_p=1e-6),
    ):
        assert_same_samples(await tc.sample(prompt, 3, variant), greedy, f"{variant} vs greedy")


async def test_top_k_and_top_p_restrict_the_draw(service: AsyncServiceClient, llama_dir: Path) -> None:
    """Every token drawn with top_k=k is among the k most likely; with top_p among the nucleus."""
    tc = await full_session(service)
    prompt = make_prompt(5)
    ref = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    for p, check in ((params(max_tokens=8, top_k=3), "k"), (params(max_tokens=8, top_p=0.02), "p")):
        out = await tc.sample(prompt, 4, p)
        for s in out.sequences:
            with torch.no_grad():
                logits = ref(input_ids=torch.tensor([prompt + s.tokens])).logits[0, len(prompt) - 1 : -1]
            probs = torch.softmax(logits.float(), dim=-1)
            for pos, tok in enumerate(s.tokens):
                order = probs[pos].argsort(descending=True).tolist()
                rank = order.index(tok)
                if check == "k":
                    assert rank < 3, (pos, rank)
                else:
                    assert float(probs[pos][order[:rank]].sum()) < 0.02, (pos, rank)
        assert len({tuple(t) for t in tokens_of(out)}) > 1, f"top_{check} left a single choice"


# ---- stopping --------------------------------------------------------------------------


async def test_stop_sequences_end_samples(service: AsyncServiceClient, llama_dir: Path) -> None:
    """With the same seed, a stopped sample is the unstopped one cut after its first stop sequence."""
    tc = await full_session(service)
    prompt = make_prompt(6)
    free = await tc.sample(prompt, 4, params(max_tokens=16))
    eos = eos_id(llama_dir)
    assert all(s.finish_reason == "length" and eos not in s.tokens for s in free.sequences)
    t0, t1 = free.sequences[0].tokens, free.sequences[1].tokens
    stops = [t0[3:5], [t1[6]]]  # a two-token and a one-token stop sequence
    stopped = await tc.sample(prompt, 4, params(max_tokens=16, stop=stops))
    ended = 0
    for i, (f, s) in enumerate(zip(free.sequences, stopped.sequences, strict=True)):
        end = first_stop_end(f.tokens, stops)
        if end is None:
            assert s.tokens == f.tokens and s.finish_reason == "length", i
            continue
        ended += 1
        assert s.finish_reason == "stop", i
        assert s.tokens == f.tokens[:end], i
        assert any(s.tokens[-len(stop) :] == stop for stop in stops), i
        close(s.logprobs, f.logprobs[:end], f"logprobs of stopped sample {i}")
    assert ended >= 2


async def test_eos_stops(service: AsyncServiceClient, llama_dir: Path) -> None:
    """Train the session to answer a prompt with [a, b, EOS]; sampling stops at EOS."""
    eos = eos_id(llama_dir)
    tc = await full_session(service)
    prompt, answer = make_prompt(7), [40, 41, eos]
    for _ in range(30):
        await tc.forward_backward([Datum.from_tokens(prompt, answer)], "cross_entropy")
        await tc.optim_step(AdamParams(learning_rate=2e-2))
    greedy = await tc.sample(prompt, 2, params(temperature=0.0, max_tokens=10))
    for s in greedy.sequences:
        assert s.tokens == answer and s.finish_reason == "stop"
    sampled = await tc.sample(prompt, 8, params(max_tokens=10))
    stopped = [s for s in sampled.sequences if s.finish_reason == "stop"]
    assert len(stopped) >= 4
    for s in sampled.sequences:
        if s.finish_reason == "stop":
            assert s.tokens[-1] == eos and eos not in s.tokens[:-1]
        else:
            assert len(s.tokens) == 10 and eos not in s.tokens


async def test_max_tokens_gives_length(service: AsyncServiceClient, llama_dir: Path) -> None:
    eos = eos_id(llama_dir)
    tc = await full_session(service)
    out = await tc.sample(make_prompt(8), 4, params(max_tokens=7))
    for s in out.sequences:
        assert eos not in s.tokens
        assert (len(s.tokens), len(s.logprobs), s.finish_reason) == (7, 7, "length")
    # The longest completion that fits: prompt + max_tokens = the model's maximum length.
    prompt = make_prompt(9, n=10)
    (s,) = (await tc.sample(prompt, 1, params(max_tokens=MAX_LENGTH - 10))).sequences
    assert len(s.tokens) == MAX_LENGTH - 10 or s.tokens[-1] == eos


# ---- streaming ---------------------------------------------------------------------------


async def test_sequences_stream_in_index_order(server: TrainerServer, service: AsyncServiceClient) -> None:
    """Raw stream: prompt logprobs first, then sequences with index 0..n-1; the client keeps that order."""
    n = 6
    prompt = make_prompt(10)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.TrainerServiceStub(channel)
        create = pb.CreateSessionRequest(base_model=LLAMA, seed=0)
        create.full.SetInParent()
        session = await stub.CreateSession(create)
        request = pb.SampleRequest(
            call=pb.CallHeader(session_id=session.session_id, seq=session.next_seq or 1),
            prompt=wire.tensor_to_wire(torch.tensor(prompt)),
            num_samples=n,
            params=params(max_tokens=5).to_proto(),
            return_prompt_logprobs=True,
        )
        messages = [msg async for msg in stub.Sample(request)]
    kinds = [m.WhichOneof("message") for m in messages]
    assert kinds == ["prompt_logprobs"] + ["sequence"] * n
    assert [m.sequence.index for m in messages[1:]] == list(range(n))
    raw = [wire.tensor_from_wire(m.sequence.tokens, "tokens").tolist() for m in messages[1:]]
    client = await (await full_session(service)).sample(prompt, n, params(max_tokens=5))
    assert tokens_of(client) == raw


# ---- validation --------------------------------------------------------------------------


async def test_bad_sampling_params(server: TrainerServer, service: AsyncServiceClient) -> None:
    tc = await full_session(service)
    prompt = make_prompt(11, n=10)
    session = server_session(server, tc)
    await tc.forward_backward(make_batch(1), "cross_entropy")  # accumulated gradients must stay untouched too
    before = state_hash(session)
    room = MAX_LENGTH - len(prompt)
    cases: list[tuple[list[int], int, SamplingParams, str]] = [
        (prompt, 1, params(temperature=-0.5), "temperature"),
        (prompt, 1, params(temperature=float("nan")), "temperature"),
        (prompt, 1, params(top_p=0.0), "top_p"),
        (prompt, 1, params(top_p=1.5), "top_p"),
        (prompt, 1, params(max_tokens=0), "max_tokens"),
        (prompt, 1, params(max_tokens=room + 1), "max_tokens"),
        (prompt, 0, params(), "num_samples"),
        (prompt, 1, params(stop=[[]]), "stop"),
        ([5, 600], 1, params(), "vocabulary"),
        ([], 1, params(), "empty"),
    ]
    for p, n, sp, match in cases:
        with pytest.raises(InvalidArgumentError, match=match):
            await tc.sample(p, n, sp)
    assert state_hash(session) == before
    # The session is not stuck behind the refused calls.
    out = await tc.sample(prompt, 2, params(max_tokens=room))
    assert len(out.sequences) == 2


# ---- isolation and ordering -----------------------------------------------------------------


async def test_sampling_never_changes_training_state(server: TrainerServer, service: AsyncServiceClient) -> None:
    tc, twin = await full_session(service), await full_session(service)
    data = make_batch(2)
    await tc.forward_backward(data, "cross_entropy")
    await twin.forward_backward(data, "cross_entropy")
    session = server_session(server, tc)
    before = state_hash(session)
    assert before == state_hash(server_session(server, twin))
    rng = torch.get_rng_state()  # the server runs in this process
    for p in (params(), params(temperature=0.0), params(seed=None, top_k=5)):
        await tc.sample(make_prompt(12), 4, p, return_prompt_logprobs=True)
    assert state_hash(session) == before, "sampling changed weights, gradients or step"
    assert torch.equal(torch.get_rng_state(), rng), "sampling disturbed the global torch RNG"
    # The step applies exactly the gradients the twin's step applies.
    a, b = await tc.optim_step(ADAM), await twin.optim_step(ADAM)
    assert (a.step, a.grad_norm) == (b.step, b.grad_norm)
    assert state_hash(session) == state_hash(server_session(server, twin))


async def test_sample_sees_weights_in_sequence_order(service: AsyncServiceClient) -> None:
    """``s0 = sample; fb; op; s1 = sample`` submitted at once equals doing them one by one."""
    prompt, data, p = make_prompt(13), make_batch(3), params(max_tokens=12)
    tc = await full_session(service)
    s0 = tc.sample(prompt, 4, p)
    fb = tc.forward_backward(data, "cross_entropy")
    op = tc.optim_step(ADAM)
    s1 = tc.sample(prompt, 4, p)
    before, _, _, after = await asyncio.gather(s0, fb, op, s1)

    twin = await full_session(service)
    expected_before = await twin.sample(prompt, 4, p)
    await twin.forward_backward(data, "cross_entropy")
    await twin.optim_step(ADAM)
    expected_after = await twin.sample(prompt, 4, p)

    assert_same_samples(before, expected_before, "sample submitted before the step")
    assert_same_samples(after, expected_after, "sample submitted after the step")
    assert tokens_of(after) != tokens_of(before), "the step did not change the samples"
    assert not torch.allclose(after.sequences[0].logprobs[:1], before.sequences[0].logprobs[:1])


async def test_sampling_concurrent_with_training_of_another_session(
    server: TrainerServer, service: AsyncServiceClient
) -> None:
    sampler, trainer, alone = [await full_session(service) for _ in range(3)]
    await train_step(sampler, 4)
    prompts = [make_prompt(20 + i) for i in range(4)]
    expected = [await sampler.sample(pr, 4, params(max_tokens=12)) for pr in prompts]
    batches = [make_batch(30 + i) for i in range(3)]
    expected_train = []
    for data in batches:  # the trainer's reference, run alone
        expected_train.append(
            ((await alone.forward_backward(data, "cross_entropy")).loss, (await alone.optim_step(ADAM)).grad_norm)
        )

    calls: list[object] = []
    for i, data in enumerate(batches):
        calls += [trainer.forward_backward(data, "cross_entropy"), trainer.optim_step(ADAM)]
        calls += [sampler.sample(prompts[i], 4, params(max_tokens=12))]
    calls.append(sampler.sample(prompts[3], 4, params(max_tokens=12)))
    results = await asyncio.gather(*calls)  # type: ignore[call-overload]

    samples = [r for r in results if isinstance(r, SampleOutput)]
    for i, (got, want) in enumerate(zip(samples, expected, strict=True)):
        assert_same_samples(got, want, f"sample {i} while the other session trained")
    fbs, ops = results[0::3][: len(batches)], results[1::3][: len(batches)]
    for i, (fb, op) in enumerate(zip(fbs, ops, strict=True)):
        assert (fb.loss, op.grad_norm) == expected_train[i], f"training step {i} while the other session sampled"
    assert state_hash(server_session(server, trainer)) == state_hash(server_session(server, alone))


# ---- checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("lora_rank", [None, 4], ids=["full", "lora"])
async def test_sample_from_checkpoints(llama_dir: Path, qwen_dir: Path, tmp_path: Path, lora_rank: int | None) -> None:
    """STATE and fp32 BASE checkpoints sample exactly like the session at the save; DELTA is refused."""
    async with (
        TrainerServer(make_config(llama_dir, qwen_dir, checkpoint_dir=tmp_path)) as server,
        AsyncServiceClient(server.address) as service,
    ):
        tc = await service.create_training_client(LLAMA, lora_rank=lora_rank, seed=2)
        await train_step(tc, 5)
        await train_step(tc, 6)
        prompt, p = make_prompt(14), params(max_tokens=12)
        live = tc.sample(prompt, 4, p, return_prompt_logprobs=True)
        await tc.save_checkpoint("st", "state")
        await tc.save_checkpoint("b32", "base", dtype="float32")
        live_out = await live
        for name in ("st", "b32"):
            out = await service.sample_from_checkpoint(name, prompt, 4, p, return_prompt_logprobs=True)
            assert_same_samples(out, live_out, f"checkpoint {name} vs session")
            assert out.prompt_logprobs is not None and live_out.prompt_logprobs is not None
            close(out.prompt_logprobs, live_out.prompt_logprobs, f"prompt logprobs of {name}")
        # The checkpoints hold the trained weights, not the base model's.
        base = await (await full_session(service)).sample(prompt, 4, p)
        assert tokens_of(base) != tokens_of(live_out)

        await train_step(tc, 7)
        await tc.save_checkpoint("d1", "delta")
        with pytest.raises(InvalidArgumentError, match="DELTA"):
            await service.sample_from_checkpoint("d1", prompt, 1, p)
        with pytest.raises(NotFoundError):
            await service.sample_from_checkpoint("nope", prompt, 1, p)
        with pytest.raises(InvalidArgumentError, match="top_p"):
            await service.sample_from_checkpoint("st", prompt, 1, params(top_p=2.0))
