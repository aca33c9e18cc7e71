"""A site: one frozen module of the base model and the named adapters attached to it.

The frozen module is not replaced or wrapped, so the base model keeps its structure and
state-dict names. Two hooks apply the active setup: a pre-hook for input-side methods (IA³ on
inputs, a bottleneck on a block's residual input), which replaces each positional argument that
some attached input-side adapter reads (its `input_arg`), and a forward hook for everything that
reads the module's output.
"""

from __future__ import annotations

from collections.abc import ItemsView, ValuesView
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import CompositionError
from .methods.base import RouteKey, RouteStack, SiteMethod, SiteShape, features_last, positional_parameters
from .routes import Route
from .setups import Average, Fuse, Setup, Stack, names_in
from .slots import Group, RoutingSlots, assign_slots, stacked_group


class AttachedAdapters(nn.ModuleDict):
    """A site's adapters by name, with a version that every change bumps.

    The per-forward caches (routing groups, stacked parameters, row indices) are keyed by the
    version, so a forward never builds or compares a tuple of all the names loaded: its cost
    depends on the adapters its batch uses, not on how many are attached.

    It holds SiteMethods only (`__setitem__` takes nothing else); ModuleDict, not generic in its
    values, types them as any Module, so its readers are retyped below for the checker alone
    (at run time they stay ModuleDict's own, which torch.compile knows).
    """

    # ModuleDict declares dict[str, Module]; only SiteMethods are set here (__setitem__)
    _modules: dict[str, SiteMethod]  # type: ignore[assignment]

    if TYPE_CHECKING:
        def __getitem__(self, key: str) -> SiteMethod: ...
        def items(self) -> ItemsView[str, SiteMethod]: ...
        def values(self) -> ValuesView[SiteMethod]: ...

    def __init__(self) -> None:
        super().__init__()
        self.version = 0

    # narrower than ModuleDict's (any Module) on purpose: only adapters are attached to a site
    def __setitem__(self, key: str, module: SiteMethod) -> None:  # type: ignore[override]
        super().__setitem__(key, module)
        self.version += 1

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self.version += 1

    def clear(self) -> None:
        super().clear()
        self.version += 1


@dataclass
class _Layout:
    """How a site's adapters route, derived once per version of them: every hooked forward reads it.

    Output-side groups are keyed (class, route_group()); input-side ones (class, route_group(),
    argument), one dict per argument index that some input-side adapter reads, in ascending order.
    Adapters reading different arguments never share a group, a stack or a row index.
    """

    version: int = -1
    output: dict[RouteKey, Group] = field(default_factory=dict)
    inputs: dict[int, dict[RouteKey, Group]] = field(default_factory=dict)
    #: the first parameter of the adapters here: a site whose frozen module computes in another dtype
    #: than it (a bf16 or quantized base) casts into it and back (kept, not its dtype: `.to()` changes that)
    first: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype | None:
        return self.first.dtype if self.first is not None else None


@dataclass
class ActiveState:
    """Shared by the model and all its sites; the hooks read it on every forward."""

    setup: Setup = None
    route: Route | None = None
    merged: set[str] = field(default_factory=set)


