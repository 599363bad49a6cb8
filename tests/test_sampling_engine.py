"""The sampling engine: a continuous decode batch (device side) and its asyncio scheduler.

Batching never changes a result: every request sampled in a batch with others (prompts of other
lengths, other settings, joining and leaving mid-decode) gives the same tokens as alone, and
its logprobs (sampled, top-k, prompt) equal those of one plain forward over prompt + sample.
The scheduler shares decode steps between concurrent requests on the same weights, one device
job per step, withdraws cancelled requests, and fails (never hangs) the requests of a failing step.
Real tiny models throughout: tiny-llama and tiny-qwen from conftest, plus GPT-2 and a
sliding-window Qwen2 (a cache layout that cannot be merged) built here.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import LLAMA, QWEN

from trainer_server import ServiceError, build_tiny_model
from trainer_server._decode import DecodeBatch
from trainer_server._models import BaseModel, load_base_model
from trainer_server._sampling import (
    SampleRequest,
    SampleResult,
    SamplingModel,
    SamplingSettings,
    generate,
    text_decoder,
)
from trainer_server._sampling_scheduler import SamplingScheduler, SchedulerClosedError

ATOL = 1e-5
CPU = torch.device("cpu")


# ---- models --------------------------------------------------------------------------------


def sampling_model(base: BaseModel, module: Any = None) -> SamplingModel:
    return SamplingModel(
        module=base.model if module is None else module,
        device=base.device,
        eos_token_ids=base.eos_token_ids,
        decode=text_decoder(base.tokenizer_files),
        vocab_size=base.vocab_size,
        max_length=base.max_sequence_length,
    )


@pytest.fixture(scope="module")
def bases(llama_dir: Path, qwen_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, BaseModel]:
    gpt2_dir = build_tiny_model(
        tmp_path_factory.mktemp("gpt2") / "gpt2", architecture="gpt2", max_position_embeddings=64
    )
    return {
        name: load_base_model(name, path, CPU, "float32")
        for name, path in ((LLAMA, llama_dir), (QWEN, qwen_dir), ("tiny-gpt2", gpt2_dir))
    }


@pytest.fixture(params=[LLAMA, QWEN])
def model(request: pytest.FixtureRequest, bases: dict[str, BaseModel]) -> SamplingModel:
    return sampling_model(bases[request.param])


@pytest.fixture(scope="module")
def sliding_model(bases: dict[str, BaseModel]) -> SamplingModel:
    """A Qwen2 whose first layer attends through a 4-token sliding window (a cache that cannot be merged)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_sliding_window=True,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        eos_token_id=1,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module: Any = Qwen2ForCausalLM(config)
    module.eval()
    return SamplingModel(module, CPU, frozenset({1}), vocab_size=512, max_length=64)


# ---- helpers -------------------------------------------------------------------------------


def prompt(seed: int, n: int) -> list[int]:
    """Ordinary token ids (the special tokens are 0, 1 and 2)."""
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def request(seed: int, n_prompt: int, **settings: Any) -> SampleRequest:
    settings.setdefault("max_tokens", 10)
    settings.setdefault("seed", seed)
    return SampleRequest(prompt(seed, n_prompt), SamplingSettings(**settings), prompt_logprobs=True)


MIXED: list[
    tuple[int, int, dict[str, Any]]
] = [  # prompt lengths, sample counts and settings that differ from row to row
    (1, 4, {"num_samples": 2}),
    (2, 12, {"num_samples": 3, "temperature": 0.7, "top_k": 5, "top_logprobs": 3}),
    (3, 1, {"temperature": 0.0, "top_logprobs": 2}),
    (4, 7, {"num_samples": 4, "temperature": 1.3, "top_p": 0.8, "max_tokens": 14}),
    (5, 9, {"num_samples": 2, "max_tokens": 3}),
]


def mixed_requests() -> list[SampleRequest]:
    return [
        SampleRequest(
            prompt(seed, n),
            SamplingSettings(**{"max_tokens": 10, "seed": seed, **s}),
            prompt_logprobs=True,
            prompt_top_logprobs=2,
        )
        for seed, n, s in MIXED
    ]


