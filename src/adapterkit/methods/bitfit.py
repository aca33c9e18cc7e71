"""BitFit (Ben Zaken et al. 2022) as a per-adapter bias delta, so the frozen biases stay shared.

    h' = f(x) + Δb            merged: b' = b + Δb

Δb starts at zero, so a new adapter is the identity.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..config import BitFit
from ..errors import TargetError
from .base import RouteStack, SiteMethod, SiteShape, broadcast_features, broadcast_rows, site_output, sum_of

#: the modules whose bias a BitFit config that names none shifts, by model family
DEFAULT_TARGETS = {"bert": ["all-linear"], "vit": ["all-linear"], "gpt2": ["all-linear"], "llama": ["all-linear"],
                   "cnn": ["Conv2d", "Conv1d", "Linear"], "recurrent": ["LSTM", "GRU", "Linear"]}


@dataclass
class BitFitStack(RouteStack):
    """b: [N+1, features], the zero slot zeros."""

    b: torch.Tensor


class BitFitAdapter(SiteMethod[BitFitStack]):
    mergeable = True

    @classmethod
    def default_targets(cls, config: BitFit, family: str) -> tuple[list, list] | None:
        found = DEFAULT_TARGETS.get(family)
        return (list(found), []) if found is not None else None

    def __init__(self, shape: SiteShape) -> None:
        super().__init__(shape)
        self.bias_delta = nn.Parameter(torch.zeros(shape.out_features))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h + broadcast_features(self.bias_delta, h, self.shape)

    def _bias(self, module: nn.Module) -> torch.Tensor:
        bias = getattr(module, "bias", None)
        if not isinstance(bias, torch.Tensor):
            raise TargetError(
                f"BitFit cannot merge into a {type(module).__name__} without a bias; keep it unmerged"
            )
        return bias

    def check_merge(self, module: nn.Module, module_name: str) -> None:
        if not isinstance(getattr(module, "bias", None), torch.Tensor):
            raise TargetError(f"BitFit cannot merge into {module_name!r}, which has no bias")

    @classmethod
    def combined_config(cls, configs: list[BitFit]) -> BitFit:
        """Δb = Σ w_i Δb_i: exact."""
        return dataclasses.replace(configs[0])

    @torch.no_grad()
    def fill_combined(self, parts: list[tuple[BitFitAdapter, float]]) -> None:
        self.bias_delta.copy_(sum_of(w * p.bias_delta for p, w in parts))

    @torch.no_grad()
    def merge_into(self, module: nn.Module) -> None:
        bias = self._bias(module)
        bias += self.bias_delta.to(bias.dtype)

    @torch.no_grad()
    def unmerge_from(self, module: nn.Module) -> None:
        bias = self._bias(module)
        bias -= self.bias_delta.to(bias.dtype)

    @classmethod
    def stack(cls, adapters: list[BitFitAdapter]) -> BitFitStack:
        deltas = [a.bias_delta for a in adapters]
        return BitFitStack(b=torch.stack(deltas + [torch.zeros_like(deltas[0])]))

    @classmethod
    def write_slot(cls, stacked: BitFitStack, slot: int, adapter: BitFitAdapter) -> bool:
        stacked.b[slot].copy_(adapter.bias_delta)
        return True

    @classmethod
    def route(cls, stacked: BitFitStack, rows: torch.Tensor, x: torch.Tensor, h: torch.Tensor | None,
              shape: SiteShape, inplace: bool = False) -> torch.Tensor:
        h = site_output(h, cls)
        return h + broadcast_rows(stacked.b[rows], h, shape)
