"""Serving the dominant adapter from merged weights (dLoRA's idea).

When every forward for a while names one mergeable adapter (LoRA, IA³, BitFit), its delta is folded
into the frozen weights and forwards run the plain base: no per-row routing at all, so one-adapter
traffic runs at the base model's own speed. The first forward that names anything else takes the
delta back out first, then routes per row as usual.

A merge changes what every tenant's rows run on, so it is checked before it serves anyone: the
merged weights must be finite and the merged model's output on a probe batch must equal the
adapter's routed output; a merge that fails the check is undone and the adapter is never merged
again. The frozen tensors a merge changes are copied first, so an unmerge restores them bit for
bit (not W + ΔW − ΔW, which rounds, and which an overflowing ΔW cannot undo at all). An adapter
whose merge would change more than `max_copy_bytes` of weights is never merged.

Every decision is made in the model thread between two forwards, so a forward never sees weights
half merged, and a forward is either all merged (every row names the merged adapter) or all routed.
An eviction of a merged adapter unmerges it first (`AdaptedModel.delete` does).

Merging is a bet that the next forwards name the same adapter; a merge and the unmerge after it
cost about as much as a few forwards. An adapter unmerged soon after its merge (the bet lost)
waits twice as many forwards in a row before its next merge, up to `max_after`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from ..errors import AdapterError
from ..model import AdaptedModel
from ..routes import RouteEntry

#: the merged output may differ from the routed one by float rounding only (relative to its scale)
PROBE_TOLERANCE = 1e-3


class DominantMerge:
    """`after`: how many forwards in a row must name the same adapter before it is merged.
    `probe`: runs the model on a fixed batch and returns its output (the check a merge must pass)."""

    def __init__(self, am: AdaptedModel, after: int = 8, probe: Callable[[], torch.Tensor] | None = None,
                 max_after: int = 1024, max_copy_bytes: int = 1 << 30) -> None:
        self.am, self.after, self.probe = am, max(1, int(after)), probe
        self.max_copy_bytes = int(max_copy_bytes)
        self.max_after = max(self.after, max_after)
        self.merged: str | None = None
        self._streak_name: str | None = None
        self._streak = 0
        self._merged_for = 0  # forwards served by the current merge
        self._wait: dict[str, int] = {}  # adapters whose last merge lost its bet: their longer streak
        self.refused: dict[str, str] = {}  # adapters whose merge failed or failed its check: why
        self.merges = self.unmerges = 0

    @contextlib.contextmanager
    def routing(self, names: Sequence[RouteEntry]) -> Iterator[None]:
        """The context one forward over rows naming `names` runs in."""
        if self.merged is not None and self.merged not in self.am.state.merged:
            self.merged = None  # evicted (and so unmerged) meanwhile
            self.am.activate(None)
        first = names[0] if names else None
        # the one adapter every row names (None: rows name different adapters, or none)
        single = first if isinstance(first, str) and all(n == first for n in names) else None
        if self.merged is not None and single != self.merged:
            self._unmerge(self.merged)
        if single is not None and self.merged is None:
            self._streak = self._streak + 1 if single == self._streak_name else 1
            self._streak_name = single
            if self._streak >= self._wait.get(single, self.after):
                self._merge(single)
        elif single is None:
            self._streak_name, self._streak = None, 0
        if self.merged is not None:
            self._merged_for += 1
            yield  # every row names the merged adapter: the merged base (and its head, if it has one)
        else:
            with self.am.route(list(names)):
                yield

    def unmerge(self) -> None:
        """Back to plain routing (the model thread, between forwards)."""
        if self.merged is not None:
            self._unmerge(self.merged)

    def _merge(self, name: str) -> None:
        if name in self.refused:
            return
        record = self.am.adapter(name)
        if record.model_method is not None or not all(m.mergeable for m in record.site_methods.values()):
            self.refused[name] = "its method cannot be merged"
            return
        copy = sum(t.numel() * t.element_size() for t in self.am.merged_tensors(name))
        if copy > self.max_copy_bytes:  # the originals could not be kept, so the unmerge would not be exact
            self.refused[name] = f"its merge changes {copy} bytes of weights, over the {self.max_copy_bytes} kept"
            return
        expected = self._probe(self.probe, [name]) if self.probe is not None else None
        try:
            self.am.merge(name, keep_original=True)
        except (AdapterError, RuntimeError, TypeError, NotImplementedError) as err:
            self.refused[name] = f"merge failed: {err}"  # tied weights, a quantised base, ...
            return
        self.am.activate(name)  # its sites skip the merged delta; its task head, if any, answers
        why = self._check(name, expected)
        if why is not None:
            self.am.activate(None)
            self.am.unmerge(name)  # the originals back, bit for bit
            self.refused[name] = why
            return
        self.merged, self._merged_for = name, 0
        self.merges += 1

    def _check(self, name: str, expected: torch.Tensor | None) -> str | None:
        """Why the merged weights must not serve (None: they may)."""
        if not all(bool(torch.isfinite(t).all()) for t in self.am.merged_tensors(name)):
            return "the merged weights hold NaN or infinite values"
        if expected is None or self.probe is None:  # no probe batch (`expected` is None then too)
            return None
        got = self._probe(self.probe, None)
        if not bool(torch.isfinite(expected).all()) or not bool(torch.isfinite(got).all()):
            return "its output on the probe batch is not finite"
        scale = float(expected.abs().max()) + 1e-6
        if float((got - expected).abs().max()) > PROBE_TOLERANCE * scale:
            return "the merged output differs from the routed output on the probe batch"
        return None

    def _probe(self, probe: Callable[[], torch.Tensor], route: list[str] | None) -> torch.Tensor:
        with torch.inference_mode():
            if route is None:
                return probe().float()
            with self.am.route(route):
                return probe().float()

    def _unmerge(self, name: str) -> None:
        """Takes out the merge of `name` (the merged adapter)."""
        self.merged = None
        self._streak_name, self._streak = None, 0
        if self._merged_for < self._wait.get(name, self.after):  # the bet lost: wait longer next time
            self._wait[name] = min(self.max_after, 2 * self._wait.get(name, self.after))
        self.am.activate(None)
        if name in self.am.state.merged:
            self.am.unmerge(name)
        self.unmerges += 1
