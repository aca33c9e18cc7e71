"""What the forward pass should use: one adapter, a Stack, a Fuse or an Average of named adapters."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CompositionError


@dataclass(frozen=True, init=False)
class Stack:
    """Serial composition (MAD-X): each site applies the adapters in order, output to input."""

    names: tuple[str, ...]

    def __init__(self, *names: str) -> None:
        if len(names) < 1:
            raise CompositionError("Stack needs at least one adapter name")
        object.__setattr__(self, "names", tuple(names))


@dataclass(frozen=True, init=False)
class Fuse:
    """AdapterFusion: per-site attention over the adapters' outputs, with its own parameters."""

    names: tuple[str, ...]

    def __init__(self, *names: str) -> None:
        if len(names) < 2:
            raise CompositionError("Fuse needs at least two adapter names")
        if len(set(names)) != len(names):
            raise CompositionError(f"Fuse names must be distinct, got {names}")
        object.__setattr__(self, "names", tuple(names))

    @property
    def key(self) -> str:
        """The name of this fusion's parameters (`fuse:a+b+c`)."""
        return "fuse:" + "+".join(self.names)


@dataclass(frozen=True, init=False)
class Average:
    """Output averaging: h' = h + Σ w_i (adapter_i(h) − h). Weights need not sum to one."""

    weights: tuple[tuple[str, float], ...]

    def __init__(self, weights: dict[str, float]) -> None:
        if not weights:
            raise CompositionError("Average needs at least one adapter weight")
        object.__setattr__(self, "weights", tuple((str(k), float(v)) for k, v in weights.items()))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.weights)


Setup = str | Stack | Fuse | Average | None


def names_in(setup: Setup) -> tuple[str, ...]:
    if setup is None:
        return ()
    if isinstance(setup, str):
        return (setup,)
    if isinstance(setup, Stack | Fuse | Average):
        return setup.names
    raise CompositionError(
        f"cannot activate {setup!r}: use an adapter name, None, Stack(...), Fuse(...) or Average({{...}})"
    )
