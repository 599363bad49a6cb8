"""The sync facade (``ServiceClient`` / ``TrainingClient``) from plain, non-async code.

The server runs in a background thread with its own event loop, as it would in another
process; the tests themselves are ordinary functions, like a user's script or notebook.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import pytest
import torch
from conftest import LLAMA, QWEN, make_config
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from trainer_client import (
    AdamParams,
    APIFuture,
    APIStatusError,
    AsyncServiceClient,
    AsyncTrainingClient,
    ClientClosedError,
    ClientConfig,
    Datum,
    ForwardBackwardOutput,
    InvalidArgumentError,
    LossFunctionError,
    NotFoundError,
    OptimStepResult,
    ServiceClient,
    TrainingClient,
)
from trainer_server import ServerConfig, TrainerServer
from trainer_server.builtin_models import EOS_TOKEN

DATA = [
    Datum.from_tokens([3, 4, 5, 6, 7], [8, 9, 10, 11]),
    Datum.from_tokens([20, 21], [22, 23, 24, 25, 26, 27]),
]


class ThreadedServer:
    """A ``TrainerServer`` on its own event loop in a background thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.address = ""
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name="trainer-server", daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            async with TrainerServer(self.config) as server:
                self.address = server.address
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._ready.set()

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        if not self._ready.wait(180):
            raise TimeoutError("the server did not start within 180 s")
        if self._error is not None:
            raise RuntimeError("the server failed to start") from self._error
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)
        assert not self._thread.is_alive(), "the server thread did not stop"


@pytest.fixture(scope="module")
def threaded_server(llama_dir: Path, qwen_dir: Path) -> Iterator[ThreadedServer]:
    with ThreadedServer(make_config(llama_dir, qwen_dir)) as srv:
        yield srv


@pytest.fixture(scope="module")
def sync_service(threaded_server: ThreadedServer) -> Iterator[ServiceClient]:
    with ServiceClient(threaded_server.address, config=ClientConfig(timeout_s=120)) as client:
        yield client


@pytest.fixture
def tc(sync_service: ServiceClient) -> Iterator[TrainingClient]:
    with sync_service.create_training_client(LLAMA, lora_rank=8, seed=3) as client:
        yield client


