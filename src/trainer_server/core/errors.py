"""Errors the core raises, with a transport-neutral code that each front end translates.

Core code raises :class:`ServiceError` with an :class:`ErrorCode` and a message written for
the user (what was wrong, where, and the limit or fix). Each front end translates it in
exactly one place: the gRPC servicer into a status (``frontends.grpc_servicer``), the
Tinker HTTP front end into an HTTP status and the SDK's error body. Anything else that
escapes is a bug: it is logged with its traceback and answered INTERNAL without it.

The codes are gRPC's canonical ones (the gRPC front end maps them by name), because they
are the vocabulary the product contract is written in.

A message travels in the status's ``grpc-message`` trailer (or an HTTP body), which clients
refuse past a few KiB ("received metadata size exceeds hard limit"), so user input is never
echoed whole: every echo goes through :func:`echo`, and each front end's error boundary
passes every message through :func:`cap_message` as a safety net.
"""

from __future__ import annotations

import enum

__all__ = [
    "ECHO_CHARS",
    "MAX_MESSAGE_BYTES",
    "ErrorCode",
    "ServiceError",
    "cap_message",
    "echo",
    "failed_precondition",
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


class ErrorCode(enum.Enum):
    """Why a call failed (gRPC's canonical status codes, without the transport)."""

    CANCELLED = "cancelled"
    UNKNOWN = "unknown"
    INVALID_ARGUMENT = "invalid_argument"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    PERMISSION_DENIED = "permission_denied"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    FAILED_PRECONDITION = "failed_precondition"
    ABORTED = "aborted"
    OUT_OF_RANGE = "out_of_range"
    UNIMPLEMENTED = "unimplemented"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"
    DATA_LOSS = "data_loss"
    UNAUTHENTICATED = "unauthenticated"


class ServiceError(Exception):
    """A failure with a precise code and a user-facing message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid_argument(message: str) -> ServiceError:
    """INVALID_ARGUMENT: the request is malformed; nothing was applied."""
    return ServiceError(ErrorCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServiceError:
    """NOT_FOUND: the named session, model or checkpoint does not exist."""
    return ServiceError(ErrorCode.NOT_FOUND, message)


def resource_exhausted(message: str) -> ServiceError:
    """RESOURCE_EXHAUSTED: a configured limit was hit; the message names it."""
    return ServiceError(ErrorCode.RESOURCE_EXHAUSTED, message)


def failed_precondition(message: str) -> ServiceError:
    """FAILED_PRECONDITION: the call cannot run in the session's present state."""
    return ServiceError(ErrorCode.FAILED_PRECONDITION, message)
