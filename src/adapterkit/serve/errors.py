"""Errors of the serving layer; each carries the HTTP status a client should see."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

#: what a caller is told of an error the server did not expect (the log has the rest)
INTERNAL_ERROR = "the server failed on this request; the failure is logged"


class ServeError(Exception):
    """Base class: `status` is the HTTP status, `code` a short machine-readable name."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param

    def as_json(self) -> dict:
        """The error body; its fields are OpenAI's (message, type, param, code), so one shape serves
        both this API and the OpenAI-compatible one."""
        return error_body(self.code, self.message, self.status, self.param)


class BadRequest(ServeError):
    status, code = 400, "bad_request"


class BadUpload(BadRequest):
    """An upload that is not a safe archive of one adapter folder."""

    code = "bad_upload"


class Unauthorized(ServeError):
    status, code = 401, "unauthorized"


class Forbidden(ServeError):
    status, code = 403, "forbidden"


class QuotaExceeded(Forbidden):
    """The tenant's quota of adapters or bytes on disk is used up."""

    code = "quota_exceeded"


class NotFound(ServeError):
    """Unknown adapter, or one that belongs to another tenant (the two read the same)."""

    status, code = 404, "not_found"


class Withdrawn(NotFound):
    """The version a request was queued for was rolled back or pruned before it was read (the
    engine asks again for the live one)."""


class Conflict(ServeError):
    status, code = 409, "conflict"


class RequestTimeout(ServeError):
    status, code = 408, "request_timeout"


class PayloadTooLarge(ServeError):
    status, code = 413, "too_large"


class InvalidAdapter(ServeError):
    """A well-formed upload that is not a valid adapter for this base model."""

    status, code = 422, "invalid_adapter"


class Overloaded(ServeError):
    status, code = 503, "overloaded"


class NonFiniteOutput(ServeError):
    """The adapter's rows came out NaN or infinite (overflowing weights or scale): those rows fail,
    the batch they shared answers everyone else."""

    status, code = 422, "non_finite_output"


class RowFailure:
    """A result standing in for one row that failed on its own (the batcher fails its request only)."""

    __slots__ = ("error",)

    def __init__(self, error: ServeError) -> None:
        self.error = error


def non_finite() -> NonFiniteOutput:
    return NonFiniteOutput("the adapter's output for this input is NaN or infinite (its weights or scale "
                           "overflow); the adapter cannot answer it")


def not_found(tenant: str, name: str) -> NotFound:
    """The one message for 'no such adapter', whether or not another tenant has one by that name."""
    return NotFound(f"adapter {name!r} not found")


#: OpenAI's error types by HTTP status
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 409: "conflict_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 503: "overloaded_error"}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(code: str, message: str, status: int, param: str | None = None) -> dict:
    return {"error": {"code": code, "message": message, "type": error_type(status), "param": param}}


class Redactor:
    """Takes the server's own paths out of a message: an error names what the caller sent (its
    adapter, its upload), never where the server keeps it."""

    def __init__(self, store_root: str | os.PathLike, base: str | os.PathLike | None = None) -> None:
        roots = sorted({str(Path(store_root).absolute()), str(Path(store_root).resolve())}, key=len, reverse=True)
        self._rules: list[tuple[re.Pattern, Any]] = []
        for root in roots:
            here = re.escape(root)
            self._rules += [
                (re.compile(here + r"/\.(?:staging|spool|trash)/[^\s'\":,)]*"), "the upload"),
                (re.compile(here + r"/[\w.-]+/([\w.-]+)/v(\d+)(?:/[\w.-]+)?"), lambda m: f"adapter {m[1]!r} v{m[2]}"),
                (re.compile(here + r"(?:/[^\s'\":,)]*)?"), "the store"),
            ]
        if base is not None and os.path.isabs(str(base)):
            for path in {str(Path(base).absolute()), str(Path(base).resolve())}:
                self._rules.append((re.compile(re.escape(path) + r"[^\s'\":,)]*"), "the base model"))

    def __call__(self, message: str) -> str:
        for pattern, replacement in self._rules:
            message = pattern.sub(replacement, message)
        return message
