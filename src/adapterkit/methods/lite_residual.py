"""Lite residual (Cai et al., TinyTL, NeurIPS 2020): a small branch beside a frozen conv block.

    h' = f(x) + up_r( W₂ · relu( G(pool_r(x)) ) )

pool_r averages x over r×r (or r) positions, G is a 3×3 (or 3-tap) group convolution with
`group_width` channels per group, W₂ a 1×1 convolution to f's output channels (starting at zero,
so a new branch is the identity) and up_r interpolates back to h's grid. Backward needs pool_r(x),
which is r² times smaller than x: that is where the training memory goes down.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LiteResidual
from ..errors import TargetError
from .base import RouteStack, SiteMethod, SiteShape, site_output


@dataclass
class LiteResidualStack(RouteStack):
    """The adapters themselves: each runs its own branch on its rows (no tensors to stack)."""

    adapters: list[LiteResidualAdapter]


class LiteResidualAdapter(SiteMethod[LiteResidualStack]):
    def __init__(self, config: LiteResidual, shape: SiteShape, dims: int) -> None:
        super().__init__(shape)
        cin, cout = shape.in_features, shape.out_features
        if cin is None:
            raise TargetError(f"a lite residual needs a site with a known input width, not a {shape.kind}")
        groups = max(1, round(cin * config.expansion / config.group_width))
        hidden = groups * config.group_width
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.dims, self.downsample = dims, config.downsample
        self.group = conv(cin, hidden, 3, padding=1, groups=_common_groups(cin, hidden, groups), bias=False)
        self.out = conv(hidden, cout, 1)
        for param in self.out.parameters():  # W₂ and its bias: the branch starts at zero
            nn.init.zeros_(param)

    @classmethod
    def build(cls, config: LiteResidual, shape: SiteShape, module: nn.Module, on_input: bool = False) -> SiteMethod:
        if shape.feature_dim != 1 or shape.in_features is None or shape.kind not in ("conv", "other"):
            raise TargetError(f"a lite residual sits beside a convolution or a conv block, not a {shape.kind} "
                              f"({type(module).__name__})")
        convs = [m for m in module.modules() if isinstance(m, nn.Conv1d | nn.Conv2d)]
        if not convs:
            raise TargetError(f"a lite residual needs a Conv1d/Conv2d block, and {type(module).__name__} has none")
        return cls(config, shape, 2 if isinstance(convs[0], nn.Conv2d) else 1)

    def delta(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        pooled = tile_mean(x, self.downsample) if self.downsample > 1 else x
        small = self.out(F.relu(self.group(pooled)))
        return F.interpolate(small, size=size, mode="nearest") if small.shape[2:] != size else small

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.dims + 2:
            raise TargetError(f"a lite residual for {self.dims}-d convolutions got an input of shape {tuple(x.shape)}")
        return h + self.delta(x, h.shape[2:])

    @classmethod
    def stack(cls, adapters: list[LiteResidualAdapter]) -> LiteResidualStack:
        return LiteResidualStack(adapters=list(adapters))

    @classmethod
    def route(cls, stacked: LiteResidualStack, rows: torch.Tensor, x: torch.Tensor, h: torch.Tensor | None,
              shape: SiteShape, inplace: bool = False) -> torch.Tensor:
        """Each adapter runs once, on its own rows (a conv per adapter; rows of other adapters skip it)."""
        h = site_output(h, cls)
        out = h
        for index, adapter in enumerate(stacked.adapters):
            mine = torch.nonzero(rows == index).flatten()
            if len(mine):
                out = out.index_add(0, mine, adapter.delta(x[mine], h.shape[2:]))
        return out


def tile_mean(x: torch.Tensor, r: int) -> torch.Tensor:
    """Average over r-wide tiles of every spatial dim (x zero-padded to a multiple of r), written as a
    reshape and a mean. Autograd keeps no tensor for it (the mean's gradient needs only shapes), where
    avg_pool would keep x, the very tensor the branch exists not to keep. A device runtime also
    differentiates these plain ops (ExecuTorch has no avg_pool backward kernel)."""
    spatial = x.shape[2:]
    for dim, n in enumerate(spatial, start=2):  # zeros appended with cat: its gradient is a slice, where
        if n % r:                                # pad's is a negative pad, which ExecuTorch refuses
            x = torch.cat([x, x.new_zeros(*x.shape[:dim], r - n % r, *x.shape[dim + 1:])], dim)
    tiles = [d for n in x.shape[2:] for d in (n // r, r)]
    return x.reshape(*x.shape[:2], *tiles).mean(dim=tuple(range(3, 3 + 2 * len(spatial), 2)))


def _common_groups(cin: int, hidden: int, groups: int) -> int:
    """The largest group count <= `groups` that divides both channel counts."""
    for g in range(min(groups, cin, hidden), 0, -1):
        if cin % g == 0 and hidden % g == 0:
            return g
    return 1
