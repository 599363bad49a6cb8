"""Checkpoints end to end: BASE, ADAPTER, DELTA and STATE on real servers with tiny real models.

- BASE is checked against the session's tensors (bitwise at fp32), loaded with plain
  ``transformers`` (and ``peft`` for ADAPTER), and scored against the server's Forward.
- DELTA (when ``trainer_ckpt.delta`` exists) rebuilds a BASE saved at the same point bit for bit.
- STATE is resumed in a *new server process* and must continue exactly like an uninterrupted run.
- Crash consistency: a server killed (SIGKILL, via ``TRAINER_FAULT_AT``) at each phase of a save
  leaves only complete checkpoints after a restart.
- Downloads resume from a partial file and refuse corrupt bytes; names cannot escape the root.

Server subprocesses are expensive to start (torch + transformers imports), so all of them are
started at once, in one module fixture (:func:`process_runs`), and the tests check what it
recorded; the runs that do not need a new process use in-process servers. Every server gets its
own checkpoint root under a temporary directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from conftest import LLAMA, make_config
from safetensors.torch import load_file

from trainer_client import (
    AdamParams,
    AlreadyExistsError,
    AsyncServiceClient,
    AsyncTrainingClient,
    CheckpointInfo,
    DataLossError,
    Datum,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ServiceClient,
    TrainerError,
    TrainingClient,
    UnavailableError,
)
from trainer_proto import pb, pb_grpc
from trainer_server import Limits, TrainerServer
from trainer_server._checkpoints import MANIFEST, SAVE_PHASES
from trainer_server.core.restarts import SESSIONS_DIR

ADAM = AdamParams(learning_rate=1e-2)
LORA_RANK = 4
SEED = 7
ATOL = 1e-5
MODES: dict[str, int | None] = {"full": None, "lora": LORA_RANK}
"""Session modes: name -> LoRA rank (None: full fine-tune)."""
READY = re.compile(r"trainer-server ready on (\S+)")


# ---- helpers ---------------------------------------------------------------------------


def make_batches(vocab: int, n_batches: int, *, seed: int = 0, size: int = 3) -> list[list[Datum]]:
    """Fixed batches of random token sequences (5 to 20 tokens)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        data = []
        for _ in range(size):
            total = int(torch.randint(5, 21, (), generator=gen))
            cut = int(torch.randint(1, total, (), generator=gen))
            tokens = torch.randint(0, vocab, (total,), generator=gen)
            data.append(Datum.from_tokens(tokens[:cut], tokens[cut:]))
        batches.append(data)
    return batches


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's raw bytes (for bitwise comparisons: NaN payloads and -0.0 included)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_bitwise(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert set(actual) == set(expected), f"{what}: tensor names differ: {set(actual) ^ set(expected)}"
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype, f"{what}: {name} is {got.dtype}, expected {want.dtype}"
        assert got.shape == want.shape, f"{what}: {name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        assert torch.equal(bits(got), bits(want)), f"{what}: {name} differs"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_files_match(directory: Path, info: CheckpointInfo) -> None:
    """Every file of a checkpoint is present in ``directory`` with its manifest size and sha256."""
    assert info.files, f"checkpoint {info.name} lists no files"
    for f in info.files:
        p = directory / f.path
        assert p.is_file(), f"{info.name}: {f.path} is missing"
        assert p.stat().st_size == f.size, f"{info.name}: {f.path} has the wrong size"
        assert sha256(p) == f.sha256, f"{info.name}: {f.path} has the wrong sha256"
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["name"] == info.name and manifest["kind"] == info.kind


def hf_logprobs(model: Any, data: list[Datum]) -> list[torch.Tensor]:
    """Per-target logprobs of each datum under a plain transformers/peft model (one datum at a time)."""
    out = []
    with torch.no_grad():
        for d in data:
            logits = model(input_ids=d.model_input[None]).logits[0].float()
            out.append(torch.log_softmax(logits, -1).gather(-1, d.target_tokens[:, None])[:, 0])
    return out


