"""A captured decode step: one stream's next token through a compiled forward over a fixed cache.

With one row running, what a decode step costs beyond reading the weights is Python and small ops:
transformers' modules and hooks, rotary positions, norms, the cache growing by a concatenation
(bench/decode_floor.py: the tiny Llama's step 1.76 ms eager, 0.86 ms compiled). The Engine compiles
one step at start, for one row over a transformers StaticCache, with every one-row product written
as the multiply-and-sum of methods/kernels.py (Inductor fuses it with its neighbours). The
ContinuousDecoder takes it whenever exactly one row runs and that row's adapter can ride along:

- the base model, or the adapter merged into the weights (serve/merged.py) by itself;
- an adapter whose every part has a low-rank form (`SiteMethod.low_rank`: LoRA on a linear layer)
  of rank up to the slots' rank, at layers that have a slot.

Each linear layer of the base gets a slot, as vLLM's LoRA layers do (`set_lora` / `reset_lora`):
fixed buffers that the compiled step adds at that layer,

    h = W x + B_slot (A_slot x)        A_slot [R, in], B_slot [out, R] (s·B), zero past the rank

so a stream's adapter is written into the buffers, never compiled. Anything else (several rows, a
mixture, a bottleneck, a longer context than the cache holds) runs the eager step; the decoder moves
the row's keys and values between the two caches when it switches.

Each fixed cache's graph is compiled at start and keeps no guards: it is called only with the shapes
it was built for (`applies` and the cache lengths keep to them), so nothing compiles in a request's
path. A step that fails raises; the decoder then turns the captured step off for good, with a
warning, and runs that step eagerly.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import TargetError
from ..hf_names import cache_keyword, last_logits_only
from ..methods.base import SiteMethod, hf_conv1d
from ..methods.kernels import row_product_reference
from ..model import AdaptedModel
from ..routes import RouteEntry

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
#: key; 156M model over 2048 cached tokens, 22.7 -> 18.8 ms a step in fp32, 14.7 -> 11.1 ms in bf16
INDUCTOR_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {"realize_opcount_threshold": 4}

_log = logging.getLogger(__name__)


@dataclass
class _Slot:
    """One linear layer's buffers: A [R, in], B [out, R]."""

    a: torch.Tensor
    b: torch.Tensor


