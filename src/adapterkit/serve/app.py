"""The HTTP API (FastAPI): inference, adapter management, health and metrics.

`create_app(engine, keys)` builds the app around an Engine; `keys` is a keys file (see
`tenants.py`), a dict, or None for a single-tenant server. OpenAPI docs are at /docs. The routes are
in routes.py and openai_api.py, the three middlewares (metrics, authentication, body limits) in
middleware.py, the mapping of the engine's errors to HTTP in http_errors.py.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import AdapterError
from .engine import Engine
from .errors import INTERNAL_ERROR, ServeError
from .http_errors import as_json, error_body, status_of
from .middleware import (
    BODY_TIMEOUT_S,
    MAX_JSON,
    MAX_UPLOAD,
    AuthMiddleware,
    BodyLimitMiddleware,
    MetricsMiddleware,
    api_key,
)
from .openai_api import OPENAI_PATHS, openai_router
from .routes import adapters_router, inference_router, operations_router
from .tenants import SINGLE_TENANT, Principal, Tenants


def create_app(engine: Engine, keys: str | os.PathLike | dict | Tenants | None = None, *,
               max_upload_bytes: int = MAX_UPLOAD, max_json_bytes: int = MAX_JSON,
               body_timeout_s: float = BODY_TIMEOUT_S, close_engine: bool = False,
               served_name: str | None = None) -> FastAPI:
    """`served_name`: the base model's name in the OpenAI API (default: the last part of its path or id)."""
    tenants = keys if isinstance(keys, Tenants) or keys is None else Tenants(keys)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if close_engine:
            await run_in_threadpool(engine.close)

    app = FastAPI(title="adapterkit serve", version="1", lifespan=lifespan,
                  description="Many adapters on one base model: per-request routing, hot load, tenants.")
    # the last added runs first: metrics see every answer, the key is checked before the body is read
    app.add_middleware(BodyLimitMiddleware, max_json=max_json_bytes, max_upload=max_upload_bytes,
                       body_timeout_s=body_timeout_s)
    app.add_middleware(AuthMiddleware, tenants=tenants)
    app.add_middleware(MetricsMiddleware, metrics=engine.metrics)

    async def principal(request: Request) -> Principal:
        if tenants is None:
            return SINGLE_TENANT
        # the middleware looked the key up before the body was read
        return getattr(request.state, "principal", None) or tenants.lookup(api_key(request.scope))

    app.include_router(inference_router(engine, principal))
    app.include_router(openai_router(engine, principal, served_name))
    app.include_router(adapters_router(engine, principal, max_upload_bytes))
    app.include_router(operations_router(engine, principal))

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, err: ServeError) -> JSONResponse:
        request.state.error = err.code
        status = status_of(err)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse(as_json(err, engine.redact), status_code=status, headers=headers)

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
