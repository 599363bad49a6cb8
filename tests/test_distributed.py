"""One process vs two: the same training through a server launched by ``accelerate launch``.

The two-process server is a real ``accelerate launch --multi_gpu --num_processes 2``
(``ACCELERATE_USE_CPU=true``: two gloo ranks on this CPU) running ``python -m
trainer_server`` with the models replicated on both ranks, and again with ``--use_fsdp
--fsdp_version 2`` (every session model sharded over the two ranks by FSDP2); the
one-process reference is an in-process :class:`TrainerServer` on the same model files.
All are driven by the same client code. Compared after each run: losses and metrics,
gradient norms, gradients (the first AdamW moment of a STATE checkpoint after step 1 is
``(1 - beta1) * grad``), weights after 3 steps (fp32 BASE checkpoints), logprobs and
seeded samples; for built-in and custom losses, LoRA and full sessions, a batch that does
not split evenly over the ranks and a batch smaller than the world size; BASE, DELTA and
ADAPTER exports. STATE checkpoints cross-load between the layouts; killing rank 1 mid-call
ends in a client error within the deadline and a launcher that exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from conftest import process_tree, stop_processes
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file

from trainer_client import (
    AdamParams,
    APIStatusError,
    AsyncServiceClient,
    AsyncTrainingClient,
    ClientConfig,
    Datum,
    LossFunctionError,
    SamplingParams,
)
from trainer_server import Limits, ServerConfig, TrainerServer, init_cluster
from trainer_server._batch import shard_bounds

MODEL = "tiny-llama"
TIED = "tied-llama"
"""The same shape with tied input/output embeddings (as Llama-3.2-1B and Qwen2.5 have)."""
ADAM = AdamParams(learning_rate=1e-3, beta1=0.9, weight_decay=0.01, grad_clip_norm=1.0)
STARTUP_S = 180.0
RTOL, ATOL = 1e-4, 1e-5


def close(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    """Equal within fp32 tolerance (the ranks sum partial gradients in another order)."""
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=(lambda m: f"{what}: {m}") if what else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Launched:
    """An ``accelerate launch`` process group serving on ``address``."""

    proc: subprocess.Popen[str]
    address: str
    checkpoint_dir: Path
    fsdp: bool = False
    lines: list[str] = field(default_factory=list)
    tree: list[Any] = field(default_factory=list)
    """The launcher and its ranks (``psutil.Process``), recorded once serving: stopped whatever happens."""

    def rank_pid(self, rank: int) -> int:
        """The pid of rank ``rank``, from rank 0's log line listing every rank."""
        for line in self.lines:
            m = re.search(r"\d+ ranks \(\S+\): (.*)$", line)
            if m:
                return int(m.group(1).split(", ")[rank].rsplit(" pid ", 1)[1])
        raise AssertionError("rank 0 never listed the ranks:\n" + "".join(self.lines[-30:]))

    def stop(self) -> int | None:
        """Stop rank 0 with SIGTERM (a graceful stop that takes the workers with it), then anything left."""
        try:
            if self.proc.poll() is None:
                os.kill(self.rank_pid(0), signal.SIGTERM)
                self.proc.wait(60)
        except (AssertionError, ProcessLookupError, subprocess.TimeoutExpired):
            pass  # rank 0 never listed, already gone, or the graceful stop hung: killed below
        finally:
            self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """Stop the launcher and every rank still running (no rank outlives a test)."""
        stop_processes([*self.tree, *process_tree(self.proc.pid)], grace_s=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


FSDP_ARGS = (
    "--use_fsdp",
    "--fsdp_version",
    "2",
    "--fsdp_auto_wrap_policy",
    "TRANSFORMER_BASED_WRAP",
    "--fsdp_reshard_after_forward",
    "true",
)
"""What a user passes to ``accelerate launch`` (or puts in its config) for FSDP2."""


def launch(model_dir: Path, checkpoint_dir: Path, home: Path, *extra: str, fsdp: bool = False) -> Launched:
    """Start a two-process server under ``accelerate launch`` (replicated, or FSDP) and wait until it serves."""
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "TRAINER_HOME": str(home),
        "PYTHONUNBUFFERED": "1",
    }
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(accelerate),
        "launch",
        *(FSDP_ARGS if fsdp else ("--multi_gpu",)),
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "trainer_server",
        "--model",
        f"{MODEL}={model_dir}",
        "--port",
        "0",
        "--torch-threads",
        "1",
        "--checkpoint-dir",
        str(checkpoint_dir),
        *extra,
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    launched = Launched(proc, "", checkpoint_dir, fsdp)
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            launched.lines.append(line)
            m = re.match(r"trainer-server ready on (\S+)", line)
            if m:
                launched.address = m.group(1)
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    ready.wait(STARTUP_S)
    launched.tree = process_tree(proc.pid)
    if not launched.address:
        launched.stop()
        raise AssertionError("the two-process server did not start:\n" + "".join(launched.lines[-40:]))
    return launched


