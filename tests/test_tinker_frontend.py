"""The Tinker front end's transport, driven by the real ``tinker`` SDK over real HTTP.

The app runs on uvicorn (port 0, its own thread) over an in-process backend that only
records calls and computes simple deterministic numbers: these tests check routes,
encodings, ids, ordering, futures, auth and errors, not training. The same SDK loops
against the real server and real models are in tests/test_tinker_sdk.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
import zstandard

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

from trainer_server._auth import owner_id  # noqa: E402
from trainer_server.tinker import TinkerConfig, TinkerFrontEnd  # noqa: E402
from trainer_server.tinker import backend as be  # noqa: E402
from trainer_server.tinker.wire import tinker_wire_pb2 as wire  # noqa: E402

KEY_A = "tml-key-a"
KEY_B = "tml-key-b"
BASE = "fake-base"
VOCAB = 64


@dataclass
class _Model:
    owner: str
    info: be.ModelInfo
    w: float = 0.0
    grad: float = 0.0
    step: int = 0
    m: float = 0.0


@dataclass
class FakeBackend:
    """Deterministic stand-in for the core: logprob of token t at weight w is -(1 + (t % 5) / 10) - w."""

    models: dict[str, _Model] = field(default_factory=dict)
    checkpoints: dict[tuple[str, str], tuple[be.CheckpointInfo, _Model, Path | None]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    delay_s: float = 0.0
    tmp: Path | None = None

    def base_models(self) -> Sequence[be.BaseModelInfo]:
        return [be.BaseModelInfo(BASE, 128, VOCAB, "FakeForCausalLM", "fake/tokenizer")]

    def ready(self) -> bool:
        return True

    async def create_model(self, owner: str, spec: be.ModelSpec) -> be.ModelHandle:
        if spec.base_model != BASE:
            raise be.NotFound(f"unknown base model {spec.base_model!r}")
        key = f"m{len(self.models)}"
        self.models[key] = _Model(owner, be.ModelInfo(spec.base_model, spec.lora))
        return be.ModelHandle(key)

    async def load_model(self, owner: str, checkpoint: str, *, with_optimizer: bool) -> be.ModelHandle:
        info, saved, _ = self._ckpt(owner, checkpoint)
        key = f"m{len(self.models)}"
        self.models[key] = _Model(owner, saved.info, saved.w, 0.0, saved.step if with_optimizer else 0,
                                  saved.m if with_optimizer else 0.0)
        return be.ModelHandle(key)

    def model_info(self, model: be.ModelHandle) -> be.ModelInfo:
        return self.models[model.key].info

    def _lp(self, m: _Model, targets: np.ndarray) -> np.ndarray:
        return (-(1 + (targets % 5) / 10) - m.w).astype(np.float32)

    async def forward_backward(
        self, model: be.ModelHandle, data: Sequence[be.TrainDatum], loss: be.LossSpec, *, backward: bool
    ) -> be.ForwardBackwardResult:
        self.calls.append((model.key, "fwdbwd" if backward else "fwd"))
        await asyncio.sleep(self.delay_s)
        m = self.models[model.key]
        outputs = []
        total = 0.0
        for d in data:
            if int(d.inputs["target_tokens"].max()) >= VOCAB:
                raise be.InvalidInput(f"target token id {int(d.inputs['target_tokens'].max())} >= vocab {VOCAB}")
            lp = self._lp(m, d.inputs["target_tokens"])
            w = np.asarray(d.inputs.get("weights", np.ones_like(lp)), dtype=np.float32)
            elementwise = -w * lp
            total += float(elementwise.sum())
            if backward:
                m.grad += float(w.sum())
            outputs.append({"logprobs": lp, "elementwise_loss": elementwise.astype(np.float32)})
        return be.ForwardBackwardResult(outputs, {"loss:sum": total, "tokens": float(sum(len(d.tokens) for d in data))})

    async def optim_step(self, model: be.ModelHandle, adam: be.AdamSettings) -> be.OptimResult:
        self.calls.append((model.key, "optim"))
        m = self.models[model.key]
        m.m = adam.beta1 * m.m + m.grad
        m.w += adam.learning_rate * m.m
        m.grad = 0.0
        m.step += 1
        return be.OptimResult(m.step, {"step:max": float(m.step)})

    async def save_state(self, model: be.ModelHandle, name: str) -> be.CheckpointInfo:
        return self._save(model, name, "state")

    def _save(self, model: be.ModelHandle, name: str, kind: str) -> be.CheckpointInfo:
        self.calls.append((model.key, f"save {kind}"))
        m = self.models[model.key]
        if (m.owner, name) in self.checkpoints:
            raise be.Conflict(f"checkpoint {name!r} exists")
        info = be.CheckpointInfo(name, kind, time.time(), 10, m.info.base_model, m.info.lora)  # type: ignore[arg-type]
        path = None
        if kind == "external" and self.tmp is not None:
            path = self.tmp / name
            path.mkdir()
            (path / "config.json").write_text(json.dumps({"w": m.w}))
        self.checkpoints[(m.owner, name)] = (info, _Model(m.owner, m.info, m.w, 0.0, m.step, m.m), path)
        return info

    async def save_sampler_weights(self, model: be.ModelHandle, name: str | None) -> str:
        if name is None:
            name = f"ephemeral-{model.key}-{self.models[model.key].step}"
        self._save(model, name, "sampler")
        return name

    async def load_state(self, model: be.ModelHandle, checkpoint: str, *, with_optimizer: bool) -> None:
        m = self.models[model.key]
        _, saved, _ = self._ckpt(m.owner, checkpoint)
        m.w = saved.w
        if with_optimizer:
            m.step, m.m = saved.step, saved.m

    async def save_external(self, model: be.ModelHandle, name: str) -> be.CheckpointInfo:
        return self._save(model, name, "external")

    async def close_model(self, model: be.ModelHandle) -> None:
        self.models.pop(model.key, None)

    def keep_alive(self, model: be.ModelHandle) -> None:
        pass

    async def sample(
        self, owner: str, source: str, prompt: np.ndarray, num_samples: int, spec: be.SampleSpec, *,
        prompt_logprobs: bool, topk_prompt_logprobs: int,
    ) -> be.SampleResult:
        if source == BASE:
            m = _Model(owner, be.ModelInfo(BASE, None))
        else:
            m = self._ckpt(owner, source)[1]
        rng = np.random.default_rng(spec.seed)
        seqs = []
        for _ in range(num_samples):
            toks = rng.integers(0, VOCAB, size=spec.max_tokens)
            seqs.append(be.SampledSequence(toks, self._lp(m, toks), "length"))
        plp = None
        if prompt_logprobs:
            plp = self._lp(m, prompt)
            plp[0] = np.nan
        ids = lps = None
        if topk_prompt_logprobs:
            ids = np.tile(np.arange(topk_prompt_logprobs), (prompt.size, 1))
            lps = np.tile(self._lp(m, np.arange(topk_prompt_logprobs)), (prompt.size, 1))
        return be.SampleResult(seqs, plp, ids, lps)

    def _ckpt(self, owner: str, name: str) -> tuple[be.CheckpointInfo, _Model, Path | None]:
        found = self.checkpoints.get((owner, name))
        if found is None:
            raise be.NotFound(f"no checkpoint {name!r}")
        return found

    def list_checkpoints(self, owner: str) -> Sequence[be.CheckpointInfo]:
        return [c[0] for (o, _), c in self.checkpoints.items() if o == owner]

    def checkpoint(self, owner: str, name: str) -> be.CheckpointInfo:
        return self._ckpt(owner, name)[0]

    async def delete_checkpoint(self, owner: str, name: str) -> None:
        self._ckpt(owner, name)
        del self.checkpoints[(owner, name)]

    def checkpoint_files(self, owner: str, name: str) -> Sequence[be.CheckpointFile]:
        _, _, path = self._ckpt(owner, name)
        if path is None:
            return []
        return [be.CheckpointFile(p.name, p.stat().st_size, p) for p in sorted(path.iterdir())]


@dataclass
class Served:
    url: str
    backend: FakeBackend
    front: TinkerFrontEnd


def serve(app_front: TinkerFrontEnd) -> Iterator[str]:
    """Run the app on uvicorn, port 0, in a thread; yield its base URL."""
    server = uvicorn.Server(uvicorn.Config(app_front.app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def served(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Served]:
    fake = FakeBackend(tmp=tmp_path)
    compress = getattr(request, "param", False)
    front = TinkerFrontEnd(
        fake,
        TinkerConfig(api_keys=frozenset({KEY_A, KEY_B}), poll_wait_s=0.5, gap_timeout_s=2.0,
                     compress_forward_backward=compress, max_body_bytes=1 << 20),
    )
    for url in serve(front):
        yield Served(url, fake, front)


def client(url: str, key: str = KEY_A) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=url, api_key=key)


def datum(tokens: list[int], weights: list[float] | None = None) -> types.Datum:
    inp, tgt = tokens[:-1], tokens[1:]
    return types.Datum(
        model_input=types.ModelInput.from_ints(inp),
        loss_fn_inputs={"target_tokens": tgt, "weights": weights if weights is not None else [1.0] * len(tgt)},
    )


@pytest.mark.parametrize("served", [False, True], ids=["plain", "zstd"], indirect=True)
def test_sft_step_through_sdk(served: Served) -> None:
    sc = client(served.url)
    tc = sc.create_lora_training_client(base_model=BASE, rank=4).result()
    assert tc.model_id.endswith(":train:0")
    info = tc.get_info()
    assert info.model_data.model_name == BASE and info.lora_rank == 4
    data = [datum([1, 2, 3, 4]), datum([5, 6, 7], [0.0, 1.0])]
    fb = tc.forward_backward(data, "cross_entropy")
    op = tc.optim_step(types.AdamParams(learning_rate=0.01))
    out = fb.result()
    step = op.result()
    expected = [-(1 + (np.array([2, 3, 4]) % 5) / 10), -(1 + (np.array([6, 7]) % 5) / 10)]
    for got, want in zip(out.loss_fn_outputs, expected, strict=True):
        np.testing.assert_allclose(got["logprobs"].to_numpy(), want, rtol=1e-6)
    assert out.metrics["loss:sum"] == pytest.approx(float(-(expected[0].sum() + expected[1][1])), rel=1e-6)
    assert out.metrics["tokens:mean"] == 5.0
    assert step.metrics == {"step:max": 1.0}
    assert served.backend.calls == [("m0", "fwdbwd"), ("m0", "optim")]
    sc.close("success").result()
