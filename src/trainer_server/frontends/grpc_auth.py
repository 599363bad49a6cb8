"""API-key authentication: a server interceptor, and the caller's identity for handlers.

Keys travel as ``authorization: Bearer <key>`` metadata. The interceptor compares the
presented key against every configured key in constant time (``hmac.compare_digest``,
no early exit) and answers UNAUTHENTICATED when none matches; the health service stays
open so load balancers can probe without a key. With no keys configured, auth is off
and every caller is the anonymous owner ``""``.

A caller's identity (its *owner id*) is a short hash of its key, never the key itself:
sessions and checkpoints belong to the owner that made them, and any other owner is told
they do not exist (NOT_FOUND), so nothing leaks about other tenants.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

__all__ = ["OPEN_METHOD_PREFIXES", "ApiKeyInterceptor", "load_api_keys", "owner_id", "owner_of"]

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
"""Methods callable without a key."""

_BEARER = "bearer "


def owner_id(key: str) -> str:
    """The owner id of an API key: 16 hex digits of its sha256."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _presented_key(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for name, value in metadata or ():
        if name.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            if text.lower().startswith(_BEARER):
                return text[len(_BEARER) :].strip()
    return None


def owner_of(context: grpc.aio.ServicerContext[Any, Any], keys_configured: bool) -> str:
    """The calling owner's id ("" when auth is off); the interceptor already checked the key."""
    if not keys_configured:
        return ""
    key = _presented_key(context.invocation_metadata())
    return owner_id(key) if key else ""


def load_api_keys(path: Path | None = None, env_var: str = "TRAINER_API_KEYS") -> frozenset[str]:
    """Keys from a file (one per line, ``#`` comments) and/or a comma-separated env var."""
    keys: set[str] = set()
    if path is not None:
        for line in path.read_text().splitlines():
            key = line.split("#", 1)[0].strip()
            if key:
                keys.add(key)
    keys.update(k.strip() for k in os.environ.get(env_var, "").split(",") if k.strip())
    return frozenset(keys)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid ``authorization: Bearer`` key (health stays open)."""

    def __init__(self, keys: Sequence[str] | frozenset[str]) -> None:
        if not keys:
            raise ValueError("ApiKeyInterceptor needs at least one key")
        self._keys = [k.encode() for k in sorted(keys)]

    def _valid(self, key: str | None) -> bool:
        presented = (key or "").encode()
        ok = False
        for k in self._keys:  # compare against every key: the time does not say which matched
            ok |= hmac.compare_digest(presented, k)
        return ok and key is not None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Let open methods and calls with an accepted key through; refuse the rest UNAUTHENTICATED."""
        method = handler_call_details.method
        if method.startswith(OPEN_METHOD_PREFIXES):
            return await continuation(handler_call_details)
        key = _presented_key(handler_call_details.invocation_metadata)
        if self._valid(key):
            return await continuation(handler_call_details)
        message = "missing API key: send 'authorization: Bearer <key>'" if key is None else "invalid API key"
        return _deny(handler_call_details, await continuation(handler_call_details), message)


def _deny(
    details: grpc.HandlerCallDetails, handler: grpc.RpcMethodHandler[Any, Any] | None, message: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same streaming shape that answers UNAUTHENTICATED."""

    async def abort(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(abort)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)
