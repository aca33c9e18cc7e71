"""The one place where the engine's errors become HTTP: status codes and the JSON error body.

Every answer that is not a success has OpenAI's shape, `{"error": {"code", "message", "type",
"param"}}`, so one shape serves this API and the OpenAI-compatible one.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import (
    BadRequest,
    Conflict,
    Forbidden,
    InvalidAdapter,
    NonFiniteOutput,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServeError,
    Unauthorized,
    Unmixable,
)

#: the HTTP status of each error class (a subclass answers as its nearest listed ancestor)
STATUS: dict[type[ServeError], int] = {
    BadRequest: 400, Unauthorized: 401, Forbidden: 403, NotFound: 404, RequestTimeout: 408, Conflict: 409,
    PayloadTooLarge: 413, InvalidAdapter: 422, NonFiniteOutput: 422, Unmixable: 422, Overloaded: 503,
}

#: OpenAI's error types by HTTP status
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 409: "conflict_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 503: "overloaded_error"}


def status_of(err: ServeError) -> int:
    """The HTTP status a client sees for `err` (500 for an error class not listed)."""
    return next((STATUS[cls] for cls in type(err).__mro__ if cls in STATUS), 500)


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(code: str, message: str, status: int, param: str | None = None) -> dict:
    return {"error": {"code": code, "message": message, "type": error_type(status), "param": param}}


def as_json(err: ServeError, redact: Callable[[str], str] = str) -> dict:
    """The error body of an engine error, its message passed through `redact`."""
    return error_body(err.code, redact(err.message), status_of(err), err.param)