def assert_logprobs_close(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a.float(), e.float(), atol=ATOL, rtol=1e-4, msg=f"{what}: datum #{i} differs")


def config_dtype(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    dtypes = {config[k] for k in ("dtype", "torch_dtype") if k in config}
    assert len(dtypes) == 1, f"config.json dtype fields disagree or are missing: {dtypes}"
    return str(dtypes.pop())


@asynccontextmanager
async def ckpt_server(
    llama_dir: Path, qwen_dir: Path, root: Path, **kwargs: Any
) -> AsyncIterator[tuple[TrainerServer, AsyncServiceClient]]:
    """An in-process server whose checkpoints live under ``root``, and a client."""
    async with (
        TrainerServer(make_config(llama_dir, qwen_dir, checkpoint_dir=root, **kwargs)) as server,
        AsyncServiceClient(server.address) as service,
    ):
        yield server, service


async def vocab_size(service: AsyncServiceClient) -> int:
    info = await service.get_server_info()
    return next(m.vocab_size for m in info.models if m.name == LLAMA)


async def train_steps(tc: AsyncTrainingClient, batches: list[list[Datum]]) -> tuple[list[float], list[int]]:
    """One cross-entropy step per batch, every call submitted before any is awaited: (losses, steps)."""
    futures = [(tc.forward_backward(b, "cross_entropy"), tc.optim_step(ADAM)) for b in batches]
    losses, steps = [], []
    for fb, op in futures:
        losses.append((await fb).loss)
        steps.append((await op).step)
    return losses, steps


async def train(tc: AsyncTrainingClient, batches: list[list[Datum]]) -> None:
    await train_steps(tc, batches)


def session_model(server: TrainerServer, tc: AsyncTrainingClient) -> Any:
    assert server.core is not None
    return server.core.sessions.get(tc.session_id).state.model


# ---- BASE --------------------------------------------------------------------------------


async def test_base_fp32_of_full_fine_tune_is_the_session_weights_and_loads_in_transformers(
    llama_dir: Path, qwen_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    root = tmp_path / "ckpt"
    async with ckpt_server(llama_dir, qwen_dir, root) as (server, service):
        batches = make_batches(await vocab_size(service), 3)
        tc = await service.create_training_client(LLAMA, lora_rank=None)
        await train(tc, batches[:2])
        info = await tc.save_checkpoint("base-full", "base", dtype="float32")
        assert (info.kind, info.dtype, info.step, info.base_model) == ("base", "float32", 2, LLAMA)

        session = dict(session_model(server, tc).state_dict())
        on_disk = load_file(str(root / "base-full" / "model.safetensors"))
        assert_bitwise(on_disk, {k: v.detach() for k, v in session.items()}, "BASE fp32 vs the session")
        assert config_dtype(root / "base-full") == "float32"

        dl = await service.download_checkpoint("base-full", tmp_path / "dl", progress=False)
        assert_files_match(dl, info)
        for tokenizer_file in ("tokenizer.json", "config.json"):
            assert (dl / tokenizer_file).is_file()
        expected = (await tc.forward(batches[2])).logprobs

    model = AutoModelForCausalLM.from_pretrained(dl)
    assert next(model.parameters()).dtype == torch.float32
    assert_logprobs_close(hf_logprobs(model, batches[2]), expected, "transformers on BASE vs server forward")


async def test_base_of_lora_session_is_merged_and_leaves_shared_base_untouched(
    llama_dir: Path, qwen_dir: Path, tmp_path: Path
) -> None:
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    root = tmp_path / "ckpt"
    async with ckpt_server(llama_dir, qwen_dir, root) as (server, service):
        assert server.core is not None
        batches = make_batches(await vocab_size(service), 3)
        a = await service.create_training_client(LLAMA, lora_rank=LORA_RANK, seed=1)
        b = await service.create_training_client(LLAMA, lora_rank=LORA_RANK, seed=2)
        await train(a, batches[:2])
        await train(b, batches[:1])

        shared = {k: v.detach().clone() for k, v in server.core.models[LLAMA].model.state_dict().items()}
        b_model = session_model(server, b)
        b_frozen = {n: p.detach().clone() for n, p in b_model.named_parameters() if not p.requires_grad}
        b_before = (await b.forward(batches[2])).logprobs
        a_before = (await a.forward(batches[2])).logprobs

        fp32 = await a.save_checkpoint("merged-fp32", "base", dtype="float32")
        bf16 = await a.save_checkpoint("merged-bf16", "base")  # the default export dtype
        assert (fp32.dtype, bf16.dtype, fp32.step, bf16.step) == ("float32", "bfloat16", 2, 2)

        # Saving merged nothing in place: the shared base, the other session and this one are unchanged.
        assert_bitwise(
            {k: v.detach() for k, v in server.core.models[LLAMA].model.state_dict().items()},
            shared,
            "shared base model after a merged save",
        )
        assert_bitwise(
            {n: p.detach() for n, p in b_model.named_parameters() if not p.requires_grad},
            b_frozen,
            "other LoRA session's base tensors after a merged save",
        )
        for before, after in zip(b_before, (await b.forward(batches[2])).logprobs, strict=True):
            assert torch.equal(bits(before), bits(after)), "the other session's forward changed"
        for before, after in zip(a_before, (await a.forward(batches[2])).logprobs, strict=True):
            assert torch.equal(bits(before), bits(after)), "the saving session's forward changed"

        # Merged = W + scaling * B @ A for every adapted layer; everything else is the base's own tensor.
        peft_model = session_model(server, a)
        merged = load_file(str(root / "merged-fp32" / "model.safetensors"))
        assert set(merged) == set(shared), "a merged BASE has the base model's tensor names, no lora_ ones"
        adapted = 0
        for module_name, module in peft_model.get_base_model().named_modules():
            if not isinstance(module, LoraLayer):
                continue
            key = f"{module_name}.weight"
            layer: Any = module
            lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            want = shared[key] + layer.scaling["default"] * (lora_b @ lora_a).detach()
            assert not torch.equal(merged[key], shared[key]), f"{key}: the adapter was not merged"
            torch.testing.assert_close(merged[key], want, atol=1e-6, rtol=1e-5)
            adapted += 1
        assert adapted > 0
        untouched = [k for k in shared if "embed" in k or "norm" in k]
        assert untouched
        assert_bitwise({k: merged[k] for k in untouched}, {k: shared[k] for k in untouched}, "non-adapted tensors")

        # bf16 export: bf16 tensors (exactly the fp32 export rounded) and a bf16 config.
        bf16_tensors = load_file(str(root / "merged-bf16" / "model.safetensors"))
        assert_bitwise(bf16_tensors, {k: v.to(torch.bfloat16) for k, v in merged.items()}, "bf16 export")
        assert config_dtype(root / "merged-bf16") == "bfloat16"
        assert config_dtype(root / "merged-fp32") == "float32"

        dl = await service.download_checkpoint("merged-fp32", tmp_path / "dl", progress=False)
        assert_files_match(dl, fp32)

    model = AutoModelForCausalLM.from_pretrained(dl)
    assert_logprobs_close(hf_logprobs(model, batches[2]), a_before, "transformers on merged BASE vs server forward")
    bf16_model = AutoModelForCausalLM.from_pretrained(root / "merged-bf16")
    assert next(bf16_model.parameters()).dtype == torch.bfloat16


# ---- ADAPTER -----------------------------------------------------------------------------


async def test_adapter_loads_with_peft_and_matches_server_forward(
    llama_dir: Path, qwen_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = tmp_path / "ckpt"
    async with ckpt_server(llama_dir, qwen_dir, root) as (_server, service):
        batches = make_batches(await vocab_size(service), 3)
        tc = await service.create_training_client(LLAMA, lora_rank=LORA_RANK, seed=3)
        await train(tc, batches[:2])
        info = await tc.save_checkpoint("adapter", "adapter")
        assert (info.kind, info.step) == ("adapter", 2)
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {f.path for f in info.files}
        expected = (await tc.forward(batches[2])).logprobs
        dl = await service.download_checkpoint("adapter", tmp_path / "dl", progress=False)
        assert_files_match(dl, info)

        full = await service.create_training_client(LLAMA, lora_rank=None)
        with pytest.raises(FailedPreconditionError, match="LoRA"):
            await full.save_checkpoint("adapter-of-full", "adapter")
        assert "adapter-of-full" not in {c.name for c in await service.list_checkpoints()}
        assert sorted(p.name for p in root.iterdir() if p.name != SESSIONS_DIR) == ["adapter"]

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), dl)
    assert_logprobs_close(hf_logprobs(model, batches[2]), expected, "peft on ADAPTER vs server forward")


# ---- DELTA -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "lora_rank"),
    [("float32", None), ("bfloat16", None), ("float32", LORA_RANK)],
    ids=["fp32-full", "bf16-full", "fp32-lora"],
)
async def test_delta_rebuilds_a_base_saved_at_the_same_point_bit_for_bit(
    llama_dir: Path, qwen_dir: Path, tmp_path: Path, dtype: str, lora_rank: int | None
) -> None:
    delta = pytest.importorskip("trainer_ckpt.delta")
    root = tmp_path / "ckpt"
    async with ckpt_server(llama_dir, qwen_dir, root) as (_server, service):
        batches = make_batches(await vocab_size(service), 4)
        tc = await service.create_training_client(LLAMA, lora_rank=lora_rank, seed=5)
        with pytest.raises(FailedPreconditionError, match="BASE"):
            await tc.save_checkpoint("delta-without-base", "delta")
        b0 = await tc.save_checkpoint("b0", "base", dtype=dtype)
        await train(tc, batches[:3])
        d1 = await tc.save_checkpoint("d1", "delta")
        b1 = await tc.save_checkpoint("b1", "base", dtype=dtype)
        assert (d1.kind, d1.base_checkpoint, d1.dtype, d1.step) == ("delta", "b0", dtype, 3)
        assert (b0.step, b1.step, b0.base_checkpoint) == (0, 3, "")
        await train(tc, batches[3:])
        d2 = await tc.save_checkpoint("d2", "delta")
        assert (d2.base_checkpoint, d2.step) == ("b1", 4), "a DELTA refers to the session's latest BASE"
        names = {c.name for c in await service.list_checkpoints()}
        assert "delta-without-base" not in names
        dls = {n: await service.download_checkpoint(n, tmp_path / "dl" / n, progress=False) for n in ("b0", "d1", "b1")}

    out = delta.apply_delta_to_dir(dls["b0"], dls["d1"], tmp_path / "rebuilt")
    rebuilt = load_file(str(out / "model.safetensors"))
    new_base = load_file(str(dls["b1"] / "model.safetensors"))
    assert {t.dtype for t in new_base.values()} == {getattr(torch, dtype)}
    assert_bitwise(rebuilt, new_base, "apply(b0, d1) vs b1")
    old_base = load_file(str(dls["b0"] / "model.safetensors"))
    assert not all(torch.equal(bits(rebuilt[k]), bits(v)) for k, v in old_base.items()), "training changed nothing"
    assert (out / "config.json").is_file() and not (out / MANIFEST).exists()
    with pytest.raises(delta.DeltaError):  # a delta against another base is refused
        delta.apply_delta_to_dir(dls["b1"], dls["d1"], tmp_path / "wrong-base")
    assert not (tmp_path / "wrong-base").exists()


