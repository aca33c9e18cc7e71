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
from torch import nn

from ..config import config_from_dict
from ..errors import AdapterError
from ..heads import hookless_copy, new_head
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
        self._template = hookless_copy(am.base.get_submodule(am.head_path)) if am.head_path else None

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
        am, internal = self.am, key.internal
        try:
            config = config_from_dict(manifest["config"])
            head_info = manifest.get("head") or None
            labels = manifest.get("labels")
            width = len(labels) if labels else (head_info or {}).get("num_labels")
            head: nn.Module | bool = False
            if head_info:
                if self._template is None:
                    raise InvalidAdapter("the adapter has a task head but this base model has no head module")
                # built here from a hook-free copy of the base head: copying the live head would
                # also deep-copy the hook that switches heads, and with it every loaded head
                head = new_head(self._template, width)
            am.add(internal, config, labels=labels, head=head)
        except (AdapterError, KeyError, TypeError, ValueError) as err:
            raise InvalidAdapter(f"adapter {key.public!r} does not fit this model: {err}") from None
        try:
            saved_sites = manifest.get("sites")
            if saved_sites is not None and saved_sites != am.site_names(internal):
                raise InvalidAdapter(f"adapter {key.public!r} was saved for other modules than this model has")
            am.load_adapter_state_dict(internal, tensors)
        except (AdapterError, InvalidAdapter) as err:
            am.delete(internal, collect=False)
            raise InvalidAdapter(f"adapter {key.public!r}: {err}") from None
        am.meta[internal].update(manifest.get("meta") or {})
        for site in am.sites.values():
            if internal in site.adapters:
                site.adapters[internal].eval()
        if internal in am.heads:
            am.heads[internal].eval()
        for path in am.copies.paths_of(internal):
            am.copies.copy_of(internal, path).eval()
        if labels is None and head_info and width:
            labels = [f"LABEL_{i}" for i in range(width)]
        entry = Resident(key, internal, _resident_bytes(am, internal), config.method, labels if head_info else None)
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


def _resident_bytes(am: AdaptedModel, name: str) -> int:
    """Parameters, plus their copy in the sites' routing stacks (rebuilt when adapters change)."""
    total = sum(p.numel() * p.element_size() for p in am.adapter_parameters(name))
    stacked = sum(
        p.numel() * p.element_size() for s in am.sites.values() if name in s.adapters for p in s.adapters[name].parameters()
    )
    return total + stacked
