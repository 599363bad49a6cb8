"""The server's shared state: models, sessions, and the device thread.

All model work goes through :meth:`Runtime.on_device`, which runs it on one dedicated
thread. That keeps torch off the event loop (the loop keeps serving health checks,
streams and other sessions) and serialises device work, so session states are never
touched by two threads at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import ParamSpec, TypeVar

import grpc
import torch

from trainer_proto import pb
from trainer_server._config import ServerConfig
from trainer_server._engine import SessionModel
from trainer_server._errors import ServiceError, invalid_argument, not_found
from trainer_server._losses import LOSSES
from trainer_server._models import BaseModel, load_base_model
from trainer_server._sessions import Session, SessionRegistry

__all__ = ["CAPABILITIES", "Runtime", "server_version"]

log = logging.getLogger("trainer_server.runtime")

P = ParamSpec("P")
T = TypeVar("T")

CAPABILITIES = (
    "forward",
    "forward_backward",
    "forward_backward_custom",
    "optim_step",
    "lora",
    "full_fine_tune",
    "bfloat16_logprobs",
    "tokenizer",
)
MAX_LORA_RANK = 1024


def server_version() -> str:
    """The installed package version."""
    try:
        return version("trainer-service")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


def pick_device(requested: str | None) -> torch.device:
    """The configured device, or CUDA when available, else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Runtime:
    """Models, sessions and the device executor of one server."""

    def __init__(self, config: ServerConfig, model_paths: dict[str, Path]) -> None:
        self.config = config
        self.model_paths = model_paths
        self.device = pick_device(config.device)
        self.models: dict[str, BaseModel] = {}
        self.sessions = SessionRegistry(config.limits.max_sessions)
        self.ready = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainer-device")

    async def on_device(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` on the device thread and wait for it."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def load_models(self) -> None:
        """Load every configured base model (on the device thread)."""
        for name, path in self.model_paths.items():
            self.models[name] = await self.on_device(load_base_model, name, path, self.device, self.config.dtype)
        self.ready = True

    def shutdown(self) -> None:
        """Stop the device thread after the work already queued."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _check_ready(self) -> None:
        if not self.ready:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the server is still loading its models; retry shortly")

    def model(self, name: str) -> BaseModel:
        """A served base model by name.

        Raises:
            ServiceError: UNAVAILABLE while loading, INVALID_ARGUMENT for an empty name,
                NOT_FOUND for an unknown one.
        """
        self._check_ready()
        if not name:
            raise invalid_argument("base_model is required")
        base = self.models.get(name)
        if base is None:
            raise not_found(f"unknown base model {name!r}; this server serves {sorted(self.models)}")
        return base

    def session(self, session_id: str) -> Session:
        """An open session by id (see :meth:`SessionRegistry.get`)."""
        self._check_ready()
        return self.sessions.get(session_id)

    async def create_session(self, request: pb.CreateSessionRequest) -> Session:
        """Validate a CreateSession request and build the session on the device thread."""
        base = self.model(request.base_model)
        mode = request.WhichOneof("mode")
        if mode is None:
            raise invalid_argument("mode is required: set 'lora' (with a rank) or 'full'")
        lora = request.lora if mode == "lora" else None
        if lora is not None:
            if not 0 < lora.rank <= MAX_LORA_RANK:
                raise invalid_argument(f"lora.rank must be in [1, {MAX_LORA_RANK}], got {lora.rank}")
            if lora.alpha < 0:
                raise invalid_argument(f"lora.alpha must be >= 0 (0 means alpha = rank), got {lora.alpha}")
        self.sessions.check_capacity()
        try:
            state = await self.on_device(SessionModel, base, lora, request.seed)
        except ValueError as exc:  # peft rejects target modules that do not exist
            raise invalid_argument(f"cannot build the session: {exc}") from None
        session = self.sessions.add(base, state)
        log.info(
            "session %s created on %r (%s, %d trainable parameters)",
            session.id,
            base.name,
            f"LoRA rank {lora.rank}" if lora else "full fine-tune",
            state.num_trainable,
        )
        return session

    async def close_session(self, session: Session) -> None:
        """Close a session and free its memory."""
        await self.sessions.close(session)
        log.info("session %s closed after %d optimizer steps", session.id, session.state.step)
        if self.device.type == "cuda":
            await self.on_device(torch.cuda.empty_cache)

    def server_info(self) -> pb.GetServerInfoResponse:
        """What GetServerInfo reports."""
        limits = self.config.limits
        return pb.GetServerInfoResponse(
            version=server_version(),
            models=[m.info() for m in self.models.values()],
            devices=[str(self.device)],
            world_size=1,
            limits=pb.Limits(
                max_tokens_per_call=limits.max_tokens_per_call,
                max_datums_per_call=limits.max_datums_per_call,
                max_sessions=limits.max_sessions,
                max_message_bytes=limits.max_message_bytes,
                chunk_bytes=limits.chunk_bytes,
            ),
            capabilities=list(CAPABILITIES),
            loss_functions=sorted(LOSSES),
        )
