"""Fast forms of the methods' arithmetic, kept apart from the equations they compute.

Each method file states its equation once, as `reference(x, h)`; its `forward` may call one of
these instead. tests/test_kernels.py checks, with hypothesis, that every fast form equals the
reference across shapes, dtypes, in place or not, and routed or not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    _ONEDNN_LINEAR = torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
except (AttributeError, RuntimeError):  # a build without the op
    _ONEDNN_LINEAR = None


def down_project(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x Wᵀ for a 2-D x and a weight with few rows (LoRA's A).

    The default CPU GEMM runs such a skinny product at a quarter of its usual speed; oneDNN's runs
    it about 2x faster (bench/overhead.py). oneDNN's op has no autograd, so it is used for eager
    inference only, on CPU float32 tensors; everything else (training, other devices and dtypes,
    torch.compile) takes F.linear.
    """
    if (
        _ONEDNN_LINEAR is not None
        and not torch.compiler.is_compiling()  # Inductor cannot lower the op; it picks its own GEMM
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.is_contiguous()
        and torch._C._get_mkldnn_enabled()  # off inside `torch.backends.mkldnn.flags(enabled=False)`
    ):
        try:
            return _ONEDNN_LINEAR(x, weight, None, "none", [], "")
        except RuntimeError:
            pass
    return F.linear(x, weight)


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
