"""IA³ (Liu et al. 2022): learned rescaling of a frozen module's output or input.

    on the output:  h' = l ⊙ f(x)          merged: W' = diag(l) W,  b' = l ⊙ b
    on the input:   h' = f(l ⊙ x)          merged: W' = W diag(l)

l starts at ones, so a new adapter is the identity.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..config import IA3
from ..errors import TargetError
from .base import (
    BERT_FFN_OUT,
    RouteStack,
    SiteMethod,
    SiteShape,
    broadcast_features,
    broadcast_rows,
    features_last,
    site_output,
    sum_of,
    union_targets,
)

#: (output targets, input targets) of an IA³ config that names none, by model family
DEFAULT_TARGETS = {
    "bert": (["key", "value"], [BERT_FFN_OUT]), "vit": (["key", "value"], [BERT_FFN_OUT]),
    "gpt2": (["c_attn"], ["mlp.c_proj"]), "llama": (["k_proj", "v_proj"], ["down_proj"]),
    "cnn": (["Conv2d", "Conv1d"], []), "recurrent": (["LSTM", "GRU"], []),
}


@dataclass
class IA3Stack(RouteStack):
    """l: [N+1, features], the zero slot all ones; `side`: scaled input or output."""

    l: torch.Tensor  # noqa: E741 - the paper's name
    side: str


class IA3Adapter(SiteMethod[IA3Stack]):
    mergeable = True

    def __init__(self, shape: SiteShape, on_input: bool) -> None:
        super().__init__(shape)
        self.side = "input" if on_input else "output"
        width = shape.in_features if on_input else shape.out_features
        if width is None:
            raise TargetError(f"IA³ on the input needs a site with a known input width, not a {shape.kind}")
        self.ia3_l = nn.Parameter(torch.ones(width))

    @classmethod
    def default_targets(cls, config: IA3, family: str) -> tuple[list, list] | None:
        """Keys and values scaled on their output, the FFN's down-projection on its input (Liu et al. 2022)."""
        found = DEFAULT_TARGETS.get(family)
        return (list(found[0]), list(found[1])) if found is not None else None

    @classmethod
    def build(cls, config: IA3, shape: SiteShape, module: nn.Module, on_input: bool = False) -> IA3Adapter:
        return cls(shape, on_input=on_input)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        if self.side == "input":
            x_last, restore = features_last(x, self.shape)
            return restore(x_last * self.ia3_l)
        h = site_output(h, type(self))
        return h * broadcast_features(self.ia3_l, h, self.shape)

    def _weight_scale(self, module: nn.Module, scale: torch.Tensor) -> None:
        kind = self.shape.kind
        if kind not in ("linear", "hf_conv1d", "conv"):
            raise TargetError(f"IA³ can merge into Linear, Conv and GPT-2 Conv1D sites, not a {kind}")
        weight = module.weight
        if not isinstance(weight, torch.Tensor):
            raise TargetError(f"IA³ merges into a weight tensor; {type(module).__name__}.weight is not one")
        # Output scaling touches rows of W (columns for Conv1D, which stores W transposed).
        out_dim = 1 if kind == "hf_conv1d" else 0
        dim = (1 - out_dim) if self.side == "input" else out_dim
        view = [1] * weight.dim()
        view[dim] = -1
        weight.mul_(scale.view(view).to(weight.dtype))
        if self.side == "output" and (bias := getattr(module, "bias", None)) is not None:
            bias.mul_(scale.to(bias.dtype))

    def check_merge(self, module: nn.Module, module_name: str) -> None:
        if self.shape.kind not in ("linear", "hf_conv1d", "conv"):
            raise TargetError(f"IA³ cannot merge into {module_name!r} ({self.shape.kind})")

    @torch.no_grad()
    def merge_into(self, module: nn.Module) -> None:
        self._weight_scale(module, self.ia3_l)

    @torch.no_grad()
    def unmerge_from(self, module: nn.Module) -> None:
        if (self.ia3_l == 0).any():
            raise TargetError("cannot unmerge an IA³ adapter with a zero scale: merging erased those features")
        self._weight_scale(module, 1.0 / self.ia3_l)

    @classmethod
    def combined_config(cls, configs: list[IA3]) -> IA3:
        """l = 1 + Σ w_i (l_i − 1): exact in the deltas from the identity."""
        return dataclasses.replace(configs[0], input_targets=union_targets([c.input_targets for c in configs]))

    @torch.no_grad()
    def fill_combined(self, parts: list[tuple[IA3Adapter, float]]) -> None:
        self.ia3_l.copy_(1 + sum_of(w * (p.ia3_l - 1) for p, w in parts))

    def route_group(self) -> tuple:
        return (self.side,)

    @classmethod
    def stack(cls, adapters: list[IA3Adapter]) -> IA3Stack:
        vectors = [a.ia3_l for a in adapters]
        return IA3Stack(l=torch.stack(vectors + [torch.ones_like(vectors[0])]), side=adapters[0].side)

    @classmethod
    def write_slot(cls, stacked: IA3Stack, slot: int, adapter: IA3Adapter) -> bool:
        stacked.l[slot].copy_(adapter.ia3_l)
        return True

    @classmethod
    def route(cls, stacked: IA3Stack, rows: torch.Tensor, x: torch.Tensor, h: torch.Tensor | None,
              shape: SiteShape, inplace: bool = False) -> torch.Tensor:
        scale = stacked.l[rows]
        if stacked.side == "input":
            return x * broadcast_rows(scale, x, shape)
        h = site_output(h, cls)
        return h * broadcast_rows(scale, h, shape)
