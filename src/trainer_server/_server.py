"""``TrainerServer``: the grpc.aio server, embeddable in any asyncio program.

::

    async with TrainerServer(ServerConfig(port=0)) as server:
        print(server.address)   # "127.0.0.1:PORT"; models are loaded and health is SERVING
        ...

Health (``grpc.health.v1``) answers NOT_SERVING until the models are loaded, SERVING
while the server runs, and NOT_SERVING again once shutdown starts; server reflection is
on, so ``grpcurl`` can list and describe everything.

The port is bound exclusively: gRPC would otherwise set ``SO_REUSEPORT``, and a second
server started on a port already in use would listen too, with clients landing on either
at random (their sessions seeming to vanish). A taken port fails :meth:`TrainerServer.start`
with an ``OSError`` that says so.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from trainer_proto import alloc, options, pb, wire
from trainer_server._cluster import Cluster
from trainer_server._config import ServerConfig
from trainer_server.core.ops import serve_worker
from trainer_server.core.service import TrainingCore
from trainer_server.frontends.grpc_auth import ApiKeyInterceptor
from trainer_server.frontends.grpc_servicer import TrainerServicer

if TYPE_CHECKING:
    from trainer_server.frontends.tinker.serving import TinkerHTTPServer

__all__ = ["SERVICE_NAME", "TrainerServer", "model_paths", "run_worker"]

log = logging.getLogger("trainer_server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TrainerService"].full_name


def _bind(add_port: Callable[[], int]) -> int:
    """The port ``add_port`` bound, or 0 when it could not (grpc raises or returns 0, by version)."""
    try:
        return add_port()
    except RuntimeError:
        return 0


def _why_not_bound(host: str, port: int) -> str:
    """Why grpc could not bind ``host:port``, as precisely as a plain socket can tell."""
    bind = f"{host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return (
                f"port {port} is already in use on {host} (another trainer-server?); stop it or choose another --port"
            )
        return f"could not bind {bind}: {exc.strerror or exc}"
    return f"could not bind {bind}"


def model_paths(config: ServerConfig) -> dict[str, Path]:
    """The base models a config serves, by name: its own, or the built-in one (built on first use)."""
    if config.models:
        return dict(config.models)
    from trainer_server.builtin_models import BUILTIN_MODEL_NAME, ensure_builtin_model

    return {BUILTIN_MODEL_NAME: ensure_builtin_model()}


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _add_servicer(servicer: TrainerServicer, server: grpc.aio.Server) -> None:
    """Register every RPC, as the generated ``add_TrainerServiceServicer_to_server`` would.

    Except that the tensor-streaming methods use :data:`trainer_proto.wire.STREAM_CODECS`:
    chunks are written as ready bytes and read as views of the received bytes (no protobuf
    copies). The bytes on the wire are the same.
    """
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["TrainerService"].methods:
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        codecs = wire.STREAM_CODECS.get(method.name)
        handlers[method.name] = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)](
            getattr(servicer, method.name),
            request_deserializer=codecs[0].deserialize if codecs else request.FromString,
            response_serializer=codecs[1].serialize if codecs else response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def run_worker(config: ServerConfig, cluster: Cluster) -> None:
    """Be rank ``cluster.rank`` > 0 of a multi-process server until rank 0 stops.

    Loads the same models as rank 0 and runs every training operation rank 0 hands out,
    on this rank's shard of each batch. Blocking; call it from the main thread.

    Raises:
        ClusterFailure: rank 0 (or another rank) is gone.
    """
    if cluster.rank == 0:
        raise ValueError("rank 0 serves gRPC with TrainerServer(config, cluster=cluster)")
    serve_worker(cluster, model_paths(config), config.dtype)
    cluster.close()


class TrainerServer:
    """A training server: start it, use :attr:`address`, stop it.

    Args:
        config: what to serve and how; the default serves the built-in tiny model.
        cluster: this process's place among the server's processes, when it is rank 0
            of a multi-process server (see :func:`trainer_server.init_cluster`); None
            for a single process.
    """

    def __init__(self, config: ServerConfig | None = None, *, cluster: Cluster | None = None) -> None:
        self.config = config or ServerConfig()
        self.cluster = cluster
        if cluster is not None and cluster.rank != 0:
            raise ValueError(f"only rank 0 serves gRPC; rank {cluster.rank} runs serve_worker()")
        self.core: TrainingCore | None = None
        self.servicer: TrainerServicer | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._port: int | None = None
        self._tinker: TinkerHTTPServer | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with ``port=0``)."""
        if self._port is None:
            raise RuntimeError("the server is not started")
        return self._port

    @property
    def tinker_port(self) -> int:
        """The bound port of the Tinker HTTP API (``ServerConfig.tinker_port``)."""
        if self._tinker is None:
            raise RuntimeError("the Tinker HTTP API is not served (ServerConfig.tinker_port is None) or not started")
        return self._tinker.port

    @property
    def address(self) -> str:
        """``host:port`` a client can connect to."""
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)  # type: ignore[arg-type]

    async def start(self) -> None:
        """Bind, start serving, and load the models; returns once they are loaded."""
        if self._server is not None:
            raise RuntimeError("the server is already started")
        if self.config.tune_allocator:
            alloc.tune_allocator()
        limits = self.config.limits
        self.core = TrainingCore(self.config, await asyncio.to_thread(model_paths, self.config), self.cluster)
        self.core.on_broken = lambda: self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.servicer = TrainerServicer(self.core)
        server = grpc.aio.server(
            interceptors=[ApiKeyInterceptor(self.config.api_keys)] if self.config.api_keys else None,
            options=[
                *options.grpc_options(
                    max_message_bytes=limits.max_message_bytes,
                    keepalive_time_s=self.config.keepalive_time_s,
                    server=True,
                ),
                ("grpc.so_reuseport", 0),  # a taken port is an error, not a port shared with another server
            ],
        )
        _add_servicer(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        bind = f"{self.config.host}:{self.config.port}"
        if self.config.tls_cert is not None and self.config.tls_key is not None:
            credentials = grpc.ssl_server_credentials(
                [(self.config.tls_key.read_bytes(), self.config.tls_cert.read_bytes())]
            )
            self._port = _bind(lambda: server.add_secure_port(bind, credentials))
        else:
            self._port = _bind(lambda: server.add_insecure_port(bind))
        if self._port == 0:
            await self.core.shutdown()  # nothing was served; the other ranks, if any, are let go
            raise OSError(_why_not_bound(self.config.host, self.config.port))
        await server.start()
        self._server = server
        if self.config.tinker_port is not None:
            try:
                await self._start_tinker(self.core)
            except BaseException:
                await self.stop(0)
                raise
        log.info(
            "listening on %s%s%s (health NOT_SERVING while models load)",
            self.address,
            " with TLS" if self.config.tls_cert else "",
            f", {len(self.config.api_keys)} API keys" if self.config.api_keys else ", no API keys (auth off)",
        )
        try:
            await self.core.load_models()
        except BaseException:
            await self.stop(0)
            raise
        if self.config.restore_sessions:
            await self.core.restarts.restore()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s", sorted(self.core.models), self.address)

    async def _start_tinker(self, core: TrainingCore) -> None:
        """Serve the Tinker HTTP API over the same core (models may still be loading)."""
        # Imported here: a gRPC-only server needs no HTTP stack.
        from trainer_server.frontends.tinker import TinkerConfig, TinkerFrontEnd
        from trainer_server.frontends.tinker.core_backend import CoreBackend
        from trainer_server.frontends.tinker.serving import TinkerHTTPServer

        assert self.config.tinker_port is not None
        front_end = TinkerFrontEnd(
            CoreBackend(core),
            TinkerConfig(
                api_keys=self.config.api_keys,
                max_body_bytes=self.config.limits.max_message_bytes,
                gap_timeout_s=self.config.sequence_gap_timeout_s,
            ),
        )
        self._tinker = TinkerHTTPServer(front_end, self.config.host, self.config.tinker_port)
        await self._tinker.start()

    async def stop(self, grace_s: float | None = None, *, save_sessions: bool = False) -> None:
        """Stop accepting calls, let in-flight ones finish for ``grace_s``, then close.

        Args:
            grace_s: how long in-flight calls may finish (default: the config's).
            save_sessions: save every open session first, so that the next start with the
                same ``checkpoint_dir`` restores them (what ``trainer-server`` does on SIGTERM);
                bounded by ``session_save_timeout_s``.
        """
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        log.info("shutting down (grace %.1fs)", grace)
        if self._tinker is not None:
            await self._tinker.stop()
            self._tinker = None
        await self._server.stop(grace)
        self._server = None
        if self.core is not None:
            if save_sessions and self.core.ready:
                await self.core.restarts.save_open()
            else:
                self.core.restarts.discard_open()
            await self.core.shutdown()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        """Block until the server stops."""
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> TrainerServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
