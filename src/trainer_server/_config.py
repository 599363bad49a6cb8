"""Server configuration: typed, validated up front, units in the names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainer_proto import options, wire

__all__ = ["Limits", "ServerConfig"]


@dataclass(frozen=True)
class Limits:
    """Limits enforced per call and per server; over one answers RESOURCE_EXHAUSTED.

    Attributes:
        max_tokens_per_call: total tokens over all datums of one call.
        max_datums_per_call: datums in one call.
        max_sessions: open sessions on the server.
        max_message_bytes: largest single gRPC message either way.
        chunk_bytes: size of the chunks tensors are streamed in.
        max_samples_per_call: ``num_samples`` of one Sample call.
        max_sessions_per_key: open sessions one API key may hold.
        max_inflight_per_session: calls of one session submitted and not yet finished.
    """

    max_tokens_per_call: int = 1 << 17
    max_datums_per_call: int = 4096
    max_sessions: int = 64
    max_message_bytes: int = options.DEFAULT_MAX_MESSAGE_BYTES
    chunk_bytes: int = wire.DEFAULT_CHUNK_BYTES
    max_samples_per_call: int = 64
    max_sessions_per_key: int = 16
    max_inflight_per_session: int = 64

    def __post_init__(self) -> None:
        for name in (
            "max_tokens_per_call",
            "max_datums_per_call",
            "max_sessions",
            "chunk_bytes",
            "max_samples_per_call",
            "max_sessions_per_key",
            "max_inflight_per_session",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be positive, got {getattr(self, name)}")
        if self.chunk_bytes + 1024 > self.max_message_bytes:
            raise ValueError(
                f"Limits.chunk_bytes ({self.chunk_bytes}) must leave room under max_message_bytes "
                f"({self.max_message_bytes}); raise max_message_bytes or lower chunk_bytes"
            )


@dataclass(frozen=True)
class ServerConfig:
    """How to run a server.

    Attributes:
        models: base models to serve, name -> local Hugging Face directory. Empty means
            the built-in tiny model (created on first use, no download).
        host: interface to bind.
        port: port to bind; 0 picks a free one (see ``TrainerServer.port``).
        device: torch device for the models ("cpu", "cuda", "cuda:1"); None picks CUDA
            when available.
        dtype: dtype the base weights are loaded in ("float32", "bfloat16").
        limits: per-call and per-server limits.
        sequence_gap_timeout_s: how long a call waits for an earlier sequence number
            that has not arrived before it is aborted (and the gap skipped).
        shutdown_grace_s: how long stop() lets in-flight calls finish.
        keepalive_time_s: keepalive ping interval (matches the client's default).
        checkpoint_dir: where checkpoints are written; None means
            ``$TRAINER_HOME/checkpoints``.
        api_keys: accepted API keys (``authorization: Bearer <key>``); empty turns auth
            off. Sessions and checkpoints belong to the key that made them.
        tls_cert: PEM server certificate (chain); with ``tls_key``, serve TLS only.
        tls_key: PEM private key of ``tls_cert``.
        heartbeat_s: in a multi-process server, rank 0 pings the other ranks this
            often, so idle ranks stay in their collectives and a lost rank is noticed.
        cluster_timeout_s: in a multi-process server, how long a rank waits in a
            collective (for a slow or lost peer) before the server gives up on it.
        tune_allocator: keep freed memory for reuse (glibc's mmap and trim thresholds,
            process-wide, see :mod:`trainer_proto.alloc`); False leaves the C allocator alone.
        session_ttl_s: a session's lease: with no call and no heartbeat for this long (and
            no call in flight) it is closed and its memory freed. Clients heartbeat their
            open sessions at a third of it.
        held_graph_timeout_s: a custom-loss call whose gradient has not arrived this long
            after its logprobs were sent fails (DEADLINE_EXCEEDED) and its forward graph is
            freed; the session's next calls then run.
        max_held_graph_bytes: server-wide budget for the tensors saved by forward graphs held
            for a gradient; a custom-loss forward that would go over it is refused
            (RESOURCE_EXHAUSTED) and freed.
        session_save_timeout_s: at a graceful stop (SIGTERM), how long saving the open
            sessions (to restore them at the next start) may take in all.
        restore_sessions: at start, restore the sessions saved at the last graceful stop in
            ``checkpoint_dir`` (their clients reattach by id).
        tinker_port: also serve the Tinker HTTP API (the official ``tinker`` SDK) on this
            port of ``host``, over the same core, keys and checkpoints; 0 picks a free one
            (see ``TrainerServer.tinker_port``); None (default) serves gRPC only.
    """

    models: dict[str, Path] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 50051
    device: str | None = None
    dtype: str = "float32"
    limits: Limits = field(default_factory=Limits)
    sequence_gap_timeout_s: float = 120.0
    shutdown_grace_s: float = 5.0
    keepalive_time_s: float = options.DEFAULT_KEEPALIVE_TIME_S
    checkpoint_dir: Path | None = None
    api_keys: frozenset[str] = frozenset()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    heartbeat_s: float = 10.0
    cluster_timeout_s: float = 1800.0
    tune_allocator: bool = True
    session_ttl_s: float = 120.0
    held_graph_timeout_s: float = 300.0
    max_held_graph_bytes: int = 8 << 30
    session_save_timeout_s: float = 60.0
    restore_sessions: bool = True
    tinker_port: int | None = None

    def __post_init__(self) -> None:
        # Paths given as strings (the natural thing to write) are taken as paths.
        object.__setattr__(self, "models", {str(k): Path(v) for k, v in self.models.items()})
        for name in ("checkpoint_dir", "tls_cert", "tls_key"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"ServerConfig.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"ServerConfig.port must be in [0, 65535], got {self.port}")
        if self.tinker_port is not None and not 0 <= self.tinker_port < 65536:
            raise ValueError(f"ServerConfig.tinker_port must be in [0, 65535] or None, got {self.tinker_port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("ServerConfig.tls_cert and tls_key go together: set both or neither")
        if self.keepalive_time_s <= 0:
            raise ValueError("ServerConfig.keepalive_time_s must be positive")
        if not 0 < self.heartbeat_s < self.cluster_timeout_s:
            raise ValueError("ServerConfig.heartbeat_s must be positive and below cluster_timeout_s")
        for name in ("sequence_gap_timeout_s", "session_ttl_s", "held_graph_timeout_s", "max_held_graph_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerConfig.{name} must be positive, got {getattr(self, name)}")
        if self.session_save_timeout_s < 0:
            raise ValueError("ServerConfig.session_save_timeout_s must be >= 0 (0 saves nothing at a stop)")
