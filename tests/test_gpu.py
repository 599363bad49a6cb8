"""The CUDA path: bf16 on a GPU (skipped without one), and the GPU benchmark's CPU behaviour."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

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
