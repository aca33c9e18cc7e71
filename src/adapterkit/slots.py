"""Routing slots: the adapters of one routing group at a site, each in a fixed slot of stacked tensors.
(Not `setups.Stack`, which is serial composition: this is the per-row routing's storage.)

Per-row routing gathers each row's parameters from tensors that stack every adapter of a group
(methods/*.stack). An adapter keeps its slot for as long as it is attached, so when a server
installs one adapter and evicts another, the stacks change by one slot (the method's `write_slot`)
instead of being rebuilt over all of them: with 64 LoRA adapters resident that rebuild was ~45 ms
per forward after every cache change, most of a batch's time on this CPU.

A slot whose adapter left is a hole: no row points at it, so its stale contents are never read,
and the next adapter to arrive takes it. The stacks' last row is the zero slot that rows without
an adapter use, at index `len(slots)`.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .methods.base import RouteStack, SiteMethod


@dataclass
class Group:
    """Adapters of one site that route together: `names[i]` holds slot i (None: a hole)."""

    names: tuple[str | None, ...]
    slot: dict[str, int]

    @property
    def zero(self) -> int:
        """The slot of rows without an adapter (the stacks' last row)."""
        return len(self.names)


def assign_slots(previous: list[str | None] | None, present: list[str]) -> list[str | None]:
    """Slots for `present`: names already placed keep theirs, new ones fill holes first, then the end.

    Trailing holes are dropped, so the stacks shrink when the adapters in the last slots leave."""
    here = set(present)
    slots = [n if n in here else None for n in (previous or [])]
    placed = set(slots)
    holes = (i for i, n in enumerate(slots) if n is None)
    for name in present:
        if name in placed:
            continue
        i = next(holes, None)
        if i is None:
            slots.append(name)
        else:
            slots[i] = name
    while slots and slots[-1] is None:
        slots.pop()
    return slots


class RoutingSlots:
    """A group's stacked parameters, the modules each slot was written from and their signatures."""

    def __init__(self, method: type[SiteMethod], group: Group, attached: Mapping[str, SiteMethod],
                 version: int) -> None:
        with torch.no_grad():
            self.stacked = stacked_group(method, group, attached)
        # weak references: a deleted adapter's memory must not wait for the next forward here
        self.modules = [weakref.ref(attached[n]) if n is not None else _GONE for n in group.names]
        self.signatures = [signature(attached[n]) if n is not None else None for n in group.names]
        self.method, self.version = method, version
        self.kind = _kind(attached[next(n for n in group.names if n is not None)])

    def current(self, group: Group, attached: Mapping[str, SiteMethod], used: tuple[str, ...],
                version: int) -> bool:
        """Whether the stack holds what the rows using `used` need (only their slots are checked)."""
        return version == self.version and all(
            self.modules[group.slot[n]]() is attached[n] and signature(attached[n]) == self.signatures[group.slot[n]]
            for n in used)

    def update(self, group: Group, attached: Mapping[str, SiteMethod], used: tuple[str, ...],
               version: int) -> bool:
        """Write the slots whose adapter is new (or, among `used`, changed) in place; False if the
        stack cannot take them (another slot count, a larger rank than it is padded to)."""
        if len(group.names) != len(self.modules):
            return False
        wanted = set(used)
        changed = []
        for i, name in enumerate(group.names):
            if name is None:
                self.modules[i], self.signatures[i] = _GONE, None
                continue
            module = attached[name]
            if module is not self.modules[i]() or (name in wanted and signature(module) != self.signatures[i]):
                changed.append((i, module))
        if any(_kind(module) != self.kind for _, module in changed):  # moved or cast: rebuild in the new kind
            return False
        with torch.no_grad():
            for i, module in changed:
                if not self.method.write_slot(self.stacked, i, module):
                    return False
                self.modules[i], self.signatures[i] = weakref.ref(module), signature(module)
        self.version = version
        return True


def stacked_group(method: type[SiteMethod], group: Group, attached: Mapping[str, SiteMethod]) -> RouteStack:
    """`method.stack` over the group's slots; holes hold a copy of another adapter that no row reads."""
    filler = attached[next(n for n in group.names if n is not None)]
    return method.stack([attached[n] if n is not None else filler for n in group.names])


def _gone() -> None:
    return None


_GONE = _gone  # what a weak reference to a freed module returns, for an empty slot


def _kind(module: nn.Module) -> tuple:
    return tuple((p.dtype, p.device) for p in parameters_of(module)[:1])


def signature(module: nn.Module) -> tuple:
    # data_ptr: `.to(dtype/device)` swaps a parameter's storage without bumping its version.
    return tuple([(p._version, p.data_ptr()) for p in parameters_of(module)])


def parameters_of(module: nn.Module) -> list[torch.Tensor]:
    """module.parameters() without its generator machinery (3x faster)."""
    params: list[torch.Tensor] = [p for p in module._parameters.values() if p is not None]
    for child in module._modules.values():
        if child is not None and (child._parameters or child._modules):  # a dropout: nothing to walk
            params += parameters_of(child)
    return params
