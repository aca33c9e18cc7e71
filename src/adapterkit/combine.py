"""Weighted combination of adapters into a new one, and the checks before a merge.

    LoRA:   Δ = Σ w_i s_i B_i A_i = [w_1 s_1 B_1 … w_n s_n B_n] · [A_1; …; A_n]   (rank Σ r_i, exact)
    IA³:    l = 1 + Σ w_i (l_i − 1)      (exact in the deltas from the identity)
    BitFit: Δb = Σ w_i Δb_i              (exact)
    Bottleneck: θ = Σ w_i θ_i            (parameter averaging; an approximation, as in AdapterHub)
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .config import IA3, BitFit, Bottleneck, LoRA, MethodConfig
from .errors import CompositionError, TargetError
from .methods.base import SiteMethod, pad_to
from .methods.bitfit import BitFitAdapter
from .methods.bottleneck import BottleneckAdapter
from .methods.ia3 import IA3Adapter
from .methods.lora import LoRAAdapter


def combined_config(configs: dict[str, MethodConfig], weights: dict[str, float]) -> MethodConfig:
    chosen = [configs[n] for n in weights]
    kinds = {type(c) for c in chosen}
    if len(kinds) != 1 or not isinstance(chosen[0], LoRA | IA3 | BitFit | Bottleneck):
        raise CompositionError(
            f"combine needs adapters of one method among LoRA, IA³, BitFit, bottleneck; got {[c.method for c in chosen]}"
        )
    if any(c.modules_to_save for c in chosen):
        raise CompositionError(
            "combine works on adapter deltas; these adapters also own copies of base modules "
            "(modules_to_save), which have no delta to weight"
        )
    targets = _union([c.targets for c in chosen])
    first = chosen[0]
    if isinstance(first, LoRA):
        rank = sum(c.r for c in chosen)
        return dataclasses.replace(first, r=rank, alpha=rank, rslora=False, dropout=0.0, targets=targets)
    if isinstance(first, Bottleneck):
        sizes = {(c.bottleneck_size, c.reduction, c.is_parallel, c.activation, c.placement) for c in chosen}
        if len(sizes) != 1:
            raise CompositionError("combining bottleneck adapters needs equal size, placement and activation")
        return dataclasses.replace(first, scaling=1.0)
    if isinstance(first, IA3):
        return dataclasses.replace(first, targets=targets, input_targets=_union([c.input_targets for c in chosen]))
    return dataclasses.replace(first, targets=targets)


def _union(target_lists: list) -> list | None:
    if any(t is None for t in target_lists):
        return None if all(t is None for t in target_lists) else _fail_mixed()
    seen: list = []
    for targets in target_lists:
        for t in [targets] if isinstance(targets, str) else targets:
            if t not in seen:
                seen.append(t)
    return seen


def _fail_mixed() -> None:
    raise CompositionError("combine needs all adapters to use default targets or all to name their targets")


@torch.no_grad()
def fill(new: SiteMethod, parts: list[tuple[SiteMethod | None, float]]) -> None:
    """Set the parameters of `new` (already attached at this site) to the weighted combination."""
    present = [(a, w) for a, w in parts if a is not None]
    if isinstance(new, LoRAAdapter):
        a = torch.cat([p.lora_A for p, _ in present])
        b = torch.cat([p.lora_B * (w * p.scale / new.scale) for p, w in present], dim=1)
        new.lora_A.copy_(pad_to(a, new.lora_A.shape[0], 0))
        new.lora_B.copy_(pad_to(b, new.lora_B.shape[1], 1))
    elif isinstance(new, IA3Adapter):
        new.ia3_l.copy_(1 + sum(w * (p.ia3_l - 1) for p, w in present))
    elif isinstance(new, BitFitAdapter):
        new.bias_delta.copy_(sum(w * p.bias_delta for p, w in present))
    elif isinstance(new, BottleneckAdapter):
        for pname, param in new.named_parameters():
            values = [w * dict(p.named_parameters())[pname] * (p.scaling if "up." in pname else 1) for p, w in present]
            param.copy_(sum(values))
    else:  # pragma: no cover - guarded by combined_config
        raise CompositionError(f"cannot combine {type(new).__name__}")


def check_mergeable(adapter: SiteMethod, module: nn.Module, name: str, module_name: str) -> None:
    """Fail before any weight changes, naming the adapter and module that cannot merge."""
    if isinstance(adapter, BitFitAdapter) and not isinstance(getattr(module, "bias", None), torch.Tensor):
        raise TargetError(f"adapter {name!r}: BitFit cannot merge into {module_name!r}, which has no bias")
    if isinstance(adapter, IA3Adapter) and adapter.shape.kind not in ("linear", "hf_conv1d", "conv"):
        raise TargetError(f"adapter {name!r}: IA³ cannot merge into {module_name!r} ({adapter.shape.kind})")
    if isinstance(adapter, LoRAAdapter) and module.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TargetError(f"adapter {name!r}: cannot merge into quantised weights of {module_name!r}")
