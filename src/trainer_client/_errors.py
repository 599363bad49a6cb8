"""The client's exception tree; gRPC errors are translated here and nowhere else.

::

    TrainerError
    ├── APIStatusError                 a status from the server (or the transport)
    │   ├── CallCancelledError         CANCELLED
    │   ├── UnknownError               UNKNOWN
    │   ├── InvalidArgumentError       INVALID_ARGUMENT
    │   ├── DeadlineExceededError      DEADLINE_EXCEEDED
    │   ├── NotFoundError              NOT_FOUND
    │   ├── AlreadyExistsError         ALREADY_EXISTS
    │   ├── PermissionDeniedError      PERMISSION_DENIED
    │   ├── ResourceExhaustedError     RESOURCE_EXHAUSTED
    │   ├── FailedPreconditionError    FAILED_PRECONDITION
    │   ├── AbortedError               ABORTED
    │   ├── OutOfRangeError            OUT_OF_RANGE
    │   ├── UnimplementedError         UNIMPLEMENTED
    │   ├── InternalError              INTERNAL
    │   ├── UnavailableError           UNAVAILABLE
    │   ├── DataLossError              DATA_LOSS
    │   └── UnauthenticatedError       UNAUTHENTICATED
    ├── ClientClosedError              the client or session was closed (also a RuntimeError)
    ├── LossFunctionError              the user's loss_fn raised or returned something unusable
    ├── ProtocolError                  the server sent a stream the client cannot make sense of
    └── PreviousCallFailedError        an earlier call on the session failed and nobody read its error

A failed connection is worded for what the user can do (``no trainer-server at HOST:PORT (is it
running?)``, a plaintext client meeting a TLS server, a TLS client meeting a plaintext one),
with gRPC's own details kept at the end of the message.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

__all__ = [
    "APIStatusError",
    "AbortedError",
    "AlreadyExistsError",
    "CallCancelledError",
    "ClientClosedError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "LossFunctionError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "PreviousCallFailedError",
    "ProtocolError",
    "ResourceExhaustedError",
    "TrainerError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "after_retries",
    "from_grpc_error",
    "from_status",
]


class TrainerError(Exception):
    """Root of every error this client raises."""


class APIStatusError(TrainerError):
    """A call ended with a non-OK gRPC status.

    Attributes:
        code: the gRPC status code.
        details: the server's message.
        method: the RPC that failed, e.g. ``"OptimStep"``.
        attempts: how many times the call was tried (more than 1 after retries on UNAVAILABLE).
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    attempts: int = 1

    def __init__(self, details: str, *, code: grpc.StatusCode | None = None, method: str = "") -> None:
        if code is not None:
            self.code = code
        self.details = details
        self.method = method
        prefix = f"{method}: " if method else ""
        super().__init__(f"{prefix}{self.code.name}: {details}")


class CallCancelledError(APIStatusError):
    """The call was cancelled."""

    code = grpc.StatusCode.CANCELLED


class UnknownError(APIStatusError):
    """The server failed in a way it could not classify."""

    code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(APIStatusError):
    """The request was malformed; the session's state is unchanged."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(APIStatusError):
    """The call's deadline passed before it finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(APIStatusError):
    """The session, model or checkpoint does not exist (or belongs to another key)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(APIStatusError):
    """The sequence number or name is already taken."""

    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(APIStatusError):
    """The caller may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(APIStatusError):
    """A limit was hit; the message names it."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(APIStatusError):
    """The session is not in a state that allows the call."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(APIStatusError):
    """The call was aborted (e.g. a sequence gap that never closed); nothing was applied."""

    code = grpc.StatusCode.ABORTED


class OutOfRangeError(APIStatusError):
    """A value was outside its valid range."""

    code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(APIStatusError):
    """The server does not implement this call."""

    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(APIStatusError):
    """The server hit an internal error."""

    code = grpc.StatusCode.INTERNAL


class UnavailableError(APIStatusError):
    """The server could not be reached or is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class DataLossError(APIStatusError):
    """Data was lost or corrupted."""

    code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(APIStatusError):
    """The API key is missing or wrong."""

    code = grpc.StatusCode.UNAUTHENTICATED


class ClientClosedError(TrainerError, RuntimeError):
    """The client or the training session was closed; open a new one to go on."""


class LossFunctionError(TrainerError):
    """The user's loss function raised or returned something unusable."""


class ProtocolError(TrainerError):
    """The server's reply stream did not follow the protocol."""


class PreviousCallFailedError(TrainerError):
    """An earlier call on this session failed and its error was never retrieved."""


_BY_CODE: dict[grpc.StatusCode, type[APIStatusError]] = {
    cls.code: cls
    for cls in (
        CallCancelledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}


def _connection_hint(details: str, target: str, tls: bool) -> str:
    """What a failed connection means for the user, or "" when it is not a connection failure."""
    if "Socket closed" in details and not tls:
        return (
            f"the server at {target} closed the connection during the handshake: it may serve TLS "
            "(connect with tls=True, or root_certificates=..., or --tls on the command line)"
        )
    if "handshake failed" in details.lower() and tls:
        return (
            f"the TLS handshake with {target} failed: the server may be plaintext (connect without "
            "tls/root_certificates), or its certificate is not signed by the roots given"
        )
    if any(s in details for s in ("Connection refused", "DNS resolution failed", "failed to connect", "No route")):
        return f"no trainer-server at {target} (is it running?)"
    return ""


def after_retries(errors: Sequence[APIStatusError]) -> APIStatusError:
    """The error to raise once retries are spent: the last one, with every distinct reason kept.

    Attempts often fail for different reasons: a server answers UNAVAILABLE saying why
    ("the server lost one of its 2 processes and must be restarted"), then goes away, and
    the later attempts only say "failed to connect to all addresses". The first reason is
    the explanation, so the details list the distinct reasons in the order they came.
    """
    last = errors[-1]
    if len(errors) == 1:
        return last
    first, *later = dict.fromkeys(e.details for e in errors)  # distinct, in order
    details = first if not later else f"{first}; later attempts: {'; '.join(later)}"
    error = type(last)(f"{details} ({len(errors)} attempts)", code=last.code, method=last.method)
    error.attempts = len(errors)
    return error


def from_status(
    code: grpc.StatusCode, details: str | None, method: str, *, target: str = "", tls: bool = False
) -> APIStatusError:
    """The exception for a non-OK status; ``target`` and ``tls`` word connection failures."""
    details = details or ""
    if code == grpc.StatusCode.UNAVAILABLE and target:
        hint = _connection_hint(details, target, tls)
        if hint:
            details = f"{hint} [{details}]"
    return _BY_CODE.get(code, UnknownError)(details, code=code, method=method)


def from_grpc_error(exc: grpc.aio.AioRpcError, method: str, *, target: str = "", tls: bool = False) -> APIStatusError:
    """Translate a gRPC error into the matching exception class (the caller chains it)."""
    return from_status(exc.code(), exc.details(), method, target=target, tls=tls)