@pytest.fixture(scope="module")
def model_dir(llama_dir: Path) -> Path:
    return llama_dir


@pytest.fixture(scope="module")
def tied_dir(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with ``tie_word_embeddings``: one tensor is both embedding and output layer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tied") / TIED
    config = AutoConfig.from_pretrained(llama_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for f in llama_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module", params=["replicated", "fsdp"])
def two(
    model_dir: Path, tied_dir: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Launched]:
    """A two-process server for the module: models replicated on both ranks, or FSDP-sharded."""
    root = tmp_path_factory.mktemp(request.param)
    tied = ("--model", f"{TIED}={tied_dir}")
    launched = launch(model_dir, root / "checkpoints", root / "home", *tied, fsdp=request.param == "fsdp")
    yield launched
    code = launched.stop()
    log = "".join(launched.lines)
    assert code == 0, log[-3000:]  # rank 0 stopped gracefully and took the other rank with it
    assert "rank 1: shutdown from rank 0" in log


@pytest.fixture
async def one(model_dir: Path, tied_dir: Path, tmp_path: Path) -> Any:
    """A one-process server on the same model files."""
    config = ServerConfig(
        models={MODEL: model_dir, TIED: tied_dir},
        port=0,
        device="cpu",
        checkpoint_dir=tmp_path / "one-checkpoints",
        limits=Limits(max_tokens_per_call=4096),
    )
    async with TrainerServer(config) as server:
        yield server


def uneven_batch() -> list[Datum]:
    """Three datums of 4, 9 and 15 targets: no token-balanced split is even."""
    g = torch.Generator().manual_seed(7)
    out = []
    for prompt_len, response_len in ((2, 3), (4, 6), (5, 11)):
        tokens = torch.randint(3, 500, (prompt_len + response_len,), generator=g).tolist()
        out.append(Datum.from_tokens(tokens[:prompt_len], tokens[prompt_len:]))
    return out


def tiny_batch() -> list[Datum]:
    """One datum: fewer datums than ranks (rank 1 has nothing to do)."""
    return [Datum.from_tokens([5, 6, 7], [8, 9, 10, 11])]


def squared_loss(data: Sequence[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """A loss no built-in computes: sum of weights * logprob^2."""
    loss = sum(((lp**2) * d.weights).sum() for d, lp in zip(data, logprobs, strict=True))
    assert isinstance(loss, torch.Tensor)
    return loss, {"sq": float(loss.detach())}


@dataclass
class Run:
    """What one server computed for one training recipe."""

    losses: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    logprobs: list[torch.Tensor] = field(default_factory=list)
    state_step1: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: list[list[int]] = field(default_factory=list)


def read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: safetensors files, and the optimizer's moments."""
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    opt = directory / "optimizer.pt"
    if opt.is_file():
        state = torch.load(opt, weights_only=True)["optimizer"]["state"]
        for index, moments in state.items():
            for name in ("exp_avg", "exp_avg_sq"):
                tensors[f"opt:{index}:{name}"] = moments[name]
    assert tensors, f"no tensors in {directory}"
    return tensors


async def train(
    address: str,
    checkpoint_dir: Path,
    *,
    lora: bool,
    custom: bool,
    batch: list[Datum],
    tag: str,
    model: str = MODEL,
    export_dtype: str = "float32",
) -> Run:
    """Three steps of one recipe; checkpoints land in ``checkpoint_dir``."""
    run = Run()
    async with AsyncServiceClient(address) as service:
        tc = await service.create_training_client(model, lora_rank=4 if lora else None, seed=11)
        for step in range(3):
            if custom:
                out = await tc.forward_backward_custom(batch, squared_loss)
            else:
                out = await tc.forward_backward(batch, "cross_entropy", return_logprobs=True)
            run.losses.append(out.loss)
            run.logprobs.append(torch.cat(out.logprobs))
            result = await tc.optim_step(ADAM)
            assert result.step == step + 1
            run.norms.append(result.grad_norm)
            if step == 0:
                info = await tc.save_checkpoint(f"{tag}-step1", "state")
                run.state_step1 = read_checkpoint(checkpoint_dir / info.name)
        run.logprobs.append(torch.cat((await tc.forward(batch)).logprobs))
        sampled = await tc.sample([5, 6, 7], 2, SamplingParams(max_tokens=6, temperature=1.0, seed=3))
        run.samples = [s.tokens for s in sampled.sequences]
        info = await tc.save_checkpoint(f"{tag}-final", "base", dtype=export_dtype)
        run.weights = read_checkpoint(checkpoint_dir / info.name)
        await tc.close()
    return run


def assert_same(a: Run, b: Run) -> None:
    close(torch.tensor(a.losses), torch.tensor(b.losses))
    close(torch.tensor(a.norms), torch.tensor(b.norms))
    assert a.samples == b.samples and a.samples  # sampling runs on rank 0's replica, seeded alike
    for x, y in zip(a.logprobs, b.logprobs, strict=True):
        close(x, y)
    for what, x_all, y_all in (
        ("gradients (step-1 state)", a.state_step1, b.state_step1),
        ("weights", a.weights, b.weights),
    ):
        assert x_all.keys() == y_all.keys(), what
        for name in x_all:
            close(x_all[name], y_all[name], f"{what} {name}")


@pytest.mark.parametrize(
    ("lora", "custom", "batch_name"),
    [
        (True, False, "uneven"),
        (True, True, "uneven"),
        (False, False, "uneven"),
        (False, True, "tiny"),
    ],
    ids=["lora-builtin-uneven", "lora-custom-uneven", "full-builtin-uneven", "full-custom-smaller-than-world"],
)
async def test_two_processes_train_like_one(
    two: Launched, one: TrainerServer, lora: bool, custom: bool, batch_name: str
) -> None:
    batch = uneven_batch() if batch_name == "uneven" else tiny_batch()
    assert one.config.checkpoint_dir is not None
    tag = f"{'lora' if lora else 'full'}-{'custom' if custom else 'builtin'}-{batch_name}"
    single = await train(one.address, one.config.checkpoint_dir, lora=lora, custom=custom, batch=batch, tag=tag)
    double = await train(two.address, two.checkpoint_dir, lora=lora, custom=custom, batch=batch, tag=tag)
    assert_same(single, double)
    assert single.losses[-1] != single.losses[0]  # it trained
    print(f"\n{tag}: losses 1p {single.losses} 2p {double.losses}; grad norms 1p {single.norms} 2p {double.norms}")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
async def test_tied_embeddings_train_like_one_process(two: Launched, one: TrainerServer, lora: bool) -> None:
    """One tensor serves as embedding and output layer; a bf16 BASE stores it once, as 1 process does."""
    assert one.config.checkpoint_dir is not None
    tag = f"tied-{'lora' if lora else 'full'}"
    kw: dict[str, Any] = {"lora": lora, "custom": False, "batch": uneven_batch(), "tag": tag, "model": TIED}
    single = await train(one.address, one.config.checkpoint_dir, export_dtype="bfloat16", **kw)
    double = await train(two.address, two.checkpoint_dir, export_dtype="bfloat16", **kw)
    weights = (single.weights, double.weights)
    single.weights = double.weights = {}
    assert_same(single, double)
    assert weights[0].keys() == weights[1].keys()
    for name, x in weights[0].items():  # bf16: fp32 values a rounding apart may land one bf16 step apart
        torch.testing.assert_close(x.float(), weights[1][name].float(), rtol=1e-2, atol=1e-5, msg=name)
    assert single.losses[-1] != single.losses[0]
    # Full: still one tensor, saved once. LoRA (on lm_head too): the merged output layer differs
    # from the embedding, is saved apart, and the config says untied (servers such as vLLM skip
    # lm_head.weight of a tied model), so the BASE loads as trained.
    assert ("model.safetensors:lm_head.weight" in weights[1]) == lora
    base_dir = two.checkpoint_dir / f"{tag}-final"
    assert json.loads((base_dir / "config.json").read_text())["tie_word_embeddings"] is not lora
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(base_dir)
    embedding = weights[1]["model.safetensors:model.embed_tokens.weight"]
    output = weights[1].get("model.safetensors:lm_head.weight", embedding)
    assert torch.equal(loaded.get_output_embeddings().weight.detach(), output.float())
    assert torch.equal(loaded.get_input_embeddings().weight.detach(), embedding.float())


async def test_server_info_reports_the_ranks(two: Launched) -> None:
    async with AsyncServiceClient(two.address) as service:
        info = await service.get_server_info()
    assert info.world_size == 2
    assert info.distributed_mode == ("FSDP" if two.fsdp else "MULTI_CPU")
    assert len(info.devices) == 2 and all(d.startswith("cpu") for d in info.devices)


async def _shard_sizes(launched: Launched, *, lora: bool) -> dict[int, tuple[int, int]]:
    """Create and close a session; each rank's logged (parameters held, session parameters)."""
    async with AsyncServiceClient(launched.address) as service:
        tc = await service.create_training_client(MODEL, lora_rank=4 if lora else None, seed=2)
        session_id = tc.session_id
        await tc.close()
    found: dict[int, tuple[int, int]] = {}
    deadline = time.monotonic() + 5
    while len(found) < 2 and time.monotonic() < deadline:  # rank 1's line may trail the reply
        closed = any(f"session {session_id} closed" in line for line in launched.lines)
        for line in launched.lines[::-1]:
            m = re.search(r"rank (\d) holds (\d+) of the session's (\d+) parameters", line)
            if m and int(m.group(1)) not in found:
                found[int(m.group(1))] = (int(m.group(2)), int(m.group(3)))
        if closed and not launched.fsdp:
            break
        await asyncio.sleep(0.1)
    return found


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
async def test_each_rank_holds_half_of_a_session_under_fsdp(two: Launched, lora: bool) -> None:
    found = await _shard_sizes(two, lora=lora)
    if not two.fsdp:
        assert found == {}, "replicated ranks hold whole models and log no shard"
        return
    assert sorted(found) == [0, 1], two.lines[-20:]
    total = found[0][1]
    assert found[1][1] == total
    for local, _ in found.values():  # each rank keeps about half of every tensor (FSDP2 pads dim 0)
        assert 0.45 * total < local < 0.56 * total, (found, total)


async def _resume_and_step(address: str, checkpoint: str, batch: list[Datum]) -> tuple[float, float, torch.Tensor]:
    async with AsyncServiceClient(address) as service:
        tc: AsyncTrainingClient = await service.create_training_client_from_state(checkpoint)
        out = await tc.forward_backward(batch, "cross_entropy")
        result = await tc.optim_step(ADAM)
        assert result.step == 2
        logprobs = torch.cat((await tc.forward(batch)).logprobs)
        await tc.close()
        return out.loss, result.grad_norm, logprobs


@pytest.mark.parametrize("direction", ["2p-to-1p", "1p-to-2p"])
async def test_state_checkpoints_cross_load(two: Launched, one: TrainerServer, direction: str) -> None:
    batch = uneven_batch()
    assert one.config.checkpoint_dir is not None
    src, dst = (two, one) if direction == "2p-to-1p" else (one, two)
    src_address = src.address
    src_dir = two.checkpoint_dir if src is two else one.config.checkpoint_dir
    dst_dir = one.config.checkpoint_dir if dst is one else two.checkpoint_dir
    name = f"cross-{direction}"
    async with AsyncServiceClient(src_address) as service:
        tc = await service.create_training_client(MODEL, lora_rank=4, seed=5)
        await tc.forward_backward(batch, "cross_entropy")
        await tc.optim_step(ADAM)
        await tc.save_checkpoint(name, "state")
        await tc.close()
    shutil.copytree(src_dir / name, dst_dir / name)  # as a user would copy it between machines
    here = await _resume_and_step(src_address, name, batch)
    there = await _resume_and_step(dst.address, name, batch)
    close(torch.tensor(here[:2]), torch.tensor(there[:2]))
    close(here[2], there[2])


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
async def test_killing_rank_1_fails_the_call_and_the_server_exits(model_dir: Path, tmp_path: Path, fsdp: bool) -> None:
    launched = launch(model_dir, tmp_path / "checkpoints", tmp_path / "home", fsdp=fsdp)
    try:
        rank1 = launched.rank_pid(1)
        batch = uneven_batch()
        deadline_s = 30.0

        def kill_rank_1(data: Sequence[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
            os.kill(rank1, signal.SIGKILL)  # while the server holds the graph on both ranks
            time.sleep(0.5)
            return squared_loss(data, logprobs)

        # No retries: the first answer is the one under test (a retry would meet a server already gone).
        async with AsyncServiceClient(launched.address, config=ClientConfig(retry_attempts=1)) as service:
            tc = await service.create_training_client(MODEL, lora_rank=4, seed=1)
            await tc.forward_backward(batch, "cross_entropy")  # both ranks work
            started = time.monotonic()
            with pytest.raises(APIStatusError) as info:
                await asyncio.wait_for(tc.forward_backward_custom(batch, kill_rank_1), deadline_s)
            elapsed = time.monotonic() - started
            print(f"\nrank 1 killed: client got {info.value.code.name} after {elapsed:.1f}s: {info.value}")
            assert elapsed < deadline_s
            assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
            assert "lost one of its 2 processes" in str(info.value) or "connect" in str(info.value)
            # Until the launcher takes the group down, rank 0 answers, and says it cannot train.
            try:
                async with grpc.aio.insecure_channel(launched.address) as channel:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=5
                    )
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE  # already gone: also fine
        launched.proc.wait(90)  # the launcher tears the group down; nothing hangs
        assert launched.proc.returncode != 0
    finally:
        launched.kill()


async def test_a_hung_rank_fails_the_call_after_the_cluster_timeout(model_dir: Path, tmp_path: Path) -> None:
    timeout_s = 6.0
    launched = launch(model_dir, tmp_path / "checkpoints", tmp_path / "home", "--cluster-timeout", str(timeout_s))
    rank1 = launched.rank_pid(1)
    try:
        async with AsyncServiceClient(launched.address, config=ClientConfig(retry_attempts=1)) as service:
            tc = await service.create_training_client(MODEL, lora_rank=4, seed=1)
            os.kill(rank1, signal.SIGSTOP)  # alive, but answers nothing
            started = time.monotonic()
            with pytest.raises(APIStatusError) as info:
                await asyncio.wait_for(tc.forward_backward(uneven_batch(), "cross_entropy"), 60)
            elapsed = time.monotonic() - started
            print(f"\nrank 1 stopped: client got {info.value.code.name} after {elapsed:.1f}s: {info.value}")
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            assert "lost one of its 2 processes" in str(info.value)
            assert elapsed < timeout_s * 4
            async with grpc.aio.insecure_channel(launched.address) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(APIStatusError) as again:
                await service.create_training_client(MODEL, lora_rank=4, seed=1)
            assert again.value.code == grpc.StatusCode.UNAVAILABLE  # refused at once, not another wait
    finally:
        os.kill(rank1, signal.SIGKILL)
        os.kill(rank1, signal.SIGCONT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            launched.proc.wait(60)
        launched.kill()


@pytest.mark.parametrize(
    ("lengths", "parts"),
    [([5, 5, 5, 5], 2), ([10, 1, 1, 1], 2), ([3], 2), ([1, 9], 2), ([4, 9, 15], 2), ([2] * 7, 3), ([8, 1], 4)],
)
def test_shards_are_contiguous_balanced_and_cover_the_batch(lengths: list[int], parts: int) -> None:
    bounds = shard_bounds(lengths, parts)
    assert len(bounds) == parts
    assert bounds[0][0] == 0 and bounds[-1][1] == len(lengths)
    assert all(a[1] == b[0] and a[0] <= a[1] for a, b in itertools.pairwise(bounds))
    tokens = [sum(lengths[a:b]) for a, b in bounds]
    assert sum(1 for t in tokens if t) == min(parts, len(lengths))  # nobody idles while datums remain
    # No better contiguous split exists than one whose largest shard is within one datum of the ideal.
    assert max(tokens) <= sum(lengths) / parts + max(lengths)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "set fsdp_version: 2"),
        ({"ACCELERATE_USE_FSDP": "true"}, "set fsdp_version: 2"),  # accelerate's default version is 1
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"},
            "fsdp_offload_params moves parameters from GPUs",
        ),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed is not supported"),
        ({"ACCELERATE_USE_MEGATRON_LM": "true"}, "Megatron-LM is not supported"),
    ],
    ids=["fsdp1", "fsdp-default-version", "fsdp-offload-on-cpu", "deepspeed", "megatron"],
)
def test_unsupported_accelerate_modes_are_refused(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        init_cluster("cpu")


async def _pipelined(address: str, batch: list[Datum]) -> tuple[list[float], torch.Tensor]:
    """Two windows of three custom calls + a step, each window submitted at once (overlap and queueing on)."""
    async with AsyncServiceClient(address) as service:
        tc = await service.create_training_client(MODEL, lora_rank=4, seed=21)
        norms = []
        for _ in range(2):
            calls = [tc.forward_backward_custom(batch, squared_loss) for _ in range(3)]
            step = tc.optim_step(ADAM)
            for c in calls:
                await c
            norms.append((await step).grad_norm)
        logprobs = torch.cat((await tc.forward(batch)).logprobs)
        await tc.close()
    return norms, logprobs


async def test_pipelined_windows_match_one_process(two: Launched, one: TrainerServer) -> None:
    batch = uneven_batch()
    single = await _pipelined(one.address, batch)
    double = await _pipelined(two.address, batch)
    close(torch.tensor(single[0]), torch.tensor(double[0]))
    close(single[1], double[1])


async def _export_kinds(address: str, checkpoint_dir: Path, tag: str) -> dict[str, dict[str, torch.Tensor]]:
    """A LoRA session's BASE, DELTA (rebuilt against that BASE) and ADAPTER checkpoints after two steps."""
    from trainer_ckpt import apply_delta

    batch = uneven_batch()
    async with AsyncServiceClient(address) as service:
        tc = await service.create_training_client(MODEL, lora_rank=4, seed=9)
        await tc.forward_backward(batch, "cross_entropy")
        await tc.optim_step(ADAM)
        base = await tc.save_checkpoint(f"{tag}-base", "base", dtype="float32")
        await tc.forward_backward_custom(batch, squared_loss)
        await tc.optim_step(ADAM)
        delta = await tc.save_checkpoint(f"{tag}-delta", "delta")
        adapter = await tc.save_checkpoint(f"{tag}-adapter", "adapter")
        await tc.close()
    return {
        "base": read_checkpoint(checkpoint_dir / base.name),
        "delta": apply_delta(checkpoint_dir / base.name / "model.safetensors", checkpoint_dir / delta.name),
        "adapter": read_checkpoint(checkpoint_dir / adapter.name),
    }


async def test_base_delta_and_adapter_exports_match_one_process(two: Launched, one: TrainerServer) -> None:
    assert one.config.checkpoint_dir is not None
    tag = "exports"
    single = await _export_kinds(one.address, one.config.checkpoint_dir, tag)
    double = await _export_kinds(two.address, two.checkpoint_dir, tag)
    for kind in ("base", "delta", "adapter"):
        assert single[kind].keys() == double[kind].keys(), kind
        for name in single[kind]:
            close(single[kind][name], double[kind][name], f"{kind} {name}")


async def _after_a_dropped_graph(address: str, batch: list[Datum]) -> tuple[float, float, torch.Tensor]:
    """A custom call whose loss fails (its held forward is released unused), then training goes on."""

    def failing_loss(data: Sequence[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        raise RuntimeError("the client's loss failed")

    async with AsyncServiceClient(address) as service:
        tc = await service.create_training_client(MODEL, lora_rank=4, seed=13)
        with pytest.raises(LossFunctionError, match="loss failed"):
            await tc.forward_backward_custom(batch, failing_loss)
        out = await tc.forward_backward_custom(batch, squared_loss)
        step = await tc.optim_step(ADAM)
        logprobs = torch.cat((await tc.forward(batch)).logprobs)
        await tc.close()
    return out.loss, step.grad_norm, logprobs


async def test_a_released_forward_leaves_training_as_one_process_has_it(two: Launched, one: TrainerServer) -> None:
    batch = tiny_batch()  # under FSDP rank 1 holds a stand-in graph, released too
    single = await _after_a_dropped_graph(one.address, batch)
    double = await _after_a_dropped_graph(two.address, batch)
    close(torch.tensor(single[:2]), torch.tensor(double[:2]))
    close(single[2], double[2])


def _huge_on_the_last_datum(
    data: Sequence[Datum], logprobs: list[torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    """A finite loss (0) whose gradient overflows the parameters' only on the last datum (rank 1's share)."""
    last = logprobs[-1]
    return ((last - last.detach()) * 3e38).sum() + 0 * sum(lp.sum() for lp in logprobs[:-1]), {}


async def test_an_overflowing_backward_on_one_rank_is_refused_on_every_rank(two: Launched) -> None:
    """Rank 1's gradients would overflow, rank 0's would not: both refuse, and training goes on as if never called."""
    batch = uneven_batch()  # rank 0 takes the first datums, rank 1 the last
    async with AsyncServiceClient(two.address) as service:
        tc = await service.create_training_client(MODEL, lora_rank=None, seed=5)
        twin = await service.create_training_client(MODEL, lora_rank=None, seed=5)
        for client in (tc, twin):
            await client.forward_backward(batch[:1], "cross_entropy")  # a gradient the refusal must keep
        with pytest.raises(APIStatusError) as info:
            await asyncio.wait_for(tc.forward_backward_custom(batch, _huge_on_the_last_datum), 120)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT, info.value
        assert "would make the parameter gradients non-finite" in info.value.details
        norms = []
        for client in (tc, twin):
            await client.forward_backward(batch, "cross_entropy")
            norms.append((await client.optim_step(ADAM)).grad_norm)
            norms.append(torch.cat((await client.forward(batch)).logprobs))
        assert norms[0] == norms[2], "a rank kept part of the refused gradient"
        assert torch.equal(norms[1], norms[3])
        await tc.close()
        await twin.close()
