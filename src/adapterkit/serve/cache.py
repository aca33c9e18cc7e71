"""Loaded adapters: an LRU of adapters resident in one AdaptedModel, under a byte budget.

Each (tenant, name, version) is loaded under its own internal name "<tenant>__<name>__v<N>", so
that a new version and the one it replaces can serve side by side while requests for the old
one drain. Only the engine's model thread calls `install` and `evict` (the model is not
thread-safe); lookups (`touch`, `get`, `stats`) may come from any thread.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ..adapter import Adapter
from ..errors import AdapterError
from ..heads import head_width
from ..io.install import install
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
    loaded_at: float = field(default_factory=time.time)


class AdapterCache:
    def __init__(self, am: AdaptedModel, budget_bytes: int) -> None:
        self.am = am
        self.budget = int(budget_bytes)
        self._entries: OrderedDict[AdapterKey, Resident] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

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

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.bytes for e in self._entries.values())

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "loaded": len(self._entries), "bytes": sum(e.bytes for e in self._entries.values()),
                "budget": self.budget, "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
            }

    # --- the model thread only ----------------------------------------------------------------

    def install(self, key: AdapterKey, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Resident:
        """Add an adapter read from disk to the model; InvalidAdapter (model unchanged) if it does not fit."""
        existing = self.get(key)
        if existing is not None:
            return existing
        try:
            # the store checked the base fingerprint when the adapter was uploaded
            internal = install(self.am, manifest, tensors, name=key.internal, source=f"adapter {key.public!r}",
                               check_base=False)
        except AdapterError as err:
            raise InvalidAdapter(f"adapter {key.public!r} does not fit this model: {err}") from None
        record = self.am.adapter(internal)
        labels = record.meta.get("labels")
        if record.head is not None and not labels:
            labels = [f"LABEL_{i}" for i in range(head_width(record.head) or 0)]
        entry = Resident(key, internal, _resident_bytes(record), record.config.method,
                         labels if record.head is not None else None)
        with self._lock:
            self._entries[key] = entry
        return entry

    def evict(self, key: AdapterKey) -> bool:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            self.evictions += 1
        # no gc.collect() per eviction: a full collection takes ~0.5 s with transformers imported,
        # and adapter modules hold no reference cycles, so reference counting frees them at once
        self.am.delete(entry.internal, collect=False)
        return True

    def over_budget(self, pinned: set[AdapterKey]) -> list[AdapterKey]:
        """Least recently used keys, not pinned, whose eviction brings the cache under budget."""
        with self._lock:
            excess = sum(e.bytes for e in self._entries.values()) - self.budget
            victims = []
            for key, entry in self._entries.items():
                if excess <= 0:
                    break
                if key not in pinned:
                    victims.append(key)
                    excess -= entry.bytes
            return victims


def _resident_bytes(record: Adapter) -> int:
    """Parameters, plus their copy in the sites' routing stacks (rebuilt when adapters change),
    padding included: a method with `routed_bytes()` says how much its slot can take."""
    stacked = 0
    for method in record.site_methods.values():
        padded = getattr(method, "routed_bytes", None)
        stacked += padded() if padded is not None else sum(p.numel() * p.element_size() for p in method.parameters())
    return record.parameter_bytes() + stacked
