"""DoRA (Liu et al. 2024): LoRA's low-rank direction with a learned magnitude per output feature.

    W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_c        ‖·‖_c: the norm of each output feature's row of weights
    h' = W' x + b = g ⊙ (h − b + s·B(A(dropout(x)))) + b,     g = m / ‖W + s·BA‖_c

The norm is held constant for the gradient (section 4.3 of the paper, as PEFT does), so only m, A and
B train through it. m starts at ‖W‖_c and B at zero: a new adapter is the identity. The frozen weight
W is read at every training forward (the norm follows A and B); in eval mode g is computed once per
change of m, A, B or W. On a quantized layer W would have to be dequantized at every step, so DoRA
does not attach there (`on_quantized`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoRA
from ..errors import TargetError
from .base import SiteShape, as_rows, site_output
from .lora import LoRAAdapter, LoRAStack


@dataclass
class DoRAStack(LoRAStack):
    """LoRA's stack plus each slot's g = m / ‖W + s·BA‖_c ([N+1, out]; 1 in the empty slot) and the
    frozen bias the magnitude does not scale."""

    g: torch.Tensor | None = None
    bias: torch.Tensor | None = None


class DoRAAdapter(LoRAAdapter):
    mergeable = True
    adds_in_place = True
    on_quantized = False
    #: the frozen Linear (not a submodule: it belongs to the base model), whose W and b DoRA reads
    frozen: nn.Module

    def __init__(self, config: LoRA, shape: SiteShape, module: nn.Module) -> None:
        if shape.kind not in ("linear", "hf_conv1d"):
            raise TargetError(f"DoRA needs a Linear or GPT-2 Conv1D site, not a {shape.kind}")
        super().__init__(config, shape, module)
        object.__setattr__(self, "frozen", module)
        with torch.no_grad():
            self.magnitude = nn.Parameter(torch.linalg.norm(self._weight().float(), dim=1).to(self.lora_A.dtype))
        self._cache: tuple[tuple, torch.Tensor] | None = None
        self._merged_norm: torch.Tensor | None = None

    @classmethod
    def build(cls, config: LoRA, shape: SiteShape, module: nn.Module, on_input: bool = False) -> DoRAAdapter:
        return cls(config, shape, module)

    def _weight(self) -> torch.Tensor:
        """W as [out, in] (a GPT-2 Conv1D stores it transposed)."""
        weight = self.frozen.weight
        if not isinstance(weight, torch.Tensor):
            raise TargetError(f"DoRA reads a weight tensor, which {type(self.frozen).__name__}.weight is not")
        return weight.T if self.shape.kind == "hf_conv1d" else weight

    def _bias(self) -> torch.Tensor | None:
        bias = self.frozen.bias
        return bias if isinstance(bias, torch.Tensor) else None

    def _norm(self) -> torch.Tensor:
        """‖W + s·BA‖_c, detached from the graph."""
        with torch.no_grad():
            weight = self._weight().to(self.lora_A.dtype)
            return torch.linalg.norm(weight + (self.lora_B @ self.lora_A) * self.scale, dim=1)

    def gain(self) -> torch.Tensor:
        """g = m / ‖W + s·BA‖_c: computed at every training forward, cached while nothing changes."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.magnitude / self._norm()
        weight = self._weight()
        key = (self.magnitude._version, self.lora_A._version, self.lora_B._version, weight.data_ptr(),
               weight._version, self.magnitude.device, self.magnitude.dtype)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.magnitude / self._norm())
        return self._cache[1]

    def reference(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """h' = g ⊙ (h − b + s·B(A(x))) + b with g = m / ‖W + s·BA‖_c, the norm detached (dropout off):
        W' x + b, W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_c, when h = W x + b."""
        direction = self._weight().to(self.lora_A.dtype) + (self.lora_B @ self.lora_A) * self.scale
        g = self.magnitude / torch.linalg.norm(direction, dim=1).detach()
        bias = self._bias()
        b = torch.zeros((), dtype=h.dtype) if bias is None else bias.to(h.dtype)
        return g * (h - b + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale) + b

    def forward(self, x: torch.Tensor, h: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        g = self.gain()
        out = super().forward(x, h, inplace=inplace)  # h + s·BA x, LoRA's fast form
        bias = self._bias()
        if torch.is_grad_enabled():
            return out * g if bias is None else (out - bias) * g + bias
        # without autograd, `out` is a tensor only this call holds (LoRA's addmm wrote it, or into h
        # when the site owns h): scale it in place, (h + Δ)·g + b·(1 − g)
        out.mul_(g)
        return out if bias is None else out.add_(bias * (1 - g))

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None  # its magnitude rescales W + ΔW: not an added low-rank product

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - DoRA merges through merge_into
        raise TargetError("DoRA's merged weight is not W plus a delta; merge it with am.merge")

    @torch.no_grad()
    def merge_into(self, module: nn.Module) -> None:
        """W ← g ⊙ (W + s·BA), each output row scaled; the norm is kept for the unmerge."""
        norm = self._norm()
        weight = self._weight()
        merged = (self.magnitude / norm).unsqueeze(1) * (weight.to(norm.dtype) + (self.lora_B @ self.lora_A) * self.scale)
        weight.copy_(merged.to(weight.dtype))
        self._merged_norm = norm

    @torch.no_grad()
    def unmerge_from(self, module: nn.Module) -> None:
        """W ← W' ⊙ ‖·‖_c / m − s·BA, with the norm the merge used."""
        norm = self._merged_norm if self._merged_norm is not None else self._norm()
        weight = self._weight()
        original = weight.to(norm.dtype) * (norm / self.magnitude).unsqueeze(1) - (self.lora_B @ self.lora_A) * self.scale
        weight.copy_(original.to(weight.dtype))
        self._merged_norm = None

    @classmethod
    def combined_config(cls, configs: list[Any]) -> Any:
        raise TargetError("DoRA adapters cannot be combined into one: the magnitude's normalisation is not linear "
                          "in the adapters (mix them per request instead: route([{'a': w, 'b': 1 - w}]))")

    @torch.no_grad()
    def fill_combined(self, parts: list[tuple[Any, float]]) -> None:  # pragma: no cover - refused above
        raise TargetError("DoRA adapters cannot be combined")

    @classmethod
    def stack(cls, adapters: list[DoRAAdapter]) -> DoRAStack:  # type: ignore[override]
        parts: list[LoRAAdapter] = [*adapters]
        lora = super().stack(parts)
        gains = [a.gain() for a in adapters]
        gains.append(torch.ones_like(gains[0]))
        bias = adapters[0]._bias()
        return DoRAStack(A=lora.A, B=lora.B, rank=lora.rank, g=torch.stack(gains),
                         bias=None if bias is None else bias.to(gains[0].dtype))

    @classmethod
    def write_slot(cls, stacked: LoRAStack, slot: int, adapter: LoRAAdapter) -> bool:
        return False  # g depends on W, m, A and B together: the stack is rebuilt

    @classmethod
    def route(cls, stacked: LoRAStack, rows: torch.Tensor, x: torch.Tensor, h: torch.Tensor | None,
              shape: SiteShape, inplace: bool = False) -> torch.Tensor:
        if not isinstance(stacked, DoRAStack) or stacked.g is None:
            raise TargetError("a DoRA route needs a DoRA stack")
        out = super().route(stacked, rows, x, site_output(h, cls), shape, inplace=inplace)
        out_rows, restore = as_rows(out, shape)
        g = stacked.g.index_select(0, rows).unsqueeze(1)  # [rows, 1, out]
        if torch.is_grad_enabled():
            return restore(out_rows * g if stacked.bias is None else (out_rows - stacked.bias) * g + stacked.bias)
        if out is h and not inplace:  # no row had an adapter: LoRA's route gave h back (every g is 1)
            return out
        out_rows.mul_(g)  # a fresh tensor, or h itself when the site owns it (`inplace`)
        return restore(out_rows if stacked.bias is None else out_rows.add_(stacked.bias * (1 - g)))
