"""Task heads that belong to adapters: a classifier with its own labels travels with its adapter.

The frozen model's own head module stays in place; a forward hook swaps in the active adapter's
head output (or, when routing, each row's head output).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import CompositionError
from .methods.base import sum_of
from .routes import Route, RowAdapters, names_of
from .setups import Setup, names_in
from .site import ActiveState

#: attribute names of classification / LM heads in transformers and torchvision models
HEAD_NAMES = ("classifier", "score", "lm_head", "qa_outputs", "head", "fc")


def find_head(model: nn.Module) -> str | None:
    names = dict(model.named_modules())
    for candidate in HEAD_NAMES:
        if candidate in names and any(p.numel() for p in names[candidate].parameters()):
            return candidate
    return None


def hookless_copy(module: nn.Module) -> nn.Module:
    """A deep copy of a module without its hooks (and without what the hooks reference).

    A base head or copied module carries the HeadSwitch hook, which references every adapter's
    copy; copying through it would duplicate them all.
    """
    memo: dict[int, Any] = {}
    for sub in module.modules():
        for attr, value in vars(sub).items():
            if attr.endswith("hooks") or attr.endswith("hooks_with_kwargs") or attr.endswith("hooks_always_called"):
                memo[id(value)] = type(value)()
    return copy.deepcopy(module, memo)


def head_width(head: nn.Module) -> int | None:
    """The number of outputs of a head: its last Linear's (None if it has none)."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def new_head(template: nn.Module, num_labels: int | None) -> nn.Module:
    """A trainable copy of the base head, its last Linear resized to `num_labels` outputs."""
    head = hookless_copy(template)
    if num_labels is None:
        return head
    last: str | None = None
    old: nn.Linear | None = None
    for name, module in head.named_modules():
        if isinstance(module, nn.Linear):
            last, old = name, module
    if last is None or old is None:
        raise ValueError(f"cannot resize a head without a Linear layer ({type(template).__name__})")
    fresh = nn.Linear(old.in_features, num_labels, bias=old.bias is not None)
    nn.init.normal_(fresh.weight, std=0.02)
    if fresh.bias is not None:
        nn.init.zeros_(fresh.bias)
    if not fresh.weight.is_meta:  # built on meta, it is given the file's tensors (io/install.py)
        fresh.to(old.weight.device)
    if last == "":
        return fresh
    parent_name, _, attr = last.rpartition(".")
    parent = head.get_submodule(parent_name) if parent_name else head
    setattr(parent, attr, fresh)
    return head


class HeadSwitch:
    """Replaces a base module's output with the active adapter's own module (per row when routing).

    `own(name)` is that adapter's module here (its task head, or its copy of this module), or None.
    """

    def __init__(self, module: nn.Module, own: Callable[[str], nn.Module | None], state: ActiveState) -> None:
        self.own, self.state = own, state
        self.handle = module.register_forward_hook(self._after, with_kwargs=True)

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        route = self.state.route
        if route is not None and route.mixed:
            return self._mixed(route, args, kwargs, output)
        if route is not None:
            return self._routed(route.names, args, kwargs, output)  # (no mixture: every entry a name or None)
        owned = self._owned(self.state.setup)
        return None if owned is None else _call_in_own_dtype(owned[1], args, kwargs, output.dtype)

    def owner(self, setup: Setup) -> str | None:
        """The adapter whose module answers for a setup: the last one in it that has one."""
        owned = self._owned(setup)
        return None if owned is None else owned[0]

    def _owned(self, setup: Setup) -> tuple[str, nn.Module] | None:
        """(name, module) of the adapter whose module answers for a setup, or None."""
        for name in reversed(names_in(setup)):
            own = self.own(name)
            if own is not None:
                return name, own
        return None

    def _owners(self, names: set[str] | frozenset[str]) -> dict[str, nn.Module]:
        """Name -> own module of the adapters among `names` that have one here, by name."""
        # a plain loop: torch.compile cannot trace an assignment expression inside a comprehension
        used: dict[str, nn.Module] = {}
        for n in sorted(names):
            own = self.own(n)
            if own is not None:
                used[n] = own
        return used

    def _routed(self, names: tuple[RowAdapters, ...], args: tuple, kwargs: dict,
                base_out: torch.Tensor) -> torch.Tensor | None:
        used = self._owners({n for n in names if isinstance(n, str)})
        if not used:
            return None
        x, rest = args[0], args[1:]
        # Heads are tiny next to the body, so one call per distinct head in the batch is cheap;
        # label counts may differ, so narrower outputs are zero-padded on the right.
        parts = {n: _call_in_own_dtype(own, (x[[i for i, m in enumerate(names) if m == n]], *rest), kwargs,
                                       base_out.dtype)
                 for n, own in used.items()}
        width = max([p.shape[-1] for p in parts.values()] + [base_out.shape[-1]])
        out = torch.zeros(*base_out.shape[:-1], width, dtype=base_out.dtype, device=base_out.device)
        out[..., : base_out.shape[-1]] = base_out
        for n, part in parts.items():
            rows = [i for i, m in enumerate(names) if m == n]
            out[rows] = 0
            out[rows, ..., : part.shape[-1]] = part
        return out

    def _mixed(self, route: Route, args: tuple, kwargs: dict, base_out: torch.Tensor) -> torch.Tensor | None:
        """Routed, with mixtures: a mixture's row is Σ w_i · (adapter i's module, or the base's, on that
        row), which needs one output width (one label set) across the mixture."""
        used = self._owners(route.used)
        if not used:
            return None
        x, rest = args[0], args[1:]
        rows_of = {n: [i for i, e in enumerate(route.names) if n in names_of(e)] for n in used}
        parts = {n: dict(zip(rows, _call_in_own_dtype(used[n], (x[rows], *rest), kwargs, base_out.dtype), strict=True))
                 for n, rows in rows_of.items()}
        width = max([next(iter(p.values())).shape[-1] for p in parts.values()] + [base_out.shape[-1]])
        out = torch.zeros(*base_out.shape[:-1], width, dtype=base_out.dtype, device=base_out.device)
        out[..., : base_out.shape[-1]] = base_out
        for i, entry in enumerate(route.names):
            if isinstance(entry, str) and entry in parts:
                out[i] = 0
                out[i, ..., : parts[entry][i].shape[-1]] = parts[entry][i]
            elif isinstance(entry, tuple):
                answers = [(parts[n][i] if n in parts else base_out[i], w) for n, w in entry]
                widths = {a.shape[-1] for a, _ in answers}
                if len(widths) > 1:
                    raise CompositionError(f"mixture {dict(entry)}: its adapters' heads give {sorted(widths)} outputs; "
                                           "a mixture needs one label set")
                out[i] = 0
                out[i, ..., : widths.pop()] = sum_of(w * a for a, w in answers)
        return out

    def remove(self) -> None:
        self.handle.remove()


def _call_in_own_dtype(module: nn.Module, args: tuple, kwargs: dict, out_dtype: torch.dtype) -> torch.Tensor:
    """`module(*args, **kwargs)` with floating tensor arguments cast to the module's dtype and the
    result to `out_dtype`: an adapter's head (fp32, trained) may answer for a bf16 base's."""
    first = next((p for p in module.parameters() if p.is_floating_point()), None)
    if first is None or all(not isinstance(a, torch.Tensor) or a.dtype == first.dtype for a in args):
        return module(*args, **kwargs)
    cast = tuple(a.to(first.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    return module(*cast, **kwargs).to(out_dtype)
