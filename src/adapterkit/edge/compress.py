"""Saved activations kept in fewer bits until backward reads them (ActNN / GACT style).

Each saved activation is split into groups of `GROUP` consecutive numbers (ActNN's grouping: a
group's range follows the data near it, and its two float32 numbers cost a quarter bit a number)
and stored as b-bit codes with the group's minimum and step:

    step = (max_g - min_g) / (2^b - 1)
    q    = floor((x - min_g) / step + u),   u ~ U[0, 1)     (stochastic rounding: E[x̂] = x)
    x̂    = min_g + q · step

so an op whose backward is linear in what it saved (a convolution's or a linear layer's weight
gradient) gets an unbiased estimate of the exact gradient. A ReLU's backward is not linear in its
output: rounding a small positive number down to 0 would drop its gradient. So a ReLU's output (one
whose autograd node is a ReLU's; the lean path's ReLUs keep their own mask instead) also keeps which
of its numbers are not zero, one bit each, and those never come back as 0: the ReLU's backward sees
its exact mask. Codes of 1, 2 or 4 bits are packed
several to a byte. What is compressed: floating-point tensors autograd saves that are not
the model's own parameters or buffers (those are flash) and hold at least `min_elements` numbers;
everything else (the lean path's 1-bit masks, small tensors, frozen weights) is kept as it is.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import AdapterError
from .lean import pack_bits, unpack_bits

BITS = (1, 2, 4, 8)
GROUP = 256


@dataclass
class Packed:
    """One compressed activation: codes packed into bytes, and each group's minimum and step."""

    codes: torch.Tensor  # uint8, 8 // bits codes a byte
    low: torch.Tensor  # [groups, 1], float32
    step: torch.Tensor  # [groups, 1], float32
    shape: torch.Size
    dtype: torch.dtype
    bits: int
    nonzero: torch.Tensor | None = None  # packed bits: which numbers of a non-negative tensor are not 0

    @property
    def nbytes(self) -> int:
        kept = (self.codes, self.low, self.step) + ((self.nonzero,) if self.nonzero is not None else ())
        return sum(t.numel() * t.element_size() for t in kept)


def _address(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a wrapper subclass (torchao's int8 weights) has no storage
        return id(t)


def check_bits(bits: int | None) -> int | None:
    if bits is not None and (isinstance(bits, bool) or bits not in BITS):
        raise AdapterError(f"activation bits {bits!r}: give one of {', '.join(map(str, BITS))} (or none to keep fp32)")
    return bits


def _groups(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    pad = (-flat.numel()) % GROUP
    if pad:  # the last group repeats its final number: the padding widens no range
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, GROUP)


def quantize(t: torch.Tensor, bits: int, generator: torch.Generator | None = None, *,
             keep_nonzero: bool = False) -> Packed:
    rows = _groups(t.detach().float())
    low = rows.amin(1, keepdim=True)
    levels = 2**bits - 1
    step = (rows.amax(1, keepdim=True) - low) / levels
    safe = torch.where(step > 0, step, torch.ones_like(step))  # a constant group: every code 0
    noise = torch.rand(rows.shape, generator=generator, dtype=rows.dtype, device=rows.device)
    codes = torch.floor((rows - low) / safe + noise).clamp_(0, levels).to(torch.uint8).flatten()
    per_byte = 8 // bits
    if per_byte > 1:
        pad = (-codes.numel()) % per_byte
        if pad:
            codes = torch.cat([codes, codes.new_zeros(pad)])
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
        codes = (codes.view(-1, per_byte) << shifts).sum(1, dtype=torch.uint8)
    nonzero = pack_bits(t.detach() != 0) if keep_nonzero else None
    return Packed(codes, low, step, t.shape, t.dtype, bits, nonzero)


def dequantize(p: Packed) -> torch.Tensor:
    codes = p.codes
    per_byte = 8 // p.bits
    if per_byte > 1:
        shifts = torch.arange(0, 8, p.bits, dtype=torch.uint8, device=codes.device)
        codes = ((codes[:, None] >> shifts) & (2**p.bits - 1)).flatten()
    count = p.shape.numel()
    rows = codes[:p.low.shape[0] * GROUP].view(-1, GROUP).float()
    values = (p.low + rows * p.step).flatten()[:count].view(p.shape)
    if p.nonzero is not None:  # a number that was not 0 stays above 0, however small it rounded
        tiny = torch.finfo(values.dtype).tiny
        values = torch.where(unpack_bits(p.nonzero, p.shape), values.clamp_min(tiny), torch.zeros_like(values))
    return values.to(p.dtype)


class ActivationCompressor:
    """The pack/unpack pair for `torch.autograd.graph.saved_tensors_hooks`: b-bit saved activations.

    One tensor saved by several ops (a ReLU's output that the next convolution also saves) is
    compressed once per forward (`forward_scope`).
    """

    def __init__(self, bits: int, model: nn.Module | None = None, *, min_elements: int = 1024,
                 generator: torch.Generator | None = None) -> None:
        self.bits = check_bits(bits) or 8
        self.min_elements = min_elements
        self.generator = generator
        self.flash = {_address(t) for t in [*model.parameters(), *model.buffers()]} if model is not None else set()
        self._memo: dict[tuple, tuple[weakref.ref, Packed]] = {}

    def compressible(self, t: torch.Tensor) -> bool:
        # a non-finite number would make its whole group's step inf or nan: such a tensor is kept as it is
        return (type(t) is torch.Tensor and t.is_floating_point() and t.numel() >= self.min_elements
                and t.dim() > 0 and _address(t) not in self.flash and bool(torch.isfinite(t).all()))

    def pack(self, t: torch.Tensor) -> torch.Tensor | Packed:
        if not self.compressible(t):
            return t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype,
               t._version)
        # the address alone could be a freed tensor's, reused: only while the tensor that owns the memory
        # (a view's base, which every view keeps alive) still lives is it the same numbers
        owner = t._base if t._base is not None else t
        seen = self._memo.get(key)
        if seen is not None and seen[0]() is owner:
            return seen[1]
        relu_output = t.grad_fn is not None and type(t.grad_fn).__name__.startswith("ReluBackward")
        packed = quantize(t, self.bits, self.generator, keep_nonzero=relu_output)
        self._memo[key] = (weakref.ref(owner), packed)
        return packed

    @staticmethod
    def unpack(saved: torch.Tensor | Packed) -> torch.Tensor:
        return dequantize(saved) if isinstance(saved, Packed) else saved

    @contextlib.contextmanager
    def forward_scope(self) -> Iterator[ActivationCompressor]:
        """One forward: a tensor saved twice inside it is compressed once."""
        self._memo.clear()
        try:
            yield self
        finally:
            self._memo.clear()

    @contextlib.contextmanager
    def active(self) -> Iterator[ActivationCompressor]:
        with self.forward_scope(), torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield self
