"""One file per method. This module is the one registry: a method's name, its config class and its
implementation; everything outside `methods/` asks it (mergeable? model-level? default targets?).

Adding a method is one file plus one `register` call, here or in the user's own code:

    register(MyConfig, MyAdapter)                  # a SiteMethod subclass, built at every site
    register(MyPromptConfig, MyPromptModule, model_level=True)   # built once per model
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from ..config import (
    IA3,
    BitFit,
    Bottleneck,
    DoRA,
    LiteResidual,
    LoRA,
    MethodConfig,
    PrefixTuning,
    PromptTuning,
    parse_config,
)
from ..errors import AdapterConfigError, TargetError
from ..precision import scheme_of
from .base import ModelMethod, SiteMethod, SiteShape
from .bitfit import BitFitAdapter
from .bottleneck import BottleneckAdapter
from .dora import DoRAAdapter
from .ia3 import IA3Adapter
from .lite_residual import LiteResidualAdapter
from .lora import LoRAAdapter
from .prefix import PrefixTuningAdapter
from .prompt import PromptTuningAdapter

if TYPE_CHECKING:
    from typing_extensions import TypeIs


def _is_site_method(implementation: type[SiteMethod] | type[ModelMethod]) -> TypeIs[type[SiteMethod]]:
    return isinstance(implementation, type) and issubclass(implementation, SiteMethod)


@dataclass(frozen=True)
class Method:
    """One registered method: its name (the `method` of its config and of `adapter.json`), its
    config class and what implements it: a SiteMethod subclass built at every site, or a
    model-level module built once per model (prompt, prefix)."""

    name: str
    config: type[MethodConfig]
    implementation: type[SiteMethod] | type[ModelMethod]
    model_level: bool = False

    @property
    def site_method(self) -> type[SiteMethod]:
        if self.model_level:
            raise AdapterConfigError(f"{self.config.__name__} is a model-level method, built once per model")
        if not _is_site_method(self.implementation):  # register() lets no other per-site method in
            raise AdapterConfigError(f"{self.implementation!r}: a per-site method is a SiteMethod subclass")
        return self.implementation

    @property
    def mergeable(self) -> bool:
        """Whether its delta folds into the frozen weights (model-level methods add tokens: never)."""
        return not self.model_level and self.site_method.mergeable


#: the one registry: method name -> Method
METHODS: dict[str, Method] = {}


def register(config_type: type[MethodConfig], method: type[SiteMethod] | type[ModelMethod], *,
             model_level: bool = False) -> None:
    """Make `config_type` usable in `am.add(name, config_type(...))`, in files and in serving."""
    if not (isinstance(config_type, type) and issubclass(config_type, MethodConfig)) or not config_type.method:
        raise AdapterConfigError(f"{config_type!r}: a method config is a MethodConfig subclass with a `method` name")
    if not model_level and not (isinstance(method, type) and issubclass(method, SiteMethod)):
        raise AdapterConfigError(f"{method!r}: a per-site method is a SiteMethod subclass")
    if model_level and not (isinstance(method, type) and issubclass(method, ModelMethod)):
        raise AdapterConfigError(f"{method!r}: a model-level method is a ModelMethod subclass")
    taken = METHODS.get(config_type.method)
    if taken is not None and taken.config is not config_type:
        raise AdapterConfigError(f"method name {config_type.method!r} is already registered by {taken.config.__name__}")
    METHODS[config_type.method] = Method(config_type.method, config_type, method, model_level)


def method_of(config: MethodConfig | type[MethodConfig] | str) -> Method:
    """The registered method of a config (or its class, or its name); a subclass of a registered
    config is its parent's method."""
    if isinstance(config, str):
        if config not in METHODS:
            raise AdapterConfigError(f"unknown adapter method {config!r}; known methods: {sorted(METHODS)}")
        return METHODS[config]
    cls = config if isinstance(config, type) else type(config)
    for base in cls.__mro__:
        found = next((m for m in METHODS.values() if m.config is base), None)
        if found is not None:
            return found
    raise AdapterConfigError(f"{cls.__name__} is not a registered method config")


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """A config from `adapter.json`'s "config" object: its method looked up here, every field type-
    and range-checked (unknown keys from newer versions dropped with a warning), then checked by the
    method's own implementation."""
    if not isinstance(data, dict):
        raise AdapterConfigError(f"a config is a JSON object, not {type(data).__name__}")
    data = dict(data)
    method = method_of(data.pop("method", None) if isinstance(data.get("method"), str) else repr(data.get("method")))
    config = parse_config(method.config, data)
    check_config(config)
    return config


def check_config(config: MethodConfig) -> None:
    """The config's own `validate`, then its implementation's `check_config`."""
    config.validate()
    method = method_of(config)
    if not method.model_level:
        method.site_method.check_config(config)


def is_model_level(config: MethodConfig | str) -> bool:
    return method_of(config).model_level


def site_method_class(config: MethodConfig) -> type[SiteMethod]:
    method = method_of(config)
    if method.model_level:
        raise AdapterConfigError(f"{type(config).__name__} is not a registered per-site method")
    return method.site_method


def build_site_method(config: MethodConfig, shape: SiteShape, module: nn.Module, on_input: bool = False) -> SiteMethod:
    method = site_method_class(config)
    scheme = scheme_of(module)
    if scheme is not None and not method.on_quantized:
        raise TargetError(f"{method.__name__} reads the frozen weight, which this layer holds quantized ({scheme}); "
                          "keep the layer in full precision (quantize_base(..., skip=[name])) or use another method")
    return method.build(config, shape, module, on_input)


def build_model_method(config: MethodConfig, model: nn.Module) -> ModelMethod:
    method = method_of(config)
    if not method.model_level or _is_site_method(method.implementation):
        raise AdapterConfigError(f"{type(config).__name__} is not a registered model-level method")
    return method.implementation(config, model)


for _config, _method in ((Bottleneck, BottleneckAdapter), (LoRA, LoRAAdapter), (DoRA, DoRAAdapter), (IA3, IA3Adapter),
                         (BitFit, BitFitAdapter), (LiteResidual, LiteResidualAdapter)):
    register(_config, _method)
register(PromptTuning, PromptTuningAdapter, model_level=True)
register(PrefixTuning, PrefixTuningAdapter, model_level=True)

__all__ = ["METHODS", "Method", "SiteMethod", "SiteShape", "build_model_method", "build_site_method", "check_config",
           "config_from_dict", "is_model_level", "method_of", "register", "site_method_class", "ModelMethod"]
