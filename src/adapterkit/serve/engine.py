"""The serving engine: one base model, an adapter store, the adapter cache and the batcher.

Usable from Python without HTTP:

    engine = Engine("path/or/hub-id", "adapters/")
    engine.classify(["great film"], adapter="sentiment")      # {"adapter", "version", "results"}
    await engine.aclassify([...], adapter="sentiment")        # the same from asyncio
    engine.put("default", "sentiment", archive=Path("sentiment.tar.gz"))   # a new live version
    engine.close()

Tenants are plain strings here; the HTTP app maps API keys to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from ..methods.kernels import fast_linears, warm_row_products
from ..model import AdaptedModel
from ..precision import parse_dtype, quantized_modules
from ..quantize import Precision
from ..task import Task
from .base import load_base, max_positions, raw_encoder, task_of
from .batcher import Batcher, Request, RequestKind
from .cache import AdapterCache, AdapterKey
from .captured import CapturedStep
from .decode import ContinuousDecoder
from .errors import (
    BadRequest,
    PayloadTooLarge,
    Redactor,
    Withdrawn,
)
from .execute import BatchRunner
from .generate import GenerationRow
from .lifecycle import AdapterLifecycle, Mixture, lower_priority
from .merged import DominantMerge
from .metrics import ServeMetrics
from .store import AdapterStore
from .tenants import DEFAULT_TENANT
from .versions import VersionStats

#: what each kind of base answers
CAN_ANSWER: dict[Task, frozenset[RequestKind]] = {
    Task.CLASSIFY: frozenset({RequestKind.CLASSIFY, RequestKind.EMBED}),
    Task.CAUSAL_LM: frozenset({RequestKind.GENERATE, RequestKind.EMBED}),
    Task.ENCODE: frozenset({RequestKind.EMBED}),
}
#: what a request runs with: an adapter's name, a {name: weight} mixture, or None (the base model)
Target = str | Mapping[str, float] | None

#: the most tokens a captured step's fixed cache holds: it attends over all of them at every step (and
#: one of several rows holds them for each row)
MAX_CAPTURED_TOKENS, MAX_CAPTURED_ROW_TOKENS = 2048, 1024
#: the fixed input an upload's and a merge's check runs on
PROBE_TEXT = "adapterkit probe: the quick brown fox jumps over the lazy dog."
_log = logging.getLogger(__name__)


class Engine(AdapterLifecycle):
    def __init__(
        self, base: str | os.PathLike | nn.Module, store: str | os.PathLike, *, tokenizer: Any = None, max_batch: int = 32,
        max_wait_ms: float = 5.0, cache_bytes: int = 512 << 20, max_inputs: int = 64, max_input_chars: int = 20_000,
        max_tokens: int | None = None, max_new_tokens: int = 256, max_queue_rows: int = 4096,
        threads: int | None = None, adopt: bool = True, padding_cost: int = 32, scheduling: str = "continuous",
        merge_after: int = 8, quantize: str | None = None, merge_copy_bytes: int = 1 << 30,
        dtype: str = "fp32", device: str = "cpu", max_mixture: int = 4, max_mixed_rows: int = 8,
        capture: bool = True, capture_rank: int = 16, capture_rows: Sequence[int] = (4, 16),
    ) -> None:
        """`merge_after`: forwards in a row for one mergeable adapter before it is served merged
        (0: never merge). `merge_copy_bytes`: a merge keeps a copy of the weights it changes (so that the
        unmerge is exact); an adapter that would change more is never merged. `quantize`: nf4 | int8 |
        int4 Linear layers in the base (quantize.py); `dtype`: the base's; `device`: cpu | cuda | auto,
        where the base, the adapters and their routing stacks live (requests arrive on the CPU and
        are moved there once per forward). `max_mixture`: adapters in one request's mixture;
        `max_mixed_rows`: rows with a mixture in one batch (the rest wait for the next). `capture`:
        compile a one-stream decode step at start (a causal LM on the CPU, continuous scheduling,
        no quantized layers; serve/captured.py), which one stream with the base, its merged adapter
        or a LoRA of rank up to `capture_rank` decodes through; and steps for `capture_rows` rows at once
        (each at most `max_batch`; fewer running rows take the smallest that holds them), which rows
        whose adapters all ride the slots decode through."""
        if capture_rank < 1:
            raise ValueError(f"capture_rank: the captured step's LoRA slot rank, at least 1, not {capture_rank}")
        if scheduling not in ("continuous", "static"):
            raise ValueError(f"scheduling: 'continuous' (rows join and leave at every step) or 'static', not {scheduling!r}")
        if threads:
            torch.set_num_threads(threads)
        if isinstance(base, str | os.PathLike):
            model, loaded_tokenizer = load_base(str(base), parse_dtype(dtype))
            tokenizer = tokenizer or loaded_tokenizer
        else:
            model = base.eval()
        if tokenizer is None:
            raise ValueError("pass the base model's tokenizer (tokenizer=...) along with a model object")
        self.precision = Precision(dtype=dtype, quantize=quantize, device=device)
        self.precision.apply(model)  # before the adapter sites hook its layers
        self.device = self.precision.torch_device
        if self.device.type == "cpu":
            fast_linears(model)  # the frozen layers' products at nearly the memory's speed in a decode step
            warm_row_products(model)  # compiled before the first request, not during it
        self._to_device = model.register_forward_pre_hook(_inputs_to(self.device), with_kwargs=True, prepend=True)
        self.am = AdaptedModel(model)
        self.am.eval()
        self.base_name = self.am.base_name
        self.task = task_of(model, self.am.head_path)
        self.fingerprint = self.am.fingerprint()  # of the full-precision base, which adapters were made for
        self.quantized = len(quantized_modules(model))  # Linear layers held quantized
        self.merging = (DominantMerge(self.am, merge_after, probe=self._probe, max_copy_bytes=merge_copy_bytes)
                        if merge_after else None)
        self._routing = self.merging.routing if self.merging is not None else self.am.route
        self.tokenizer = tokenizer
        self._tok_lock = threading.Lock()
        self._encoder = raw_encoder(tokenizer)
        self.pad_id = _first_int(tokenizer.pad_token_id, tokenizer.eos_token_id, 0)
        self.eos_id = tokenizer.eos_token_id if self.task == Task.CAUSAL_LM else None
        positions = max_positions(model) or 512
        self.max_tokens = min(max_tokens or positions, positions)
        self.max_inputs, self.max_input_chars, self.max_new_tokens = max_inputs, max_input_chars, max_new_tokens
        self.max_mixture = max_mixture
        self.padding_cost = padding_cost
        config = getattr(model, "config", None)
        labels = getattr(config, "id2label", None) or {}
        self.base_labels = [labels[i] for i in sorted(labels)] if self.task == Task.CLASSIFY else None
        with self._tok_lock:
            probe = self.tokenizer([PROBE_TEXT], truncation=False)["input_ids"][0]
        self._probe_ids = torch.tensor([probe[: self.max_tokens]], dtype=torch.long)
        self.store = AdapterStore(store, fingerprint=self.fingerprint)
        self.redact = Redactor(self.store.root, base if isinstance(base, str | os.PathLike) else None)
        if adopt:
            self.store.adopt_flat()
        self.metrics = ServeMetrics()
        self.versions = VersionStats(self.metrics.registry)
        self.cache = AdapterCache(self.am, cache_bytes)
        self.scheduling = scheduling
        self.captured_steps = self._capture(capture, capture_rank, capture_rows, max_batch, scheduling)
        self.captured = next((step for step in self.captured_steps if step.rows == 1), None)
        self.runner = BatchRunner(self.am, self.cache, self.task, self.pad_id, self.eos_id, self.padding_cost,
                                  self.base_labels, self._routing)
        decoder = None
        if self.task == Task.CAUSAL_LM and scheduling == "continuous":
            decoder = ContinuousDecoder(self.am, self.pad_id, self.eos_id, self.runner.describe, self._routing,
                                        self.captured_steps)
        self.batcher = Batcher(self.cache, self._read, self.runner.execute, self.metrics, max_batch=max_batch,
                               max_wait_ms=max_wait_ms, max_queue_rows=max_queue_rows, decoder=decoder,
                               max_mixed_rows=max_mixed_rows)
        self.metrics.watch(self.stats)
        # Uploads are unpacked, hashed and checked on two low-priority threads, one upload per tenant
        # at a time: a tenant's stream of uploads takes CPU from nobody's requests but its own.
        self._uploads = ThreadPoolExecutor(2, thread_name_prefix="adapterkit-upload", initializer=lower_priority)
        self._upload_locks: dict[str, threading.Lock] = {}
        self._upload_locks_lock = threading.Lock()
        self._warm_up()

    # --- inference: sync, future and asyncio flavours -----------------------------------------

    def submit(self, kind: str, inputs: list[str], adapter: Target = None, tenant: str = DEFAULT_TENANT,
               caller: str | None = None, **options: Any) -> Future:
        """Queue a classify/embed request; the future gives its response dict. `caller`: who asks
        (hashed to pick a version under a traffic split; None: drawn at random)."""
        if kind not in (RequestKind.CLASSIFY, RequestKind.EMBED):
            raise BadRequest(f"unknown request kind {kind!r}: classify or embed")
        request_kind = RequestKind(kind)
        self.require(request_kind)
        rows = self.tokenize(inputs)
        field = "results" if request_kind == RequestKind.CLASSIFY else "vectors"
        return self._queue(tenant, adapter, lambda key: Request(request_kind, key, rows, options),
                           lambda key, results: self._respond(key, results, field), caller=caller)

    def submit_generate(self, prompt: str, adapter: Target = None, tenant: str = DEFAULT_TENANT,
                        max_new_tokens: int = 32, temperature: float = 0.0, seed: int | None = None,
                        on_token: Callable[[int], None] | None = None, top_p: float = 1.0,
                        ignore_eos: bool = False, prompt_ids: list[int] | None = None,
                        caller: str | None = None) -> Future:
        """Queue a generation; the future gives {"adapter", "version", "text", "tokens", "token_ids",
        "prompt_tokens", "finish_reason"}. `prompt_ids`: the prompt already tokenised (then `prompt`
        is not read), as the chat endpoint has it from the chat template."""
        self.require(RequestKind.GENERATE)
        if prompt_ids is None and (not isinstance(prompt, str) or not prompt):
            raise BadRequest("prompt: a non-empty string")
        if not 1 <= int(max_new_tokens) <= self.max_new_tokens:
            raise PayloadTooLarge(f"max_new_tokens must be between 1 and {self.max_new_tokens}")
        if temperature < 0:
            raise BadRequest("temperature must be >= 0 (0: greedy)")
        if not 0 < top_p <= 1:
            raise BadRequest("top_p must be in (0, 1]")
        ids = self.tokenize([prompt])[0] if prompt_ids is None else self._check_ids(prompt_ids)
        if len(ids) + max_new_tokens > self.max_tokens:
            raise PayloadTooLarge(f"prompt ({len(ids)} tokens) + max_new_tokens exceeds the model's {self.max_tokens}")
        row = GenerationRow(ids, int(max_new_tokens), float(temperature), seed, on_token, float(top_p), bool(ignore_eos))

        def respond(key: AdapterKey | Mixture | None, results: list) -> dict:
            out = results[0]
            return {**self._respond(key, [], None), "text": self.decode(out.tokens), "tokens": len(out.tokens),
                    "token_ids": out.tokens, "prompt_tokens": len(ids), "finish_reason": out.finish_reason}

        return self._queue(tenant, adapter, lambda key: Request(RequestKind.GENERATE, key, [ids], {"row": row}), respond,
                           caller=caller)

    def _queue(self, tenant: str, adapter: Target, make: Callable[[AdapterKey | None], Request],
               respond: Callable[[AdapterKey | Mixture | None, list], dict], tries: int = 3,
               caller: str | None = None) -> Future:
        """Queue a request for the adapter's live version; the future of its response. A version
        withdrawn (rolled back, pruned) before its files were read is asked again for the version
        live then: the caller sees the swap, not the race."""
        out: Future = Future()
        running: list[Future] = []

        started = time.perf_counter()

        def attempt(left: int) -> None:
            if isinstance(adapter, Mapping):
                mixture = self.mixture(tenant, adapter, caller)
                request = make(None)
                request.mixture = mixture
                key: AdapterKey | Mixture | None = mixture
            else:
                key = self.key(tenant, adapter, caller)
                request = make(key)
            inner = self.batcher.submit(request)
            running[:] = [inner]

            def done(f: Future) -> None:
                if f.cancelled():
                    out.cancel()
                    return
                err = f.exception()
                try:
                    if isinstance(err, Withdrawn) and left > 1:
                        attempt(left - 1)
                    elif err is not None:
                        if isinstance(key, AdapterKey):
                            self.versions.failed(key)
                        out.set_exception(err)
                    else:
                        response = {**respond(key, f.result()), "request_id": uuid.uuid4().hex}
                        if isinstance(key, AdapterKey):
                            self.versions.answered(key, response["request_id"], time.perf_counter() - started,
                                                   response)
                        out.set_result(response)
                except InvalidStateError:  # `out` was cancelled meanwhile
                    pass
                except Exception as failure:  # noqa: BLE001 - handed to the caller
                    with contextlib.suppress(InvalidStateError):
                        out.set_exception(failure)

            inner.add_done_callback(done)

        attempt(tries)  # the first lookup's errors (unknown adapter, full queue) are the caller's at once
        out.add_done_callback(lambda f: f.cancelled() and running and running[0].cancel())
        return out

    def classify(self, inputs: list[str], adapter: Target = None, tenant: str = DEFAULT_TENANT) -> dict:
        return self.submit("classify", inputs, adapter, tenant).result()

    def embed(self, inputs: list[str], adapter: Target = None, tenant: str = DEFAULT_TENANT,
              normalize: bool = False) -> dict:
        return self.submit("embed", inputs, adapter, tenant, normalize=normalize).result()

    def generate(self, prompt: str, adapter: Target = None, tenant: str = DEFAULT_TENANT, **options: Any) -> dict:
        return self.submit_generate(prompt, adapter, tenant, **options).result()

    async def aclassify(self, inputs: list[str], adapter: Target = None, tenant: str = DEFAULT_TENANT) -> dict:
        return await asyncio.wrap_future(self.submit("classify", inputs, adapter, tenant))

    async def aembed(self, inputs: list[str], adapter: Target = None, tenant: str = DEFAULT_TENANT,
                     normalize: bool = False) -> dict:
        return await asyncio.wrap_future(self.submit("embed", inputs, adapter, tenant, normalize=normalize))

    async def agenerate(self, prompt: str, adapter: Target = None, tenant: str = DEFAULT_TENANT,
                        **options: Any) -> dict:
        return await asyncio.wrap_future(self.submit_generate(prompt, adapter, tenant, **options))

    def decode(self, tokens: list[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def chat_tokens(self, turns: list[dict[str, str]]) -> list[int]:
        """Token ids of chat turns rendered by the tokenizer's chat template, ready for the reply."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadRequest("this model's tokenizer has no chat template; use /v1/completions", param="messages")
        if sum(len(t["content"]) for t in turns) > self.max_input_chars:
            raise PayloadTooLarge(f"the messages have more than {self.max_input_chars} characters")
        with self._tok_lock:
            try:
                text = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
            except Exception as err:  # noqa: BLE001 - a template that rejects these messages (e.g. role order)
                raise BadRequest(f"the chat template rejected these messages: {err}", param="messages") from None
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template wrote the specials

    def require(self, kind: RequestKind) -> None:
        """BadRequest unless this base can answer `kind` (the one check of a request against the task)."""
        if kind not in CAN_ANSWER[self.task]:
            served = ", ".join(sorted(k.value for k in CAN_ANSWER[self.task]))
            raise BadRequest(f"this server's base is a {self.task} model: it answers {served}, not {kind.value}"
                             + (" (generation needs a causal-LM base)" if kind == RequestKind.GENERATE else ""))

    # --- facts ----------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        merging = self.merging
        merges = {"merges": merging.merges, "unmerges": merging.unmerges, "merges_refused": len(merging.refused)
                  } if merging is not None else {"merges": 0, "unmerges": 0, "merges_refused": 0}
        captured = sum(step.steps for step in self.captured_steps)
        return {**self.cache.stats(), "queued_rows": self.batcher.queued_rows, **merges, "captured_steps": captured}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "base": self.base_name, "task": self.task, "fingerprint": self.fingerprint,
                "precision": {**Precision.of(self.am.base), "device": str(self.device)},
                "captured_step": "off" if self.captured is None else self.captured.off or "on",
                "captured_rows": {str(step.rows): step.off or "on" for step in self.captured_steps if step.rows > 1},
                **self.stats()}

    def close(self) -> None:
        self.batcher.close()
        self._uploads.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- inside -----------------------------------------------------------------------------------

    def tokenize(self, inputs: list[str]) -> list[list[int]]:
        """Token ids per input, checked against this engine's limits (BadRequest / PayloadTooLarge)."""
        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
            raise BadRequest("inputs: a non-empty list of strings")
        if len(inputs) > self.max_inputs:
            raise PayloadTooLarge(f"{len(inputs)} inputs in one request; at most {self.max_inputs}")
        for i, text in enumerate(inputs):
            if len(text) > self.max_input_chars:
                raise PayloadTooLarge(f"inputs[{i}] has {len(text)} characters; at most {self.max_input_chars}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate such as "\ud800", which JSON lets through
                raise BadRequest(f"inputs[{i}] is not valid Unicode text (a lone surrogate)") from None
        with self._tok_lock:
            if self._encoder is not None:
                rows = [e.ids for e in self._encoder.encode_batch(inputs)]
            else:
                rows = self.tokenizer(inputs, truncation=False)["input_ids"]
        for i, row in enumerate(rows):
            if not row:
                raise BadRequest(f"inputs[{i}] is empty after tokenisation")
            if len(row) > self.max_tokens:
                raise PayloadTooLarge(f"inputs[{i}] has {len(row)} tokens; this model takes at most {self.max_tokens}")
        return rows

    def _check_ids(self, ids: list[int]) -> list[int]:
        vocab = len(self.tokenizer)
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise BadRequest(f"prompt token ids: a non-empty list of integers in [0, {vocab})")
        return ids

    def _respond(self, key: AdapterKey | Mixture | None, results: list, field: str | None) -> dict[str, Any]:
        if isinstance(key, tuple) and not isinstance(key, AdapterKey):
            out: dict[str, Any] = {"adapter": None, "version": None,
                                   "adapters": {k.name: {"version": k.version, "weight": w} for k, w in key}}
        else:
            out = {"adapter": key.name if key else None, "version": key.version if key else None}
        if field is not None:
            out[field] = results
        return out

    def _capture(self, wanted: bool, rank: int, rows: Sequence[int], max_batch: int,
                 scheduling: str) -> list[CapturedStep]:
        """The compiled decode steps, one row's and `rows`' (each at most `max_batch`), built and checked
        now (none: not for this engine)."""
        if (not wanted or self.task != Task.CAUSAL_LM or scheduling != "continuous" or self.device.type != "cpu"
                or self.quantized or self._probe_ids.shape[1] < 3):
            return []
        steps = []
        for n in sorted({1, *(min(int(r), max_batch) for r in rows if int(r) > 1)}):
            try:
                step = CapturedStep(self.am, min(self.max_tokens, MAX_CAPTURED_TOKENS if n == 1 else MAX_CAPTURED_ROW_TOKENS),
                                    rank, rows=n)
            except Exception as err:  # noqa: BLE001 - a model without a fixed-size cache: eager steps
                _log.warning("adapterkit: no captured decode step for this model (%s: %s)", type(err).__name__, err)
                return []
            step.build(self._probe_ids[0].tolist())
            steps.append(step)
        return steps

    def _warm_up(self) -> None:
        ids = self.tokenize(["warm up"])
        self.batcher.submit(Request(RequestKind.EMBED, None, ids)).result()


def _first_int(*values: Any) -> int:
    return next(v for v in values if isinstance(v, int))


def _inputs_to(device: torch.device) -> Callable[[nn.Module, tuple, dict], tuple[tuple, dict] | None]:
    """A forward pre-hook that moves a call's tensors to `device` (requests are built on the CPU)."""
    if device.type == "cpu":
        return lambda module, args, kwargs: None

    def move(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return (tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args),
                {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

    return move
