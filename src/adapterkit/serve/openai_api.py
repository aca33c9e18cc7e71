"""The OpenAI-compatible part of the HTTP API: /v1/models, /v1/completions, /v1/chat/completions.

As in vLLM and LoRAX, `model` names the adapter (an admin key: "<tenant>/<name>"), and the base
model's own name means no adapter; the tenant comes from the API key (`Authorization: Bearer`).
Chat messages go through the tokenizer's chat template. `stream: true` sends OpenAI's chunks as
server-sent events, ending with `data: [DONE]`; a client that goes away frees its decode row.
Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Extensions, as in vLLM: `ignore_eos` (decode max_tokens whatever comes) on both endpoints.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from .batcher import RequestKind
from .engine import Engine, Target
from .errors import INTERNAL_ERROR, BadRequest, NotFound, PayloadTooLarge, ServeError
from .http_errors import as_json, error_body
from .routes import caller_of, target_of
from .tenants import Principal

OPENAI_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
MAX_CHOICES = 8


class ContextLengthExceeded(BadRequest):
    code = "context_length_exceeded"


class ModelNotFound(NotFound):
    code = "model_not_found"


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI's clients send fields we do not use (user, ...)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, allow_inf_nan=False)
    logprobs: Any = None
    ignore_eos: StrictBool = False
    #: adapterkit's own field (the openai client sends it as extra_body={"adapters": {...}}): a weighted
    #: mixture of adapters; `model` then names the base or one of them
    adapters: dict[str, float] | None = None


class CompletionIn(_Sampling):
    prompt: str | list[str]
    echo: StrictBool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class ChatIn(_Sampling):
    messages: list[Message] = Field(min_length=1)


def openai_router(engine: Engine, principal: Callable, served_name: str | None = None) -> APIRouter:
    """The OpenAI endpoints; `principal` is the app's API-key dependency."""
    router = APIRouter()
    base_names = {engine.base_name, served_name or Path(str(engine.base_name)).name}
    public_base = served_name or Path(str(engine.base_name)).name
    created = int(time.time())

    def adapter_of(request: Request, who: Principal, model: str,
                   mixture: dict[str, float] | None = None) -> tuple[str, Target]:
        if mixture is not None:
            if model not in base_names and model not in mixture:
                raise BadRequest(f"with adapters, model names the base ({public_base!r}) or one of them, "
                                 f"not {model!r}", param="model")
            return target_of(engine, request, who, None, mixture)
        if model in base_names:
            request.state.adapter = "base"
            return who.tenant, None
        try:
            tenant, name = who.resolve(model)
            engine.key(tenant, name)
        except NotFound:
            raise ModelNotFound(f"the model {model!r} does not exist", param="model") from None
        request.state.adapter = f"{tenant}/{name}"
        return tenant, name

    @router.get("/v1/models", summary="OpenAI: the base model and the adapters your key may use")
    async def models(who: Principal = Depends(principal)) -> Any:
        data = [{"id": public_base, "object": "model", "created": created, "owned_by": "adapterkit"}]
        for record in await run_in_threadpool(engine.adapters, None if who.admin else who.tenant):
            name = f"{record['tenant']}/{record['name']}" if who.admin else record["name"]
            data.append({"id": name, "object": "model", "created": created, "owned_by": record["tenant"],
                         "parent": public_base, "method": record["method"], "version": record["version"]})
        return {"object": "list", "data": data}

    @router.post("/v1/completions", summary="OpenAI: text completion; `model` names the adapter")
    async def completions(body: CompletionIn, request: Request, who: Principal = Depends(principal)) -> Any:
        prompt = _one_prompt(body.prompt)
        _supported(body, engine)
        tenant, name = adapter_of(request, who, body.model, body.adapters)
        ids = _tokens(engine, prompt)
        return await _respond(engine, body, ids, name, tenant, chat=False, prefix=prompt if body.echo else "",
                              caller=caller_of(request))

    @router.post("/v1/chat/completions", summary="OpenAI: chat completion with the tokenizer's chat template")
    async def chat(body: ChatIn, request: Request, who: Principal = Depends(principal)) -> Any:
        _supported(body, engine)
        tenant, name = adapter_of(request, who, body.model, body.adapters)
        ids = _chat_tokens(engine, body.messages)
        return await _respond(engine, body, ids, name, tenant, chat=True, caller=caller_of(request))

    return router


# --- requests ----------------------------------------------------------------------------------


def _one_prompt(prompt: str | list[str]) -> str:
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise BadRequest("prompt: one string (a list of several prompts is not supported; send one request each)",
                             param="prompt")
        prompt = prompt[0]
    if not prompt:
        raise BadRequest("prompt: a non-empty string", param="prompt")
    return prompt


def _supported(body: _Sampling, engine: Engine) -> None:
    engine.require(RequestKind.GENERATE)
    if body.n > MAX_CHOICES or (body.n > 1 and body.stream):
        raise BadRequest(f"n: at most {MAX_CHOICES}, and 1 when streaming", param="n")
    for field in ("presence_penalty", "frequency_penalty"):
        if getattr(body, field):
            raise BadRequest(f"{field} is not supported (send 0)", param=field)
    if body.logprobs not in (None, False, 0):
        raise BadRequest("logprobs are not supported", param="logprobs")
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stops) > 4 or any(not s for s in stops):
        raise BadRequest("stop: up to 4 non-empty strings", param="stop")


