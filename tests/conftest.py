"""Shared fixtures: tiny real models on disk, a real grpc.aio server on port 0, clients.

Models are built once per test run with transformers configs and a ``tokenizers``
tokenizer, saved in Hugging Face layout, and loaded by the server through the same path a
user's checkpoint takes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import torch

from trainer_client import AsyncServiceClient, AsyncTrainingClient
from trainer_server import Limits, ServerConfig, TrainerServer, build_tiny_model
from trainer_server.core.sessions import Session

torch.set_num_threads(min(2, os.cpu_count() or 1))

LLAMA = "tiny-llama"
QWEN = "tiny-qwen"


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