class CapturedStep:
    """`capacity`: tokens the longest fixed cache holds (a longer row runs eagerly); `rank`: the
    slots' rank R (an adapter of a larger rank runs eagerly). One graph is compiled for each of the
    fixed caches' `lengths`."""

    def __init__(self, am: AdaptedModel, capacity: int, rank: int = 16) -> None:
        from transformers import StaticCache

        self.am, self.capacity, self.rank = am, int(capacity), int(rank)
        base: Any = am.base  # a transformers model: its config, its output embeddings
        self.lengths = cache_lengths(self.capacity)
        self.caches: list[Any] = [StaticCache(config=base.config, max_cache_len=n) for n in self.lengths]
        self._at = 0  # the fixed cache the row is in
        self._extra = last_logits_only(base)
        keyword = cache_keyword(base)
        if keyword is None:
            raise TargetError(f"{type(base).__name__}.forward takes no key/value cache")
        self._keyword = keyword
        output = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        dtype = am.adapter_dtype
        self.slots: dict[str, _Slot] = {}
        self._gate = _Gate()  # open only during a compiled step: eager forwards skip the slots
        for name, module in base.named_modules():
            width = _widths(module)
            if width is None or module is output:
                continue
            slot = _Slot(torch.zeros(self.rank, width[0], dtype=dtype), torch.zeros(width[1], self.rank, dtype=dtype))
            self.slots[name] = slot
            # inside the layer's forward, not a hook: dynamo guards the hooks a layer has when it is
            # compiled, and the adapter sites hook layers later (hooks added to a layer that had none
            # are not seen by the compiled graph, which the step does not need: its sites idle)
            module.forward = functools.partial(_with_slot, module.forward, slot, self._gate)
        self._forwards: list[Any] = []  # a compiled step for each fixed cache
        self._threads = torch.get_num_threads()
        self.length = 0  # tokens in the row's fixed cache
        self._holds: tuple = ()  # what the slots hold: (adapter, its record, its parameters' versions)
        self._fit: tuple[str, nn.Module, _Parts | None] | None = None  # the last adapter `_parts` looked at
        self.off: str | None = "not compiled yet"
        self.steps = 0

    @property
    def cache(self) -> Any:
        """The fixed cache the row is in (a transformers StaticCache)."""
        return self.caches[self._at]

    # --- what the decoder asks ---------------------------------------------------------------

    def applies(self, entry: RouteEntry, position: int) -> bool:
        """Whether a lone row naming `entry`, about to feed position `position`, can take this step."""
        if self.off is not None or position + 1 > self.capacity or torch.get_num_threads() != self._threads:
            return False
        merged = self.am.state.merged
        if merged:
            return isinstance(entry, str) and merged == {entry}  # its delta is in the weights already
        if entry is None:
            return True
        if not isinstance(entry, str) or entry not in self.am.loaded:
            return False
        return self._parts(entry) is not None

    def step(self, token: int, position: int, entry: RouteEntry) -> torch.Tensor:
        """The next token's logits [1, vocab] for the row in the fixed cache, which grows by one."""
        self._write(entry if not self.am.state.merged else None)
        if position + 1 > self.lengths[self._at]:
            self.load(self.unload())  # into the next longer cache
        ids = torch.tensor([[token]], dtype=torch.long)
        where = torch.tensor([position], dtype=torch.long)
        with self._captured():
            out = self._forwards[self._at](input_ids=ids, position_ids=where.unsqueeze(0), use_cache=True,
                                           cache_position=where, **{self._keyword: self.cache}, **self._extra)
        self.length = position + 1
        self.steps += 1
        return out.logits[:, -1, :]

    def load(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put one row's keys and values ([1, heads, tokens, dim] per layer) into the shortest fixed
        cache with room for them and the next token."""
        length = layers[0][0].shape[2] if layers else 0
        self._load(next((i for i, n in enumerate(self.lengths) if n > length), len(self.lengths) - 1), layers)

    def _load(self, at: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._at = at
        self.cache.reset()
        for i, (keys, values) in enumerate(layers):
            self.cache.update(keys, values, i)
        self.length = layers[0][0].shape[2] if layers else 0

    def unload(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The row's keys and values out of the fixed cache, as `load` takes them."""
        return [(layer.keys[:, :, :self.length].clone(), layer.values[:, :, :self.length].clone())
                for layer in self.cache.layers]

    def turn_off(self, why: str) -> None:
        if self.off is None:
            _log.warning("adapterkit: the captured decode step is off (%s); one stream decodes eagerly", why)
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
        options: dict[str, str | int | bool | Callable[..., Any]] = {"guard_filter_fn": _no_guards, **INDUCTOR_OPTIONS}
        try:
            self._forwards = [torch.compile(_own_code(self.am.base.forward), dynamic=False, fullgraph=True,
                                            options=options) for _ in self.lengths]
            why = self._check(probe[:self.lengths[0]])
        except Exception as err:  # noqa: BLE001 - no compiler, a model Inductor cannot trace: eager steps
            why = f"{type(err).__name__}: {str(err)[:300]}"
        self.off = None
        if why is not None:
            self.turn_off(why)
        self.steps = 0

    def _check(self, probe: list[int]) -> str | None:
        """Why the compiled steps must not serve (None: they may): each fixed cache's logits against
        the eager step's on the probe, all from the probe's prefilled keys and values."""
        from transformers import DynamicCache

        if len(probe) < 2:
            return f"the probe needs 2 tokens, the shortest fixed cache holds {self.lengths[0]}"
        ids = torch.tensor([probe[:-1]], dtype=torch.long)
        eager_cache: Any = DynamicCache()
        with self._plain():
            self.am.base(input_ids=ids, use_cache=True, **{self._keyword: eager_cache})
            layers = [(layer.keys.clone(), layer.values.clone()) for layer in eager_cache.layers]
            expected = self.am.base(input_ids=torch.tensor([probe[-1:]]), use_cache=True,
                                    position_ids=torch.tensor([[len(probe) - 1]]), **{self._keyword: eager_cache},
                                    **self._extra).logits[:, -1]
        scale = float(expected.abs().max()) + 1e-6
        tolerance = CHECK_TOLERANCE.get(expected.dtype, HALF_CHECK_TOLERANCE)
        self.off = None
        for at, length in enumerate(self.lengths):
            for _ in range(2):  # the second call runs what the first compiled
                self._load(at, layers)
                got = self.step(probe[-1], len(probe) - 1, None)
            if not bool(torch.isfinite(got).all()) or float((got.float() - expected.float()).abs().max()) > tolerance * scale:
                return f"its logits over {length} cached tokens differ from the eager step's on the probe"
        return None

    # --- inside --------------------------------------------------------------------------------

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
            self._gate.open = True
            if attention is not None:
                config._attn_implementation = "eager"
            try:
                yield
            finally:
                self._gate.open = False
                if attention is not None:
                    config._attn_implementation = attention

    def _parts(self, entry: str) -> _Parts | None:
        """Adapter `entry`'s layers and parameters, if every part has a low-rank form that fits a
        slot (worked out once per loaded record); None if not."""
        record = self.am.loaded[entry]
        if self._fit is not None and self._fit[0] == entry and self._fit[1] is record:
            return self._fit[2]
        methods = list(record.methods_by_path.items())
        whole_model = record.model_method is not None or record.head is not None or len(record.copies) > 0
        fits = not whole_model and all(_fits(method.low_rank(), self.slots.get(path), self.rank)
                                       for path, method in methods)
        parts = _Parts(record, methods, list(record.parameters())) if fits else None
        self._fit = (entry, record, parts)
        return parts

    def _write(self, entry: RouteEntry) -> None:
        """The slots hold `entry`'s low-rank parts (None: all zero); written again only when the
        adapter, or a parameter of it in place, changed since the last write."""
        parts = self._parts(entry) if isinstance(entry, str) else None
        if isinstance(entry, str) and parts is None:  # `applies` said yes: the adapter changed in between
            raise RuntimeError(f"adapter {entry!r} no longer fits the captured step's slots")
        holds = (entry, id(parts.record), tuple(p._version for p in parts.parameters)) if parts is not None else ()
        if holds == self._holds:
            return
        for slot in self.slots.values():
            slot.a.zero_()
            slot.b.zero_()
        for path, method in parts.methods if parts is not None else ():
            form = method.low_rank()
            if form is None:
                raise RuntimeError(f"adapter {entry!r} lost its low-rank form at {path}")
            slot = self.slots[path]
            slot.a[:form[0].shape[0]].copy_(form[0])
            slot.b[:, :form[1].shape[1]].copy_(form[1])
        self._holds = holds


def _own_code(forward: Callable[..., Any]) -> Callable[..., Any]:
    """A function calling `forward`, with a code object of its own: dynamo keeps compiled graphs per
    code object, and every model of one class shares its forward's. Without guards two graphs of one
    code object could not be told apart, and with them every Engine's graphs in the process would
    count against one recompile limit."""
    def decode(**kwargs: Any) -> Any:
        return forward(**kwargs)

    return types.FunctionType(decode.__code__.replace(), decode.__globals__, "decode", None, decode.__closure__)


def _no_guards(entries: list[Any]) -> list[bool]:
    return [False] * len(entries)


def cache_lengths(capacity: int) -> tuple[int, ...]:
    """The fixed caches' lengths for a capacity: FIRST_LENGTH, then GROWTH times longer, then `capacity`."""
    lengths, n = [], min(FIRST_LENGTH, capacity)
    while n < capacity:
        lengths.append(n)
        n *= GROWTH
    return (*lengths, capacity)


@dataclass
class _Parts:
    """An adapter that fits the slots: its record, its (layer, method) pairs and its parameters."""

    record: nn.Module
    methods: list[tuple[str, SiteMethod]]
    parameters: list[torch.Tensor]


def _fits(form: tuple[torch.Tensor, torch.Tensor] | None, slot: _Slot | None, rank: int) -> bool:
    """Whether a low-rank form (None: the part has none) fits a layer's slot (None: the layer has none)."""
    if form is None or slot is None:
        return False
    a, b = form
    return (a.dim() == 2 and b.dim() == 2 and a.shape[0] <= rank and a.shape[0] == b.shape[1]
            and a.shape[1] == slot.a.shape[1] and b.shape[0] == slot.b.shape[0]
            and a.dtype == b.dtype == slot.a.dtype and a.device == slot.a.device)


@dataclass
class _Gate:
    open: bool = False


def _with_slot(forward: Callable[..., torch.Tensor], slot: _Slot, gate: _Gate, x: torch.Tensor) -> torch.Tensor:
    """A linear layer's output plus its slot's x Aᵀ Bᵀ, computed in the slot's dtype, while the gate
    is open (a captured step, whose x is one row); its plain output otherwise."""
    h = forward(x)
    if not gate.open:
        return h
    dtype = slot.a.dtype
    # as the step's products: multiply-and-sums that Inductor fuses (its mm calls cost more)
    low = row_product_reference(x.reshape(1, -1).to(dtype), slot.a)
    return (h.to(dtype) + row_product_reference(low.view(1, -1), slot.b).view(h.shape)).to(h.dtype)


def _widths(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a plain linear layer (an nn.Linear or GPT-2's Conv1D); None for anything else."""
    if type(module) is nn.Linear:
        return module.in_features, module.out_features
    if isinstance(module, hf_conv1d()):
        weight: Any = module.weight
        return int(weight.shape[0]), int(weight.shape[1])
    return None
