"""AdapterFusion (Pfeiffer et al. 2021): per-site attention over the outputs of frozen adapters.

    o_i = adapter_i(x, h)                     for the fused adapters i = 1..n
    α   = softmax_i( (Q h) · (K o_i) / T )    one weight per adapter, per position
    h'  = Σ_i α_i · V o_i

V starts as the identity, so fusing adapters that are still the identity returns h unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class FusionLayer(nn.Module):
    def __init__(self, features: int, temperature: float = 1.0) -> None:
        super().__init__()
        self.query = nn.Linear(features, features)
        self.key = nn.Linear(features, features)
        self.value = nn.Linear(features, features, bias=False)
        for layer in (self.query, self.key):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        nn.init.eye_(self.value.weight)
        self.temperature = temperature

    def forward(self, h: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
        """h: [..., d] the site output before adapters; outputs: n tensors [..., d]."""
        stacked = torch.stack(outputs, dim=-2)  # [..., n, d]
        query = self.query(h).unsqueeze(-1)  # [..., d, 1]
        scores = (self.key(stacked) @ query).squeeze(-1) / (self.temperature * h.shape[-1] ** 0.5)
        weights = scores.softmax(dim=-1).unsqueeze(-1)  # [..., n, 1]
        return (weights * self.value(stacked)).sum(dim=-2)
