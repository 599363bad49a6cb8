"""Shared fixtures: tiny real models on disk, a real grpc.aio server on port 0, clients.

Models are built once per test run with transformers configs and a ``tokenizers``
tokenizer, saved in Hugging Face layout, and loaded by the server through the same path a
user's checkpoint takes.

No process outlives the tests: every process the tests start inherits a tag in its
environment (``TRAINER_TEST_RUN``), and at the end of the session any tagged process still
alive, orphans reparented to init included, is killed and fails the run. Tests stop what
they start with :func:`stop_process_tree`, in ``finally``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest
import pytest_asyncio
import torch

from trainer_client import AsyncServiceClient, AsyncTrainingClient
from trainer_server import Limits, ServerConfig, TrainerServer, build_tiny_model
from trainer_server.core.sessions import Session

torch.set_num_threads(min(2, os.cpu_count() or 1))

LLAMA = "tiny-llama"
QWEN = "tiny-qwen"

RUN_TAG = "TRAINER_TEST_RUN"
"""Environment variable every process started by the tests inherits (unless a test clears the environment)."""
LEFTOVER_GRACE_S = 10.0
"""How long processes still stopping at the end of the session get before they count as left behind."""


SLOW_MODULES = {
    "test_bench": "the benchmark's quick mode, with two server processes",
    "test_crashing_clients": "30 client processes killed at random points; server restarts",
    "test_distributed": "2-process servers under accelerate launch",
    "test_docs": "every README/docs block, some starting servers of their own",
    "test_gpu": "GPU comparisons (skip without CUDA)",
}
"""Test modules marked ``slow``: ``scripts/run-tests.sh -m "not slow"`` is the fast lane."""


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault(RUN_TAG, f"{os.getpid()}-{uuid.uuid4().hex}")  # before any test starts a process
    config.addinivalue_line("markers", "slow: multi-process, subprocess-heavy or doc-wide tests (see SLOW_MODULES)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


def _started_by_tests() -> list[psutil.Process]:
    """Processes alive now that this test run started: tagged, or below this process."""
    me = psutil.Process()
    found = {p.pid: p for p in me.children(recursive=True)}
    tag = f"{RUN_TAG}={os.environ[RUN_TAG]}".encode()
    for proc in psutil.process_iter():
        if proc.pid == me.pid or proc.pid in found:
            continue
        try:
            with open(f"/proc/{proc.pid}/environ", "rb") as f:
                if tag in f.read().split(b"\0"):
                    found[proc.pid] = proc
        except OSError:  # gone, or not ours to read
            continue
    alive = []
    for proc in found.values():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE or "multiprocessing" in " ".join(proc.cmdline()):
                continue  # reaped soon; multiprocessing's resource tracker lives as long as pytest
            alive.append(proc)
        except psutil.NoSuchProcess:
            continue
    return alive


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and everything below it now (empty when it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_process_tree(pid: int, grace_s: float = 30.0) -> None:
    """Stop a process and everything below it: SIGTERM, then SIGKILL after ``grace_s``.

    The descendants are listed first, so the ones a launcher (accelerate, torchrun) started
    are stopped even when the launcher dies first and they are reparented to init.
    """
    stop_processes(process_tree(pid), grace_s)


def stop_processes(procs: list[psutil.Process], grace_s: float = 30.0) -> None:
    """SIGTERM the processes still running, then SIGKILL those alive after ``grace_s``.

    ``psutil.Process`` objects remember their start time: a pid reused since is left alone.
    """
    procs = [p for p in procs if p.is_running()]
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Fail the run when a process a test started is still alive at the end (and kill it)."""
    yield
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    left = _started_by_tests()
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _started_by_tests()
    if not left:
        return
    described = []
    for proc in left:
        try:
            described.append(f"pid {proc.pid} (parent {proc.ppid()}): {' '.join(proc.cmdline())[:300]}")
        except psutil.NoSuchProcess:
            continue
    for proc in left:
        stop_process_tree(proc.pid, grace_s=5)
    if described:
        pytest.fail(
            "processes started by the tests were still running at the end (now killed):\n" + "\n".join(described)
        )


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llama_dir(models_root: Path) -> Path:
    return build_tiny_model(models_root / LLAMA, architecture="llama", max_position_embeddings=64)


@pytest.fixture(scope="session")
def qwen_dir(models_root: Path) -> Path:
    return build_tiny_model(models_root / QWEN, architecture="qwen2", max_position_embeddings=64)


def make_config(llama_dir: Path, qwen_dir: Path, **kwargs: object) -> ServerConfig:
    """A server config on a free loopback port serving both tiny models."""
    return ServerConfig(models={LLAMA: llama_dir, QWEN: qwen_dir}, port=0, device="cpu", **kwargs)  # type: ignore[arg-type]


@pytest_asyncio.fixture
async def server(llama_dir: Path, qwen_dir: Path) -> AsyncIterator[TrainerServer]:
    """A real server on 127.0.0.1:0 with both tiny models loaded."""
    async with TrainerServer(make_config(llama_dir, qwen_dir, limits=Limits(max_tokens_per_call=4096))) as srv:
        yield srv


@pytest_asyncio.fixture
async def service(server: TrainerServer) -> AsyncIterator[AsyncServiceClient]:
    """An async client connected to ``server``."""
    async with AsyncServiceClient(server.address) as client:
        yield client


def server_session(server: TrainerServer, tc: AsyncTrainingClient) -> Session:
    """The server-side session behind a training client (for white-box checks)."""
    assert server.core is not None
    return server.core.sessions.get(tc.session_id)


def state_hash(session: Session) -> str:
    """Hash of a session's trainable state: parameters, accumulated gradients, step."""
    h = hashlib.sha256()
    for name, p in session.state.model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        if p.grad is not None:
            h.update(b"grad")
            h.update(p.grad.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(str(session.state.step).encode())
    return h.hexdigest()