# ---- downloads ---------------------------------------------------------------------------


class RecordingStub:
    """Wraps the client's stub and records each DownloadCheckpoint request's (file, offset)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.requests: list[tuple[str, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def DownloadCheckpoint(self, request: pb.DownloadCheckpointRequest, **kwargs: Any) -> Any:
        self.requests.append((request.file, request.offset))
        return self._inner.DownloadCheckpoint(request, **kwargs)


async def test_download_resumes_from_a_partial_file_and_rejects_corrupt_bytes(
    llama_dir: Path, qwen_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "ckpt"
    async with ckpt_server(llama_dir, qwen_dir, root, limits=Limits(chunk_bytes=64 * 1024)) as (_server, service):
        tc = await service.create_training_client(LLAMA, lora_rank=None)
        info = await tc.save_checkpoint("base", "base", dtype="float32")
        dl = await service.download_checkpoint("base", tmp_path / "dl", progress=False)
        assert_files_match(dl, info)
        weights = dl / "model.safetensors"
        good = weights.read_bytes()
        half = len(good) // 2
        assert half > 2 * 64 * 1024, "the file should span several chunks"

        # An interrupted download: half the file in FILE.part. Only the rest is fetched.
        stub = RecordingStub(service._stub)
        service._stub = stub  # type: ignore[assignment]
        weights.unlink()
        part = dl / "model.safetensors.part"
        part.write_bytes(good[:half])
        await service.download_checkpoint("base", dl, progress=False)
        assert ("model.safetensors", half) in stub.requests
        assert [r for r in stub.requests if r[0] == "model.safetensors"] == [("model.safetensors", half)]
        assert not part.exists()
        assert_files_match(dl, info)
        # Files already complete and correct are not fetched again.
        assert {f for f, _ in stub.requests} == {"model.safetensors", MANIFEST}

        # A .part with wrong bytes: the result fails its sha256, is removed, and a retry succeeds.
        weights.unlink()
        part.write_bytes(bytes(b ^ 0xFF for b in good[:half]))
        with pytest.raises(DataLossError, match="sha256"):
            await service.download_checkpoint("base", dl, progress=False)
        assert not part.exists() and not weights.exists()
        await service.download_checkpoint("base", dl, progress=False)
        assert_files_match(dl, info)
        assert weights.read_bytes() == good

        with pytest.raises(NotFoundError):
            await service.download_checkpoint("missing", tmp_path / "dl-missing", progress=False)
        assert not (tmp_path / "dl-missing").exists()


# ---- names -------------------------------------------------------------------------------

BAD_NAMES = ["../x", "/abs", "a/b", "x\x00y", "..", "", ".hidden", "a\\b", "x/../y", "..x", "-x", "x" * 200]


async def test_invalid_names_are_rejected_everywhere_and_nothing_escapes_the_root(
    llama_dir: Path, qwen_dir: Path, tmp_path: Path
) -> None:
    outer = tmp_path / "outer"
    root = outer / "ckpt"
    absolute = str(tmp_path / "absolute-target")
    async with ckpt_server(llama_dir, qwen_dir, root) as (_server, service):
        tc = await service.create_training_client(LLAMA, lora_rank=LORA_RANK)
        stub = pb_grpc.TrainerServiceStub(service._channel)
        for name in [*BAD_NAMES, absolute]:
            for kind in ("state", "base"):
                with pytest.raises(InvalidArgumentError):
                    await tc.save_checkpoint(name, kind)
            with pytest.raises(InvalidArgumentError):
                await service.delete_checkpoint(name)
            with pytest.raises((InvalidArgumentError, NotFoundError)):
                await service.download_checkpoint(name, tmp_path / "dl", progress=False)
            with pytest.raises(grpc.aio.AioRpcError) as raw:
                async for _ in stub.DownloadCheckpoint(pb.DownloadCheckpointRequest(name=name, file=MANIFEST)):
                    pass
            assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, raw.value.details())

        # The session still works after all those refused calls; a valid save lands in the root.
        ok = await tc.save_checkpoint("ok", "state")
        assert ok.step == 0
        # A file outside the checkpoint cannot be fetched through a valid name either.
        for file in ("../../outer-file", "/etc/passwd", "../ok/manifest.json", "trainable.safetensors/../state.json"):
            with pytest.raises(grpc.aio.AioRpcError) as raw:
                async for _ in stub.DownloadCheckpoint(pb.DownloadCheckpointRequest(name="ok", file=file)):
                    pass
            assert raw.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), file

        # Duplicates and missing names.
        with pytest.raises(AlreadyExistsError):
            await tc.save_checkpoint("ok", "base")
        with pytest.raises(NotFoundError):
            await service.delete_checkpoint("missing")
        await service.delete_checkpoint("ok")
        assert await service.list_checkpoints() == []
        with pytest.raises(NotFoundError):
            await service.delete_checkpoint("ok")

    assert sorted(p.name for p in outer.iterdir()) == ["ckpt"], "nothing is created next to the checkpoint root"
    assert [p for p in root.iterdir() if p.name != SESSIONS_DIR] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outer"], "nothing is created outside the root"


async def test_save_checkpoint_runs_after_the_calls_submitted_before_it(
    llama_dir: Path, qwen_dir: Path, tmp_path: Path
) -> None:
    async with ckpt_server(llama_dir, qwen_dir, tmp_path / "ckpt") as (_server, service):
        (batch,) = make_batches(await vocab_size(service), 1)
        tc = await service.create_training_client(LLAMA, lora_rank=LORA_RANK)
        fb = tc.forward_backward(batch, "cross_entropy")
        op = tc.optim_step(ADAM)
        ck = tc.save_checkpoint("x", "state")
        fb2 = tc.forward_backward(batch, "cross_entropy")
        op2 = tc.optim_step(ADAM)
        ck2 = tc.save_checkpoint("y", "state")
        info, info2 = await ck, await ck2
        await fb, await fb2
        assert ((await op).step, (await op2).step) == (1, 2)
        assert (info.step, info2.step) == (1, 2)
        assert info.seq < info2.seq


# ---- server processes: STATE resume in a new process, crash consistency -----------------


class ServerProcess:
    """``python -m trainer_server`` on port 0 serving the tiny llama, with its own checkpoint dir.

    Its torch thread count is pinned to this process's, so its float results can be compared
    bitwise with runs in this process.
    """

    def __init__(self, llama_dir: Path, checkpoint_dir: Path, log: Path, *, fault: str | None = None) -> None:
        env = dict(os.environ)
        env.pop("TRAINER_FAULT_AT", None)
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(torch.get_num_threads())
        if fault is not None:
            env["TRAINER_FAULT_AT"] = fault
        self.log = log
        with log.open("w") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "trainer_server",
                    "--model",
                    f"{LLAMA}={llama_dir}",
                    "--port",
                    "0",
                    "--checkpoint-dir",
                    str(checkpoint_dir),
                ],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
            )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._address: str | None = None
        self._lock = threading.Lock()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put("")

    def _fail(self, why: str) -> None:
        pytest.fail(f"{why}; server log {self.log}:\n{self.log.read_text()[-3000:]}")

    @property
    def address(self) -> str:
        """Wait for the ready line and return ``host:port`` (from any thread)."""
        with self._lock:
            while self._address is None:
                try:
                    line = self._lines.get(timeout=240)
                except queue.Empty:
                    self._fail("the server did not report ready in 240 s")
                if not line:
                    self._fail(f"the server exited before it was ready (status {self.proc.wait()})")
                if m := READY.search(line):
                    self._address = m.group(1)
            return self._address

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> int:
        """SIGTERM (graceful) and wait."""
        self.proc.send_signal(signal.SIGTERM)
        return self.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def sync_train(tc: TrainingClient, batches: list[list[Datum]]) -> tuple[list[float], list[int]]:
    futures = [(tc.forward_backward(b, "cross_entropy"), tc.optim_step(ADAM)) for b in batches]
    results = [(fb.result(120), op.result(120)) for fb, op in futures]
    return [fb.loss for fb, _ in results], [op.step for _, op in results]


@dataclass
class ResumeRun:
    """One mode's runs: uninterrupted (``ref``) vs 2 steps, STATE, new process, 2 steps (``run``)."""

    ref_losses: list[float] = field(default_factory=list)
    ref_steps: list[int] = field(default_factory=list)
    run_losses: list[float] = field(default_factory=list)
    resumed_losses: list[float] = field(default_factory=list)
    resumed_steps: list[int] = field(default_factory=list)
    state: CheckpointInfo | None = None
    ref_base: Path | None = None
    resumed_base: Path | None = None


