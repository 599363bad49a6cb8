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
import zstandard

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

from trainer_server.frontends.grpc_auth import owner_id  # noqa: E402
from trainer_server.frontends.tinker import TinkerConfig, TinkerFrontEnd  # noqa: E402
from trainer_server.frontends.tinker import backend as be  # noqa: E402
from trainer_server.frontends.tinker.serving import TinkerHTTPServer  # noqa: E402
from trainer_server.frontends.tinker.wire import tinker_wire_pb2 as wire  # noqa: E402

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
        _info, saved, _ = self._ckpt(owner, checkpoint)
        key = f"m{len(self.models)}"
        self.models[key] = _Model(
            owner, saved.info, saved.w, 0.0, saved.step if with_optimizer else 0, saved.m if with_optimizer else 0.0
        )
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
        self._save(model, name, "state")
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
        self,
        owner: str,
        source: str,
        prompt: np.ndarray,
        num_samples: int,
        spec: be.SampleSpec,
        *,
        prompt_logprobs: bool,
        topk_prompt_logprobs: int,
    ) -> be.SampleResult:
        m = _Model(owner, be.ModelInfo(BASE, None)) if source == BASE else self._ckpt(owner, source)[1]
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


def serve(front: TinkerFrontEnd) -> Iterator[str]:
    """Run the app with TinkerHTTPServer (uvicorn, port 0) on an event loop in a thread; yield its URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    http = TinkerHTTPServer(front, "127.0.0.1", 0)
    asyncio.run_coroutine_threadsafe(http.start(), loop).result(30)
    try:
        yield f"http://127.0.0.1:{http.port}"
    finally:
        asyncio.run_coroutine_threadsafe(http.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture
def served(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Served]:
    fake = FakeBackend(tmp=tmp_path)
    compress = getattr(request, "param", False)
    front = TinkerFrontEnd(
        fake,
        TinkerConfig(
            api_keys=frozenset({KEY_A, KEY_B}),
            poll_wait_s=0.5,
            gap_timeout_s=2.0,
            compress_forward_backward=compress,
            max_body_bytes=1 << 20,
        ),
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


# ----------------------------------------------------------------------------- raw HTTP


def post(url: str, path: str, body: object, key: str | None = KEY_A, **headers: str) -> httpx.Response:
    hdrs = {"X-API-Key": key} if key is not None else {}
    hdrs.update(headers)
    if isinstance(body, bytes):
        return httpx.post(f"{url}/api/v1/{path}", content=body, headers=hdrs, timeout=30)
    return httpx.post(f"{url}/api/v1/{path}", json=body, headers=hdrs, timeout=30)


def result(url: str, request_id: str, key: str = KEY_A, proto: bool = False) -> httpx.Response:
    deadline = time.monotonic() + 30
    while True:
        headers = {"Accept": "application/x-protobuf"} if proto else {}
        r = post(url, "retrieve_future", {"request_id": request_id}, key, **headers)
        if r.headers["content-type"].startswith("application/json") and r.json().get("type") == "try_again":
            assert time.monotonic() < deadline
            continue
        return r


def new_model(url: str, key: str = KEY_A) -> str:
    session = post(url, "create_session", {"tags": [], "sdk_version": "raw"}, key).json()["session_id"]
    body = {"session_id": session, "model_seq_id": 0, "base_model": BASE, "lora_config": {"rank": 2}}
    sub = post(url, "create_model", body, key).json()
    assert result(url, sub["request_id"], key).json()["model_id"] == sub["model_id"]
    return str(sub["model_id"])


def fwdbwd_body(model_id: str, seq_id: int, targets: list[int], weights: list[float] | None = None) -> bytes:
    msg = wire.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy")
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = np.arange(len(targets), dtype="<i4").tobytes()
    d.loss_fn_inputs["target_tokens"].CopyFrom(
        wire.Tensor(dense=np.asarray(targets, "<i8").tobytes(), dtype=wire.DTYPE_INT64, shape=[len(targets)])
    )
    w = weights if weights is not None else [1.0] * len(targets)
    d.loss_fn_inputs["weights"].CopyFrom(
        wire.Tensor(dense=np.asarray(w, "<f4").tobytes(), dtype=wire.DTYPE_FLOAT32, shape=[len(w)])
    )
    return msg.SerializeToString()


PB = {"Content-Type": "application/x-protobuf"}


def optim(url: str, model_id: str, seq_id: int, key: str = KEY_A) -> httpx.Response:
    body = {"model_id": model_id, "seq_id": seq_id, "adam_params": {"learning_rate": 0.01}}
    return post(url, "optim_step", body, key)


def test_calls_run_in_seq_order_and_retries_apply_once(served: Served) -> None:
    mid = new_model(served.url)
    late = optim(served.url, mid, 2).json()["request_id"]  # arrives first, runs second
    fb_body = fwdbwd_body(mid, 1, [1, 2, 3])
    first = post(served.url, "forward_backward", fb_body, **PB).json()["request_id"]
    again = post(served.url, "forward_backward", fb_body, **PB).json()["request_id"]
    assert again == first
    assert result(served.url, late).json() == {"metrics": {"step:max": 1.0}}
    out = result(served.url, first, proto=True)
    assert out.headers["content-type"] == "application/x-protobuf"
    assert served.backend.calls == [("m0", "fwdbwd"), ("m0", "optim")]
    # Same seq_id, other content: a conflict, refused without retry; nothing applied.
    clash = post(served.url, "forward_backward", fwdbwd_body(mid, 1, [4, 5]), **PB)
    assert clash.status_code == 409 and "seq_id 1 was already used" in clash.json()["detail"]
    assert clash.headers["x-should-retry"] == "false"
    assert len(served.backend.calls) == 2


def test_refused_call_does_not_block_later_ones(served: Served) -> None:
    mid = new_model(served.url)
    bad = post(served.url, "forward_backward", fwdbwd_body(mid, 1, [1, 2, 3], [1.0]), **PB)
    assert bad.status_code == 400
    assert bad.json()["detail"] == "forward_backward: data[0].loss_fn_inputs['weights']: 1 entries for 3 input tokens"
    assert result(served.url, optim(served.url, mid, 2).json()["request_id"]).json()["metrics"] == {"step:max": 1.0}
    bad_json = post(served.url, "optim_step", {"model_id": mid, "seq_id": 3, "adam_params": {"learning_rate": "x"}})
    assert bad_json.status_code == 400 and "adam_params.learning_rate" in bad_json.json()["detail"]
    assert result(served.url, optim(served.url, mid, 4).json()["request_id"]).json()["metrics"] == {"step:max": 2.0}
    assert served.backend.calls == [("m0", "optim"), ("m0", "optim")]


def test_missing_predecessor_fails_the_call_unapplied(served: Served) -> None:
    mid = new_model(served.url)
    rid = optim(served.url, mid, 3).json()["request_id"]
    failure = result(served.url, rid).json()
    assert failure == {
        "error": "seq_id 3 waited 2 s for seq_id 1, which never arrived; it was not applied",
        "category": "user",
    }
    assert served.backend.calls == []
    assert optim(served.url, mid, 2).status_code == 409  # given up: behind the next seq_id
    assert result(served.url, optim(served.url, mid, 4).json()["request_id"]).json()["metrics"] == {"step:max": 1.0}


def test_bad_bodies_are_refused_precisely_and_change_nothing(served: Served) -> None:
    url = served.url
    mid = new_model(url)
    cases: list[tuple[httpx.Response, int, str]] = [
        (post(url, "create_session", b"{not json", **{"Content-Type": "application/json"}), 400, "not valid JSON"),
        (post(url, "create_session", [1, 2]), 400, "must be a JSON object, got list"),
        (post(url, "forward_backward", b"\xff\xff\xff", **PB), 400, "not a valid ForwardBackwardRequest protobuf"),
        (
            post(url, "forward_backward", fwdbwd_body(mid, 1, [1]), **{"Content-Type": "application/json"}),
            400,
            "Content-Type must be application/x-protobuf",
        ),
        (
            post(url, "forward_backward", b"\x28\xb5\x2f\xfd garbage", **PB, **{"Content-Encoding": "zstd"}),
            400,
            "not valid zstd data",
        ),
        (post(url, "forward_backward", b"x" * (2 << 20), **PB), 413, "exceeds the server's limit of 1048576 bytes"),
        (
            post(
                url,
                "forward_backward",
                zstandard.ZstdCompressor().compress(b"\0" * (2 << 20)),
                **PB,
                **{"Content-Encoding": "zstd"},
            ),
            413,
            "decompressed body exceeds",
        ),
        (
            post(url, "optim_step", {"model_id": "sess-000000000000:train:9", "seq_id": 1, "adam_params": {}}),
            404,
            "unknown model_id",
        ),
        (post(url, "optim_step", {"model_id": mid, "seq_id": 0, "adam_params": {}}), 400, "seq_id must be >= 1"),
        (post(url, "optim_step", {"model_id": mid, "seq_id": 1}), 400, "exactly one of adam_params and optim_params"),
        (post(url, "create_session", {}, key=None), 401, "missing or invalid API key"),
        (post(url, "create_session", {}, key="tml-wrong"), 401, "missing or invalid API key"),
        (post(url, "retrieve_future", {"request_id": "req-nope"}), 404, "unknown or expired request_id"),
        (post(url, "no_such_route", {}), 404, "unknown route POST /api/v1/no_such_route"),
        (post(url, "copy_weights", {}), 400, "not supported by this server"),
        (post(url, "sessions/search", {}), 400, "not supported by this server"),
    ]
    for response, status, text in cases:
        assert response.status_code == status, (response.status_code, response.text)
        assert text in response.json()["detail"], response.json()
    assert served.backend.calls == []
    # The refused optim_step with seq_id 1 consumed its number; seq_id 2 runs at once.
    rid = post(url, "forward_backward", fwdbwd_body(mid, 2, [1]), **PB).json()["request_id"]
    assert result(url, rid, proto=True).status_code == 200
    assert served.backend.calls == [("m0", "fwdbwd")]


def test_zstd_bodies_are_decoded(served: Served) -> None:
    mid = new_model(served.url)
    body = zstandard.ZstdCompressor().compress(fwdbwd_body(mid, 1, [1, 2]))
    rid = post(served.url, "forward_backward", body, **PB, **{"Content-Encoding": "zstd"}).json()["request_id"]
    out = wire.ForwardBackwardOutput()
    out.ParseFromString(result(served.url, rid, proto=True).content)
    assert out.metrics["loss:sum"] == pytest.approx(1.1 + 1.2, rel=1e-6)
    lp = np.frombuffer(out.loss_fn_outputs[0].fields["logprobs"].data, dtype="<f4")
    np.testing.assert_allclose(lp, [-1.1, -1.2], rtol=1e-6)


def test_two_keys_are_isolated(served: Served) -> None:
    mid = new_model(served.url, KEY_A)
    rid = optim(served.url, mid, 1).json()["request_id"]
    assert post(served.url, "get_info", {"model_id": mid}, KEY_B).status_code == 404
    assert optim(served.url, mid, 2, KEY_B).status_code == 404
    assert post(served.url, "retrieve_future", {"request_id": rid}, KEY_B).status_code == 404
    assert result(served.url, rid, KEY_A).status_code == 200
    sc_a, sc_b = client(served.url, KEY_A), client(served.url, KEY_B)
    tc = sc_a.create_lora_training_client(base_model=BASE, rank=2).result()
    path = tc.save_state("shared-name").result().path
    assert [c.tinker_path for c in sc_a.create_rest_client().list_user_checkpoints().result().checkpoints] == [path]
    assert sc_b.create_rest_client().list_user_checkpoints().result().checkpoints == []
    with pytest.raises(tinker.NotFoundError):
        sc_b.create_rest_client().get_weights_info_by_tinker_path(path).result()
    with pytest.raises(tinker.NotFoundError, match=f"no checkpoint {path}"):
        sc_b.create_training_client_from_state(path).result()
    assert owner_id(KEY_A) != owner_id(KEY_B)


def test_checkpoints_sampling_and_custom_loss_through_sdk(served: Served) -> None:
    torch = pytest.importorskip("torch")
    sc = client(served.url)
    tc = sc.create_lora_training_client(base_model=BASE, rank=2).result()
    data = [datum([1, 2, 3])]
    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=0.5)).result()
    state = tc.save_state("step1").result().path
    assert state == f"tinker://{tc.model_id}/weights/step1"
    sampler_path = tc.save_weights_for_sampler("s1").result().path
    rest = sc.create_rest_client()
    listed = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert [(c.checkpoint_type, c.tinker_path) for c in listed] == [("training", state), ("sampler", sampler_path)]
    info = rest.get_weights_info_by_tinker_path(state).result()
    assert (info.base_model, info.is_lora, info.lora_rank) == (BASE, True, 2)

    # Resume with the optimizer: the next step equals the uninterrupted model's next step.
    resumed = sc.create_training_client_from_state_with_optimizer(state).result()
    for c in (tc, resumed):
        c.forward_backward(data, "cross_entropy").result()
        c.optim_step(types.AdamParams(learning_rate=0.5)).result()
    a, b = served.backend.models["m0"], served.backend.models["m1"]
    assert (a.w, a.step, a.m) == (b.w, b.step, b.m)

    # Sampling from ephemeral and named weights; prompt logprobs equal compute_logprobs.
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints([3, 4, 5, 6])
    out = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=3, seed=7), include_prompt_logprobs=True).result()
    assert [len(s.tokens) for s in out.sequences] == [3, 3]
    assert all(s.stop_reason == "length" for s in out.sequences)
    logprobs = sampler.compute_logprobs(prompt).result()
    assert logprobs[0] is None and out.prompt_logprobs is not None
    np.testing.assert_allclose(logprobs[1:], out.prompt_logprobs[1:], rtol=1e-6)
    named = sc.create_sampling_client(model_path=sampler_path).result()
    again = named.sample(prompt, 2, types.SamplingParams(max_tokens=3, seed=7)).result()
    assert again.sequences[0].tokens == out.sequences[0].tokens  # same seed: same draws (fake draws ignore weights)
    base = sc.create_sampling_client(base_model=BASE).result()
    topk = base.sample(
        prompt, 1, types.SamplingParams(max_tokens=1), include_prompt_logprobs=True, topk_prompt_logprobs=2
    ).result()
    assert topk.topk_prompt_logprobs is not None and topk.topk_prompt_logprobs[1] == [
        (0, -1.0),
        (1, pytest.approx(-1.1)),
    ]

    # The SDK's own forward_backward_custom: forward, local loss, linear surrogate backward.
    def loss_fn(batch: list[types.Datum], lps: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss = sum((lp**2).sum() for lp in lps)
        return loss, {"sq:sum": float(loss)}

    custom = tc.forward_backward_custom(data, loss_fn).result()
    lp = -(1 + (np.array([2, 3]) % 5) / 10) - a.w
    assert custom.metrics["loss:sum"] == pytest.approx(float((lp**2).sum()), rel=1e-5)
    assert served.backend.calls[-2:] == [("m0", "fwd"), ("m0", "fwdbwd")]

    # External weights: URLs served by this server, for the owner only.
    ext = tc.save_weights_external("hf").result().path
    urls = rest.get_external_weights_urls(ext).result().urls
    assert list(urls) == ["config.json"]
    assert json.loads(httpx.get(urls["config.json"]).content) == {"w": a.w}
    assert httpx.get(urls["config.json"].replace("sig=", "sig=0")).status_code == 404

    rest.delete_checkpoint_from_tinker_path(state).result()
    assert state not in [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints]
    with pytest.raises(tinker.BadRequestError, match="not supported by this server"):
        rest.publish_checkpoint_from_tinker_path(sampler_path).result()
    sc.close("success").result()


def test_failures_surface_as_sdk_exceptions(served: Served) -> None:
    with pytest.raises(tinker.AuthenticationError, match="missing or invalid API key"):
        client(served.url, "tml-not-a-key").create_lora_training_client(base_model=BASE, rank=2).result()
    sc = client(served.url)
    with pytest.raises(tinker.RequestFailedError, match="unknown base model 'nope'"):
        sc.create_lora_training_client(base_model="nope", rank=2).result()
    tc = sc.create_lora_training_client(base_model=BASE, rank=2).result()
    with pytest.raises(tinker.BadRequestError, match="loss_fn 'gspo' is not supported"):
        tc.forward_backward([datum([1, 2])], "gspo").result()
    with pytest.raises(tinker.RequestFailedError, match=f"target token id 99 >= vocab {VOCAB}") as err:
        tc.forward_backward([datum([1, 99])], "cross_entropy").result()
    assert err.value.category == types.RequestErrorCategory.User
    with pytest.raises(tinker.RequestFailedError, match=f"checkpoint tinker://{tc.model_id}/weights/dup exists"):
        tc.save_state("dup").result()
        tc.save_state("dup").result()
    with pytest.raises(tinker.BadRequestError, match="checkpoint name 'a/b' must start"):
        tc.save_state("a/b").result()
