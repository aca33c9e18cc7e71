"""Continuous batching for generation: rows join and leave a running decode at every step.

One `ContinuousDecoder` holds the rows being decoded and their shared key/value cache. Between two
steps the model thread may

- `admit` newcomers: their prompts are prefilled together (left-padded, each routed to its own
  adapter), their first tokens sampled, and their cache rows merged into the running cache;
- `drop` rows whose request was cancelled (a client went away): their cache rows go at once;
- `step`: one token for every running row, each routed to its own adapter and sampled with its own
  settings and seeded generator; finished rows leave the batch in the same step.

The cache stays transformers' own cache object; rows are inserted and evicted on its per-layer key
and value tensors ([batch, heads, seq, head_dim]). Every row is padded on the left: a row shorter
than the batch has masked columns before its first token, and columns no remaining row uses are cut
off. Positions count each row's real tokens, so a row's tokens do not depend on its neighbours.

While a captured step can take the running rows (serve/captured.py: the smallest one with room for
them, if their adapters ride along), their keys and values move into that step's fixed cache, each
row into a slot, and their tokens come from the compiled step; rows that finish free their slots;
the keys and values move back when a row joins or the captured step cannot go on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import TargetError
from ..hf_names import cache_keyword, last_logits_only, output_cache
from ..model import AdaptedModel
from ..routes import RouteEntry
from .base import pad
from .captured import CapturedStep
from .errors import RowFailure, non_finite
from .generate import Generated, GenerationRow, _generator, _sample


@dataclass(eq=False)
class _Running:
    handle: Any
    row: GenerationRow
    name: RouteEntry
    generator: torch.Generator
    tokens: list[int]
    position: int  # the position id of the next token fed
    next_token: int = 0  # the token fed at the next step
    finish: str = ""


class ContinuousDecoder:
    """`describe(handle)` gives a newcomer's GenerationRow and the internal name of its adapter
    (None: the base model); handles are the caller's own names for rows."""

    def __init__(self, am: AdaptedModel, pad_id: int, eos_id: int | None,
                 describe: Callable[[Any], tuple[GenerationRow, RouteEntry]],
                 routing: Callable[[list[RouteEntry]], ContextManager] | None = None,
                 captured: Sequence[CapturedStep] = ()) -> None:
        self.am, self.pad_id, self.eos_id, self.describe = am, pad_id, eos_id, describe
        self.captured = sorted(captured, key=lambda step: step.rows)
        self._fixed: CapturedStep | None = None  # the captured step whose fixed cache holds the rows
        self._slots: list[int] = []  # there, each running row's slot
        self.routing = routing or am.route
        self._keyword = cache_keyword(am.base)
        self._extra = last_logits_only(am.base)
        self._rows: list[_Running] = []
        self._cache: Any = None
        self._mask: torch.Tensor = _NO_ROWS  # [rows, cached columns]

    @property
    def running(self) -> int:
        return len(self._rows)

    def handles(self) -> list[Any]:
        return [r.handle for r in self._rows]

    @torch.inference_mode()
    def admit(self, handles: Sequence[Any]) -> list[tuple[Any, Generated | RowFailure]]:
        """Prefill newcomers as one batch and add them to the running rows; returns the rows that
        finished on their first token (a RowFailure: that row's logits were not finite). On an error
        nothing is admitted and the running rows stay."""
        if not handles:
            return []
        keyword = self._cache_keyword()
        entries = [(h, *self.describe(h)) for h in handles]
        rows = [_Running(h, row, name, _generator(row.seed), [], len(row.prompt)) for h, row, name in entries]
        input_ids, mask = pad([r.row.prompt for r in rows], self.pad_id, left=True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with self.routing([r.name for r in rows]):
            out = self.am(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                          **{keyword: None}, **self._extra)
        cache = output_cache(out)
        layers = _layers(cache)  # before any token is sampled: an unusable cache admits nothing
        logits = out.logits[:, -1, :].float().cpu()  # sampled on the CPU, with its generators
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        finished = [(r.handle, self._advance(r, logits[i], finite[i])) for i, r in enumerate(rows)]
        keep = [i for i, r in enumerate(rows) if not r.finish]
        if keep:
            _select(layers, keep)
            self._merge(cache, layers, mask[keep], [rows[i] for i in keep])
        return [(h, g) for h, g in finished if g is not None]

    @torch.inference_mode()
    def step(self) -> list[tuple[Any, Generated | RowFailure]]:
        """One token for every running row; returns the rows that finished (a RowFailure: that row's
        logits were not finite)."""
        if not self._rows:
            return []
        captured = self._captured_logits()
        if captured is not None:
            logits = captured.float().cpu()
        else:
            self._unfix()
            n = len(self._rows)
            mask = torch.cat([self._mask, torch.ones((n, 1), dtype=self._mask.dtype)], dim=1)
            input_ids = torch.tensor([r.next_token for r in self._rows], dtype=torch.long).unsqueeze(1)
            positions = torch.tensor([r.position for r in self._rows], dtype=torch.long).unsqueeze(1)
            with self.routing([r.name for r in self._rows]):
                out = self.am(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                              **{self._cache_keyword(): self._cache}, **self._extra)
            self._cache, self._mask = output_cache(out), mask
            logits = out.logits[:, -1, :].float().cpu()  # sampled on the CPU, with its generators
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        finished: list[tuple[Any, Generated | RowFailure]] = []
        for i, r in enumerate(self._rows):
            r.position += 1
            generated = self._advance(r, logits[i], finite[i])
            if generated is not None:
                finished.append((r.handle, generated))
        if finished:
            self._keep([i for i, r in enumerate(self._rows) if not r.finish])
        return finished

    def drop(self, gone: Callable[[Any], bool]) -> list[Any]:
        """Remove the rows whose handle `gone` names (cancelled requests); returns their handles."""
        dropped = [r.handle for r in self._rows if gone(r.handle)]
        if dropped:
            self._keep([i for i, r in enumerate(self._rows) if not gone(r.handle)])
        return dropped

    def abort(self) -> list[Any]:
        """Forget every running row (after a failed step); returns their handles."""
        handles = self.handles()
        self._rows, self._cache, self._mask, self._fixed, self._slots = [], None, _NO_ROWS, None, []
        return handles

    # --- inside ---------------------------------------------------------------------------------

    def _cache_keyword(self) -> str:
        """The keyword under which the base model takes its key/value cache."""
        if self._keyword is None:
            raise TargetError(f"{type(self.am.base).__name__}.forward takes no key/value cache, so it cannot generate")
        return self._keyword

    def _advance(self, r: _Running, logits: torch.Tensor, finite: bool = True) -> Generated | RowFailure | None:
        """Sample r's next token; the finished result if this ends the row (a failure of this row
        alone if its logits are not finite)."""
        if not finite:
            r.finish = "error"
            return RowFailure(non_finite())
        token = _sample(logits, r.row.temperature, r.generator, r.row.top_p)
        if self.eos_id is not None and token == self.eos_id and not r.row.ignore_eos:
            r.finish = "stop"
        else:
            r.tokens.append(token)
            if r.row.on_token is not None:
                try:
                    r.row.on_token(token)
                except Exception:  # noqa: BLE001 - a gone listener must not fail the other rows
                    r.row.on_token = None
            if len(r.tokens) >= r.row.max_new_tokens:
                r.finish = "length"
        if r.finish:
            return Generated(r.tokens, r.finish)
        r.next_token = token
        return None

    def _captured_logits(self) -> torch.Tensor | None:
        """The running rows' next logits from the smallest captured step that holds them and can take
        them (one that is off gives way to the next); None: the eager step runs."""
        rows, entries = self._rows, [r.name for r in self._rows]
        step = next((s for s in self.captured if s.rows >= len(rows) and s.applies(entries)), None)
        if step is None:
            return None
        if self._fixed is not step:
            self._unfix()
            width = self._mask.shape[1]
            if step.rows == 1 and (width != rows[0].position or not bool(self._mask.all())):
                return None  # columns of padding: a lone row's fixed cache holds its real tokens only
            if width + 1 > step.capacity:
                return None
            step.load([(layer.keys, layer.values) for layer in _layers(self._cache)],
                      self._mask if step.rows > 1 else None)
            self._cache, self._fixed, self._slots = None, step, list(range(len(rows)))
        if not step.has_room(self._slots):
            self._unfix()
            return None
        try:
            return step.step([r.next_token for r in rows], [r.position for r in rows], entries, self._slots)
        except Exception as err:  # noqa: BLE001 - a guard that would recompile, a failing kernel: eager from here
            step.turn_off(f"{type(err).__name__}: {str(err)[:300]}")
            self._unfix()
            return None

    def _unfix(self) -> None:
        """The rows' keys and values back from a captured step's fixed cache into a growing one."""
        if self._fixed is None:
            return
        from transformers import DynamicCache

        layers, mask = self._fixed.unload(self._slots)
        cache = DynamicCache()
        for i, (keys, values) in enumerate(layers):
            cache.update(keys, values, i)
        self._cache, self._mask, self._fixed, self._slots = cache, mask, None, []

    def _merge(self, cache: Any, layers: list, mask: torch.Tensor, rows: list[_Running]) -> None:
        if not self._rows:
            self._cache, self._mask, self._rows = cache, mask, rows
            return
        self._unfix()
        width = max(self._mask.shape[1], mask.shape[1])
        running = _layers(self._cache)
        for old, new in zip(running, layers, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)], dim=0)
            old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)], dim=0)
        self._mask = torch.cat([_left_pad_mask(self._mask, width), _left_pad_mask(mask, width)], dim=0)
        self._rows += rows

    def _keep(self, indices: list[int]) -> None:
        if not indices:
            self.abort()
            return
        if self._fixed is not None:  # the rows stay in their slots; the others' slots are free
            kept = set(indices)
            for i, slot in enumerate(self._slots):
                if i not in kept:
                    self._fixed.release(slot)
            self._slots = [self._slots[i] for i in indices]
            self._rows = [self._rows[i] for i in indices]
            return
        index = torch.tensor(indices, dtype=torch.long)
        layers = _layers(self._cache)
        _select(layers, index)
        mask = self._mask[index]
        first = int((mask.sum(0) > 0).nonzero()[0])  # columns before it are padding for every row left
        if first:
            for layer in layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            mask = mask[:, first:]
        self._mask = mask
        self._rows = [self._rows[i] for i in indices]