def weighted_nll(data: Sequence[Datum], logprobs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean negative log-likelihood of the response tokens."""
    weights = torch.cat([d.weights for d in data])
    nll = -(torch.cat(list(logprobs)) * weights).sum() / weights.sum()
    return nll, {"response_tokens": float(weights.sum())}


def test_the_issue_loop_runs_synchronously(tc: TrainingClient) -> None:
    fb = tc.forward_backward_custom(DATA, weighted_nll)
    op = tc.optim_step(AdamParams(learning_rate=1e-3))
    assert isinstance(fb, APIFuture)
    assert isinstance(op, APIFuture)
    out = fb.result(timeout=60)
    step = op.result(timeout=60)
    assert isinstance(out, ForwardBackwardOutput)
    assert isinstance(step, OptimStepResult)
    assert out.num_tokens == sum(len(d) for d in DATA)
    assert [len(lp) for lp in out.logprobs] == [len(d) for d in DATA]
    assert out.metrics == {"response_tokens": 10.0}
    assert 0 < out.loss < 50
    assert step.step == 1
    assert step.grad_norm > 0
    assert fb.done()
    assert op.done()


def test_training_methods_return_before_the_call_finishes(tc: TrainingClient) -> None:
    """Submitting is not waiting: the future comes back while the call is still running."""
    release = threading.Event()

    def gated_loss(data: Sequence[Datum], logprobs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        assert release.wait(60)
        return weighted_nll(data, logprobs)

    started = time.monotonic()
    fb = tc.forward_backward_custom(DATA, gated_loss)
    op = tc.optim_step(AdamParams(learning_rate=1e-3))
    assert time.monotonic() - started < 30
    assert not fb.done()
    assert not op.done()
    with pytest.raises(TimeoutError):
        fb.result(timeout=0.0001)
    with pytest.raises(TimeoutError):
        op.result(timeout=0.0001)
    release.set()  # the call was only waited on, never abandoned: it still completes
    assert fb.result(timeout=60).num_tokens == sum(len(d) for d in DATA)
    assert op.result(timeout=60).step == 1


def test_loss_decreases_on_a_fixed_batch(tc: TrainingClient) -> None:
    losses: list[float] = []
    for _ in range(5):
        fb = tc.forward_backward_custom(DATA, weighted_nll)
        op = tc.optim_step(AdamParams(learning_rate=2e-2))
        losses.append(fb.result(timeout=60).loss)
        op.result(timeout=60)
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.9 * losses[0], losses


def test_get_tokenizer_round_trips_and_builds_datums(sync_service: ServiceClient, tc: TrainingClient) -> None:
    tokenizer = tc.get_tokenizer()
    assert isinstance(tokenizer, PreTrainedTokenizerFast)  # transformers is installed here
    text = "Question: what is 12 + 7? Answer: 19"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids
    assert tokenizer.decode(ids) == text
    assert sync_service.get_tokenizer(LLAMA) is tokenizer  # cached
    assert isinstance(sync_service.get_tokenizer(QWEN), PreTrainedTokenizerFast)
    files = sync_service.get_tokenizer_files(LLAMA)
    assert Tokenizer.from_str(files["tokenizer.json"].decode()).get_vocab() == tokenizer.get_vocab()
    assert set(files) == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    }

    # EOS is the model's own (tokenizer_config.json), not a guess from a list of strings.
    assert tokenizer.eos_token == EOS_TOKEN
    datum = Datum.from_text(tokenizer, "12 + 7 =", " 19")
    prompt = tokenizer.encode("12 + 7 =", add_special_tokens=False)
    response = tokenizer.encode(" 19", add_special_tokens=False)
    prompt_len = len(prompt)
    assert len(datum) == prompt_len + len(response)  # response + EOS, shifted by one
    assert datum.model_input.tolist() == prompt + response
    assert datum.target_tokens.tolist() == [*prompt[1:], *response, tokenizer.convert_tokens_to_ids(EOS_TOKEN)]
    assert datum.weights[: prompt_len - 1].sum() == 0
    assert bool((datum.weights[prompt_len - 1 :] == 1).all())
    out = tc.forward([datum]).result(timeout=60)
    assert out.num_tokens == len(datum)
    assert out.logprobs[0].shape == (len(datum),)
    assert bool((out.logprobs[0] <= 0).all())


def test_errors_are_typed(sync_service: ServiceClient, tc: TrainingClient) -> None:
    with pytest.raises(NotFoundError) as not_found:
        sync_service.create_training_client("no-such-model")
    assert "no-such-model" in str(not_found.value)

    out_of_vocab = Datum.from_tokens([3, 4], [1_000_000])
    bad = tc.forward_backward([*DATA, out_of_vocab])
    with pytest.raises(InvalidArgumentError) as invalid:
        bad.result(timeout=60)
    assert isinstance(invalid.value, APIStatusError)
    assert invalid.value.code.name == "INVALID_ARGUMENT"
    assert invalid.value.method == "ForwardBackward"
    assert "1000000" in str(invalid.value)
    assert "vocabulary" in str(invalid.value)

    def broken(data: Sequence[Datum], logprobs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        raise ValueError("boom")

    with pytest.raises(LossFunctionError, match="boom"):
        tc.forward_backward_custom(DATA, broken).result(timeout=60)

    # Both errors were retrieved and neither call applied anything, so the session carries on.
    assert tc.optim_step(AdamParams(learning_rate=1e-3)).result(timeout=60).grad_norm == 0.0


def test_sync_call_inside_a_running_event_loop_warns(sync_service: ServiceClient, tc: TrainingClient) -> None:
    async def misuse() -> APIFuture[OptimStepResult]:
        with pytest.warns(RuntimeWarning, match="running event loop"):
            info = sync_service.get_server_info()
        assert {m.name for m in info.models} == {LLAMA, QWEN}
        with pytest.warns(RuntimeWarning, match="AsyncTrainingClient"):
            return tc.optim_step(AdamParams(learning_rate=1e-3))

    fut = asyncio.run(misuse())
    assert fut.result(timeout=60).step == 1


def test_result_timeout_says_what_timed_out(tc: TrainingClient) -> None:
    fb = tc.forward_backward([Datum.from_tokens(list(range(1, 60)), [5])] * 8)
    with pytest.raises(TimeoutError, match=r"forward_backward #\d+ of session .* did not finish within 1e-06 s"):
        fb.result(timeout=1e-6)
    assert fb.result(timeout=120).num_tokens > 0  # it went on running; waiting again gets it


def test_sync_client_has_every_call_of_the_async_one() -> None:
    for sync_cls, async_cls in ((ServiceClient, AsyncServiceClient), (TrainingClient, AsyncTrainingClient)):
        public = {n for n in dir(async_cls) if not n.startswith("_")}
        missing = sorted(n for n in public if not hasattr(sync_cls, n))
        assert not missing, f"{sync_cls.__name__} lacks {missing}"
        for name in public:
            if callable(getattr(async_cls, name)):
                sync_params = list(inspect.signature(getattr(sync_cls, name)).parameters)
                assert sync_params == list(inspect.signature(getattr(async_cls, name)).parameters), name


def test_closed_sync_client_raises_the_projects_error(threaded_server: ThreadedServer) -> None:
    client = ServiceClient(threaded_server.address)
    tc = client.create_training_client(LLAMA, lora_rank=4)
    client.close()
    with pytest.raises(ClientClosedError, match=f"the client to {threaded_server.address} is closed"):
        client.list_checkpoints()
    with pytest.raises(ClientClosedError):
        tc.optim_step()
