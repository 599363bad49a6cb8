"""gRPC channel and server options, built in one place so both ends agree.

Message-size limits are always set explicitly (gRPC's implicit 4 MiB receive limit
would reject 4 MiB chunks); keepalive pings are allowed by the server at the rate the
client sends them, so neither side closes the connection for "too many pings".
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_KEEPALIVE_TIMEOUT_S",
    "DEFAULT_KEEPALIVE_TIME_S",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "grpc_options",
]

DEFAULT_CHUNK_BYTES = 1 << 20
"""Chunk size for streamed tensors: 1 MiB measured best on loopback (FACTS.md)."""
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
"""Largest single message either end accepts: 64 MiB."""
DEFAULT_KEEPALIVE_TIME_S = 30.0
"""Ping an idle connection this often, so dead peers are noticed."""
DEFAULT_KEEPALIVE_TIMEOUT_S = 20.0
"""Close the connection when a ping is not answered within this."""


def grpc_options(
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive_time_s: float = DEFAULT_KEEPALIVE_TIME_S,
    keepalive_timeout_s: float = DEFAULT_KEEPALIVE_TIMEOUT_S,
    server: bool = False,
) -> list[tuple[str, int]]:
    """Channel arguments for a client channel (``server=False``) or a server."""
    opts = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if server:
        # Accept pings as often as any gRPC client sends them (at most one a second, whatever its
        # keepalive setting), so a client with a shorter keepalive than ours is never told
        # "too many pings" and cut off mid-stream.
        opts.append(("grpc.http2.min_ping_interval_without_data_ms", min(int(keepalive_time_s * 1000) // 2, 500)))
    return opts