#: the mask of no running rows (every path that reads the mask has running rows)
_NO_ROWS = torch.zeros((0, 0), dtype=torch.long)


def _layers(cache: Any) -> list:
    """The cache's per-layer key/value holders, if rows can be cut and joined on them."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(_plain(layer) for layer in layers):
        raise TargetError(f"continuous batching needs a cache of full-attention key/value layers; this model returns "
                          f"{type(cache).__name__} ({sorted({type(x).__name__ for x in layers or ()})}); "
                          "serve it with scheduling='static'")
    return list(layers)


def _plain(layer: Any) -> bool:
    return (not getattr(layer, "is_sliding", False) and isinstance(getattr(layer, "keys", None), torch.Tensor)
            and isinstance(getattr(layer, "values", None), torch.Tensor) and layer.keys.dim() == 4)


def _select(layers: list, index: list[int] | torch.Tensor) -> None:
    index = torch.as_tensor(index, dtype=torch.long)
    for layer in layers:
        layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)


def _left_pad(states: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - states.shape[2]
    if missing <= 0:
        return states
    shape = (states.shape[0], states.shape[1], missing, states.shape[3])
    return torch.cat([states.new_zeros(shape), states], dim=2)


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    if missing <= 0:
        return mask
    return torch.cat([mask.new_zeros((mask.shape[0], missing)), mask], dim=1)
