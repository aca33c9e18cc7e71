"""A frozen path that keeps only what backward needs to pass the gradient through it.

PyTorch's own ops save for backward as if every weight might train: a convolution keeps its
input, BatchNorm its input, ReLU its output, each in fp32. On a frozen layer none of that is
needed to reach an adapter upstream:

    frozen conv / linear   dx = Wᵀ·dy          keeps nothing (W is read-only, in flash)
    frozen BatchNorm(eval) dx = dy · γ/σ        keeps a per-channel scale
    frozen ReLU / ReLU6    dx = dy · 1[0<y<6]   keeps a 1-bit mask, packed 8 to a byte

`lean(model)` swaps those modules' forward for these (module objects, state dicts and hooks stay
as they are, so adapters attach the same way); a module whose parameters train, or a BatchNorm
in training mode, runs its own forward. `tests/test_edge.py` checks gradients equal PyTorch's.
"""

from __future__ import annotations

import types

import torch
from torch import nn

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.flatten()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _BITS).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    bits = packed[:, None].bitwise_and(_BITS).ne(0).flatten()
    return bits[: torch.Size(shape).numel()].view(shape)


class _FrozenConv(torch.autograd.Function):
    """The module itself is passed, not its weight: backward reads the weight again (an int8 base
    dequantizes it again), so nothing of it is kept."""

    @staticmethod
    def forward(ctx, x, module):  # noqa: ANN001, ANN205
        ctx.module, ctx.shape = module, x.shape
        return type(module).forward(module, x)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        m = ctx.module
        dx = torch.ops.aten.convolution_backward(
            grad, _like(grad, ctx.shape), m.weight, None, m.stride, m.padding, m.dilation, False,
            [0] * len(m.stride), m.groups, [True, False, False])[0]
        return dx, None


def _like(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # convolution_backward reads only the input's shape when the weight's gradient is not asked for
    return grad.new_empty((1,) * len(shape)).expand(shape)


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module):  # noqa: ANN001, ANN205
        ctx.module = module
        return type(module).forward(module, x)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return grad @ ctx.module.weight, None


class _Affine(torch.autograd.Function):
    """y = x·scale + shift per channel (frozen BatchNorm in eval mode)."""

    @staticmethod
    def forward(ctx, x, scale, shift):  # noqa: ANN001, ANN205
        ctx.save_for_backward(scale)
        view = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.view(view), x, scale.view(view))

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (scale,) = ctx.saved_tensors
        return grad * scale.view((1, -1) + (1,) * (grad.dim() - 2)), None, None


class _MaskedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, upper):  # noqa: ANN001, ANN205
        y = x.clamp(0, upper) if upper is not None else x.clamp_min(0)
        mask = (x > 0) & (x < upper) if upper is not None else x > 0
        ctx.save_for_backward(pack_bits(mask))
        ctx.shape = x.shape
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (packed,) = ctx.saved_tensors
        return grad * unpack_bits(packed, ctx.shape), None


def _frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters(recurse=False))


def _conv_forward(self: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    if not _frozen(self) or self.padding_mode != "zeros" or isinstance(self.padding, str) or \
            not torch.is_grad_enabled() or not x.requires_grad:
        return type(self).forward(self, x)
    return _FrozenConv.apply(x, self)


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not _frozen(self) or not torch.is_grad_enabled() or not x.requires_grad:
        return type(self).forward(self, x)
    return _FrozenLinear.apply(x, self)


def _batchnorm_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    # running_mean and running_var are registered together: both tensors, or both None
    mean, var = self.running_mean, self.running_var
    if self.training or not _frozen(self) or mean is None or var is None or not torch.is_grad_enabled() \
            or not x.requires_grad:
        return type(self).forward(self, x)
    scale = torch.rsqrt(var + self.eps)
    if self.weight is not None:
        scale = scale * self.weight
    shift = -mean * scale + (self.bias if self.bias is not None else 0)
    return _Affine.apply(x, scale, shift)


def _relu_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled() or not x.requires_grad:
        return type(self).forward(self, x)
    return _MaskedReLU.apply(x, 6.0 if isinstance(self, nn.ReLU6) else None)


_LEAN = ((nn.Conv1d, _conv_forward), (nn.Conv2d, _conv_forward), (nn.Linear, _linear_forward),
         (nn.BatchNorm1d, _batchnorm_forward), (nn.BatchNorm2d, _batchnorm_forward),
         (nn.ReLU6, _relu_forward), (nn.ReLU, _relu_forward))


def lean(model: nn.Module) -> int:
    """Give `model`'s frozen conv, linear, BatchNorm and ReLU layers the lean backward; the count changed."""
    changed = 0
    for module in model.modules():
        for kind, forward in _LEAN:
            if isinstance(module, kind) and "forward" not in vars(module):
                # an instance attribute shadowing the class's forward (what Module.__setattr__ would store)
                vars(module)["forward"] = types.MethodType(forward, module)
                changed += 1
                break
    return changed


def unlean(model: nn.Module) -> None:
    for module in model.modules():
        if "forward" in vars(module) and getattr(module.forward, "__func__", None) in {f for _, f in _LEAN}:
            del module.forward
