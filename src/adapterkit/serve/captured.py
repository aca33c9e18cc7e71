"""A captured decode step: the running rows' next tokens through a compiled forward over a fixed cache.

With few rows running, what a decode step costs beyond reading the weights is Python and small ops:
transformers' modules and hooks, rotary positions, norms, the cache growing by a concatenation,
and with per-row adapters the routing hooks at every adapted layer (bench/decode_floor.py: the tiny
Llama's step 1.76 ms eager, 0.86 ms compiled). The Engine compiles steps at start over transformers
StaticCaches: one for a lone row, with every one-row product written as the multiply-and-sum of
methods/kernels.py (Inductor fuses it with its neighbours), and steps for a few rows at once, whose
products call oneDNN's linear as eager inference does. The ContinuousDecoder takes the smallest step
that holds the running rows when every row's adapter can ride along:

- the base model, or the adapter merged into the weights (serve/merged.py), for every row;
- adapters whose every part has a low-rank form, in the step's LoRA slots (serve/capture_slots.py).

Anything else (more rows, a mixture, a bottleneck, a longer context than the caches hold) runs the
eager step; the decoder moves the rows' keys and values between the caches when it switches.

Each fixed cache's graph is compiled at start and keeps no guards: it is called only with the shapes
it was built for (`applies`, `has_room` and the cache lengths keep to them), so nothing compiles in
a request's path. A step that fails raises; the decoder then turns that captured step off for good,
with a warning, and runs the step eagerly.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..errors import TargetError
from ..hf_names import cache_keyword, last_logits_only
from ..model import AdaptedModel
from ..routes import RouteEntry
from .capture_slots import LoraSlots

#: a compiled step's logits may differ from the eager step's by float rounding (relative to their scale);
#: a bf16 or fp16 base rounds every product and activation (measured: 0.6% on the tiny Llama, 0.9% on
#: the 156M model of bench/vs_llamacpp.py), a wrong graph by the whole scale
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3}
HALF_CHECK_TOLERANCE = 2e-2
#: the fixed caches' lengths: the shortest, then each GROWTH times the one before, up to the capacity
#: (a step attends over its whole cache: 156M model, 2048 tokens cost about 2 ms a step more than 256,
#: in fp32 and bf16 alike; a row moves to the next cache when it outgrows its own)
FIRST_LENGTH, GROWTH = 256, 4
#: Inductor inlines a pointwise value into every reader unless it takes more ops than this (default
#: 30): the query's rotary embedding (a cosine and a sine per element) was recomputed for every cached
#: key. Given to fp32 steps over caches longer than FIRST_LENGTH only, as measured on the 156M model
#: (one AVX2 machine): over 1500 tokens 36.5 -> 31.5 ms a step; over 96 tokens in a cache of 256,
#: 18 -> 21.5 ms; bf16, 30 -> 80 ms and 17 -> 77 ms (an earlier machine gained in bf16 too: 14.7 ->
#: 11.1 ms over 2048 tokens)
INDUCTOR_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {"realize_opcount_threshold": 4}

_log = logging.getLogger(__name__)


class CapturedStep:
    """`capacity`: tokens the longest fixed cache holds (a longer row runs eagerly); `rank`: the
    slots' rank R (an adapter of a larger rank runs eagerly); `rows`: the rows a step feeds (fewer
    rows leave slots free). One graph is compiled for each of the fixed caches' `lengths`.

    Several rows share the cache's columns: every row writes its next token at the same column, so
    a shorter row has masked columns before its first token (as in the eager decoder's cache). A
    free slot is fed a padding token that attends only to itself; its logits are never read."""

    def __init__(self, am: AdaptedModel, capacity: int, rank: int = 16, rows: int = 1) -> None:
        from transformers import StaticCache

        if rows < 1:
            raise ValueError(f"rows: a captured step feeds at least one row, not {rows}")
        self.am, self.capacity, self.rank, self.rows = am, int(capacity), int(rank), int(rows)
        base: Any = am.base  # a transformers model: its config
        self.lengths = cache_lengths(self.capacity)
        self.caches: list[Any] = [StaticCache(config=base.config, max_cache_len=n) for n in self.lengths]
        # which of each fixed cache's columns each row reads (one row reads all it holds: no mask)
        self.masks = [torch.zeros(self.rows, n, dtype=torch.long) for n in self.lengths] if self.rows > 1 else []
        self._at = 0  # the fixed cache the rows are in
        self.column = 0  # the column the next token is written at: the columns filled so far
        self._extra = last_logits_only(base)
        keyword = cache_keyword(base)
        if keyword is None:
            raise TargetError(f"{type(base).__name__}.forward takes no key/value cache")
        self._keyword = keyword
        self.slots = LoraSlots(am, self.rows, self.rank)
        self._forwards: list[Any] = []  # a compiled step for each fixed cache
        self._threads = torch.get_num_threads()
        self.off: str | None = "not compiled yet"
        self.steps = 0

    @property
    def cache(self) -> Any:
        """The fixed cache the rows are in (a transformers StaticCache)."""
        return self.caches[self._at]

    # --- what the decoder asks ---------------------------------------------------------------

    def applies(self, entries: Sequence[RouteEntry]) -> bool:
        """Whether rows naming `entries` can take this step together."""
        if self.off is not None or len(entries) > self.rows or torch.get_num_threads() != self._threads:
            return False
        merged = self.am.state.merged
        if merged:  # its delta is in the weights already
            return all(isinstance(entry, str) and merged == {entry} for entry in entries)
        return all(self.slots.fits(entry) for entry in entries)

    def has_room(self, slots: Sequence[int]) -> bool:
        """Whether the rows in `slots` can write one more token (a longer cache, or columns that
        none of them reads, to cut)."""
        return self.column + 1 <= self.capacity or self._first_read(slots) > 0

    def step(self, tokens: Sequence[int], positions: Sequence[int], entries: Sequence[RouteEntry],
             slots: Sequence[int]) -> torch.Tensor:
        """The next token's logits [len(slots), vocab] for the rows in `slots`, fed `tokens` at
        `positions` with `entries`' adapters; the cache grows by one column."""
        self.slots.write([None] * len(entries) if self.am.state.merged else entries, slots)
        if self.column + 1 > self.lengths[self._at]:
            self._move(slots)
        ids = torch.zeros((self.rows, 1), dtype=torch.long)
        where = torch.zeros((self.rows, 1), dtype=torch.long)
        index = torch.tensor(slots, dtype=torch.long)
        ids[index, 0] = torch.tensor(tokens, dtype=torch.long)
        where[index, 0] = torch.tensor(positions, dtype=torch.long)
        column = torch.tensor([self.column], dtype=torch.long)
        masked = {}
        if self.rows > 1:
            mask = self.masks[self._at]
            mask[:, self.column] = 1  # a free slot reads its own token only
            masked = {"attention_mask": mask}
        with self._captured():
            out = self._forwards[self._at](input_ids=ids, position_ids=where, use_cache=True, cache_position=column,
                                           **masked, **{self._keyword: self.cache}, **self._extra)
        self.column += 1
        self.steps += 1
        return out.logits[index, -1, :]

    def load(self, layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor | None = None) -> None:
        """Put rows' keys and values ([n, heads, columns, dim] per layer, n <= rows; `mask` [n, columns]
        says which columns are a row's own, None: all) into slots 0..n-1 of the shortest fixed cache
        with room for them and the next token."""
        columns = layers[0][0].shape[2] if layers else 0
        at = next((i for i, n in enumerate(self.lengths) if n > columns), len(self.lengths) - 1)
        self._place(at, layers, mask)

    def unload(self, slots: Sequence[int]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """The keys and values of the rows in `slots` out of the fixed cache, as `load` takes them, from
        the first column any of them reads; and their mask."""
        first = self._first_read(slots)
        index = torch.tensor(slots, dtype=torch.long)
        layers = [(layer.keys[index, :, first:self.column].clone(), layer.values[index, :, first:self.column].clone())
                  for layer in self.cache.layers]
        mask = (self.masks[self._at][index, first:self.column].clone() if self.rows > 1
                else torch.ones((len(slots), self.column - first), dtype=torch.long))
        return layers, mask

    def release(self, slot: int) -> None:
        """Slot `slot`'s row left: its columns are no row's."""
        if self.rows > 1:
            self.masks[self._at][slot].zero_()

    def turn_off(self, why: str) -> None:
        if self.off is None:
            _log.warning("adapterkit: the captured decode step is off for %d row(s) (%s); they decode eagerly",
                         self.rows, why)
        self.off = why

    # --- building ------------------------------------------------------------------------------

    @torch.inference_mode()
    def build(self, probe: list[int]) -> None:
        """Compile the step for each fixed cache and check it against the eager step on `probe` (a
        few token ids); on any failure the step stays off (`off` says why) and every step runs
        eagerly."""
        # each its own graph, compiled by its first call, with fixed shapes, called by one thread, with
        # `applies` keeping to what it was built for: no guards (on the 156M model they cost 0.9 ms a
        # call; 0.35 ms skipping all but those that tell two graphs of one function apart)
        fp32 = getattr(self.am.base, "dtype", torch.float32) == torch.float32
        try:
            self._forwards = [torch.compile(_own_code(self.am.base.forward), dynamic=False, fullgraph=True,
                                            options=_options(fp32 and n > FIRST_LENGTH)) for n in self.lengths]
            why = self._check(probe[:self.lengths[0]])
        except Exception as err:  # noqa: BLE001 - no compiler, a model Inductor cannot trace: eager steps
            why = f"{type(err).__name__}: {str(err)[:300]}"
        self.off = None
        if why is not None:
            self.turn_off(why)
        self.steps = 0

    def _check(self, probe: list[int]) -> str | None:
        """Why the compiled steps must not serve (None: they may): each fixed cache's logits against
        the eager step's on the probe, from the probe's prefilled keys and values; with several rows,
        every other row one token shorter (masked columns, other positions)."""
        from transformers import DynamicCache

        if len(probe) < 3:
            return f"the probe needs 3 tokens, the shortest fixed cache holds {self.lengths[0]}"
        prompts = [probe[i % 2:] for i in range(self.rows)]
        width = len(probe) - 1
        layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        mask = torch.zeros((self.rows, width), dtype=torch.long)
        expected = []
        with self._plain():
            for i, prompt in enumerate(prompts):
                eager_cache: Any = DynamicCache()
                self.am.base(input_ids=torch.tensor([prompt[:-1]]), use_cache=True, **{self._keyword: eager_cache})
                own = len(prompt) - 1
                mask[i, width - own:] = 1
                for k, layer in enumerate(eager_cache.layers):
                    if i == 0:
                        layers.append((layer.keys.new_zeros((self.rows, *layer.keys.shape[1:2], width, layer.keys.shape[3])),
                                       layer.values.new_zeros((self.rows, *layer.values.shape[1:2], width, layer.values.shape[3]))))
                    layers[k][0][i, :, width - own:] = layer.keys[0]
                    layers[k][1][i, :, width - own:] = layer.values[0]
                expected.append(self.am.base(input_ids=torch.tensor([prompt[-1:]]), use_cache=True,
                                             position_ids=torch.tensor([[own]]), **{self._keyword: eager_cache},
                                             **self._extra).logits[0, -1])
        want = torch.stack(expected)
        scale = float(want.abs().max()) + 1e-6
        tolerance = CHECK_TOLERANCE.get(want.dtype, HALF_CHECK_TOLERANCE)
        slots = list(range(self.rows))
        self.off = None
        for at, length in enumerate(self.lengths):
            for _ in range(2):  # the second call runs what the first compiled
                self._place(at, layers, mask if self.rows > 1 else None)
                got = self.step([p[-1] for p in prompts], [len(p) - 1 for p in prompts], [None] * self.rows, slots)
            if not bool(torch.isfinite(got).all()) or float((got.float() - want.float()).abs().max()) > tolerance * scale:
                return f"its logits over {length} cached tokens differ from the eager step's on the probe"
        return None

    # --- inside --------------------------------------------------------------------------------

    def _place(self, at: int, layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor | None) -> None:
        """Rows' keys and values into slots 0..n-1 of fixed cache `at`, at its first columns."""
        self._at = at
        cache = self.cache
        cache.reset()
        columns = layers[0][0].shape[2] if layers else 0
        for i, (keys, values) in enumerate(layers):
            if keys.shape[0] < self.rows:  # every slot written, so the cache is made for all of them
                keys, values = _pad_rows(keys, self.rows), _pad_rows(values, self.rows)
            cache.update(keys, values, i)
        if self.rows > 1:
            own = self.masks[at]
            own.zero_()
            if mask is not None:
                own[:mask.shape[0], :columns] = mask
            else:
                own[:len(layers[0][0]) if layers else 0, :columns] = 1
        self.column = columns

    def _move(self, slots: Sequence[int]) -> None:
        """Every slot into the next longer cache; at the longest, the columns no row in `slots`
        reads cut from the front."""
        first = 0 if self._at + 1 < len(self.lengths) else self._first_read(slots)
        all_slots = list(range(self.rows))
        index = torch.tensor(all_slots, dtype=torch.long)
        layers = [(layer.keys[:, :, first:self.column].clone(), layer.values[:, :, first:self.column].clone())
                  for layer in self.cache.layers]
        mask = self.masks[self._at][index, first:self.column].clone() if self.rows > 1 else None
        self.load(layers, mask)

    def _first_read(self, slots: Sequence[int]) -> int:
        """The first column any row in `slots` reads (0 for one row: it reads them all)."""
        if self.rows == 1 or not slots:
            return 0
        read = self.masks[self._at][torch.tensor(slots, dtype=torch.long), :self.column].amax(0)
        return int(read.argmax()) if bool(read.any()) else self.column

    @contextlib.contextmanager
    def _plain(self) -> Iterator[None]:
        """No setup and no route (the hooks idle): the compiled graph was traced so, and a merged
        adapter is in the weights already."""
        state = self.am.state
        setup, route = state.setup, state.route
        state.setup = state.route = None
        try:
            yield
        finally:
            state.setup, state.route = setup, route

    @contextlib.contextmanager
    def _captured(self) -> Iterator[None]:
        """Inside a captured step: the slots open, and transformers' own ("eager") attention, which
        Inductor compiles into the graph: for one query its fused kernels beat the CPU's SDPA kernel,
        which pays for the whole fixed cache (156M model: 16.0 ms a step, not 20.5 ms)."""
        config: Any = getattr(self.am.base, "config", None)
        attention = getattr(config, "_attn_implementation", None)
        with self._plain():
            self.slots.gate.open = True
            if attention is not None:
                config._attn_implementation = "eager"
            try:
                yield
            finally:
                self.slots.gate.open = False
                if attention is not None:
                    config._attn_implementation = attention


def _pad_rows(states: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([states, states.new_zeros((rows - states.shape[0], *states.shape[1:]))])


def _own_code(forward: Callable[..., Any]) -> Callable[..., Any]:
    """A function calling `forward`, with a code object of its own: dynamo keeps compiled graphs per
    code object, and every model of one class shares its forward's. Without guards two graphs of one
    code object could not be told apart, and with them every Engine's graphs in the process would
    count against one recompile limit."""
    def decode(**kwargs: Any) -> Any:
        return forward(**kwargs)

    return types.FunctionType(decode.__code__.replace(), decode.__globals__, "decode", None, decode.__closure__)


def _options(realize: bool) -> dict[str, str | int | bool | Callable[..., Any]]:
    """Inductor's options for one graph: no guards; INDUCTOR_OPTIONS if `realize`."""
    return {"guard_filter_fn": _no_guards, **(INDUCTOR_OPTIONS if realize else {})}


def _no_guards(entries: list[Any]) -> list[bool]:
    return [False] * len(entries)


def cache_lengths(capacity: int) -> tuple[int, ...]:
    """The fixed caches' lengths for a capacity: FIRST_LENGTH, then GROWTH times longer, then `capacity`."""
    lengths, n = [], min(FIRST_LENGTH, capacity)
    while n < capacity:
        lengths.append(n)
        n *= GROWTH
    return (*lengths, capacity)


