"""Errors of the serving engine, by what went wrong (not found, forbidden, bad input, over quota,
busy, ...). They know nothing of HTTP: `http_errors.py` maps them to status codes, in one place."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

#: what a caller is told of an error the server did not expect (the log has the rest)
INTERNAL_ERROR = "the server failed on this request; the failure is logged"


class ServeError(Exception):
    """Base class: `code` is a short machine-readable name, `param` the request field at fault."""

    code = "internal_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


class BadRequest(ServeError):
    code = "bad_request"


class BadUpload(BadRequest):
    """An upload that is not a safe archive of one adapter folder."""

    code = "bad_upload"


class Unauthorized(ServeError):
    code = "unauthorized"


class Forbidden(ServeError):
    code = "forbidden"


class QuotaExceeded(Forbidden):
    """The tenant's quota of adapters or bytes on disk is used up."""

    code = "quota_exceeded"


class NotFound(ServeError):
    """Unknown adapter, or one that belongs to another tenant (the two read the same)."""

    code = "not_found"


class Withdrawn(NotFound):
    """The version a request was queued for was rolled back or pruned before it was read (the
    engine asks again for the live one)."""


class Conflict(ServeError):
    code = "conflict"


class RequestTimeout(ServeError):
    code = "request_timeout"


class PayloadTooLarge(ServeError):
    code = "too_large"


class InvalidAdapter(ServeError):
    """A well-formed upload that is not a valid adapter for this base model."""

    code = "invalid_adapter"


class Unmixable(ServeError):
    """A mixture of adapters that cannot answer as one: heads with different label sets."""

    code = "unmixable"


class Overloaded(ServeError):
    code = "overloaded"


class NonFiniteOutput(ServeError):
    """The adapter's rows came out NaN or infinite (overflowing weights or scale): those rows fail,
    the batch they shared answers everyone else."""

    code = "non_finite_output"


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