@dataclass
class CrashRun:
    """A server killed at ``phase`` of a save on a copy of a directory with committed checkpoints."""

    directory: Path
    before: list[CheckpointInfo]
    error: BaseException | None
    returncode: int
    tmp_dirs: list[str]


@dataclass
class ProcessRuns:
    resume: dict[str, ResumeRun]
    crash: dict[str, CrashRun]


async def first_runs(llama_dir: Path, qwen_dir: Path, base: Path) -> tuple[dict[str, ResumeRun], list[list[Datum]]]:
    """The runs that need no new process, each on its own server and checkpoint root.

    ``ref/``: each mode trains 4 steps uninterrupted, then saves a BASE fp32 (``final-MODE``)
    and a STATE (``good-MODE``). ``run/``: each mode trains the same first 2 steps and saves a
    STATE (``state-MODE``); then that server stops.
    """
    runs = {mode: ResumeRun() for mode in MODES}
    async with ckpt_server(llama_dir, qwen_dir, base / "ref") as (_server, service):
        batches = make_batches(await vocab_size(service), 4, seed=11)
        for mode, rank in MODES.items():
            tc = await service.create_training_client(LLAMA, lora_rank=rank, seed=SEED)
            runs[mode].ref_losses, runs[mode].ref_steps = await train_steps(tc, batches)
            await tc.save_checkpoint(f"final-{mode}", "base", dtype="float32")
            await tc.save_checkpoint(f"good-{mode}", "state")
            runs[mode].ref_base = base / "ref" / f"final-{mode}" / "model.safetensors"
    async with ckpt_server(llama_dir, qwen_dir, base / "run") as (_server, service):
        for mode, rank in MODES.items():
            tc = await service.create_training_client(LLAMA, lora_rank=rank, seed=SEED)
            runs[mode].run_losses, _ = await train_steps(tc, batches[:2])
            runs[mode].state = await tc.save_checkpoint(f"state-{mode}", "state")
    return runs, batches