def alone(model: SamplingModel, req: SampleRequest) -> SampleResult:
    (result,) = DecodeBatch(model).run([req])
    return result


def assert_same(a: SampleResult, b: SampleResult, msg: str) -> None:
    assert [s.tokens for s in a.samples] == [s.tokens for s in b.samples], msg
    assert [s.finish_reason for s in a.samples] == [s.finish_reason for s in b.samples], msg
    for i, (x, y) in enumerate(zip(a.samples, b.samples, strict=True)):
        torch.testing.assert_close(
            torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=ATOL, rtol=0, msg=f"{msg} {i}"
        )


def forward_logprobs(model: SamplingModel, tokens: list[int]) -> torch.Tensor:
    """log_softmax of one plain forward over ``tokens``: row i scores the token after position i."""
    with torch.no_grad():
        logits = model.module(input_ids=torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def assert_matches_forward(model: SamplingModel, req: SampleRequest, result: SampleResult) -> None:
    """Sampled, top-k and prompt logprobs equal those of a forward over prompt + sample."""
    p = req.tokens.tolist()
    for i, s in enumerate(result.samples):
        full = p + s.tokens
        lp = forward_logprobs(model, full)[:-1]
        scored = lp.gather(-1, torch.tensor(full[1:])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(s.logprobs), scored[len(p) - 1 :], atol=ATOL, rtol=0)
        if i == 0 and result.prompt_logprobs is not None:
            torch.testing.assert_close(result.prompt_logprobs, scored[: len(p) - 1], atol=ATOL, rtol=0)
        if i == 0 and result.prompt_top_logprobs is not None:
            top = lp[: len(p) - 1].topk(req.prompt_top_logprobs, dim=-1)
            assert torch.equal(result.prompt_top_logprobs.token_ids, top.indices)
            torch.testing.assert_close(result.prompt_top_logprobs.logprobs, top.values, atol=ATOL, rtol=0)
        k = req.settings.top_logprobs
        if k:
            assert s.top_logprobs is not None
            top = lp[len(p) - 1 :].topk(k, dim=-1)
            assert torch.equal(s.top_logprobs.token_ids, top.indices), f"top-{k} ids of sample {i}"
            torch.testing.assert_close(s.top_logprobs.logprobs, top.values, atol=ATOL, rtol=0)
        else:
            assert s.top_logprobs is None


# ---- the decode batch ----------------------------------------------------------------------


@pytest.mark.parametrize("name", [LLAMA, QWEN, "tiny-gpt2"])
def test_batched_equals_alone_and_forward(bases: dict[str, BaseModel], name: str) -> None:
    model = sampling_model(bases[name])
    reqs = mixed_requests()
    together = DecodeBatch(model).run(reqs)
    for i, (req, result) in enumerate(zip(reqs, together, strict=True)):
        assert len(result.samples) == req.settings.num_samples
        assert_same(alone(model, req), result, f"request {i} alone vs batched")
        assert_matches_forward(model, req, result)
    # Sampling at temperature > 0 gives different samples of one prompt.
    assert len({tuple(s.tokens) for s in together[3].samples}) > 1


def test_requests_join_and_leave_mid_decode(model: SamplingModel) -> None:
    """Requests admitted at different steps, with prompts shorter and longer than the running rows."""
    a = request(10, 6, num_samples=2, max_tokens=20)
    b = request(11, 2, max_tokens=3, temperature=0.5)  # joins at step 2, leaves at step 4
    c = request(12, 30, num_samples=3, max_tokens=8, top_logprobs=2)  # wider than the running rows
    d = request(13, 1, temperature=0.0, max_tokens=6)
    schedule = {0: [(0, a)], 2: [(1, b)], 5: [(2, c)], 6: [(3, d)]}
    batch = DecodeBatch(model)
    results: dict[int, SampleResult] = {}
    rows = []
    for step in range(40):
        admit = schedule.get(step, [])
        assert batch.admissible([r for _, r in admit]) == len(admit)
        results.update(batch.step(admit, ()))
        rows.append(batch.num_rows)
        if len(results) == 4:
            break
    assert rows[:7] == [2, 2, 3, 3, 2, 5, 6]  # b leaves after its third token; c and d join
    assert results[1].samples[0].finish_reason == "length" and len(results[1].samples[0].tokens) == 3
    for i, req in enumerate((a, b, c, d)):
        assert_same(alone(model, req), results[i], f"request {i}")
        assert_matches_forward(model, req, results[i])


def test_greedy_is_argmax_and_top_k_1_is_greedy(model: SamplingModel) -> None:
    p = prompt(20, 5)
    greedy, top1 = DecodeBatch(model).run(
        [
            SampleRequest(p, SamplingSettings(num_samples=2, max_tokens=12, temperature=0.0)),
            SampleRequest(p, SamplingSettings(max_tokens=12, top_k=1, seed=3)),
        ]
    )
    tokens = greedy.samples[0].tokens
    assert greedy.samples[1].tokens == tokens == top1.samples[0].tokens
    logp = forward_logprobs(model, p + tokens)
    n = len(tokens)
    assert logp[len(p) - 1 : len(p) - 1 + n].argmax(dim=-1).tolist() == tokens


def test_top_k_and_top_p_restrict_the_draw(model: SamplingModel) -> None:
    p = prompt(21, 5)
    k3, nucleus = DecodeBatch(model).run(
        [
            SampleRequest(p, SamplingSettings(num_samples=4, max_tokens=8, top_k=3, seed=1)),
            SampleRequest(p, SamplingSettings(num_samples=4, max_tokens=8, top_p=0.02, seed=2)),
        ]
    )
    for s in k3.samples:
        logp = forward_logprobs(model, p + s.tokens)[len(p) - 1 : -1]
        for pos, token in enumerate(s.tokens):
            assert token in logp[pos].topk(3).indices.tolist()
    for s in nucleus.samples:  # the nucleus: the most likely tokens until their mass reaches top_p
        logp = forward_logprobs(model, p + s.tokens)[len(p) - 1 : -1]
        for pos, token in enumerate(s.tokens):
            probs, order = logp[pos].exp().sort(descending=True)
            inside = order[(probs.cumsum(0) - probs) < 0.02].tolist()
            assert token in inside and len(inside) < 20


def test_seeds(model: SamplingModel) -> None:
    p = prompt(22, 4)

    def run(seed: int | None) -> list[list[int]]:
        (result,) = DecodeBatch(model).run([SampleRequest(p, SamplingSettings(num_samples=3, seed=seed))])
        return [s.tokens for s in result.samples]

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert run(None) != run(None)


def first_end(tokens: list[int], done: Callable[[list[int]], bool]) -> int | None:
    return next((end for end in range(1, len(tokens) + 1) if done(tokens[:end])), None)


def test_stop_sequences_end_samples(model: SamplingModel) -> None:
    free = request(23, 5, num_samples=4, max_tokens=16)
    (unstopped,) = DecodeBatch(model).run([free])
    t0, t1 = unstopped.samples[0].tokens, unstopped.samples[1].tokens
    stops = (tuple(t0[3:5]), (t1[6],))  # a two-token and a one-token stop sequence
    stopped_req = SampleRequest(free.tokens, SamplingSettings(num_samples=4, max_tokens=16, seed=23, stop=stops))
    (stopped,) = DecodeBatch(model).run([stopped_req])
    for f, s in zip(unstopped.samples, stopped.samples, strict=True):
        end = first_end(f.tokens, lambda t: any(tuple(t[-len(x) :]) == x for x in stops))
        assert s.tokens == f.tokens[: end or len(f.tokens)]
        assert s.finish_reason == ("stop" if end else f.finish_reason)
        torch.testing.assert_close(
            torch.tensor(s.logprobs), torch.tensor(f.logprobs[: len(s.tokens)]), atol=ATOL, rtol=0
        )
    assert stopped.samples[0].finish_reason == stopped.samples[1].finish_reason == "stop"


def test_stop_strings_end_samples_at_the_completing_token(model: SamplingModel) -> None:
    assert model.decode is not None
    decode = model.decode
    free = request(24, 5, num_samples=4, max_tokens=16)
    (unstopped,) = DecodeBatch(model).run([free])
    text0 = decode(unstopped.samples[0].tokens[:6])
    stop = text0[-3:]  # ends inside the text of sample 0's first six tokens
    assert stop.strip(), f"pick another seed: {text0!r}"
    stopped_req = SampleRequest(
        free.tokens, SamplingSettings(num_samples=4, max_tokens=16, seed=24, stop_strings=(stop,))
    )
    (stopped,) = DecodeBatch(model).run([stopped_req])
    for f, s in zip(unstopped.samples, stopped.samples, strict=True):
        end = first_end(f.tokens, lambda t: stop in decode(t))
        assert s.tokens == f.tokens[: end or len(f.tokens)]
        assert s.finish_reason == ("stop" if end else f.finish_reason)
    assert stopped.samples[0].finish_reason == "stop" and len(stopped.samples[0].tokens) <= 6


def test_eos_and_max_tokens(bases: dict[str, BaseModel]) -> None:
    base = bases[LLAMA]
    p = prompt(25, 5)
    (free,) = DecodeBatch(sampling_model(base)).run(
        [SampleRequest(p, SamplingSettings(num_samples=4, max_tokens=7, seed=1))]
    )
    assert all(len(s.tokens) == 7 and s.finish_reason == "length" for s in free.samples)
    # Declare a token the model draws to be its eos: samples end right after it.
    eos = free.samples[0].tokens[2]
    model = SamplingModel(base.model, CPU, frozenset({eos}))
    (ended,) = DecodeBatch(model).run([SampleRequest(p, SamplingSettings(num_samples=4, max_tokens=7, seed=1))])
    for f, s in zip(free.samples, ended.samples, strict=True):
        end = f.tokens.index(eos) + 1 if eos in f.tokens else None
        assert s.tokens == f.tokens[: end or 7]
        assert s.finish_reason == ("stop" if end else "length")


def test_sliding_window_cache_batches_only_requests_prefilled_together(sliding_model: SamplingModel) -> None:
    reqs = [request(30, 9, num_samples=2), request(31, 3, temperature=0.6, top_logprobs=2)]
    batch = DecodeBatch(sliding_model)
    assert batch.admissible(reqs) == 2
    results = dict(batch.step(list(enumerate(reqs)), ()))
    late = request(32, 5)
    assert batch.admissible([late]) == 0, "a running sliding-window batch cannot take new rows"
    while batch.num_rows:
        results.update(batch.step([], ()))
    assert batch.admissible([late]) == 1
    for i, req in enumerate(reqs):
        assert_same(alone(sliding_model, req), results[i], f"request {i}")
        assert_matches_forward(sliding_model, req, results[i])


def test_generate_is_one_request_on_the_engine(model: SamplingModel) -> None:
    req = request(33, 6, num_samples=3, temperature=0.8, top_p=0.9)
    samples, prompt_lp = generate(model.module, req.tokens, req.settings, model.eos_token_ids, CPU)
    expected = alone(model, req)
    assert [s.tokens for s in samples] == [s.tokens for s in expected.samples]
    assert expected.prompt_logprobs is not None
    torch.testing.assert_close(prompt_lp, expected.prompt_logprobs, atol=0, rtol=0)


# ---- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0}, "num_samples must be at least 1"),
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -2}, "top_k must be >= 0"),
        ({"stop": ((),)}, "stop contains an empty sequence"),
        ({"stop_strings": ("",)}, "stop_strings contains an empty string"),
        ({"top_logprobs": 21}, r"top_logprobs must be in \[0, 20\]"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ServiceError, match=match):
        SamplingSettings(**kwargs)


