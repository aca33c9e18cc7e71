"""What the forward pass should use: a tree of named adapters.

A setup is an adapter name, None (the base model), or a Stack, Fuse or Average of setups,
nested as AdapterHub allows:

    Stack    of names, Fuses and Averages   serial: each child's output is the next one's input
    Fuse     of names and Stacks            AdapterFusion: attention over the children's outputs
    Average  of names and Stacks            h + Σ w_i (child_i(h) − h)

Every setup has `to_dict()`, and `setup_from_dict` reads it back (adapter files store setups so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from .errors import CompositionError


def _check_children(kind: str, children: tuple, allowed: tuple[type, ...]) -> None:
    for child in children:
        if not (isinstance(child, str) or isinstance(child, allowed)):
            kinds = ", ".join(["names"] + [t.__name__ + "s" for t in allowed])
            raise CompositionError(f"a {kind} holds {kinds}; got {child!r}")


@dataclass(frozen=True, init=False)
class Stack:
    """Serial composition (MAD-X): each site applies the children in order, output to input."""

    children: tuple[Any, ...]

    def __init__(self, *children: str | Fuse | Average) -> None:
        if len(children) < 1:
            raise CompositionError("Stack needs at least one adapter name")
        _check_children("Stack", children, (Fuse, Average))
        object.__setattr__(self, "children", tuple(children))

    @property
    def names(self) -> tuple[str, ...]:
        return _flatten(self.children)

    def to_dict(self) -> dict[str, Any]:
        return {"stack": [setup_to_dict(c) for c in self.children]}

    def label(self) -> str:
        return ">".join(_label(c) for c in self.children)


@dataclass(frozen=True, init=False)
class Fuse:
    """AdapterFusion: per-site attention over the children's outputs, with its own parameters."""

    children: tuple[Any, ...]

    def __init__(self, *children: str | Stack) -> None:
        if len(children) < 2:
            raise CompositionError("Fuse needs at least two adapter names")
        _check_children("Fuse", children, (Stack,))
        if len(set(children)) != len(children):
            raise CompositionError(f"Fuse children must be distinct, got {children}")
        object.__setattr__(self, "children", tuple(children))

    @property
    def names(self) -> tuple[str, ...]:
        return _flatten(self.children)

    @property
    def key(self) -> str:
        """The name of this fusion's parameters (`fuse:a+b+c`; a Stack child reads `a>b`)."""
        return "fuse:" + "+".join(_label(c) for c in self.children)

    def to_dict(self) -> dict[str, Any]:
        return {"fuse": [setup_to_dict(c) for c in self.children]}

    def label(self) -> str:
        return "(" + self.key + ")"


@dataclass(frozen=True, init=False)
class Average:
    """Output averaging: h' = h + Σ w_i (child_i(h) − h). Weights need not sum to one.

    `Average({"a": 0.5, "b": 0.5})`; a Stack may stand in for a name: `{Stack("l", "t"): 0.5, ...}`.
    """

    weights: tuple[tuple[Any, float], ...]

    def __init__(self, weights: dict[str | Stack, float]) -> None:
        if not weights:
            raise CompositionError("Average needs at least one adapter weight")
        _check_children("Average", tuple(weights), (Stack,))
        object.__setattr__(self, "weights", tuple((k, float(v)) for k, v in weights.items()))

    @property
    def children(self) -> tuple[Any, ...]:
        return tuple(child for child, _ in self.weights)

    @property
    def names(self) -> tuple[str, ...]:
        return _flatten(self.children)

    def to_dict(self) -> dict[str, Any]:
        return {"average": [[setup_to_dict(c), w] for c, w in self.weights]}

    def label(self) -> str:
        return "avg(" + ",".join(f"{_label(c)}*{w:g}" for c, w in self.weights) + ")"


Setup = str | Stack | Fuse | Average | None


def _flatten(children: tuple) -> tuple[str, ...]:
    names: list[str] = []
    for child in children:
        names.extend((child,) if isinstance(child, str) else child.names)
    return tuple(names)


def _label(child: Any) -> str:
    return child if isinstance(child, str) else child.label()


def names_in(setup: Setup) -> tuple[str, ...]:
    """Every adapter name in a setup, depth first, in order."""
    if setup is None:
        return ()
    if isinstance(setup, str):
        return (setup,)
    if isinstance(setup, Stack | Fuse | Average):
        return setup.names
    raise CompositionError(
        f"cannot activate {setup!r}: use an adapter name, None, Stack(...), Fuse(...) or Average({{...}})"
    )


def fuses_in(setup: Setup) -> list[Fuse]:
    """Every Fuse in a setup, outermost first."""
    if isinstance(setup, Fuse):
        return [setup, *[f for c in setup.children for f in fuses_in(c)]]
    if isinstance(setup, Stack | Average):
        return [f for c in setup.children for f in fuses_in(c)]
    return []


def setup_to_dict(setup: Setup) -> Any:
    """A setup as JSON-ready data: a name stays a string, None stays None."""
    if setup is None or isinstance(setup, str):
        return setup
    names_in(setup)  # the error for anything that is not a setup
    return setup.to_dict()


def setup_from_dict(data: Any) -> Setup:
    """The inverse of `setup_to_dict`; CompositionError for anything else."""
    if data is None or isinstance(data, str):
        return data
    if isinstance(data, dict) and len(data) == 1:
        (kind, value), = data.items()
        if kind in ("stack", "fuse") and isinstance(value, list):
            # read from a file, so of any kind: Stack and Fuse check their children themselves
            children = [setup_from_dict(v) for v in value]
            if kind == "stack":
                return Stack(*cast("list[str | Fuse | Average]", children))
            return Fuse(*cast("list[str | Stack]", children))
        if kind == "average" and isinstance(value, list) and all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[1], int | float) for v in value
        ):
            weights = {setup_from_dict(c): w for c, w in value}
            return Average(cast("dict[str | Stack, float]", weights))  # Average checks its keys itself
    raise CompositionError(f"not a saved setup: {data!r} (expected a name, or {{'stack'|'fuse'|'average': [...]}})")
