"""An int8 frozen base: float adapters trained on top of int8 weights (the QLoRA idea, on a CPU).

Every Conv1d/Conv2d/Linear of the base keeps its weight as int8 with one fp32 scale per output
channel (symmetric, round to nearest): w ≈ scale[c] · q[c], q in [-127, 127]. The module stays
an instance of its class, so adapters find and wrap it as before; `weight` is the dequantized
tensor, made when it is read, and the stored bytes are the int8 ones. Biases and BatchNorm stay
fp32 (they are a few hundred bytes).

Linear layers can use torchao's int8 weight-only tensors instead (`linear="torchao"`); convolutions
always use this per-channel form, which torchao does not offer for them. An LSTM keeps each of its
weight matrices (W_ih, W_hh per layer and direction) in the same form, one scale per gate row;
its forward hands PyTorch's own LSTM kernel the dequantized matrices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TargetError


class Int8Weight:
    """Mixin for a conv/linear whose `weight` is int8 codes times a per-output-channel scale."""

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor

    @property
    def weight(self) -> torch.Tensor:
        view = (-1,) + (1,) * (self.weight_int8.dim() - 1)
        return self.weight_int8.to(self.weight_scale.dtype) * self.weight_scale.view(view)

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:
        raise TargetError(f"{type(self).__name__} holds an int8 weight; it cannot be set (merge into an fp32 base)")


class Int8Conv1d(Int8Weight, nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight, self.bias)


class Int8Conv2d(Int8Weight, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight, self.bias)


class Int8Linear(Int8Weight, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Int8LSTM(nn.LSTM):
    """nn.LSTM whose weight matrices are int8 codes and per-row scales (biases stay fp32)."""

    int8_names: list[str]

    def __getattr__(self, name: str) -> torch.Tensor | nn.Module:
        # called only when normal lookup fails: the weights are no longer parameters
        if name in self.__dict__.get("int8_names", ()):
            codes, scale = self._buffers[name + "_int8"], self._buffers[name + "_scale"]
            if codes is None or scale is None:
                raise TargetError(f"Int8LSTM lost the int8 codes or scales of {name}")
            return codes.to(scale.dtype) * scale[:, None]
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: object) -> None:
        if name in self.__dict__.get("int8_names", ()):
            raise TargetError(f"Int8LSTM holds {name} as int8; it cannot be set (merge into an fp32 base)")
        super().__setattr__(name, value)

    # PyTorch's kernel reads _flat_weights. At rest the list holds nothing, so no fp32 copy of the
    # matrices stays resident; each forward dequantizes them once and lets them go after.
    def _init_flat_weights(self) -> None:
        self.__dict__["_flat_weights"] = [None] * len(self._flat_weights_names)
        self.__dict__["_flat_weight_refs"] = [None] * len(self._flat_weights_names)

    def _update_flat_weights(self) -> None:
        pass

    def forward(self, input, hx=None):  # noqa: ANN001, ANN201, A002
        self.__dict__["_flat_weights"] = [getattr(self, n) for n in self._flat_weights_names]
        try:
            return super().forward(input, hx)
        finally:
            self._init_flat_weights()


def _lstm_to_int8(module: nn.LSTM) -> None:
    names = [n for n in module._flat_weights_names if n.startswith("weight_")]
    for name in names:
        codes, scale = quantize_weight(getattr(module, name))
        del module._parameters[name]
        module.register_buffer(name + "_int8", codes)
        module.register_buffer(name + "_scale", scale)
    module.__class__ = Int8LSTM
    module.__dict__["int8_names"] = names
    module._init_flat_weights()  # drop the list's references to the fp32 matrices


_INT8 = {nn.Conv1d: Int8Conv1d, nn.Conv2d: Int8Conv2d, nn.Linear: Int8Linear, nn.LSTM: Int8LSTM}


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (codes, scales)."""
    flat = weight.detach().reshape(weight.shape[0], -1).float()
    scale = flat.abs().amax(1).clamp_min(1e-12) / 127.0
    codes = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes.reshape(weight.shape), scale


def _to_int8(module: nn.Module) -> None:
    if isinstance(module, nn.LSTM):
        return _lstm_to_int8(module)
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
        raise TargetError(f"int8 quantization cannot convert a {type(module).__name__}")
    codes, scale = quantize_weight(module.weight)
    del module._parameters["weight"]
    module.__class__ = _INT8[type(module)]
    module.register_buffer("weight_int8", codes)
    module.register_buffer("weight_scale", scale)


def quantize_int8(model: nn.Module, *, skip: tuple[str, ...] = ("classifier",), linear: str = "own") -> int:
    """Quantize the frozen conv, linear and LSTM weights of `model` in place (before `adapt`); the count.

    `skip`: module names (and what is under them) left in fp32, by default the task head, which an
    adapter replaces anyway. `linear="torchao"` quantizes Linear layers with torchao instead.
    """
    if linear not in ("own", "torchao"):
        raise TargetError(f"linear={linear!r}: use 'own' or 'torchao'")
    count, torchao_linears = 0, []
    for name, module in list(model.named_modules()):
        if any(name == s or name.startswith(s + ".") for s in skip) or type(module) not in _INT8:
            continue
        if linear == "torchao" and type(module) is nn.Linear:
            torchao_linears.append(name)
            continue
        _to_int8(module)
        count += 1
    if torchao_linears:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        names = set(torchao_linears)
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in names)
        count += len(names)
    for p in model.parameters():
        p.requires_grad_(False)
    return count
