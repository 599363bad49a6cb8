"""The CUDA path: bf16 on a GPU (skipped without one), and the GPU benchmark's behaviour on CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import stop_process_tree

from trainer_client import AdamParams, AsyncServiceClient, Datum
from trainer_server import ServerConfig, TrainerServer

ROOT = Path(__file__).resolve().parent.parent

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def test_bench_gpu_skips_cleanly_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the benchmark would run for real")
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_gpu.py")],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "no CUDA GPU" in out.stdout


def test_bench_gpu_runs_its_comparison_on_cpu_ranks(tmp_path: Path) -> None:
    """The benchmark's launch, drive and table code, on CPU ranks: 1 process, 2 replicated, 2 FSDP."""
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--cpu", "--full", "--fsdp", "--steps", "1"]
    cmd += ["--hidden", "64", "--layers", "2", "--vocab", "512", "--seq", "32", "--batch", "2"]
    cmd += ["--models-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:  # the benchmark, its launchers and their ranks, on every path (a timeout included)
        stop_process_tree(proc.pid)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    rows = [line.split(" | ") for line in stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [(r[0], r[1]) for r in rows] == [("| 1", "single"), ("| 2", "MULTI_CPU"), ("| 2", "FSDP")], stdout
    for row in rows:
        assert float(row[3]) > 0 and int(row[6].rstrip(" |").replace(",", "")) > 100  # step s; peak RSS MiB


@needs_cuda
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
async def test_bf16_on_cuda_matches_transformers(llama_dir: Path, lora: bool) -> None:
    from transformers import AutoModelForCausalLM

    config = ServerConfig(models={"m": llama_dir}, port=0, device="cuda", dtype="bfloat16")
    data = [Datum.from_tokens([5, 6, 7, 8], [9, 10, 11, 12, 13]), Datum.from_tokens([20, 21], [22, 23, 24])]
    async with TrainerServer(config) as server, AsyncServiceClient(server.address) as service:
        info = await service.get_server_info()
        assert info.devices[0].startswith("cuda") and info.models[0].dtype == "bfloat16"
        tc = await service.create_training_client("m", lora_rank=8 if lora else None, seed=0)
        remote = await tc.forward(data)
        out = await tc.forward_backward(data, "cross_entropy")
        step = await tc.optim_step(AdamParams(learning_rate=1e-3))
        assert torch.isfinite(torch.tensor([out.loss, step.grad_norm])).all() and step.grad_norm > 0
        after = await tc.forward(data)
    model: Any = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16)
    model.to("cuda").eval()
    for d, lp in zip(data, remote.logprobs, strict=True):
        ids = d.model_input.unsqueeze(0).cuda()
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        expected = torch.log_softmax(logits, -1)[0].gather(-1, d.target_tokens.cuda().unsqueeze(-1)).squeeze(-1)
        assert (lp - expected.cpu()).abs().max() < 2e-2  # bf16 on both sides
    assert not torch.equal(torch.cat(after.logprobs), torch.cat(remote.logprobs))  # the step changed the model
