"""Fast forms of the methods' arithmetic, kept apart from the equations they compute.

Each method file states its equation once, as `reference(x, h)`; its `forward` may call one of
these instead. tests/test_kernels.py checks, with hypothesis, that every fast form equals the
reference across shapes, dtypes, in place or not, and routed or not.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

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
    on CPU float32 tensors; training, other devices and dtypes take F.linear (a traced product takes
    `_ONEDNN_IN_GRAPH`: Inductor cannot lower the op)."""
    applies = (not torch.compiler.is_compiling() and x.is_contiguous() and _onednn_pays(x, weight)
               and torch._C._get_mkldnn_enabled())  # off inside `torch.backends.mkldnn.flags(enabled=False)`
    return _ONEDNN_LINEAR if applies else None


def _onednn_pays(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """What oneDNN's linear asks of a product, eager or traced, and where it pays."""
    return (max(x.numel(), weight.numel()) >= ONEDNN_MIN_ELEMENTS
            and not torch.is_grad_enabled()
            and x.device.type == weight.device.type == "cpu"
            and x.dtype == weight.dtype == torch.float32)


def row_product_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x Wᵀ for one row x [1, in] as a multiply-and-sum over each weight row, accumulated in float32."""
    return (x.float() * weight.float()).sum(-1).to(x.dtype)


class RowProduct:
    """One row through a frozen weight (a decode step of one stream) at the memory's speed.

    Such a product reads every weight element once for two flops, so the weight's read is all its
    cost. PyTorch's CPU GEMMs read it at 55-85% of the bandwidth (a bf16 weight at about half of
    float32's speed, though it is half the bytes); Inductor's fused multiply-and-sum of
    `row_product_reference` streams it at nearly the memory's speed: the 156M model's one-row
    products, float32 19.4 -> 18.1 ms (oneDNN's), bf16 15.3 -> 8.5 ms (bench/decode_floor.py).

    One kernel per dtype, weight shape and thread count (Inductor writes the count into the
    kernel; a model has a handful of shapes), traced and compiled standalone:
    no dynamo frame around it (8 µs a call, not 25 µs), and fixed sizes, which Inductor splits over
    the threads better than symbolic ones (bf16 8.2 ms, not 11.8). It has no guards of its own:
    `applies` keeps to what it was compiled for (one contiguous row, a contiguous weight, one
    dtype). It needs a C++ compiler at run time; where compiling fails, it is switched off with one
    warning and products go back to oneDNN / F.linear. Inference mode only (the serving engine's):
    training and plain no-grad code keep the GEMMs.
    """

    #: kernels kept; a product of a further shape takes the GEMMs
    MAX_KERNELS = 64

    def __init__(self) -> None:
        self._kernels: dict[tuple[torch.dtype, int, int, int], Callable[..., Any]] = {}
        self._lock = threading.Lock()
        self.failed: str | None = None
        self.enabled = True  # False: one-row products take oneDNN / F.linear (an A/B, a debugging aid)

    def applies(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (
            weight.numel() >= ONEDNN_MIN_ELEMENTS  # first: most calls it refuses are small (LoRA's A)
            and self.enabled and self.failed is None
            and type(weight) in _PLAIN and type(x) in _PLAIN  # not a quantized tensor subclass
            and x.dim() >= 2 and x.numel() == x.shape[-1]  # one row
            and weight.dim() == 2 and min(weight.shape) >= 2 and x.shape[-1] == weight.shape[1]
            and x.dtype == weight.dtype and x.dtype in _ROW_DTYPES
            and x.device.type == weight.device.type == "cpu"
            and x.is_contiguous() and weight.is_contiguous()
            and torch.is_inference_mode_enabled()
            and not torch.compiler.is_compiling()
            and (len(self._kernels) < self.MAX_KERNELS or _key(x, weight) in self._kernels)
        )

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        """x Wᵀ shaped [..., out]; None where the caller should take the GEMMs: the kernel could not
        be compiled (then never again) or this call failed in it (that call only)."""
        key = _key(x, weight)
        kernel = self._kernels.get(key)
        if kernel is None:
            try:
                kernel = self._compile(key)
            except Exception as err:  # noqa: BLE001 - no compiler, an Inductor bug: the products fall back
                self.failed = f"{type(err).__name__}: {str(err)[:300]}"
                _log.warning("adapterkit: the compiled one-row product is off (%s); one-row products use "
                             "oneDNN/F.linear", self.failed)
                return None
        try:
            return kernel(x.reshape(1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
        except Exception as err:  # noqa: BLE001 - the GEMMs answer this call, or raise its real error
            _log.debug("adapterkit: the one-row kernel %s failed: %s", key, err)
            return None

    def _compile(self, key: tuple[torch.dtype, int, int, int]) -> Callable[..., Any]:
        from torch.fx.experimental.proxy_tensor import make_fx

        dtype, rows, columns, _ = key
        with self._lock:
            if key not in self._kernels:
                x, weight = torch.zeros(1, columns, dtype=dtype), torch.zeros(rows, columns, dtype=dtype)
                with torch.inference_mode(False), torch.no_grad():
                    graph = make_fx(row_product_reference)(x, weight)
                    self._kernels[key] = torch._inductor.standalone_compile(
                        graph, [x, weight], dynamic_shapes="from_example_inputs")
            return self._kernels[key]


def _one_row_in_graph(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """What `RowProduct.applies` asks of a product, for one traced into a graph (whose sizes are
    fixed), small weights included: there a product costs no call of its own, where the GEMM it
    would otherwise be costs an external call of about 20 µs (the tiny Llama's step: 29 of them)."""
    return (x.dim() >= 2 and x.numel() == x.shape[-1]
            and weight.dim() == 2 and x.shape[-1] == weight.shape[1] and x.dtype == weight.dtype
            and x.dtype in _ROW_DTYPES and x.device.type == weight.device.type == "cpu"
            and not torch.is_grad_enabled())


def _onednn_in_graph(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """`_onednn_pays`, for a product traced into a graph (a captured step of several rows), with the
    shapes the operator takes (others get F.linear's own error)."""
    return (_onednn_pays(x, weight) and x.dim() >= 2 and weight.dim() == 2 and x.shape[-1] == weight.shape[1]
            and (bias is None or (bias.dtype == torch.float32 and bias.dim() == 1)))


def _onednn_op() -> Callable[..., torch.Tensor] | None:
    """oneDNN's linear as an operator Inductor calls as it is (it cannot lower the op itself, and its
    own GEMM for several rows is slower: 16 rows through the 156M model's weights 83 -> 55 ms)."""
    if _ONEDNN_LINEAR is None:
        return None
    onednn: Any = _ONEDNN_LINEAR

    @torch.library.custom_op("adapterkit::onednn_linear", mutates_args=())
    def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return onednn(x.contiguous(), weight, bias, "none", [], "")

    @onednn_linear.register_fake
    def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty(x.shape[0], weight.shape[0])

    return onednn_linear


_ONEDNN_IN_GRAPH = _onednn_op()


def _key(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.dtype, int, int, int]:
    return x.dtype, weight.shape[0], weight.shape[1], torch.get_num_threads()


_ROW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PLAIN = (torch.Tensor, nn.Parameter)
_log = logging.getLogger(__name__)
#: the process's kernels, one per dtype and weight shape, shared by every layer
row_product = RowProduct()


def down_project(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x Wᵀ for a 2-D x and a weight with few rows (LoRA's A).

    With many rows the default CPU GEMM runs such a skinny product slowly; oneDNN's runs 4096 rows of
    384 features at rank 8 in 0.27 ms, not 0.77 ms. With a few rows (a decode step) its fixed cost is
    more than the product: 14.5 µs against 2 µs for one row, so those take F.linear (`linear`'s rule).
    Never the one-row kernel: an adapter's shapes are not known when the Engine warms up, so a
    first request would wait for a compile, and such a weight is too small to gain from it.
    """
    return linear(x, weight, row_kernel=False)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           row_kernel: bool = True) -> torch.Tensor:
    """F.linear(x, weight, bias) for a frozen layer in eager CPU inference, through oneDNN's kernel.

    With few rows (a decode step: one token per stream) the default CPU GEMM reads a weight at about
    half the memory bandwidth; oneDNN's reads it at nearly all of it: one row through the 156M model's
    layers 30 -> 18 ms, 16 rows 66 -> 38 ms (bench/decode_floor.py). One row through a large weight
    takes `row_product` (unless `row_kernel` is False); inside a compiled graph (a captured decode
    step) it is written as `row_product_reference`, which Inductor compiles to the same kernel and
    fuses with its neighbours.
    """
    if torch.compiler.is_compiling():
        if row_kernel and _one_row_in_graph(x, weight):
            product = row_product_reference(x.reshape(1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
            return product if bias is None else product + bias
        if _ONEDNN_IN_GRAPH is not None and _onednn_in_graph(x, weight, bias):
            return _ONEDNN_IN_GRAPH(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])
        return F.linear(x, weight, bias)
    if (row_kernel and row_product.applies(x, weight)
            and (bias is None or (bias.dtype == x.dtype and bias.dim() <= 1))):
        out = row_product(x, weight)
        if out is not None:
            return out if bias is None else out.add_(bias)
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


def warm_row_products(model: nn.Module) -> int:
    """Compile the one-row product now for each dtype and shape of `model`'s plain Linear layers
    (a second or two each the first time, from Inductor's disk cache after), so that no request
    waits for it; returns how many kernels it asked for."""
    seen: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    for module in model.modules():
        if type(module) is not nn.Linear:
            continue
        w = module.weight
        if type(w) in _PLAIN and w.numel() >= ONEDNN_MIN_ELEMENTS:
            seen.setdefault((w.dtype, w.device, *w.shape), (w.new_zeros(1, w.shape[1]), w))
    with torch.inference_mode():
        for x, w in seen.values():
            linear(x, w)
    return len(seen)


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
