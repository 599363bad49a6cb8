"""``trainer-server`` argument parsing: models, keys, TLS pairing, limits and their errors."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer_client import AsyncServiceClient
from trainer_server import Limits, ServerConfig, TrainerServer
from trainer_server.__main__ import default_torch_threads, parse_args


def test_models_keys_and_limits(llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("alpha  # the first key\n\n# a comment line\nbeta\n")
    monkeypatch.setenv("TRAINER_API_KEYS", "gamma, delta")
    config = parse_args(
        [
            "--model", f"a={llama_dir}", "--model", f"b={llama_dir}", "--port", "0",
            "--api-key-file", str(keys), "--max-sessions", "3", "--checkpoint-dir", str(tmp_path / "ck"),
        ]
    )  # fmt: skip
    assert config.models == {"a": llama_dir, "b": llama_dir}
    assert config.api_keys == frozenset({"alpha", "beta", "gamma", "delta"})
    assert config.limits.max_sessions == 3
    assert config.checkpoint_dir == tmp_path / "ck"


@pytest.mark.parametrize(
    "argv",
    [
        ["--model", "noequals"],
        ["--model", "x=/definitely/not/a/model"],
        ["--tls-cert", "c.pem"],
        ["--torch-threads", "0"],
        ["--dtype", "int8"],
        ["--max-sessions", "0"],
        ["--chunk-bytes", "99999999999"],
        ["--cluster-timeout", "0"],
    ],
)
def test_bad_arguments_exit_with_usage(argv: list[str], llama_dir: Path) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2


def test_duplicate_model_names_are_refused(llama_dir: Path) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--model", f"a={llama_dir}", "--model", f"a={llama_dir}"])


def test_every_limit_has_a_flag_and_reaches_the_config() -> None:
    defaults = Limits()
    argv, expected = [], {}
    for i, f in enumerate(dataclasses.fields(Limits)):
        value = getattr(defaults, f.name) - 1 - i  # distinct, still valid
        argv += [f"--{f.name.replace('_', '-')}", str(value)]
        expected[f.name] = value
    config = parse_args(argv)
    assert dataclasses.asdict(config.limits) == expected


async def test_get_server_info_lists_every_limit(llama_dir: Path) -> None:
    limits = Limits(max_sessions=5, max_inflight_per_session=7, max_samples_per_call=9, max_sessions_per_key=3)
    config = ServerConfig(models={"m": llama_dir}, port=0, device="cpu", limits=limits)
    async with TrainerServer(config) as server, AsyncServiceClient(server.address) as service:
        info = await service.get_server_info()
    assert info.limits == dataclasses.asdict(limits)


def test_default_torch_threads_leave_a_core_on_cpu() -> None:
    # One core stays free for the event loop (docs/PERFORMANCE.md, section 4b); at least one thread.
    assert default_torch_threads("cpu", 2) == 1
    assert default_torch_threads("cpu", 1) == 1
    assert default_torch_threads("cpu", 16) == 15
    assert default_torch_threads("cpu", 16, processes_per_node=4) == 3
    assert default_torch_threads("cuda", 16) is None  # an accelerator: torch's choice


@pytest.mark.timeout(120)
def test_server_process_applies_the_default_torch_threads(llama_dir: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "trainer_server", "--port", "0", "--device", "cpu", "--model", f"m={llama_dir}"]
    cmd += ["--checkpoint-dir", str(tmp_path / "ck")]
    env = dict(os.environ, TRAINER_API_KEYS="")
    env.pop("OMP_NUM_THREADS", None)  # set, it is the user's choice and the default stays out of the way
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("trainer-server ready on "):
                break
    finally:
        proc.terminate()
        proc.wait(30)
    expected = default_torch_threads("cpu", len(os.sched_getaffinity(0)))
    assert any(f"torch CPU threads: {expected} (default" in line for line in lines), "\n".join(lines)


def test_omp_num_threads_in_the_environment_is_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer_server.__main__ import _set_torch_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        _set_torch_threads(None, "cpu")
        assert torch.get_num_threads() == 2  # not lowered: the user asked for 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        _set_torch_threads(None, "cpu")
        assert torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)) - 1)
    finally:
        torch.set_num_threads(before)