def test_requests_the_model_cannot_run_are_refused(model: SamplingModel) -> None:
    for bad, match in [
        (SampleRequest([5, 600]), "outside the vocabulary"),
        (SampleRequest(prompt(1, 60), SamplingSettings(max_tokens=5)), "leaves 4 of the model's maximum length 64"),
    ]:
        with pytest.raises(ServiceError, match=match):
            model.check(bad)
    no_tokenizer = SamplingModel(model.module, CPU)
    with pytest.raises(ServiceError, match="stop_strings need the model's tokenizer"):
        no_tokenizer.check(SampleRequest([5], SamplingSettings(stop_strings=("x",))))
    for bad_prompt in ([], [[1, 2]], [0.5]):
        with pytest.raises(ServiceError, match="prompt must"):
            SampleRequest(bad_prompt)  # type: ignore[arg-type]


# ---- the scheduler -------------------------------------------------------------------------


class Device:
    """A real one-thread executor standing in for the server's device thread; it logs each job."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-device")
        self.jobs: list[str] = []  # labels, in the order the jobs ran
        self.finished = 0
        self._progress = asyncio.Event()

    def run(self, fn: Callable[[], Any], label: str = "sampling step") -> Awaitable[Any]:
        def job() -> Any:
            self.jobs.append(label)
            return fn()

        future = asyncio.get_running_loop().run_in_executor(self.executor, job)
        future.add_done_callback(self._done)
        return future

    def _done(self, _: object) -> None:
        self.finished += 1
        self._progress.set()

    async def wait_finished(self, n: int) -> None:
        """Wait until ``n`` jobs have finished (and their awaiters have been woken)."""
        while self.finished < n:
            self._progress.clear()
            await self._progress.wait()


@pytest.fixture
def device() -> Iterator[Device]:
    d = Device()
    yield d
    d.executor.shutdown(wait=True)


async def test_concurrent_requests_share_decode_steps(model: SamplingModel, device: Device) -> None:
    scheduler = SamplingScheduler(device.run)
    reqs = [request(40 + i, 3 + i % 5, max_tokens=8, temperature=0.9, top_logprobs=1) for i in range(16)]
    results = await asyncio.gather(*(scheduler.submit("base", model, r) for r in reqs))
    # 8 shared steps, and perhaps one that was queued behind the last and found nothing to do.
    assert len(device.jobs) in (8, 9), device.jobs
    for i, (req, result) in enumerate(zip(reqs, results, strict=True)):
        assert_same(alone(model, req), result, f"request {i}")
    assert_matches_forward(model, reqs[0], results[0])
    assert scheduler.rows("base") == 0


async def test_submit_many_prompts_each_with_its_own_settings(model: SamplingModel, device: Device) -> None:
    scheduler = SamplingScheduler(device.run)
    reqs = mixed_requests()
    results = await scheduler.submit_many("base", model, reqs)
    assert [len(r.samples) for r in results] == [r.settings.num_samples for r in reqs]
    for req, result in zip(reqs, results, strict=True):
        assert_same(alone(model, req), result, "submit_many")
    assert await scheduler.submit_many("base", model, []) == []


async def test_keys_batch_apart_and_other_device_work_runs_between_steps(
    bases: dict[str, BaseModel], device: Device
) -> None:
    scheduler = SamplingScheduler(device.run)
    llama, qwen = sampling_model(bases[LLAMA]), sampling_model(bases[QWEN])
    req = request(50, 4, max_tokens=10)
    llama_task = asyncio.create_task(scheduler.submit("llama", llama, req))
    qwen_task = asyncio.create_task(scheduler.submit("qwen", qwen, req))
    await device.wait_finished(4)
    assert scheduler.rows("llama") == scheduler.rows("qwen") == 1
    await device.run(lambda: None, "training step")  # queued behind at most one step of each key
    llama_result, qwen_result = await llama_task, await qwen_task
    # Each key keeps at most two steps on the device queue: the training step waits for at most
    # four, and most of the sampling runs after it.
    training = device.jobs.index("training step")
    assert training <= 8 and device.jobs[training + 1 :].count("sampling step") >= 10, device.jobs
    assert_same(alone(llama, req), llama_result, "llama key")
    assert_same(alone(qwen, req), qwen_result, "qwen key")
    busy = scheduler.enqueue("k", llama, [req])
    with pytest.raises(ValueError, match="busy with another model"):
        scheduler.enqueue("k", qwen, [req])
    await busy


async def test_cancelled_request_leaves_the_batch(model: SamplingModel, device: Device) -> None:
    scheduler = SamplingScheduler(device.run)
    long = request(60, 5, num_samples=3, max_tokens=30)
    other = request(61, 8, max_tokens=30)
    long_task = asyncio.create_task(scheduler.submit("base", model, long))
    other_task = asyncio.create_task(scheduler.submit("base", model, other))
    await device.wait_finished(3)
    assert scheduler.rows("base") == 4
    long_task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long_task
    # The running step and the one queued behind it may have started before the withdrawal.
    await device.wait_finished(device.finished + 3)
    assert scheduler.rows("base") == 1, "the cancelled request's rows are dropped at the next step"
    assert_same(alone(model, other), await other_task, "the other request")
    # A request cancelled while still queued never runs.
    queued = scheduler.enqueue("base", model, [long])
    queued.cancel()
    await scheduler.wait_idle("base")
    assert scheduler.rows("base") == 0


class FailingModule(torch.nn.Module):
    """A real model whose forward raises from its ``fail_at``-th call on (fault injection)."""

    def __init__(self, inner: Any, fail_at: int) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.fail_at = fail_at

    def forward(self, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls >= self.fail_at:
            raise RuntimeError("injected device failure")
        return self.inner(**kwargs)


async def test_a_failing_step_fails_its_batch_and_later_requests_run(model: SamplingModel, device: Device) -> None:
    failing = SamplingModel(FailingModule(model.module, fail_at=4), CPU, model.eos_token_ids)
    scheduler = SamplingScheduler(device.run)
    reqs = [request(70, 5, max_tokens=10), request(71, 3, num_samples=2, max_tokens=10)]
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(scheduler.submit("k", failing, r) for r in reqs), return_exceptions=True), 30
    )
    assert all(isinstance(o, RuntimeError) and "injected device failure" in str(o) for o in outcomes), outcomes
    failing.module.fail_at = 10**9  # the device recovers: the key's next batch starts afresh
    result = await asyncio.wait_for(scheduler.submit("k", failing, reqs[0]), 30)
    assert_same(alone(model, reqs[0]), result, "after the failure")
    # A refused request never reaches the batch.
    with pytest.raises(ServiceError, match="outside the vocabulary"):
        await scheduler.submit("k", sampling_model_like(model), SampleRequest([600]))


def sampling_model_like(model: SamplingModel) -> SamplingModel:
    return SamplingModel(model.module, CPU, model.eos_token_ids, vocab_size=512, max_length=64)


async def test_close_fails_waiting_requests(model: SamplingModel, device: Device) -> None:
    scheduler = SamplingScheduler(device.run)
    task = asyncio.create_task(scheduler.submit("k", model, request(80, 5, max_tokens=40)))
    await device.wait_finished(1)
    await scheduler.aclose()
    with pytest.raises(SchedulerClosedError):
        await task
    with pytest.raises(SchedulerClosedError):
        await scheduler.submit("k", model, request(81, 5))


async def test_wait_idle_returns_when_the_key_drains(model: SamplingModel, device: Device) -> None:
    scheduler = SamplingScheduler(device.run)
    future = scheduler.enqueue("k", model, [request(90, 5, max_tokens=6)])
    await scheduler.wait_idle("k")
    assert future.done() and len(future.result()[0].samples[0].tokens) == 6
    await scheduler.wait_idle("never-used")


def test_device_jobs_are_one_step_each(model: SamplingModel) -> None:
    """Each scheduler step is one bounded device job: a step's work is one forward (plus a prefill)."""
    calls = []
    module = model.module

    def counting(**kwargs: Any) -> Any:
        calls.append(kwargs["input_ids"].shape)
        return module(**kwargs)

    batch = DecodeBatch(SamplingModel(counting, CPU, model.eos_token_ids))
    batch.step([(0, request(91, 5, max_tokens=4)), (1, request(92, 2, num_samples=2, max_tokens=4))], ())
    assert calls == [torch.Size([2, 5]), torch.Size([3, 1])]  # one prefill of both prompts, one decode forward
    batch.step([], ())
    assert calls[2:] == [torch.Size([3, 1])]
    functools.reduce(lambda _, __: batch.step([], ()), range(2), None)
    assert batch.num_rows == 0