@pytest.fixture(scope="module")
def process_runs(llama_dir: Path, qwen_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessRuns]:
    """Every run that needs a server subprocess, all started at once (they are slow to start).

    First, without new processes (:func:`first_runs`): the uninterrupted reference runs and
    the first halves of the interrupted ones, whose servers are then stopped. Then, concurrently:

    - ``second``, a new server process on ``run/``, resumes each STATE, trains the last 2 steps
      and saves a BASE fp32 (``final-MODE``);
    - per save phase, a server process with ``TRAINER_FAULT_AT=phase`` on a copy of ``ref/``
      (checkpoints committed by an earlier server) resumes ``good-full``, trains a step and saves
      a STATE: it kills itself with SIGKILL in the middle of that save.
    """
    base = tmp_path_factory.mktemp("procs")
    runs, batches = asyncio.run(first_runs(llama_dir, qwen_dir, base))
    procs: list[ServerProcess] = []

    def start(name: str, directory: Path, fault: str | None = None) -> ServerProcess:
        proc = ServerProcess(llama_dir, directory, base / f"{name}.log", fault=fault)
        procs.append(proc)
        return proc

    try:
        second = start("second", base / "run")
        faulty: dict[str, tuple[ServerProcess, Path]] = {}
        for phase in SAVE_PHASES:
            directory = base / f"crash-{phase}"
            shutil.copytree(base / "ref", directory)
            faulty[phase] = (start(f"fault-{phase}", directory, fault=phase), directory)

        def resume(mode: str) -> None:
            with ServiceClient(second.address) as service:
                tc = service.create_training_client_from_state(f"state-{mode}")
                runs[mode].resumed_losses, runs[mode].resumed_steps = sync_train(tc, batches[2:])
                tc.save_checkpoint(f"final-{mode}", "base", dtype="float32").result(120)
                runs[mode].resumed_base = base / "run" / f"final-{mode}" / "model.safetensors"

        def crash_save(phase: str) -> CrashRun:
            proc, directory = faulty[phase]
            error: BaseException | None = None
            with ServiceClient(proc.address) as service:
                before = service.list_checkpoints()
                tc = service.create_training_client_from_state("good-full")
                sync_train(tc, batches[:1])
                try:
                    tc.save_checkpoint(f"new-{phase}", "state").result(120)
                except TrainerError as exc:
                    error = exc
            return CrashRun(
                directory=directory,
                before=before,
                error=error,
                returncode=proc.wait(),
                tmp_dirs=sorted(p.name for p in directory.glob(".tmp-*")),
            )

        with ThreadPoolExecutor(max_workers=len(MODES) + len(faulty)) as pool:
            resumed = [pool.submit(resume, mode) for mode in MODES]
            crashes = {phase: pool.submit(crash_save, phase) for phase in faulty}
            for future in resumed:
                future.result()
            crash = {phase: future.result() for phase, future in crashes.items()}
        assert second.stop() == 0, "the server did not stop cleanly on SIGTERM"
        yield ProcessRuns(resume=runs, crash=crash)
    finally:
        for proc in procs:
            proc.kill()


