"""LoRA slots of a captured decode step: fixed buffers at each linear layer, one per row.

Each linear layer of the base gets a slot, as vLLM's LoRA layers do (`set_lora` / `reset_lora`):
fixed buffers that the compiled step adds at that layer, for each row i of the step,

    h_i = W x_i + B_i (A_i x_i)        A_i [R, in], B_i [out, R] (s·B), zero past the adapter's rank

so a row's adapter is written into its row of the buffers, never compiled. An adapter rides along
if every part of it has a low-rank form (`SiteMethod.low_rank`: LoRA on a linear layer) of rank up
to R, at layers that have a slot.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..methods.base import SiteMethod, hf_conv1d
from ..model import AdaptedModel
from ..routes import RouteEntry


@dataclass
class _Slot:
    """One linear layer's buffers: A [rows, R, in], B [rows, out, R]."""

    a: torch.Tensor
    b: torch.Tensor


@dataclass
class Gate:
    """Open only while the captured step runs: eager forwards skip the slots."""

    open: bool = False


@dataclass
class _Parts:
    """An adapter that fits the slots: its record, its (layer, method) pairs and its parameters."""

    record: nn.Module
    methods: list[tuple[str, SiteMethod]]
    parameters: list[torch.Tensor]


@dataclass
class LoraSlots:
    """`rows` rows of slots of rank `rank` at every plain linear layer of `am`'s base but its output
    embeddings; `gate` opens them."""

    am: AdaptedModel
    rows: int
    rank: int
    gate: Gate = field(default_factory=Gate)
    layers: dict[str, _Slot] = field(default_factory=dict)

    def __post_init__(self) -> None:
        base: Any = self.am.base
        output = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        dtype = self.am.adapter_dtype
        for name, module in base.named_modules():
            width = _widths(module)
            if width is None or module is output:
                continue
            slot = _Slot(torch.zeros(self.rows, self.rank, width[0], dtype=dtype),
                         torch.zeros(self.rows, width[1], self.rank, dtype=dtype))
            self.layers[name] = slot
            _layer_slots(module).entries.append((slot, self.gate))
        self._holds: list[tuple] = [()] * self.rows  # what each row holds: (adapter, record id, versions)
        self._fit: dict[str, tuple[nn.Module, _Parts | None]] = {}  # each adapter's parts, per loaded record

    def fits(self, entry: RouteEntry) -> bool:
        """Whether a row naming `entry` (None: the base) can ride in the slots."""
        if entry is None:
            return True
        return isinstance(entry, str) and entry in self.am.loaded and self._parts(entry) is not None

    def write(self, entries: Sequence[RouteEntry], rows: Sequence[int]) -> None:
        """Row rows[k] of the slots holds entries[k]'s low-rank parts (None: all zero); a row is
        written again only when its adapter, or a parameter of it in place, changed since."""
        versions: dict[str, tuple] = {}
        for entry, row in zip(entries, rows, strict=True):
            parts = self._parts(entry) if isinstance(entry, str) else None
            if isinstance(entry, str) and parts is None:  # `fits` said yes: the adapter changed in between
                raise RuntimeError(f"adapter {entry!r} no longer fits the captured step's slots")
            if parts is not None and isinstance(entry, str):
                if entry not in versions:
                    versions[entry] = (entry, id(parts.record), tuple([p._version for p in parts.parameters]))
                holds = versions[entry]
            else:
                holds = ()
            if holds != self._holds[row]:
                self._write_row(row, entry, parts)
                self._holds[row] = holds

    def _write_row(self, row: int, entry: RouteEntry, parts: _Parts | None) -> None:
        for slot in self.layers.values():
            slot.a[row].zero_()
            slot.b[row].zero_()
        for path, method in parts.methods if parts is not None else ():
            form = method.low_rank()
            if form is None:
                raise RuntimeError(f"adapter {entry!r} lost its low-rank form at {path}")
            slot = self.layers[path]
            slot.a[row, :form[0].shape[0]].copy_(form[0])
            slot.b[row, :, :form[1].shape[1]].copy_(form[1])
        loaded = self.am.loaded
        for name in [n for n, (record, _) in self._fit.items() if n not in loaded or loaded[n] is not record]:
            del self._fit[name]  # a deleted or reloaded adapter's memory must not wait here

    def _parts(self, entry: str) -> _Parts | None:
        """Adapter `entry`'s layers and parameters, if every part has a low-rank form that fits a
        slot (worked out once per loaded record); None if not."""
        record = self.am.loaded[entry]
        known = self._fit.get(entry)
        if known is not None and known[0] is record:
            return known[1]
        methods = list(record.methods_by_path.items())
        whole_model = record.model_method is not None or record.head is not None or len(record.copies) > 0
        fits = not whole_model and all(_fits(method.low_rank(), self.layers.get(path), self.rank)
                                       for path, method in methods)
        parts = _Parts(record, methods, list(record.parameters())) if fits else None
        self._fit[entry] = (record, parts)
        return parts


