"""Putting a frozen base in the precision it will train or serve in: dtype, device, quantized Linears.

    base = ak.quantize_base(model, "nf4")              # the frozen Linear layers only
    am = ak.adapt(base); am.add("a", ak.LoRA(r=16, targets="all-linear"))   # adapters stay fp32

Embeddings, norms, convolutions and the task head keep the model's dtype: the head is what an
adapter replaces with its own trained copy, and the rest is small next to the Linear layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import PrecisionError
from .heads import HeadSwitch, find_head
from .precision import (
    DTYPES,
    SCHEMES,
    check_dtype,
    check_scheme,
    dtype_name,
    parse_dtype,
    quantization_of,
    quantize_linears,
    resolve_device,
)
from .site import Site


def quantize_base(model: nn.Module, scheme: str, *, head: str | None = "auto",
                  skip: tuple[str, ...] = ()) -> nn.Module:
    """Quantize the frozen Linear layers of `model` in place with nf4 (bitsandbytes), int8 or int4
    (torchao), leaving out its task head (`head`: its module name, "auto" to find it, None: none)
    and the modules named in `skip` (and what is inside them). Returns the model.

    Quantize before `adapt`: the adapters' sites then hook the quantized layers."""
    if _adapted(model):
        raise PrecisionError("quantize the base before ak.adapt(): its adapter sites hook the layers it replaces")
    head_path = find_head(model) if head == "auto" else head
    fenced = tuple(p for p in (head_path, *skip) if p)

    def skipped(name: str) -> bool:
        return any(name == f or name.startswith(f + ".") for f in fenced)

    for p in model.parameters():
        p.requires_grad_(False)
    quantize_linears(model, scheme, skipped)
    return model


def _adapted(model: nn.Module) -> bool:
    """Whether adapter sites already hook this model's modules (a forward hook of theirs is there)."""
    return any(isinstance(getattr(hook, "__self__", None), Site | HeadSwitch)
               for module in model.modules() for hook in module._forward_hooks.values())


@dataclass(frozen=True)
class Precision:
    """How a command holds its base: `dtype` (fp32 | bf16 | fp16), `quantize` (None | nf4 | int8 |
    int4) and `device` (cpu | cuda | auto). Adapters keep fp32 parameters unless `adapter_dtype`
    says otherwise ("base": the base's dtype)."""

    dtype: str = "fp32"
    quantize: str | None = None
    device: str = "cpu"
    adapter_dtype: str = "fp32"

    def __post_init__(self) -> None:
        parse_dtype(self.dtype)
        if self.adapter_dtype != "base":
            parse_dtype(self.adapter_dtype)
        if self.quantize is not None:
            check_scheme(self.quantize)
        check_dtype(self.torch_dtype, self.torch_device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    @property
    def adapter_torch_dtype(self) -> torch.dtype:
        return self.torch_dtype if self.adapter_dtype == "base" else DTYPES[self.adapter_dtype]

    def apply(self, model: nn.Module) -> nn.Module:
        """The model in this dtype, on this device, with its Linear layers quantized."""
        model.to(self.torch_device, dtype=self.torch_dtype)
        if self.quantize is not None:
            quantize_base(model, self.quantize)
        return model

    def record(self, model: nn.Module) -> dict[str, Any]:
        """What an adapter's metadata keeps about the base it was trained on."""
        return {"dtype": self.dtype, "quantization": quantization_of(model)}

    @staticmethod
    def of(model: nn.Module) -> dict[str, Any]:
        """The dtype and quantization a model is in now (for a report)."""
        first = next((p for p in model.parameters() if p.dtype.is_floating_point), None)
        dtype = dtype_name(first.dtype) if first is not None else "fp32"
        return {"dtype": dtype, "quantization": quantization_of(model)}


__all__ = ["DTYPES", "SCHEMES", "Precision", "quantize_base"]
