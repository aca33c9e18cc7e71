"""The HTTP routes, one router per concern: inference, adapters (management), operations.
The OpenAI-compatible routes are in openai_api.py; app.py puts them together."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypedDict, overload

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, StrictBool
from starlette.datastructures import UploadFile

from .batcher import RequestKind
from .engine import Engine, Target
from .errors import INTERNAL_ERROR, BadRequest, BadUpload, Forbidden, PayloadTooLarge, ServeError, not_found
from .http_errors import as_json, error_body
from .middleware import MAX_UPLOAD
from .tenants import Principal, valid_name

ARCHIVE = {"schema": {"type": "string", "format": "binary"}}
UPLOAD_DOC = {"requestBody": {"content": {
    "application/x-tar": ARCHIVE, "application/gzip": ARCHIVE, "application/zip": ARCHIVE,
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": ARCHIVE}}},
    "application/json": {"schema": {"type": "object", "properties": {"source": {
        "type": "string", "description": "an adapter folder already in the store, relative to your part of it"}}}},
}}}
#: the dependency that gives a route its caller (app.py's, from the key the middleware checked)
PrincipalOf = Callable[..., Any]


MIXTURE_HELP = ("a weighted mixture of your adapters instead of one, {name: weight}: LoRA/IA³/BitFit mix their "
                "deltas, bottlenecks their outputs, classifiers their scores (one label set)")


class ClassifyIn(BaseModel):
    adapter: str | None = Field(None, description="adapter name (admin: '<tenant>/<name>'); none: the base model")
    adapters: dict[str, float] | None = Field(None, description=MIXTURE_HELP)
    inputs: list[str]


class EmbedIn(ClassifyIn):
    normalize: StrictBool = Field(False, description="L2-normalise the mean-pooled vectors")


class GenerateIn(BaseModel):
    adapter: str | None = None
    adapters: dict[str, float] | None = Field(None, description=MIXTURE_HELP)
    prompt: str
    max_new_tokens: int = 32
    temperature: float = Field(0.0, description="0: greedy", allow_inf_nan=False)
    seed: int | None = None
    stream: StrictBool = Field(False, description="server-sent events, one per token, then a final summary")


class GenerateOptions(TypedDict):
    """The options of a /v1/generate request, as `Engine.submit_generate` takes them."""

    max_new_tokens: int
    temperature: float
    seed: int | None
    caller: str | None


@overload
def adapter_of(engine: Engine, request: Request, who: Principal, ref: str) -> tuple[str, str]: ...
@overload
def adapter_of(engine: Engine, request: Request, who: Principal, ref: str | None) -> tuple[str, str | None]: ...


def adapter_of(engine: Engine, request: Request, who: Principal, ref: str | None) -> tuple[str, str | None]:
    """The (tenant, adapter) a request names, checked to exist (404 first, so unknown names do not
    become metric labels); None: the base model."""
    if ref is None:
        request.state.adapter = "base"
        return who.tenant, None
    tenant, name = who.resolve(ref)
    engine.key(tenant, name)
    request.state.adapter = f"{tenant}/{name}"
    return tenant, name


CALLER_HEADER = "x-adapterkit-caller"


def caller_of(request: Request) -> str | None:
    """Who asks, for a traffic split's sticky choice: the caller header, else the API key (hashed);
    None (each request drawn at random) without either."""
    given = request.headers.get(CALLER_HEADER) or request.headers.get("authorization")
    return hashlib.sha256(given.encode()).hexdigest()[:32] if given else None


def target_of(engine: Engine, request: Request, who: Principal, ref: str | None,
              mixture: dict[str, float] | None) -> tuple[str, str | dict[str, float] | None]:
    """(tenant, what the request runs with): one adapter, a mixture {name: weight} of one tenant's
    adapters (each checked to exist: 404 names the first that does not), or None for the base."""
    if mixture is None:
        return adapter_of(engine, request, who, ref)
    if ref is not None:
        raise BadRequest("give adapter or adapters, not both", param="adapters")
    resolved = [(who.resolve(name), weight) for name, weight in mixture.items()]
    tenants = {tenant for (tenant, _), _ in resolved}
    if len(tenants) > 1:
        raise BadRequest(f"a mixture takes the adapters of one tenant, not of {sorted(tenants)}", param="adapters")
    tenant = tenants.pop() if tenants else who.tenant
    named = {name: weight for (_, name), weight in resolved}
    engine.mixture(tenant, named)
    request.state.adapter = "mixture"
    return tenant, named


def inference_router(engine: Engine, principal: PrincipalOf) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/classify", summary="Labels and scores of each input, from the adapter's own head")
    async def classify(body: ClassifyIn, request: Request, who: Principal = Depends(principal)) -> Any:
        tenant, name = target_of(engine, request, who, body.adapter, body.adapters)
        return JSONResponse(await asyncio.wrap_future(
            engine.submit("classify", body.inputs, name, tenant, caller=caller_of(request))))

    @router.post("/v1/embed", summary="Mean-pooled last hidden state of each input, with the adapter routed")
    async def embed(body: EmbedIn, request: Request, who: Principal = Depends(principal)) -> Any:
        tenant, name = target_of(engine, request, who, body.adapter, body.adapters)
        return JSONResponse(await asyncio.wrap_future(
            engine.submit("embed", body.inputs, name, tenant, caller=caller_of(request), normalize=body.normalize)))

    @router.post("/v1/generate", summary="Text generation (causal-LM bases); stream=true for server-sent events")
    async def generate(body: GenerateIn, request: Request, who: Principal = Depends(principal)) -> Any:
        tenant, name = target_of(engine, request, who, body.adapter, body.adapters)
        options = GenerateOptions(max_new_tokens=body.max_new_tokens, temperature=body.temperature, seed=body.seed,
                                  caller=caller_of(request))
        engine.require(RequestKind.GENERATE)  # before a stream starts: once it has, the status is 200
        if not body.stream:
            return JSONResponse(await asyncio.wrap_future(engine.submit_generate(body.prompt, name, tenant, **options)))
        return StreamingResponse(_stream(engine, body.prompt, name, tenant, options), media_type="text/event-stream")

    return router


def adapters_router(engine: Engine, principal: PrincipalOf, max_upload_bytes: int = MAX_UPLOAD) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/adapters", summary="Your adapters: live version, method, size, loaded or not")
    async def list_adapters(tenant: str | None = None, who: Principal = Depends(principal)) -> Any:
        if tenant is not None and not valid_name(tenant):
            raise BadRequest(f"tenant {tenant!r}: a tenant name, not a path")
        scope = (tenant if who.admin else who.tenant)
        records = await run_in_threadpool(engine.adapters, scope)
        return {"adapters": [_public(r, who) for r in records]}

    @router.get("/v1/adapters/{name:path}/versions",
                summary="Per version: requests, errors, latency, labels, tokens, feedback accuracy; the split")
    async def version_stats(name: str, request: Request, who: Principal = Depends(principal)) -> Any:
        tenant, adapter = adapter_of(engine, request, who, name)
        return await run_in_threadpool(engine.version_stats, tenant, adapter)

    @router.get("/v1/adapters/{name:path}", summary="One adapter")
    async def get_adapter(name: str, request: Request, who: Principal = Depends(principal)) -> Any:
        tenant, adapter = adapter_of(engine, request, who, name)
        records = [r for r in await run_in_threadpool(engine.adapters, tenant) if r["name"] == adapter]
        if not records:  # deleted between the lookup and the listing
            raise not_found(tenant, adapter)
        return _public(records[0], who)

    @router.put("/v1/adapters/{name:path}", status_code=201, openapi_extra=UPLOAD_DOC,
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

    @router.post("/v1/adapters/{name:path}/rollback", summary="Make the previously live version live again")
    async def rollback(name: str, request: Request, who: Principal = Depends(principal)) -> Any:
        tenant, adapter = adapter_of(engine, request, who, name)
        return _public(await run_in_threadpool(engine.rollback, tenant, adapter), who)

    @router.post("/v1/adapters/{name:path}/split",
                 summary='Split traffic between kept versions, e.g. {"v3": 0.1, "v2": 0.9}; each caller sticks to one')
    async def split(name: str, request: Request, who: Principal = Depends(principal)) -> Any:
        tenant, adapter = adapter_of(engine, request, who, name)
        weights = {_version(k): w for k, w in (await _json_body(request)).items()}
        return _public(await run_in_threadpool(engine.split, tenant, adapter, weights), who)

    @router.post("/v1/adapters/{name:path}/promote", summary='Make a kept version live for everyone: {"version": "v3"}')
    async def promote(name: str, request: Request, who: Principal = Depends(principal)) -> Any:
        tenant, adapter = adapter_of(engine, request, who, name)
        version = _version((await _json_body(request)).get("version"))
        return _public(await run_in_threadpool(engine.promote, tenant, adapter, version), who)

    @router.delete("/v1/adapters/{name:path}", summary="Delete an adapter with all its versions")
    async def delete_adapter(name: str, request: Request, who: Principal = Depends(principal)) -> Any:
        tenant, adapter = adapter_of(engine, request, who, name)
        result = await run_in_threadpool(engine.delete, tenant, adapter)
        return {"deleted": adapter if not who.admin else f"{tenant}/{adapter}", "versions": result["deleted_versions"]}

    return router


def _version(value: Any) -> int:
    """A version as the API spells it: 3, "3" or "v3"."""
    text = str(value).removeprefix("v") if isinstance(value, str | int) and not isinstance(value, bool) else ""
    if not text.isdigit():
        raise BadRequest(f"{value!r} is not a version (write v3 or 3)")
    return int(text)


class FeedbackIn(BaseModel):
    request_id: str
    label: str | None = Field(None, description="the right label for the request's input `index`")
    score: float | None = Field(None, description="how good the answer was (any scale you keep to)")
    index: int = Field(0, ge=0)


def operations_router(engine: Engine, principal: PrincipalOf) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/feedback", summary="Say whether an answer (by its request_id) was right: per-version accuracy")
    async def feedback(body: FeedbackIn, who: Principal = Depends(principal)) -> Any:
        return engine.feedback(who.tenant, body.request_id, body.label, body.score, body.index)

    @router.get("/healthz", summary="Liveness and a few figures")
    async def healthz() -> Any:
        health = engine.health()
        return {k: health[k] for k in ("status", "task", "loaded", "queued_rows")}

    @router.get("/metrics", summary="Prometheus metrics (admin key when the server has keys)")
    async def prometheus(who: Principal = Depends(principal)) -> Response:
        if not who.admin:
            raise Forbidden("metrics need an admin key")
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


async def _stream(engine: Engine, prompt: str, name: Target, tenant: str,
                  options: GenerateOptions) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[int | None] = asyncio.Queue()

    def on_token(token: int) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, token)

    future = engine.submit_generate(prompt, name, tenant, **options, on_token=on_token)
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
            yield _event(as_json(err, engine.redact))
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
