"""HTTP errors of the Tinker front end, in the shape the tinker SDK turns into its exceptions.

The SDK builds an exception from the status code (``tinker._client._make_status_error``):
400 ``BadRequestError``, 401 ``AuthenticationError``, 404 ``NotFoundError``, 409
``ConflictError``, 413 ``APIStatusError``, 429 ``RateLimitError``, 5xx
``InternalServerError``; its message is ``Error code: N - <JSON body>``. Every error here
has a JSON body ``{"detail": message}`` (FastAPI's shape, which Tinker's server uses): a
bare 400 would be retried by the SDK as a proxy glitch.

Failures of accepted work do not use HTTP errors: they complete the request's future with
``{"error": message, "category": "user" | "server"}``, which the SDK raises as
``RequestFailedError``.

Tree::

    HTTPError
    ├── BadRequest          400
    ├── Unauthenticated     401
    ├── NotFound            404
    ├── Conflict            409  (never retried: ``x-should-retry: false``)
    │   └── SeqGapError          (a future's failure: an earlier seq_id never arrived)
    ├── PayloadTooLarge     413
    ├── NotSupported        400  (a hosted-service route: "not supported by this server")
    ├── TooManyRequests     429
    └── ServiceUnavailable  503
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from trainer_server.frontends.tinker import backend

__all__ = [
    "BadRequest",
    "Conflict",
    "HTTPError",
    "NotFound",
    "NotSupported",
    "PayloadTooLarge",
    "SeqGapError",
    "ServiceUnavailable",
    "TooManyRequests",
    "Unauthenticated",
    "error_category",
    "from_backend",
]


class HTTPError(Exception):
    """An error answered as an HTTP status with a JSON ``detail``."""

    status = 500
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def response(self) -> JSONResponse:
        """The HTTP response: status, ``{"detail": message}`` and whether to retry."""
        headers = {} if self.retryable else {"x-should-retry": "false"}
        return JSONResponse({"detail": self.message}, status_code=self.status, headers=headers)


class BadRequest(HTTPError):
    """Malformed or invalid request."""

    status = 400


class Unauthenticated(HTTPError):
    """Missing or unknown API key."""

    status = 401


class NotFound(HTTPError):
    """Unknown route, or an id unknown to (or not owned by) the caller."""

    status = 404


class Conflict(HTTPError):
    """The request conflicts with state (a reused seq_id, a finished session)."""

    status = 409


class SeqGapError(Conflict):
    """A training call's predecessor never arrived; the call was not applied."""


class PayloadTooLarge(HTTPError):
    """The body (or its decompressed form) exceeds the server's limit."""

    status = 413


class NotSupported(HTTPError):
    """A hosted-service route (billing, projects, publishing ...) this server does not offer.

    400, not 501: the SDK retries every 5xx for five minutes, and a 404 would read as a
    missing resource. 400 surfaces at once as ``BadRequestError`` with the message.
    """

    status = 400


class TooManyRequests(HTTPError):
    """A server limit; the SDK backs off and retries."""

    status = 429
    retryable = True


class ServiceUnavailable(HTTPError):
    """Loading or shutting down; the SDK retries."""

    status = 503
    retryable = True


_FROM_BACKEND: dict[type[backend.BackendError], type[HTTPError]] = {
    backend.InvalidInput: BadRequest,
    backend.NotFound: NotFound,
    backend.Conflict: Conflict,
    backend.LimitExceeded: TooManyRequests,
    backend.Unavailable: ServiceUnavailable,
}


def from_backend(exc: backend.BackendError) -> HTTPError:
    """The HTTP error for a backend refusal (500 for an unclassified one)."""
    for kind, http in _FROM_BACKEND.items():
        if isinstance(exc, kind):
            return http(str(exc))
    return HTTPError(str(exc))


_USER_ERRORS = (backend.InvalidInput, backend.NotFound, backend.Conflict, backend.LimitExceeded, HTTPError)


def error_category(exc: BaseException) -> str:
    """Tinker's ``RequestErrorCategory`` of a failed future: ``user`` for bad input, else ``server``.

    A :class:`SeqGapError` (the client never sent an earlier call) counts as the user's.
    """
    if isinstance(exc, HTTPError) and exc.status >= 500:
        return "server"
    return "user" if isinstance(exc, _USER_ERRORS) else "server"
