"""Loaded adapters: an LRU of adapters resident in one AdaptedModel, under a byte budget.

Each (tenant, name, version) is loaded under its own internal name "<tenant>__<name>__v<N>", so
that a new version and the one it replaces can serve side by side while requests for the old
one drain. Only the engine's model thread calls `install` and `evict` (the model is not thread-safe);
lookups (`touch`, `get`, `stats`) may come from any thread.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ..adapter import Adapter
from ..errors import AdapterError
from ..heads import head_width
from ..io.install import prepare
from ..model import AdaptedModel
from .errors import InvalidAdapter


class AdapterKey(NamedTuple):
    tenant: str
    name: str
    version: int

    @property
    def internal(self) -> str:
        return f"{self.tenant}__{self.name}__v{self.version}"

    @property
    def public(self) -> str:
        return f"{self.tenant}/{self.name}"


@dataclass
class Resident:
    key: AdapterKey
    internal: str
    bytes: int
    method: str
    labels: list[str] | None  # the adapter's head's label names; None: no head of its own
    structure: str | None = None  # how its record is built (_structure): an evicted one is reused
    loaded_at: float = field(default_factory=time.time)


class AdapterCache:
    def __init__(self, am: AdaptedModel, budget_bytes: int) -> None:
        self.am = am
        self.budget = int(budget_bytes)
        self._entries: OrderedDict[AdapterKey, Resident] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0
        self.reused = 0  # installs that filled an evicted adapter's record instead of building one

    # --- any thread ---------------------------------------------------------------------------

    def touch(self, key: AdapterKey) -> Resident | None:
        """The resident entry (now most recently used), or None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def get(self, key: AdapterKey) -> Resident | None:
        with self._lock:
            return self._entries.get(key)

    def keys(self) -> list[AdapterKey]:
        with self._lock:
            return list(self._entries)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "loaded": len(self._entries), "bytes": sum(e.bytes for e in self._entries.values()),
                "budget": self.budget, "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "reused": self.reused,
            }

    # --- the model thread only ----------------------------------------------------------------

    def install(self, key: AdapterKey, manifest: dict[str, Any], tensors: dict[str, torch.Tensor],
                pinned: set[AdapterKey] | frozenset = frozenset()) -> Resident:
        """Add an adapter read from disk to the model; InvalidAdapter if it does not fit (the model
        keeps what it had, less any adapters evicted to make room, which the store still holds).

        When the cache is full, the least recently used adapters that are not `pinned` are evicted
        first, and if one of them was built alike (same config, sites and head), the new adapter's
        tensors are copied into its record instead of building one: building the modules was most
        of an install (io/install.py `reuse`)."""
        existing = self.get(key)
        if existing is not None:
            return existing
        structure = _structure(manifest)
        spare, size = self._make_room(structure, pinned)
        try:
            # the store checked the base fingerprint when the adapter was uploaded
            record = prepare(self.am, manifest, tensors, name=key.internal, source=f"adapter {key.public!r}",
                             check_base=False, reuse=spare)
            self.am.attach(record)
        except AdapterError as err:
            raise InvalidAdapter(f"adapter {key.public!r} does not fit this model: {err}") from None
        labels = record.meta.get("labels")
        if record.head is not None and not labels:
            labels = [f"LABEL_{i}" for i in range(head_width(record.head) or 0)]
        nbytes = size if record is spare else _resident_bytes(record)  # built alike: as big
        entry = Resident(key, record.name, nbytes, record.config.method,
                         labels if record.head is not None else None, structure)
        with self._lock:
            self._entries[key] = entry
            self.reused += record is spare
        return entry

    def evict(self, key: AdapterKey) -> bool:
        return self._evict(key) is not None

    def _evict(self, key: AdapterKey) -> Adapter | None:
        """Remove an adapter from the model; its record, now attached nowhere (None: not resident)."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return None
            self.evictions += 1
        record = self.am.adapter(entry.internal)
        # no gc.collect() per eviction: a full collection takes ~0.5 s with transformers imported,
        # and adapter modules hold no reference cycles, so reference counting frees them at once
        self.am.delete(entry.internal, collect=False)
        return record

    def _make_room(self, structure: str | None, pinned: set[AdapterKey] | frozenset) -> tuple[Adapter | None, int]:
        """Evict what a new adapter of `structure` needs (its size is that of a resident one built
        alike; unknown: nothing is evicted now, `over_budget` does it after); the record of an evicted
        one of that structure, to reuse, and that size."""
        with self._lock:
            size = next((e.bytes for e in self._entries.values() if e.structure == structure), None)
        if structure is None or size is None:
            return None, 0
        spare = None
        for victim in self.over_budget(pinned, incoming=size):
            resident = self.get(victim)  # None: evicted meanwhile (then _evict finds nothing either)
            alike = resident is not None and resident.structure == structure
            record = self._evict(victim)
            if alike and spare is None:
                spare = record
        return spare, size

    def over_budget(self, pinned: set[AdapterKey] | frozenset, incoming: int = 0) -> list[AdapterKey]:
        """Least recently used keys, not pinned, whose eviction brings the cache under budget (with
        room for `incoming` more bytes)."""
        with self._lock:
            excess = sum(e.bytes for e in self._entries.values()) + incoming - self.budget
            victims = []
            for key, entry in self._entries.items():
                if excess <= 0:
                    break
                if key not in pinned:
                    victims.append(key)
                    excess -= entry.bytes
            return victims




def _structure(manifest: dict[str, Any]) -> str | None:
    """What decides how an adapter's record is built: alike ones can share a record, in turn."""
    try:
        return json.dumps([manifest.get("config"), manifest.get("sites"), manifest.get("head"),
                           len(manifest.get("labels") or ())], sort_keys=True)
    except (TypeError, ValueError):
        return None


def _resident_bytes(record: Adapter) -> int:
    """Parameters, plus their copy in the sites' routing stacks (rebuilt when adapters change),
    padding included: each method's `routed_bytes()` says how much its slot can take."""
    return record.parameter_bytes() + sum(method.routed_bytes() for method in record.site_methods.values())