def _tokens(engine: Engine, prompt: str) -> list[int]:
    try:
        return engine.tokenize([prompt])[0]
    except PayloadTooLarge as err:
        raise ContextLengthExceeded(err.message.replace("inputs[0]", "the prompt"), param="prompt") from None


def _chat_tokens(engine: Engine, messages: list[Message]) -> list[int]:
    turns = [{"role": m.role, "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
             for m in messages]
    ids = engine.chat_tokens(turns)
    if len(ids) > engine.max_tokens:
        raise ContextLengthExceeded(f"the messages have {len(ids)} tokens; this model takes at most "
                                    f"{engine.max_tokens}", param="messages")
    return ids


def _budget(body: _Sampling, engine: Engine, prompt: int, chat: bool) -> int:
    """max_tokens, checked; unset: 16 for completions (OpenAI's default), all that fits for chat."""
    asked = body.max_completion_tokens or body.max_tokens
    room = engine.max_tokens - prompt
    if room < 1:
        raise ContextLengthExceeded(f"the prompt has {prompt} tokens and fills the model's {engine.max_tokens}")
    if asked is None:
        return min(engine.max_new_tokens, room, 16 if not chat else room)
    if asked > engine.max_new_tokens:
        raise BadRequest(f"max_tokens: at most {engine.max_new_tokens} on this server", param="max_tokens")
    if asked > room:
        raise ContextLengthExceeded(f"this model's context is {engine.max_tokens} tokens; the prompt has {prompt} and "
                                    f"max_tokens asks for {asked}", param="max_tokens")
    return asked


# --- answers -----------------------------------------------------------------------------------


class _Run:
    """One generation seen as text: deltas as tokens arrive, cut at the first stop string."""

    def __init__(self, engine: Engine, stops: list[str], loop: asyncio.AbstractEventLoop) -> None:
        self.engine, self.stops, self.loop = engine, stops, loop
        self.queue: asyncio.Queue[int | None] = asyncio.Queue()
        self.tokens: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False
        self.future: Any = None

    def on_token(self, token: int) -> None:  # the model thread: never blocks
        self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

    def start(self, submit: Callable[..., Any]) -> None:
        self.future = submit(on_token=self.on_token)
        self.future.add_done_callback(lambda _: self.loop.call_soon_threadsafe(self.queue.put_nowait, None))

    async def deltas(self) -> AsyncIterator[str]:
        hold = max((len(s) for s in self.stops), default=1) - 1  # text that may still become a stop string
        while (token := await self.queue.get()) is not None:
            self.tokens.append(token)
            self.text = self.engine.decode(self.tokens)
            cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.stopped = self.text[:cut], True
                self.future.cancel()  # frees the decode row now
                break
            if len(self.text) - hold > self.sent:
                piece, self.sent = self.text[self.sent:len(self.text) - hold], len(self.text) - hold
                yield piece
        if self.sent < len(self.text):
            yield self.text[self.sent:]
            self.sent = len(self.text)

    def result(self) -> tuple[str, str, int]:
        """(text, finish_reason, completion tokens)."""
        if self.stopped:
            return self.text, "stop", len(self.tokens)
        out = self.future.result()
        return self.text, out["finish_reason"], out["tokens"]


async def _respond(engine: Engine, body: _Sampling, ids: list[int], name: Target, tenant: str, *,
                   chat: bool, prefix: str = "", caller: str | None = None) -> Any:
    max_tokens = _budget(body, engine, len(ids), chat)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    loop = asyncio.get_running_loop()
    runs: list[_Run] = []
    try:
        for k in range(body.n):
            run = _Run(engine, stops, loop)
            seed = None if body.seed is None else body.seed + k  # n choices: n different samples
            run.start(lambda seed=seed, **kw: engine.submit_generate(
                "", name, tenant, max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                seed=seed, ignore_eos=body.ignore_eos, prompt_ids=ids, caller=caller, **kw))
            runs.append(run)
    except BaseException:
        for run in runs:
            run.future.cancel()
        raise
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    head = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": body.model}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_chunks(runs[0], head, chat, prefix, len(ids), include_usage),
                                 media_type="text/event-stream")
    try:
        choices, completion = [], 0
        for k, run in enumerate(runs):
            async for _ in run.deltas():
                pass
            text, finish, used = run.result()
            completion += used
            choice: dict[str, Any] = {"index": k, "finish_reason": finish, "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = prefix + text
            choices.append(choice)
    finally:
        for run in runs:
            run.future.cancel()
    usage = {"prompt_tokens": len(ids), "completion_tokens": completion, "total_tokens": len(ids) + completion}
    return JSONResponse({**head, "choices": choices, "usage": usage})


async def _chunks(run: _Run, head: dict, chat: bool, prefix: str, prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[str]:
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        data = {**head, "choices": [choice]}
        if include_usage:
            data["usage"] = None
        return f"data: {json.dumps(data)}\n\n"

    try:
        if chat or prefix:
            yield chunk(prefix if not chat else None, None, first=True)
        async for piece in run.deltas():
            yield chunk(piece, None)
        try:
            _, finish, used = run.result()
        except ServeError as err:
            yield f"data: {json.dumps(as_json(err))}\n\n"
            return
        except Exception:  # noqa: BLE001 - the stream has started: report in band
            yield f"data: {json.dumps(error_body('internal_error', INTERNAL_ERROR, 500))}\n\n"
            return
        yield chunk(None, finish)
        if include_usage:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": used,
                     "total_tokens": prompt_tokens + used}
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        run.future.cancel()
