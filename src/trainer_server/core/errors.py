"""Errors the core raises, with a transport-neutral code that each front end translates.

Core code raises :class:`ServiceError` with an :class:`ErrorCode` and a message written for
the user (what was wrong, where, and the limit or fix). Each front end translates it in
exactly one place: the gRPC servicer into a status (``frontends.grpc_servicer``), the
Tinker HTTP front end into an HTTP status and the SDK's error body. Anything else that
escapes is a bug: it is logged with its traceback and answered INTERNAL without it.

The codes are gRPC's canonical ones (the gRPC front end maps them by name), because they
are the vocabulary the product contract is written in.
"""

from __future__ import annotations

import enum

__all__ = [
    "ErrorCode",
    "ServiceError",
    "failed_precondition",
    "invalid_argument",
    "not_found",
    "resource_exhausted",
]


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