# The first of these tests pays for process_runs; give slow (shared, loaded) machines room.
@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", list(MODES))
def test_state_resume_in_a_new_process_continues_like_an_uninterrupted_run(
    process_runs: ProcessRuns, mode: str
) -> None:
    run = process_runs.resume[mode]
    assert run.ref_steps == [1, 2, 3, 4]
    assert [x.hex() for x in run.run_losses] == [x.hex() for x in run.ref_losses[:2]], "runs are not deterministic"
    assert run.state is not None and (run.state.kind, run.state.step) == ("state", 2)
    assert run.resumed_steps == [3, 4], "the resumed session continues the step count"
    assert [x.hex() for x in run.resumed_losses] == [x.hex() for x in run.ref_losses[2:]], (
        f"losses of steps 3-4 after resume {run.resumed_losses} != uninterrupted {run.ref_losses[2:]}"
    )
    assert run.ref_base is not None and run.resumed_base is not None
    assert run.resumed_base.read_bytes() == run.ref_base.read_bytes(), "final weights differ from the uninterrupted run"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("phase", SAVE_PHASES)
async def test_crash_at_each_save_phase_leaves_only_complete_checkpoints(
    process_runs: ProcessRuns, phase: str, llama_dir: Path, qwen_dir: Path, tmp_path: Path
) -> None:
    run = process_runs.crash[phase]
    assert run.returncode == -signal.SIGKILL, f"the server was not killed at {phase} (status {run.returncode})"
    assert isinstance(run.error, UnavailableError), f"the client should see the server go away, got {run.error!r}"
    committed = phase == "renamed"
    if committed:
        assert run.tmp_dirs == []
    else:
        assert len(run.tmp_dirs) == 1 and run.tmp_dirs[0].startswith(f".tmp-new-{phase}-"), run.tmp_dirs
    earlier = {c.name: c for c in run.before}
    assert set(earlier) == {"final-full", "final-lora", "good-full", "good-lora"}

    # Restart (without the fault hook) on the same directory.
    async with ckpt_server(llama_dir, qwen_dir, run.directory) as (_server, service):
        listed = {c.name: c for c in await service.list_checkpoints()}
        assert set(listed) == set(earlier) | ({f"new-{phase}"} if committed else set())
        assert not list(run.directory.glob(".tmp-*")), "unfinished saves are cleaned up at startup"
        for name, info in earlier.items():
            assert listed[name] == info, f"{name} changed"
        for name, info in listed.items():
            dl = await service.download_checkpoint(name, tmp_path / name, progress=False)
            assert_files_match(dl, info)
            if info.kind == "state":
                tc = await service.create_training_client_from_state(name)
                await train(tc, make_batches(await vocab_size(service), 1))
        if committed:
            new = listed[f"new-{phase}"]
            assert (new.kind, new.step) == ("state", 5)
    assert sorted(p.name for p in run.directory.iterdir() if p.name != SESSIONS_DIR) == sorted(listed)
