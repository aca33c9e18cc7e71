"""One file per method. This module only maps a config to the module that implements it."""

from __future__ import annotations

from torch import nn

from ..config import IA3, BitFit, Bottleneck, LoRA, MethodConfig, PrefixTuning, PromptTuning
from ..errors import AdapterConfigError
from .base import SiteMethod, SiteShape
from .bitfit import BitFitAdapter
from .bottleneck import BottleneckAdapter
from .ia3 import IA3Adapter
from .lora import LoRAAdapter
from .prompt import PromptTuningAdapter

MODEL_LEVEL = (PromptTuning, PrefixTuning)


def build_site_method(config: MethodConfig, shape: SiteShape, module: nn.Module, on_input: bool = False) -> SiteMethod:
    if isinstance(config, Bottleneck):
        return BottleneckAdapter(config, shape)
    if isinstance(config, LoRA):
        return LoRAAdapter(config, shape, module)
    if isinstance(config, IA3):
        return IA3Adapter(shape, on_input=on_input)
    if isinstance(config, BitFit):
        return BitFitAdapter(shape)
    raise AdapterConfigError(f"{type(config).__name__} is not a per-site method")


def build_model_method(config: MethodConfig, model: nn.Module) -> nn.Module:
    if isinstance(config, PromptTuning):
        return PromptTuningAdapter(config, model)
    if isinstance(config, PrefixTuning):
        from .prefix import PrefixTuningAdapter

        return PrefixTuningAdapter(config, model)
    raise AdapterConfigError(f"{type(config).__name__} is not a model-level method")


__all__ = ["MODEL_LEVEL", "SiteMethod", "SiteShape", "build_model_method", "build_site_method"]
