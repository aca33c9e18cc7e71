"""The Engine's adapters: who serves which version, and a version's life from upload to deletion.

A new version is unpacked and checked off the model thread (two low-priority threads, one upload per
tenant at a time), installed into the model and probed before it goes live; a refused one leaves
nothing behind. Rollback, traffic splits, promotion and deletion move which version is live; versions
no longer live leave memory once their last request is done.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterFileError
from ..hf_names import last_logits_only
from ..io.files import read_adapter
from ..model import AdaptedModel
from ..routes import finite_number
from ..task import Task
from .batcher import Batcher, Request, RequestKind
from .cache import AdapterCache, AdapterKey
from .errors import (
    BadRequest,
    Conflict,
    InvalidAdapter,
    NonFiniteOutput,
    PayloadTooLarge,
    Withdrawn,
    not_found,
)
from .store import AdapterStore
from .tenants import check_name, valid_name
from .versions import VersionStats

#: a request's weighted adapters, by name: ((key, weight), ...)
Mixture = tuple[tuple[AdapterKey, float], ...]


class AdapterLifecycle:
    """The adapter half of serve.Engine (which sets these attributes up)."""

    am: AdaptedModel
    task: Task
    store: AdapterStore
    cache: AdapterCache
    batcher: Batcher
    versions: VersionStats
    max_mixture: int
    _probe_ids: torch.Tensor
    _uploads: ThreadPoolExecutor
    _upload_locks: dict[str, threading.Lock]
    _upload_locks_lock: threading.Lock

    def mixture(self, tenant: str, adapters: Mapping[str, float], caller: str | None = None) -> Mixture:
        """The live versions of a tenant's weighted adapters, by name (BadRequest for a malformed or
        too large mixture, NotFound for an adapter the tenant does not have)."""
        if not adapters:
            raise BadRequest("adapters: a non-empty {name: weight} object", param="adapters")
        if len(adapters) > self.max_mixture:
            raise PayloadTooLarge(f"adapters: {len(adapters)} in one mixture; at most {self.max_mixture}")
        mixture = []
        for name, weight in sorted(adapters.items()):
            if not finite_number(weight):
                raise BadRequest(f"adapters: the weight of {name!r} must be a finite number, not {weight!r}",
                                 param="adapters")
            key = self.key(tenant, name, caller)
            assert key is not None  # (a name, so a key)
            mixture.append((key, float(weight)))
        return tuple(mixture)

    def key(self, tenant: str, adapter: str | None, caller: str | None = None) -> AdapterKey | None:
        """The version of a tenant's adapter that serves `caller`: the live one, or its version
        under a traffic split (None for the base model)."""
        if adapter is None:
            return None
        if not (valid_name(tenant) and valid_name(adapter)):
            raise not_found(tenant, str(adapter))
        return AdapterKey(tenant, adapter, self.store.resolve(tenant, adapter, caller))

    def preload(self, tenant: str, adapter: str) -> Future:
        """Load an adapter's live version now (if it is not resident); resolves when it serves."""
        key = self.key(tenant, adapter)
        return _then(self.batcher.submit(Request(RequestKind.LOAD, key, [])), lambda _: key)

    def unload(self, tenant: str, adapter: str) -> None:
        """Drop every resident version of an adapter once no request needs it (it stays in the store)."""
        self.batcher.doom([k for k in self.cache.keys() if (k.tenant, k.name) == (tenant, adapter)])

    def adapters(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """The adapters of a tenant (all tenants: None) with live version, method, size, loaded or not."""
        resident = set(self.cache.keys())
        records = self.store.list(tenant)
        for r in records:
            r["loaded"] = AdapterKey(r["tenant"], r["name"], r["version"]) in resident
        return records

    def put(self, tenant: str, name: str, *, archive: str | os.PathLike | None = None,
            source: str | os.PathLike | None = None, source_root: str | os.PathLike | None = None) -> dict[str, Any]:
        """A new live version from an uploaded archive or an adapter folder (inside `source_root`, if
        given). It is checked, loaded into the model (the real test that it fits this base) and only
        then made live; on any failure the previous version stays live and nothing is left behind."""
        check_name(tenant, "tenant name")
        check_name(name)
        with self._upload_locks_lock:
            lock = self._upload_locks.setdefault(tenant, threading.Lock())
        with lock:
            return self._uploads.submit(self._put, tenant, name, archive, source, source_root).result()

    def _put(self, tenant: str, name: str, archive: str | os.PathLike | None, source: str | os.PathLike | None,
             source_root: str | os.PathLike | None) -> dict[str, Any]:
        with self.store.staging() as staging:
            if archive is not None:
                folder = self.store.unpack(Path(archive), staging)
            elif source is not None:
                folder = self.store.copy_in(Path(source), staging, Path(source_root) if source_root else None)
            else:
                raise BadRequest("give an archive or a source folder")
            version = self.store.reserve(tenant, name, folder)
        key = AdapterKey(tenant, name, version)
        try:
            try:
                manifest, tensors = read_adapter(self.store.path(tenant, name, version))
            except AdapterFileError:
                if not self.store.path(tenant, name, version).is_dir():  # a DELETE of this name won the race
                    raise Conflict(f"adapter {name!r} was deleted while this version was uploaded; "
                                   "upload it again") from None
                raise
            self.batcher.call(lambda: self.cache.install(key, manifest, tensors)).result()
            self._check_answers(key)
            self.store.publish(tenant, name, version)
        except BaseException:
            self.batcher.evict([key]).result()  # nothing of a refused version stays in memory
            self.store.discard(tenant, name, version)
            raise
        self._unload_old(tenant, name, version)
        return {**self.store.record(tenant, name), "loaded": True}

    def _check_answers(self, key: AdapterKey) -> None:
        """The new version (not yet live, so no one else names it) answers the probe input as a row
        of the next batch: a non-finite answer refuses the upload (its caller removes it)."""
        kind = RequestKind.CLASSIFY if self.task == Task.CLASSIFY else RequestKind.EMBED
        try:
            self.batcher.submit(Request(kind, key, [self._probe_ids[0].tolist()])).result()
        except NonFiniteOutput:
            raise InvalidAdapter(f"adapter {key.name!r} answers the probe input with NaN or infinite values "
                                 "(its weights or its config's scale overflow); nothing was kept") from None

    def _probe(self) -> torch.Tensor:
        """The model's output on the fixed probe input (the last hidden state, and the logits of a
        classifier): what an upload and a merge are checked with."""
        mask = torch.ones_like(self._probe_ids)
        extra = last_logits_only(self.am.base) if self.task == Task.CAUSAL_LM else {}
        out = self.am(input_ids=self._probe_ids, attention_mask=mask, output_hidden_states=True, **extra)
        parts = [out.hidden_states[-1].flatten()]
        if self.task == Task.CLASSIFY:
            parts.append(out.logits.flatten())
        return torch.cat([p.float() for p in parts])

    def _unload_old(self, tenant: str, name: str, live: int) -> None:
        """Versions other than the live one leave memory as soon as their last request is done."""
        self.batcher.doom([k for k in self.cache.keys() if (k.tenant, k.name) == (tenant, name) and k.version != live])

    def rollback(self, tenant: str, name: str) -> dict[str, Any]:
        previous, live = self.store.rollback(tenant, name)
        self._unload_old(tenant, name, live)
        return {**self.store.record(tenant, name), "rolled_back_from": previous}

    def split(self, tenant: str, name: str, weights: dict[int, float]) -> dict[str, Any]:
        """Send each caller to one of an adapter's kept versions, by weight (an A/B rollout)."""
        self.store.split(tenant, name, weights)
        return self.store.record(tenant, name)

    def promote(self, tenant: str, name: str, version: int) -> dict[str, Any]:
        """Make a kept version live for everyone (ends a split); other versions leave memory."""
        self.store.promote(tenant, name, version)
        self._unload_old(tenant, name, version)
        return self.store.record(tenant, name)

    def version_stats(self, tenant: str, name: str) -> dict[str, Any]:
        """Per version: requests, errors, latency quantiles, labels, tokens, feedback and accuracy."""
        record = self.store.record(tenant, name)
        return {"tenant": tenant, "name": name, "live": record["version"], "split": record["split"],
                "versions": {f"v{v}": facts for v, facts in self.versions.summary(tenant, name).items()}}

    def feedback(self, tenant: str, request_id: str, label: str | None = None, score: float | None = None,
                 index: int = 0) -> dict[str, Any]:
        return self.versions.record_feedback(tenant, request_id, label, score, index)

    def delete(self, tenant: str, name: str) -> dict[str, Any]:
        versions = self.store.delete(tenant, name)
        self.batcher.doom([AdapterKey(tenant, name, v) for v in versions])
        return {"tenant": tenant, "name": name, "deleted_versions": versions}


    def _read(self, key: AdapterKey) -> tuple[dict, dict]:
        try:
            return read_adapter(self.store.path(*key))
        except AdapterFileError:
            if not self.store.path(*key).is_dir():
                if self.store.resolve(key.tenant, key.name) != key.version:  # NotFound if deleted
                    raise Withdrawn(f"adapter {key.name!r} v{key.version} was withdrawn") from None
                raise not_found(key.tenant, key.name) from None
            raise


def lower_priority() -> None:
    """Nice the calling thread (Linux schedules threads one by one); elsewhere a no-op."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def _then(future: Future, fn: Callable[[Any], Any]) -> Future:
    """A future of fn(result of `future`); cancelling it cancels the original."""
    out: Future = Future()

    def done(f: Future) -> None:
        try:
            if f.cancelled():
                out.cancel()
            elif f.exception() is not None:
                out.set_exception(f.exception())
            else:
                out.set_result(fn(f.result()))
        except InvalidStateError:  # `out` was cancelled meanwhile
            pass
        except Exception as failure:  # noqa: BLE001 - fn failed: hand it to the caller
            with contextlib.suppress(InvalidStateError):
                out.set_exception(failure)

    def cancelled(f: Future) -> None:
        if f.cancelled():
            future.cancel()

    future.add_done_callback(done)
    out.add_done_callback(cancelled)
    return out
