"""The HTTP server's three doors, as pure ASGI middlewares (cheap: no request objects are built).

    MetricsMiddleware    outermost: counts and times every request by route, adapter and status
    AuthMiddleware       the API key is looked up before a byte of the body is read
    BodyLimitMiddleware  a body is read within a time limit and up to its size limit, counted on the
                         byte stream (chunked or not): no request makes the server hold more than that

A refusal by the last two closes the connection: the body was not read (or not all of it), and
draining the rest would let the client go on sending.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse

from .errors import PayloadTooLarge, RequestTimeout, ServeError
from .http_errors import as_json, status_of
from .metrics import ServeMetrics
from .tenants import Tenants

MAX_UPLOAD = 256 << 20
MAX_JSON = 16 << 20
BODY_TIMEOUT_S = 30.0
UPLOAD_DEADLINE_S = 600.0
#: paths anyone may call without a key
OPEN_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})


class MetricsMiddleware:
    """Counts and times every request by route template, adapter and status (the route handlers
    name the adapter and the error code in the request's state)."""

    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        start = time.perf_counter()
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            adapter = state.get("adapter", "-")
            self.metrics.requests.labels(path, adapter, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)
            if status >= 400:
                self.metrics.errors.labels(path, adapter, state.get("error", str(status))).inc()


class AuthMiddleware:
    """Unauthorized (401) before the body is read; the routes read the principal from the state."""

    def __init__(self, app: Any, tenants: Tenants | None) -> None:
        self.app, self.tenants = app, tenants

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.tenants is not None and scope.get("path") not in OPEN_PATHS:
            try:
                scope.setdefault("state", {})["principal"] = self.tenants.lookup(api_key(scope))
            except ServeError as err:
                await refuse(err, scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """JSON bodies are read whole now, bounded in size and time, and replayed to the route; archive
    uploads stream through, counted, each piece within `body_timeout_s`."""

    def __init__(self, app: Any, max_json: int = MAX_JSON, max_upload: int = MAX_UPLOAD,
                 body_timeout_s: float = BODY_TIMEOUT_S) -> None:
        self.app, self.max_json, self.max_upload, self.body_timeout_s = app, max_json, max_upload, body_timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            try:
                if scope["method"] == "PUT" and content_type(scope) != "application/json":
                    receive = self._counted(receive)  # archives stream to disk, bounded here and there
                elif scope["method"] in ("POST", "PATCH", "PUT"):
                    receive = await self._buffered(scope, receive)
            except ServeError as err:
                await refuse(err, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _buffered(self, scope: dict, receive: Any) -> Any:
        if content_length(scope) > self.max_json:
            raise PayloadTooLarge(f"request bodies are limited to {self.max_json} bytes")
        chunks, size, more = [], 0, True
        deadline = time.monotonic() + self.body_timeout_s
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise RequestTimeout(f"the request body did not arrive within {self.body_timeout_s:g} s") from None
            if message["type"] == "http.disconnect":
                break
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_json:
                raise PayloadTooLarge(f"request bodies are limited to {self.max_json} bytes")
            chunks.append(body)
            more = message.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> dict:
            return replay.pop() if replay else await receive()

        return replayed

    def _counted(self, receive: Any) -> Any:
        """An upload's body: at most `max_upload` bytes (plus room for multipart framing), each piece
        within `body_timeout_s`, the whole within `UPLOAD_DEADLINE_S`."""
        limit, seen = self.max_upload + (1 << 20), [0]
        deadline = time.monotonic() + UPLOAD_DEADLINE_S

        async def counted() -> dict:
            wait = min(self.body_timeout_s, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), max(0.0, wait))
            except asyncio.TimeoutError:
                raise RequestTimeout(f"the upload did not arrive in time ({self.body_timeout_s:g} s without data, "
                                     f"or {UPLOAD_DEADLINE_S:g} s in all)") from None
            seen[0] += len(message.get("body", b""))
            if seen[0] > limit:
                raise PayloadTooLarge(f"uploads are limited to {self.max_upload} bytes")
            return message

        return counted


async def refuse(err: ServeError, scope: dict, receive: Any, send: Any) -> None:
    """Answer `err` before the route runs, and close the connection."""
    scope.setdefault("state", {})["error"] = err.code
    headers = {"connection": "close"}
    if status_of(err) == 401:
        headers["WWW-Authenticate"] = "Bearer"
    await JSONResponse(as_json(err), status_code=status_of(err), headers=headers)(scope, receive, send)


def api_key(scope: Mapping[str, Any]) -> str | None:
    """The key of `X-API-Key`, else of `Authorization: Bearer` (the first of each header)."""
    key = auth = None
    for name, value in scope.get("headers", ()):
        if name == b"x-api-key" and key is None:
            key = value.decode("latin-1")
        elif name == b"authorization" and auth is None:
            auth = value.decode("latin-1")
    if not key and auth and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    return key


def content_type(scope: Mapping[str, Any]) -> str:
    for key, value in scope.get("headers", ()):
        if key == b"content-type":
            return value.decode("latin-1").split(";")[0].strip().lower()
    return ""


def content_length(scope: Mapping[str, Any]) -> int:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0
