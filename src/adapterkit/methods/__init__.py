"""One file per method. This module only maps a config class to the module that implements it.

Adding a method is one file plus one `register` call, here or in the user's own code:

    register(MyConfig, MyAdapter)                  # a SiteMethod subclass, built at every site
    register(MyPromptConfig, MyPromptModule, model_level=True)   # built once per model
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..config import (
    CONFIGS,
    IA3,
    BitFit,
    Bottleneck,
    LiteResidual,
    LoRA,
    MethodConfig,
    PrefixTuning,
    PromptTuning,
)
from ..errors import AdapterConfigError
from .base import SiteMethod, SiteShape
from .bitfit import BitFitAdapter
from .bottleneck import BottleneckAdapter
from .ia3 import IA3Adapter
from .lite_residual import LiteResidualAdapter
from .lora import LoRAAdapter
from .prefix import PrefixTuningAdapter
from .prompt import PromptTuningAdapter

SITE_METHODS: dict[type[MethodConfig], type[SiteMethod]] = {}
#: model-level methods: called as `method(config, model)`; the module has `prepare(model, args, kwargs)`
MODEL_METHODS: dict[type[MethodConfig], Callable[[MethodConfig, nn.Module], nn.Module]] = {}


def register(config_type: type[MethodConfig], method: type, *, model_level: bool = False) -> None:
    """Make `config_type` usable in `am.add(name, config_type(...))`, in files and in serving."""
    if not (isinstance(config_type, type) and issubclass(config_type, MethodConfig)) or not config_type.method:
        raise AdapterConfigError(f"{config_type!r}: a method config is a MethodConfig subclass with a `method` name")
    if not model_level and not (isinstance(method, type) and issubclass(method, SiteMethod)):
        raise AdapterConfigError(f"{method!r}: a per-site method is a SiteMethod subclass")
    taken = CONFIGS.get(config_type.method)
    if taken is not None and taken is not config_type:
        raise AdapterConfigError(f"method name {config_type.method!r} is already registered by {taken.__name__}")
    CONFIGS[config_type.method] = config_type
    (MODEL_METHODS if model_level else SITE_METHODS)[config_type] = method


def _lookup(table: dict, config: MethodConfig):
    return next((table[t] for t in type(config).__mro__ if t in table), None)


def is_model_level(config: MethodConfig) -> bool:
    return _lookup(MODEL_METHODS, config) is not None


def site_method_class(config: MethodConfig) -> type[SiteMethod]:
    method = _lookup(SITE_METHODS, config)
    if method is None:
        raise AdapterConfigError(f"{type(config).__name__} is not a registered per-site method")
    return method


def build_site_method(config: MethodConfig, shape: SiteShape, module: nn.Module, on_input: bool = False) -> SiteMethod:
    return site_method_class(config).build(config, shape, module, on_input)


def build_model_method(config: MethodConfig, model: nn.Module) -> nn.Module:
    method = _lookup(MODEL_METHODS, config)
    if method is None:
        raise AdapterConfigError(f"{type(config).__name__} is not a registered model-level method")
    return method(config, model)


for _config, _method in ((Bottleneck, BottleneckAdapter), (LoRA, LoRAAdapter), (IA3, IA3Adapter),
                         (BitFit, BitFitAdapter), (LiteResidual, LiteResidualAdapter)):
    register(_config, _method)
register(PromptTuning, PromptTuningAdapter, model_level=True)
register(PrefixTuning, PrefixTuningAdapter, model_level=True)

__all__ = ["SiteMethod", "SiteShape", "build_model_method", "build_site_method", "is_model_level", "register",
           "site_method_class"]
