"""What training must keep writable, counted from what PyTorch really keeps.

    writable = saved + trainable + gradients + optimizer state + working set
    flash    = frozen parameters and buffers, at their stored dtype (read-only on a device)

`saved` are the tensors autograd keeps for backward, caught with `saved_tensors_hooks` and
deduplicated by storage (a ReLU's output that the next convolution also saves is one tensor).
Frozen weights that autograd saves are flash, not writable: they are read, never written.
`working` is the largest forward working set: the most bytes one module's inputs and outputs
hold at once, which is also what its backward needs for the incoming and outgoing gradients.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import AdapterError
from .compress import ActivationCompressor, Packed

_UNITS = {"": 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}
#: optimizer state per trainable element, in units of the parameter's size
OPTIMIZER_STATE = {"adam": 2, "adamw": 2, "sgd": 0, "sgd_momentum": 1}


class BudgetError(AdapterError):
    """A training setup whose writable memory does not fit the budget (raised before any step)."""


def parse_budget(budget: int | str) -> int:
    """Bytes from 262144, "256KiB", "0.25 MiB" or "300kB"."""
    if isinstance(budget, bool):
        raise BudgetError(f"budget {budget!r}: give bytes or a size such as '256KiB'")
    if isinstance(budget, int):
        if budget <= 0:
            raise BudgetError(f"budget {budget} bytes: must be positive")
        return budget
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(budget))
    if not match or match.group(2).lower() not in _UNITS:
        raise BudgetError(f"budget {budget!r}: give bytes or a size such as '256KiB', '1.5MiB', '300kB'")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise BudgetError(f"budget {budget!r}: must be positive")
    return int(value)


def human(n: float) -> str:
    for unit, size in (("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclass
class MemoryReport:
    """Writable training memory of one setup (bytes), apart from the read-only frozen weights."""

    batch_size: int
    saved: int
    trainable: int
    gradients: int
    optimizer: int
    working: int
    flash: int
    #: saved bytes by the module that was running when autograd saved them, largest first
    by_layer: dict[str, int] = field(default_factory=dict)
    measured: bool = False  # True: gradients and optimizer state read off a real step

    @property
    def writable(self) -> int:
        return self.saved + self.trainable + self.gradients + self.optimizer + self.working

    def as_dict(self) -> dict[str, int | bool | dict[str, int]]:
        return {"batch_size": self.batch_size, "writable": self.writable, "saved": self.saved,
                "trainable": self.trainable, "gradients": self.gradients, "optimizer": self.optimizer,
                "working": self.working, "flash": self.flash, "measured": self.measured,
                "by_layer": dict(list(self.by_layer.items())[:10])}

    def describe(self) -> str:
        parts = ", ".join(f"{k} {human(getattr(self, k))}" for k in ("saved", "trainable", "gradients",
                                                                      "optimizer", "working"))
        return f"writable {human(self.writable)} ({parts}); flash {human(self.flash)}"


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes as stored: a tensor subclass (torchao's int8 weights) by the tensors it holds inside."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = flatten(t)
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # a wrapper subclass (torchao) has no storage of its own
        return id(t), tensor_bytes(t)


class Meter:
    """Counts saved tensors (by storage, attributed to the running module) and the working set; with a
    compressor, what it keeps of each activation (edge/compress.py) instead of the activation."""

    def __init__(self, model: nn.Module, compressor: ActivationCompressor | None = None) -> None:
        self.model = model
        self.compressor = compressor
        self.stored = {_storage_key(t)[0] for t in [*model.parameters(), *model.buffers()]}
        self.saved: dict[object, tuple[int, str]] = {}
        self.flash_saved = 0
        self.working = 0
        self._stack: list[str] = []

    def _pack(self, t: torch.Tensor) -> torch.Tensor | Packed:
        ptr, nbytes = _storage_key(t)
        if ptr in self.stored or ptr == 0:  # a parameter or buffer (counted on its own side) or an empty tensor
            return t
        layer = self._stack[-1] if self._stack else "(loss)"
        if self.compressor is not None and self.compressor.compressible(t):
            packed = self.compressor.pack(t)
            self.saved.setdefault(id(packed), (packed.nbytes, layer))
            return packed
        self.saved.setdefault(ptr, (nbytes, layer))
        return t

    @staticmethod
    def _unpack(saved: torch.Tensor | Packed) -> torch.Tensor:
        return ActivationCompressor.unpack(saved)

    @contextlib.contextmanager
    def watching(self) -> Iterator[Meter]:
        handles = []
        for name, module in self.model.named_modules():
            handles.append(module.register_forward_pre_hook(self._enter(name)))
            handles.append(module.register_forward_hook(self._leave(len(list(module.children())) == 0),
                                                        always_call=True))
        try:
            with self.compressor.forward_scope() if self.compressor is not None else contextlib.nullcontext(), \
                    torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield self
        finally:
            for h in handles:
                h.remove()

    def _enter(self, name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            self._stack.append(name or "(model)")
        return hook

    def _leave(self, leaf: bool) -> Callable[[nn.Module, tuple, object], None]:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if leaf:
                self.working = max(self.working, _nbytes(args) + _nbytes(output))
            if self._stack:
                self._stack.pop()
        return hook

    @property
    def saved_bytes(self) -> int:
        return sum(n for n, _ in self.saved.values())

    def by_layer(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for nbytes, layer in self.saved.values():
            totals[layer] = totals.get(layer, 0) + nbytes
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def _nbytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return tensor_bytes(value)
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    logits = getattr(value, "logits", None)  # a model output object (e.g. transformers' ModelOutput)
    return _nbytes(logits) if logits is not None else 0


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], int]:
    """The trainable parameters, and the bytes of everything frozen (parameters and buffers) at stored dtype."""
    trainable, flash, seen = [], 0, set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        if isinstance(t, nn.Parameter) and t.requires_grad:
            trainable.append(t)
        else:
            flash += tensor_bytes(t)
    return trainable, flash


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(v) for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))
