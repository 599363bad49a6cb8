"""Serve the Tinker front end with uvicorn on the server's own event loop.

The trainer server owns the process: its signal handling, its event loop and its
shutdown. uvicorn therefore runs as a task on that loop with its signal capture turned
off, on a socket bound here (so port 0 is resolved before :meth:`TinkerHTTPServer.start`
returns), and stops when the trainer server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator

import uvicorn

from trainer_server.frontends.tinker.app import TinkerFrontEnd

__all__ = ["TinkerHTTPServer"]

log = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handlers (the trainer server handles SIGTERM)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket whose connections send at once.

    The protocol number is given explicitly: asyncio turns Nagle off (``TCP_NODELAY``)
    only on sockets whose ``proto`` is TCP, and ``socket.create_server`` leaves it 0.
    With Nagle on, uvicorn's separate header and body writes wait for the client's
    delayed ACK: about 40 ms added to every response.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    return sock


class TinkerHTTPServer:
    """The Tinker front end on an HTTP port."""

    def __init__(self, front_end: TinkerFrontEnd, host: str, port: int) -> None:
        self.front_end = front_end
        self._host = host
        self._requested_port = port
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self, *, timeout_s: float = 30.0) -> None:
        """Bind and start serving; :attr:`port` is the bound port afterwards.

        Raises:
            OSError: The port cannot be bound.
            RuntimeError: uvicorn did not start within ``timeout_s``.
        """
        sock = _listen(self._host, self._requested_port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.front_end.app,
            log_level="warning",
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=5,
        )
        self._server = _EmbeddedServer(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]), name="tinker http")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the Tinker HTTP server stopped while starting")
            if loop.time() > deadline:
                raise RuntimeError(f"the Tinker HTTP server did not start within {timeout_s:g} s")
            await asyncio.sleep(0.01)
        log.info("Tinker API on http://%s:%d/api/v1", self._host, self.port)

    async def stop(self) -> None:
        """Stop accepting, finish open responses, cancel pending Tinker work."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.front_end.close()
