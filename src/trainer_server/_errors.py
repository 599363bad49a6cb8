"""Errors the engine raises for the servicer to turn into gRPC statuses.

Engine code raises :class:`ServiceError` with a status code and a message written for
the user (what was wrong, where, and the limit or fix); the servicer translates it in
exactly one place (``_servicer.translate_errors``). Anything else that escapes is a bug:
it is logged with its traceback and answered INTERNAL without the traceback.

A message travels in the status's ``grpc-message`` trailer, which clients refuse past a
few KiB ("received metadata size exceeds hard limit"), so user input is never echoed
whole: every echo goes through :func:`echo`, and the boundary passes every message
through :func:`cap_message` as a safety net.
"""

from __future__ import annotations

import grpc

__all__ = [
    "ECHO_CHARS",
    "MAX_MESSAGE_BYTES",
    "ServiceError",
    "cap_message",
    "echo",
    "invalid_argument",
    "not_found",
    "resource_exhausted",
]

ECHO_CHARS = 64
"""The most characters of one user-supplied value that a message repeats."""
MAX_MESSAGE_BYTES = 2048
"""The most bytes a status message takes on the wire (percent-encoded, as ``grpc-message`` is)."""


def echo(value: str, limit: int = ECHO_CHARS) -> str:
    """A user-supplied string as a message may quote it: ``repr``, cut to ``limit`` characters.

    ``repr`` makes control characters visible (a newline shows as backslash-n); a longer
    value is cut and its length named, e.g. ``'aaaa…'... (1048576 characters)``.
    """
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def _wire_bytes(char: str) -> int:
    """Bytes one character takes in ``grpc-message`` (UTF-8, non-printable bytes as ``%XX``)."""
    return sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in char.encode("utf-8", "replace"))


def cap_message(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``message`` cut so that it fits ``limit`` bytes on the wire, saying that it was cut."""
    if len(message) * 12 <= limit:  # a character takes at most 4 UTF-8 bytes, each at most 3 on the wire
        return message
    suffix = "... (message truncated)"
    room = limit - len(suffix)
    used = 0
    for i, char in enumerate(message):
        used += _wire_bytes(char)
        if used > room:
            return message[:i] + suffix
    return message


class ServiceError(Exception):
    """A failure with a precise gRPC status and a user-facing message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid_argument(message: str) -> ServiceError:
    """INVALID_ARGUMENT: the request is malformed; nothing was applied."""
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServiceError:
    """NOT_FOUND: the named session or model does not exist."""
    return ServiceError(grpc.StatusCode.NOT_FOUND, message)


def resource_exhausted(message: str) -> ServiceError:
    """RESOURCE_EXHAUSTED: a configured limit was hit; the message names it."""
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
