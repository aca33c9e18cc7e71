"""The HTTP API (FastAPI): inference, adapter management, health and metrics.

`create_app(engine, keys)` builds the app around an Engine; `keys` is a keys file (see
`tenants.py`), a dict, or None for a single-tenant server. OpenAPI docs are at /docs.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, StrictBool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import AdapterError
from .engine import Engine
from .errors import (
    INTERNAL_ERROR,
    BadRequest,
    BadUpload,
    Forbidden,
    PayloadTooLarge,
    RequestTimeout,
    ServeError,
    error_body,
    not_found,
)
from .metrics import ServeMetrics
from .openai_api import OPENAI_PATHS, add_openai_routes
from .tenants import SINGLE_TENANT, Principal, Tenants, valid_name

MAX_UPLOAD = 256 << 20
MAX_JSON = 16 << 20
BODY_TIMEOUT_S = 30.0
UPLOAD_DEADLINE_S = 600.0
#: paths anyone may call without a key
OPEN_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
ARCHIVE = {"schema": {"type": "string", "format": "binary"}}
UPLOAD_DOC = {"requestBody": {"content": {
    "application/x-tar": ARCHIVE, "application/gzip": ARCHIVE, "application/zip": ARCHIVE,
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": ARCHIVE}}},
    "application/json": {"schema": {"type": "object", "properties": {"source": {
        "type": "string", "description": "an adapter folder already in the store, relative to your part of it"}}}},
}}}


class ClassifyIn(BaseModel):
    adapter: str | None = Field(None, description="adapter name (admin: '<tenant>/<name>'); none: the base model")
    inputs: list[str]


class EmbedIn(ClassifyIn):
    normalize: StrictBool = Field(False, description="L2-normalise the mean-pooled vectors")


class GenerateIn(BaseModel):
    adapter: str | None = None
    prompt: str
    max_new_tokens: int = 32
    temperature: float = Field(0.0, description="0: greedy", allow_inf_nan=False)
    seed: int | None = None
    stream: StrictBool = Field(False, description="server-sent events, one per token, then a final summary")


def create_app(engine: Engine, keys: str | os.PathLike | dict | Tenants | None = None, *,
               max_upload_bytes: int = MAX_UPLOAD, max_json_bytes: int = MAX_JSON,
               body_timeout_s: float = BODY_TIMEOUT_S, close_engine: bool = False,
               served_name: str | None = None) -> FastAPI:
    """`served_name`: the base model's name in the OpenAI API (default: the last part of its path or id)."""
    tenants = keys if isinstance(keys, Tenants) or keys is None else Tenants(keys)
    metrics = engine.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if close_engine:
            await run_in_threadpool(engine.close)

    app = FastAPI(title="adapterkit serve", version="1", lifespan=lifespan,
                  description="Many adapters on one base model: per-request routing, hot load, tenants.")
    app.add_middleware(_MetricsMiddleware, metrics=metrics, max_json=max_json_bytes, max_upload=max_upload_bytes,
                       tenants=tenants, body_timeout_s=body_timeout_s)

    async def principal(request: Request) -> Principal:
        if tenants is None:
            return SINGLE_TENANT
        # the middleware looked the key up before the body was read
        return getattr(request.state, "principal", None) or tenants.lookup(_api_key(request.scope))

    def adapter_of(request: Request, who: Principal, ref: str | None) -> tuple[str, str | None]:
        if ref is None:
            request.state.adapter = "base"
            return who.tenant, None
        tenant, name = who.resolve(ref)
        engine.key(tenant, name)  # 404 before the label, so unknown names do not become metric labels
        request.state.adapter = f"{tenant}/{name}"
        return tenant, name

    # --- inference ------------------------------------------------------------------------------

    @app.post("/v1/classify", summary="Labels and scores of each input, from the adapter's own head")
    async def classify(body: ClassifyIn, request: Request, who: Principal = Depends(principal)) -> Any:
        tenant, name = adapter_of(request, who, body.adapter)
        return JSONResponse(await asyncio.wrap_future(engine.submit("classify", body.inputs, name, tenant)))

    @app.post("/v1/embed", summary="Mean-pooled last hidden state of each input, with the adapter routed")
    async def embed(body: EmbedIn, request: Request, who: Principal = Depends(principal)) -> Any:
        tenant, name = adapter_of(request, who, body.adapter)
        return JSONResponse(
            await asyncio.wrap_future(engine.submit("embed", body.inputs, name, tenant, normalize=body.normalize))
        )

    @app.post("/v1/generate", summary="Text generation (causal-LM bases); stream=true for server-sent events")
    async def generate(body: GenerateIn, request: Request, who: Principal = Depends(principal)) -> Any:
        tenant, name = adapter_of(request, who, body.adapter)
        options = {"max_new_tokens": body.max_new_tokens, "temperature": body.temperature, "seed": body.seed}
        if engine.task != "causal_lm":  # before a stream starts: once it has, the status is 200
            raise BadRequest(f"generation needs a causal-LM base; this server's base is a {engine.task} model")
        if not body.stream:
            return JSONResponse(await asyncio.wrap_future(engine.submit_generate(body.prompt, name, tenant, **options)))
        return StreamingResponse(_stream(engine, body.prompt, name, tenant, options), media_type="text/event-stream")

    add_openai_routes(app, engine, principal, served_name)

    # --- adapters -------------------------------------------------------------------------------

    @app.get("/v1/adapters", summary="Your adapters: live version, method, size, loaded or not")
    async def list_adapters(tenant: str | None = None, who: Principal = Depends(principal)) -> Any:
        if tenant is not None and not valid_name(tenant):
            raise BadRequest(f"tenant {tenant!r}: a tenant name, not a path")
        scope = (tenant if who.admin else who.tenant)
        records = await run_in_threadpool(engine.adapters, scope)
        return {"adapters": [_public(r, who) for r in records]}

    @app.get("/v1/adapters/{name:path}", summary="One adapter")
    async def get_adapter(name: str, request: Request, who: Principal = Depends(principal)) -> Any:
        tenant, adapter = adapter_of(request, who, name)
        records = [r for r in await run_in_threadpool(engine.adapters, tenant) if r["name"] == adapter]
        if not records:  # deleted between the lookup and the listing
            raise not_found(tenant, adapter)
        return _public(records[0], who)

    @app.put("/v1/adapters/{name:path}", status_code=201, openapi_extra=UPLOAD_DOC,
             summary="Upload a new version (tar/zip of an adapter folder, or a folder in the store); live at once")
    async def put_adapter(name: str, request: Request, who: Principal = Depends(principal)) -> Any:
        tenant, adapter = who.new_ref(name)
        request.state.adapter = f"{tenant}/{adapter}"
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            source = (await _json_body(request)).get("source")
            if not isinstance(source, str) or not source:
                raise BadRequest("JSON body: {'source': '<adapter folder in the store>'}")
            root = engine.store.root if who.admin else engine.store.root / who.tenant
            record = await run_in_threadpool(engine.put, tenant, adapter, source=root / source, source_root=root)
        else:
            path = await _spool_upload(request, kind, max_upload_bytes, engine.store.spool, engine.store.owned("upload-"))
            try:
                record = await run_in_threadpool(engine.put, tenant, adapter, archive=path)
            finally:
                path.unlink(missing_ok=True)
        return JSONResponse(_public(record, who), status_code=201)

    @app.post("/v1/adapters/{name:path}/rollback", summary="Make the previously live version live again")
    async def rollback(name: str, request: Request, who: Principal = Depends(principal)) -> Any:
        tenant, adapter = adapter_of(request, who, name)
        return _public(await run_in_threadpool(engine.rollback, tenant, adapter), who)

    @app.delete("/v1/adapters/{name:path}", summary="Delete an adapter with all its versions")
    async def delete_adapter(name: str, request: Request, who: Principal = Depends(principal)) -> Any:
        tenant, adapter = adapter_of(request, who, name)
        result = await run_in_threadpool(engine.delete, tenant, adapter)
        return {"deleted": adapter if not who.admin else f"{tenant}/{adapter}", "versions": result["deleted_versions"]}

    # --- operations -----------------------------------------------------------------------------

    @app.get("/healthz", summary="Liveness and a few figures")
    async def healthz() -> Any:
        health = engine.health()
        return {k: health[k] for k in ("status", "task", "loaded", "queued_rows")}

    @app.get("/metrics", summary="Prometheus metrics (admin key when the server has keys)")
    async def prometheus(who: Principal = Depends(principal)) -> Response:
        if not who.admin:
            raise Forbidden("metrics need an admin key")
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --- errors ---------------------------------------------------------------------------------

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, err: ServeError) -> JSONResponse:
        request.state.error = err.code
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        body = error_body(err.code, engine.redact(err.message), err.status, err.param)
        return JSONResponse(body, status_code=err.status, headers=headers)

    @app.exception_handler(AdapterError)
    async def adapter_error(request: Request, err: AdapterError) -> JSONResponse:
        request.state.error = "invalid_adapter"
        return JSONResponse(error_body("invalid_adapter", engine.redact(str(err)), 422), status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        # Starlette logs the exception after this answer; the caller gets the documented shape,
        # and nothing of the server's internals
        request.state.error = "internal_error"
        return JSONResponse(error_body("internal_error", INTERNAL_ERROR, 500), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        request.state.error = code
        return JSONResponse(error_body(code, str(err.detail), err.status_code), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            request.state.error = "invalid_json"
            return JSONResponse(error_body("invalid_json", "the request body is not valid JSON", 400), status_code=400)
        request.state.error = "invalid_request"
        message = "; ".join(f"{'.'.join(str(x) for x in p.get('loc', ())[1:]) or 'body'}: {p.get('msg')}"
                            for p in problems[:5])
        # OpenAI's API answers a malformed request with 400 (its clients raise BadRequestError)
        status = 400 if request.url.path in OPENAI_PATHS else 422
        where = problems[0].get("loc", ())[1:] if problems else ()
        param = ".".join(str(x) for x in where) or None
        return JSONResponse(error_body("invalid_request", message, status, param), status_code=status)

    return app


async def _stream(engine: Engine, prompt: str, name: str | None, tenant: str, options: dict) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[int | None] = asyncio.Queue()
    future = engine.submit_generate(prompt, name, tenant, **options,
                                    on_token=lambda t: loop.call_soon_threadsafe(queue.put_nowait, t))
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
    tokens: list[int] = []
    sent = ""
    try:
        while (token := await queue.get()) is not None:
            tokens.append(token)
            text = engine.decode(tokens)
            piece, sent = text[len(sent):], text
            yield _event({"token": piece, "token_id": token})
        try:
            yield _event({"done": True, **future.result()})
        except ServeError as err:
            yield _event(err.as_json())
        except Exception:  # noqa: BLE001 - the stream has started; report in band
            yield _event(error_body("internal_error", INTERNAL_ERROR, 500))
    finally:
        future.cancel()


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _public(record: dict[str, Any], who: Principal) -> dict[str, Any]:
    out = dict(record)
    if not who.admin:
        out.pop("tenant", None)
    return out


async def _json_body(request: Request) -> dict:
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the JSON body must be an object")
    return data


async def _spool_upload(request: Request, kind: str, limit: int, folder: Path, prefix: str) -> Path:
    """The uploaded archive in a temporary file in `folder` (its name starting with `prefix`), at most
    `limit` bytes."""
    fd, name = tempfile.mkstemp(prefix=prefix, dir=folder)
    path = Path(name)
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            if kind == "multipart/form-data":
                form = await request.form(max_files=1, max_fields=4)
                try:
                    upload = form.get("file")
                    if not isinstance(upload, UploadFile):
                        raise BadUpload("multipart upload: put the archive in a form field named 'file'")
                    while chunk := await upload.read(1 << 20):
                        size += len(chunk)
                        if size > limit:
                            raise PayloadTooLarge(f"uploads are limited to {limit} bytes")
                        out.write(chunk)
                finally:
                    await form.close()  # starlette's own temporary file of the part
            else:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(f"uploads are limited to {limit} bytes")
                    out.write(chunk)
        if size == 0:
            raise BadUpload("empty upload: send a tar or zip archive of an adapter folder")
        return path
    except BaseException:
        path.unlink(missing_ok=True)
        raise


class _MetricsMiddleware:
    """Counts and times every request by route template, adapter and status (pure ASGI, cheap).

    It is also the door: the API key is checked before any body is read, and a body is read
    within `body_timeout_s` and up to its limit, counted on the byte stream (chunked or not),
    so no request makes the server hold more than the limit in memory.
    """

    def __init__(self, app: Any, metrics: ServeMetrics, max_json: int = MAX_JSON, max_upload: int = MAX_UPLOAD,
                 tenants: Tenants | None = None, body_timeout_s: float = BODY_TIMEOUT_S) -> None:
        self.app, self.metrics, self.max_json, self.max_upload = app, metrics, max_json, max_upload
        self.tenants, self.body_timeout_s = tenants, body_timeout_s

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
            try:
                self._check_key(scope)
                if scope["method"] == "PUT" and _content_type(scope) != "application/json":
                    receive = self._counted(receive)  # archives stream to disk, bounded here and there
                elif scope["method"] in ("POST", "PATCH", "PUT"):
                    receive = await self._buffered(scope, receive)
            except ServeError as err:
                state["error"] = err.code
                # The body was not read (or not all of it): close the connection rather than let the
                # client go on sending, or drain its rest to keep the connection alive.
                headers = {"connection": "close"}
                if err.status == 401:
                    headers["WWW-Authenticate"] = "Bearer"
                await JSONResponse(err.as_json(), status_code=err.status, headers=headers)(scope, receive, send_status)
                return
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            adapter = state.get("adapter", "-")
            self.metrics.requests.labels(path, adapter, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)
            if status >= 400:
                self.metrics.errors.labels(path, adapter, state.get("error", str(status))).inc()

    def _check_key(self, scope: dict) -> None:
        if self.tenants is None or scope.get("path") in OPEN_PATHS:
            return
        # Unauthorized before a byte of the body is read; the route's dependency reuses the answer
        scope["state"]["principal"] = self.tenants.lookup(_api_key(scope))

    async def _buffered(self, scope: dict, receive: Any) -> Any:
        """Read the whole (small, JSON) body now, bounded in size and time, and replay it to the app."""
        if _content_length(scope) > self.max_json:
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


def _api_key(scope: dict) -> str | None:
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


def _content_type(scope: dict) -> str:
    for key, value in scope.get("headers", ()):
        if key == b"content-type":
            return value.decode("latin-1").split(";")[0].strip().lower()
    return ""


def _content_length(scope: dict) -> int:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0
