"""Serving the dominant adapter from merged weights (dLoRA's idea).

When every forward for a while names one mergeable adapter (LoRA, IA³, BitFit), its delta is folded
into the frozen weights and forwards run the plain base: no per-row routing at all, so one-adapter
traffic runs at the base model's own speed. The first forward that names anything else takes the
delta back out first, then routes per row as usual.

Every decision is made in the model thread between two forwards, so a forward never sees weights
half merged, and a forward is either all merged (every row names the merged adapter) or all routed.
Merging and unmerging are exact up to float rounding (W + s·BA - s·BA); an eviction of a merged
adapter unmerges it first (`AdaptedModel.delete` does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from ..errors import AdapterError
from ..model import AdaptedModel

MERGEABLE = frozenset({"lora", "ia3", "bitfit"})


class DominantMerge:
    """`after`: how many forwards in a row must name the same adapter before it is merged."""

    def __init__(self, am: AdaptedModel, after: int = 8) -> None:
        self.am, self.after = am, max(1, int(after))
        self.merged: str | None = None
        self._streak_name: str | None = None
        self._streak = 0
        self._refused: set[str] = set()  # adapters whose merge failed (tied weights, an int8 base, ...)
        self.merges = self.unmerges = 0

    @contextlib.contextmanager
    def routing(self, names: Sequence[str | None]) -> Iterator[None]:
        """The context one forward over rows naming `names` runs in."""
        if self.merged is not None and self.merged not in self.am.state.merged:
            self.merged = None  # evicted (and so unmerged) meanwhile
            self.am.activate(None)
        first = names[0] if names else None
        single = first is not None and all(n == first for n in names)
        if self.merged is not None and not (single and first == self.merged):
            self._unmerge()
        if single and self.merged is None:
            self._streak = self._streak + 1 if first == self._streak_name else 1
            self._streak_name = first
            if self._streak >= self.after:
                self._merge(first)
        elif not single:
            self._streak_name, self._streak = None, 0
        if self.merged is not None:
            yield  # every row names the merged adapter: the merged base (and its head, if it has one)
        else:
            with self.am.route(list(names)):
                yield

    def unmerge(self) -> None:
        """Back to plain routing (the model thread, between forwards)."""
        if self.merged is not None:
            self._unmerge()

    def _merge(self, name: str) -> None:
        if name in self._refused or self.am.adapter(name).config.method not in MERGEABLE:
            return
        try:
            self.am.merge(name)
        except (AdapterError, RuntimeError, TypeError, NotImplementedError):
            self._refused.add(name)
            return
        self.am.activate(name)  # its sites skip the merged delta; its task head, if any, answers
        self.merged = name
        self.merges += 1

    def _unmerge(self) -> None:
        name, self.merged = self.merged, None
        self._streak_name, self._streak = None, 0
        self.am.activate(None)
        if name in self.am.state.merged:
            self.am.unmerge(name)
        self.unmerges += 1