def _fits(form: tuple[torch.Tensor, torch.Tensor] | None, slot: _Slot | None, rank: int) -> bool:
    """Whether a low-rank form (None: the part has none) fits a layer's slot (None: the layer has none)."""
    if form is None or slot is None:
        return False
    a, b = form
    return (a.dim() == 2 and b.dim() == 2 and a.shape[0] <= rank and a.shape[0] == b.shape[1]
            and a.shape[1] == slot.a.shape[2] and b.shape[0] == slot.b.shape[1]
            and a.dtype == b.dtype == slot.a.dtype and a.device == slot.a.device)


@dataclass
class _LayerSlots:
    """A linear layer's own forward and the slots of every captured step on it, each with its gate.
    Entries are only ever appended: a compiled graph finds its slot's tensors by this path (the
    layer's forward, its entry), unguarded, on every call."""

    forward: Callable[..., torch.Tensor]
    entries: list[tuple[_Slot, Gate]]


def _layer_slots(module: nn.Module) -> _LayerSlots:
    """The layer's slots, its forward wrapped once to add them: inside the layer's forward, not a hook,
    since dynamo guards the hooks a layer has when it is compiled, and the adapter sites hook layers
    later (hooks added to a layer that had none are not seen by the compiled graph, which the step
    does not need: its sites idle)."""
    forward = vars(module).get("forward")
    if isinstance(forward, functools.partial) and forward.func is _with_slots:
        return forward.args[0]
    layer = _LayerSlots(module.forward, [])
    module.forward = functools.partial(_with_slots, layer)
    return layer


def _with_slots(layer: _LayerSlots, x: torch.Tensor) -> torch.Tensor:
    """A linear layer's output, plus the slots of the captured step whose gate is open."""
    h = layer.forward(x)
    for slot, gate in layer.entries:
        if gate.open:
            return _add_slot(h, x, slot)
    return h


def _add_slot(h: torch.Tensor, x: torch.Tensor, slot: _Slot) -> torch.Tensor:
    """h plus, for each row, its slot's x Aᵀ Bᵀ, computed in the slot's dtype (x: one token per row)."""
    dtype, rows = slot.a.dtype, slot.a.shape[0]
    # multiply-and-sums accumulated in float32, which Inductor fuses (its mm calls cost more)
    low = (x.reshape(rows, 1, -1).to(dtype).float() * slot.a.float()).sum(-1).to(dtype)  # [rows, R]
    delta = (low.unsqueeze(1).float() * slot.b.float()).sum(-1).to(dtype)  # [rows, out]
    return (h.to(dtype) + delta.view(h.shape)).to(h.dtype)


def _widths(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a plain linear layer (an nn.Linear or GPT-2's Conv1D); None for anything else."""
    if type(module) is nn.Linear:
        return module.in_features, module.out_features
    if isinstance(module, hf_conv1d()):
        weight: Any = module.weight
        return int(weight.shape[0]), int(weight.shape[1])
    return None
