"""Errors the engine raises for the servicer to turn into gRPC statuses.

Engine code raises :class:`ServiceError` with a status code and a message written for
the user (what was wrong, where, and the limit or fix); the servicer translates it in
exactly one place (``_servicer.translate_errors``). Anything else that escapes is a bug:
it is logged with its traceback and answered INTERNAL without the traceback.
"""

from __future__ import annotations

import grpc

__all__ = ["ServiceError", "invalid_argument", "not_found", "resource_exhausted"]


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
