"""Fast forms of the methods' arithmetic, kept apart from the equations they compute.

Each method file states its equation once, as `reference(x, h)`; its `forward` may call one of
these instead. tests/test_kernels.py checks, with hypothesis, that every fast form equals the
reference across shapes, dtypes, in place or not, and routed or not.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

try:
    _ONEDNN_LINEAR = torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
except (AttributeError, RuntimeError):  # a build without the op
    _ONEDNN_LINEAR = None


#: oneDNN's call costs about 13 µs more than the default GEMM's; it pays off from a weight or an input
#: of this many elements (a 1024x256 projection, 1024 rows of 256 features) up
ONEDNN_MIN_ELEMENTS = 1 << 18


def _onednn(x: torch.Tensor, weight: torch.Tensor) -> Callable[..., torch.Tensor] | None:
    """oneDNN's linear where it applies and pays, else None. It has no autograd: eager inference only,
    on CPU float32 tensors; training, other devices and dtypes and torch.compile take F.linear."""
    applies = (
        max(x.numel(), weight.numel()) >= ONEDNN_MIN_ELEMENTS
        and not torch.compiler.is_compiling()  # Inductor cannot lower the op; it picks its own GEMM
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.is_contiguous()
        and torch._C._get_mkldnn_enabled()  # off inside `torch.backends.mkldnn.flags(enabled=False)`
    )
    return _ONEDNN_LINEAR if applies else None


def down_project(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x Wᵀ for a 2-D x and a weight with few rows (LoRA's A).

    With many rows the default CPU GEMM runs such a skinny product slowly; oneDNN's runs 4096 rows of
    384 features at rank 8 in 0.27 ms, not 0.77 ms. With a few rows (a decode step) its fixed cost is
    more than the product: 14.5 µs against 2 µs for one row, so those take F.linear (`linear`'s rule).
    """
    return linear(x, weight)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for a frozen layer in eager CPU inference, through oneDNN's kernel.

    With few rows (a decode step: one token per stream) the default CPU GEMM reads a weight at about
    half the memory bandwidth; oneDNN's reads it at nearly all of it: one row through the 156M model's
    layers 30 -> 18 ms, 16 rows 66 -> 38 ms (bench/decode_floor.py).
    """
    onednn = _onednn(x, weight)
    if onednn is not None and (bias is None or bias.dtype == weight.dtype) and x.dim() >= 2:
        try:
            out = onednn(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
            return out.view(*x.shape[:-1], weight.shape[0])
        except RuntimeError:
            pass
    return F.linear(x, weight, bias)


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def fast_linears(model: nn.Module) -> int:
    """Give every plain nn.Linear of `model` `linear`'s forward (where it does not apply, F.linear's
    own); returns how many. Its parameters, hooks and type stay as they were; a quantized layer (a
    subclass or another module) keeps its own forward."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and "forward" not in vars(module):
            # a partial, not a bound method: both deepcopy and pickle rebuild it around the copy
            module.forward = functools.partial(_linear_forward, module)  # type: ignore[method-assign]
            count += 1
    return count


def add_product(h: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, scale: float,
                bias: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
    """h + scale·(a Wᵀ + bias), features last, as one addmm with the scale inside it.

    One pass over the output-sized tensor instead of three (a Wᵀ, times the scale, plus h); with
    `inplace`, into h itself. A non-contiguous h (a channels-first site seen features-last) gets a
    plain elementwise add instead: that keeps h's memory layout, which the next convolution's
    algorithm, and so its exact numbers, depends on.
    """
    if not h.is_contiguous():
        return h + F.linear(a, weight, bias) * scale
    h_2d, a_2d = h.reshape(-1, h.shape[-1]), a.reshape(-1, a.shape[-1])
    out = h_2d.addmm_(a_2d, weight.T, alpha=scale) if inplace else torch.addmm(h_2d, a_2d, weight.T, alpha=scale)
    if bias is not None:
        out = out.add_(bias, alpha=scale)
    return out.view(h.shape)
