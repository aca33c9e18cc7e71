"""Per-row routing: which adapters each row of a batch uses, one or a weighted mixture.

    am.route(["a", None, {"a": 0.7, "b": 0.3}])   # row 0: a; row 1: the base; row 2: 0.7·a + 0.3·b

A mixture's row gets h + Σ w_i · (adapter_i(h) − h) at every site, each adapter applied to the same
h. For LoRA, IA³ and BitFit that is Σ w_i · delta_i, what `combine` builds into a new adapter; for
bottlenecks it is AdapterHub's Average of their outputs. Heads and module copies answer with the
weighted sum of their outputs. A batch stays one forward: a site runs each of its routing groups
once per mixture component (rows without that component use the empty slot, which the methods skip).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .errors import CompositionError

#: a row's adapters: a name, None (the base model), or a mixture as ((name, weight), ...) by name
RowAdapters = str | None | tuple[tuple[str, float], ...]
#: what `am.route` takes for a row: a name, None, or a {name: weight} mixture
RouteEntry = str | None | Mapping[str, float]


def finite_number(value: object) -> bool:
    """An int or float (not a bool) that is finite: what a mixture weight must be."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def row_adapters(entry: RouteEntry) -> RowAdapters:
    """One row's entry of a route, checked: a mixture becomes ((name, weight), ...) sorted by name, and
    a mixture of one adapter at weight 1 becomes its name."""
    if entry is None or isinstance(entry, str):
        return entry
    if not isinstance(entry, Mapping) or not entry:
        raise CompositionError(f"a route entry is an adapter name, None or a non-empty {{name: weight}} mixture, "
                               f"not {entry!r}")
    pairs = []
    for name, weight in entry.items():
        if not isinstance(name, str):
            raise CompositionError(f"mixture {dict(entry)!r}: adapter names are strings, not {name!r}")
        if not finite_number(weight):
            raise CompositionError(f"mixture weight of adapter {name!r} must be a finite number, not {weight!r}")
        pairs.append((name, float(weight)))
    pairs.sort()
    if len(pairs) == 1 and pairs[0][1] == 1.0:
        return pairs[0][0]
    return tuple(pairs)


def names_of(entry: RowAdapters) -> list[str]:
    """The adapter names a row uses."""
    if entry is None:
        return []
    return [entry] if isinstance(entry, str) else [n for n, _ in entry]


@dataclass
class Route:
    """Per-row routing for one forward: `names[i]` is row i's adapters (None = base model)."""

    names: tuple[RowAdapters, ...]
    #: row indices into each site's stacks, computed once per route, site, group, site version and
    #: mixture component; and each component's per-row weights, once per dtype and device
    rows: dict[tuple, tuple[torch.Tensor | None, tuple[str, ...]]] = field(default_factory=dict)
    weights: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mixed = any(isinstance(n, tuple) for n in self.names)
        #: every adapter some row uses (the hooks ask at every site, so it is worked out once)
        self.used: frozenset[str] = frozenset(n for entry in self.names for n in names_of(entry))
        width = max((len(n) if isinstance(n, tuple) else 1 for n in self.names), default=1)
        #: component k: (row i's k-th adapter or None, its weight) for every row. Without mixtures there
        #: is one component, the names themselves, at weight 1.
        self.components: list[tuple[tuple[str | None, ...], tuple[float, ...]]] = []
        for k in range(width):
            names: list[str | None] = []
            weights: list[float] = []
            for entry in self.names:
                if isinstance(entry, tuple):
                    name, weight = entry[k] if k < len(entry) else (None, 0.0)
                else:
                    name, weight = (entry, 1.0) if k == 0 else (None, 0.0)
                names.append(name)
                weights.append(weight)
            self.components.append((tuple(names), tuple(weights)))

    def weight(self, k: int, like: torch.Tensor, batch_dim: int) -> torch.Tensor:
        """Component k's per-row weights, shaped to broadcast against `like` along `batch_dim`."""
        key = (k, like.dtype, like.device, like.dim(), batch_dim % like.dim())
        found = self.weights.get(key)
        if found is None:
            view = [1] * like.dim()
            view[batch_dim % like.dim()] = len(self.names)
            found = torch.tensor(self.components[k][1], dtype=like.dtype, device=like.device).view(view)
            self.weights[key] = found
        return found


def route_of(entries: Sequence[RouteEntry]) -> Route:
    """A Route from `am.route`'s list; raises CompositionError for a malformed entry."""
    if isinstance(entries, str) or not isinstance(entries, Sequence) or len(entries) == 0:
        raise CompositionError("route() takes a non-empty list with one adapter name, None or {name: weight} "
                               "mixture per row")
    return Route(tuple(row_adapters(e) for e in entries))