class Site(nn.Module):
    #: set with object.__setattr__ (not submodules): the frozen module belongs to the base model only
    frozen: nn.Module
    state: ActiveState

    def __init__(self, name: str, module: nn.Module, state: ActiveState) -> None:
        super().__init__()
        self.module_name = name
        self.shape = SiteShape.of(module, name)
        self.adapters = AttachedAdapters()
        self.fusions = nn.ModuleDict()
        # A plain attribute, not a submodule: the frozen module belongs to the base model only.
        object.__setattr__(self, "frozen", module)
        object.__setattr__(self, "state", state)
        self._stacks: dict[RouteKey, RoutingSlots] = {}
        self._slots: dict[RouteKey, list[str | None]] = {}  # group key -> the adapter in each slot
        self._layout_cache = _Layout()
        self._arg_names: tuple[str, ...] | None = None  # the frozen forward's positional ones, read when needed
        self._handles = [
            module.register_forward_pre_hook(self._before, with_kwargs=True),
            module.register_forward_hook(self._after, with_kwargs=True),
        ]

    def detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # --- the hooks ---------------------------------------------------------------------------

    def _idle(self) -> bool:
        """Nothing to apply: no setup and no route, or a route whose rows all run the base (a route
        replaces the setup), which is what every plain base-model forward and base-only batch hits."""
        route = self.state.route
        return not route.used if route is not None else self.state.setup is None

    def _check_batch(self, route: Route, target: torch.Tensor) -> None:
        batch = target.shape[self.shape.batch_dim % target.dim()]
        if batch != len(route.names):
            raise CompositionError(
                f"routing list has {len(route.names)} entries but the batch at {self.module_name!r} has {batch} rows"
            )

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if self._idle():
            return None
        inputs = self._layout().inputs
        if not inputs:
            return None
        for arg, groups in inputs.items():
            where = self._where(args, kwargs, arg)
            x = _get(args, kwargs, where)
            if where is None or x is None:  # (where is None: not passed, and then x is None too)
                if self._uses(groups, arg):
                    raise CompositionError(f"{self.module_name}: an input-side adapter reads argument {arg} of "
                                           "this module, which this call does not pass")
                continue
            given = x
            dtype = self._layout().dtype
            if dtype is not None and x.dtype != dtype and x.is_floating_point():
                x = x.to(dtype)
            route = self.state.route
            if route is not None:
                new = self._routed(route, groups, "input", x, None)
            else:
                new = self._apply_setup(self.state.setup, "input", x, x, inplace=False, arg=arg)
            if new is not x or x is not given:
                new = new.to(given.dtype)
                args, kwargs = _put(args, kwargs, where, new)
        return args, kwargs

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._idle():
            route = self.state.route
            if route is not None and self._layout().output:  # base rows only: a wrong-length list is still refused
                self._check_batch(route, output[0] if isinstance(output, tuple) else output)
            return None
        if not self._layout().output:  # only input-side adapters here: nothing to do after the module
            return None
        h, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, None)
        x = args[0] if args else _get(args, kwargs, _first(args, kwargs))
        given = h.dtype
        dtype = self._layout().dtype
        if dtype is not None and given != dtype and h.is_floating_point():
            # into the adapters' dtype and back: a fresh copy of h, which only this hook holds
            h = h.to(dtype)
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                x = x.to(dtype)
        route = self.state.route
        if route is not None:
            h = self._routed(route, self._layout().output, "output", x, h)
        else:
            h = self._apply_setup(self.state.setup, "output", x, h, inplace=self._owns_output())
        h = h.to(given)
        return h if rest is None else (h, *rest)

    def _uses(self, groups: dict[RouteKey, Group], arg: int) -> bool:
        """Whether the active setup or route applies any of `groups` (the adapters reading `arg`)."""
        if self.state.route is not None:
            used = self.state.route.used
            return any(n in g.slot for g in groups.values() for n in used)
        return self._touches(self.state.setup, "input", arg)

    def _where(self, args: tuple, kwargs: dict, arg: int) -> int | str | None:
        """Where argument `arg` of this call is: its position, its keyword, or None (not passed)."""
        if arg < len(args):
            return arg
        if arg == 0:
            return _first(args, kwargs)
        if self._arg_names is None:
            self._arg_names = positional_parameters(self.frozen)[0]
        names = self._arg_names
        return names[arg] if arg < len(names) and names[arg] in kwargs else None

    def _owns_output(self) -> bool:
        """Whether adapters may add their deltas into the site's output in place.

        Without autograd, the output of a Linear (or GPT-2 Conv1D) is a fresh tensor that only this
        hook holds, so a Stack or a route can update it in place instead of allocating an
        output-sized tensor per adapter (measured in bench/overhead.py). Average and Fuse reuse
        the output for every adapter, so they never do.
        """
        return not torch.is_grad_enabled() and self.shape.kind in ("linear", "hf_conv1d")

    # --- one setup for the whole batch -------------------------------------------------------

    def _live(self, name: str, side: str, arg: int = 0) -> SiteMethod | None:
        """The adapter `name` here, if it is attached, not merged, and acts on `side` (on the input
        side: on argument `arg`)."""
        adapter = self.adapters._modules.get(name)
        if adapter is None or adapter.side != side or name in self.state.merged:
            return None
        if side == "input" and adapter.input_arg != arg:
            return None
        return adapter

    def _touches(self, setup: Setup, side: str, arg: int) -> bool:
        return any(self._live(n, side, arg) is not None for n in names_in(setup))

    def _apply_setup(self, setup: Setup, side: str, x: torch.Tensor, h: torch.Tensor, inplace: bool,
               arg: int = 0) -> torch.Tensor:
        """One node of the setup tree at this site; on the input side, h is the module's argument
        number `arg` and only the adapters reading that argument act.

        `inplace`: h is a fresh tensor only this hook holds, so a name or a Stack may add into it;
        Average and Fuse read h again after each child, so their children never do.
        """
        if isinstance(setup, str):
            adapter = self._live(setup, side, arg)
            if adapter is None:
                return h
            if side == "input":
                return adapter(h)
            if inplace and adapter.adds_in_place:
                return adapter(x, h, inplace=True)
            return adapter(x, h)
        if isinstance(setup, Stack):
            for child in setup.children:
                h = self._apply_setup(child, side, x, h, inplace, arg)
            return h
        if isinstance(setup, Average):
            base = h
            for child, weight in setup.weights:
                if self._touches(child, side, arg):
                    h = h + weight * (self._apply_setup(child, side, x, base, False, arg) - base)
            return h
        if isinstance(setup, Fuse):
            live = [c for c in setup.children if self._touches(c, side, arg)]
            if side == "input":
                if live:
                    raise CompositionError(f"{self.module_name}: Fuse cannot combine input-side adapters (IA³ on "
                                           "inputs, bottlenecks on an input)")
                return h
            layer = self.fusions._modules.get(setup.key)
            if layer is None or not live:
                return h
            outs = [features_last(self._apply_setup(c, side, x, h, False), self.shape)[0] for c in live]
            h_last, restore = features_last(h, self.shape)
            return restore(layer(h_last, outs))
        return h

    def fusion_width(self) -> int:
        """The features a fusion layer here attends over."""
        return self.shape.out_features

    # --- per-row routing ---------------------------------------------------------------------

    def _layout(self) -> _Layout:
        """Adapters that route together: same class, same side (and argument), same routing-relevant
        settings.

        Cached per version of the attached adapters: every hooked forward asks, at every site.
        """
        if self._layout_cache.version != self.adapters.version:
            output: dict[RouteKey, list[str]] = {}
            inputs: dict[int, dict[RouteKey, list[str]]] = {}
            for name, adapter in self.adapters.items():
                if adapter.side == "input":
                    key = RouteKey(type(adapter), adapter.route_group(), adapter.input_arg)
                    inputs.setdefault(adapter.input_arg, {}).setdefault(key, []).append(name)
                else:
                    output.setdefault(RouteKey(type(adapter), adapter.route_group()), []).append(name)
            self._slots = {key: assign_slots(self._slots.get(key), names)
                           for key, names in [*output.items(), *(g for arg in inputs.values() for g in arg.items())]}
            self._stacks = {key: stack for key, stack in self._stacks.items() if key in self._slots}
            first = next((p for a in self.adapters.values() for p in a.parameters() if p.is_floating_point()), None)
            self._layout_cache = _Layout(self.adapters.version, self._grouped(output),
                                         {arg: self._grouped(inputs[arg]) for arg in sorted(inputs)},
                                         first)
        return self._layout_cache

    def _grouped(self, found: dict[RouteKey, list[str]]) -> dict[RouteKey, Group]:
        groups = {}
        for key in found:
            names = tuple(self._slots[key])
            groups[key] = Group(names, {n: i for i, n in enumerate(names) if n is not None})
        return groups

    def _stacked(self, key: RouteKey, group: Group, used: tuple[str, ...]) -> RouteStack:
        """The stacked parameters of `group`, updated slot by slot when its adapters change, or when
        an adapter that this batch uses has changed (in place, or swapped for another module).

        Only the adapters in `used` are checked: a changed adapter that no row uses cannot affect
        this forward, and it is checked again when a batch names it. That keeps the per-forward
        cost proportional to the adapters in the batch, not to all the adapters loaded.
        """
        attached = self.adapters._modules  # the plain dict: ModuleDict's indexing costs more
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            # The stack is part of the autograd graph, so it cannot be reused across steps; a compiled
            # graph stacks inside itself (its guards cannot read the cache's storage pointers).
            return stacked_group(key.method, group, attached)
        version = self.adapters.version
        cached = self._stacks.get(key)
        if cached is not None and (cached.current(group, attached, used, version)
                                   or cached.update(group, attached, used, version)):
            return cached.stacked
        cached = RoutingSlots(key.method, group, attached, version)
        self._stacks[key] = cached
        return cached.stacked

    def _routed(self, route: Route, groups: dict[RouteKey, Group], side: str, x: torch.Tensor,
                h: torch.Tensor | None) -> torch.Tensor:
        """Apply each of `groups` to its rows; on the input side x is the argument they read (and h
        is None), on the output side h is the module's output. A route with mixtures gives each row
        target + Σ_k w_k · (component k applied to target − target) (routes.py)."""
        target = x if side == "input" else h
        if target is None:
            raise CompositionError(f"{self.module_name}: per-row routing after the module found no output")
        self._check_batch(route, target)
        if route.mixed:
            return self._mixed(route, groups, side, x, target)
        out = target
        for key, group in groups.items():
            rows, used, group = self._rows(route, 0, key, group, target.device)
            if rows is None:
                continue
            stacked = self._stacked(key, group, used)
            inplace = side == "output" and key.method.adds_in_place and self._owns_output()
            out = key.method.route(stacked, rows, x, h, self.shape, inplace=inplace)
            if side == "input":
                x = out
            else:
                h = out
        return out  # the new x (input side) or h: the last group's result, or as given when none routed

    def _mixed(self, route: Route, groups: dict[RouteKey, Group], side: str, x: torch.Tensor,
               target: torch.Tensor) -> torch.Tensor:
        """target + Σ over components k and groups of w_k · (the group's adapters of component k − target):
        every adapter of a row's mixture reads the same target, whatever its group."""
        total: torch.Tensor | None = None
        for k in range(len(route.components)):
            for key, group in groups.items():
                rows, used, group = self._rows(route, k, key, group, target.device)
                if rows is None:
                    continue
                stacked = self._stacked(key, group, used)
                out = key.method.route(stacked, rows, x, None if side == "input" else target, self.shape)
                part = (out - target) * route.weight(k, target, self.shape.batch_dim)
                total = part if total is None else total + part
        return target if total is None else target + total

    def _rows(self, route: Route, k: int, key: RouteKey, group: Group,
              device: torch.device) -> tuple[torch.Tensor | None, tuple[str, ...], Group]:
        """Component k's slot per row in `group` (None: no row uses it), the adapters it uses, and the
        group itself (while training: narrowed to those adapters, whose stacks are rebuilt every step)."""
        names = route.components[k][0]
        if torch.is_grad_enabled():
            wanted = set(names)
            kept = tuple(n for n in group.names if n is not None and n in wanted)
            group = Group(kept, {n: i for i, n in enumerate(kept)})
        row_key = (self.module_name, key, self.adapters.version, torch.is_grad_enabled(), k)
        found = route.rows.get(row_key)
        if found is None:
            slot = group.slot
            idx = [slot.get(n, group.zero) if n is not None else group.zero for n in names]
            used = tuple({n: None for n in names if n in slot})
            found = (torch.tensor(idx, device=device) if used else None, used)
            route.rows[row_key] = found
        return found[0], found[1], group


def _first(args: tuple, kwargs: dict) -> int | str | None:
    """Where a call's input is: its first positional argument, else its first tensor keyword argument."""
    if args:
        return 0
    return next((key for key, value in kwargs.items() if isinstance(value, torch.Tensor)), None)


def _get(args: tuple, kwargs: dict, where: int | str | None) -> Any:
    if where is None:
        return None
    return args[where] if isinstance(where, int) else kwargs[where]


def _put(args: tuple, kwargs: dict, where: int | str, value: torch.Tensor) -> tuple[tuple, dict]:
    if isinstance(where, int):
        return (*args[:where], value, *args[where + 1:]), kwargs
    return args, {**kwargs, where: value}
