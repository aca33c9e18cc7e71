"""Names that transformers changes between releases, looked up in one place.

The key/value cache: transformers 5.24 renamed the `past_key_values` argument and output field to `cache` (the old name
lives on as a deprecated alias until 5.40); older releases know only `past_key_values`. Code that
hands a model its cache asks `cache_keyword(model)`; code that receives one (from a caller, or from
generate(), which uses the model's own name) reads every known name with `given_cache`. A future
rename means one more entry in CACHE_NAMES, not a hunt through the package.

Activation checkpointing: transformers 5.24 also renamed `gradient_checkpointing_enable` and
`is_gradient_checkpointing` to `activation_checkpointing_*` (the old names warn until v6).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from .errors import TargetError

#: every name a transformers release has used for the cache argument, newest first
CACHE_NAMES = ("cache", "past_key_values")
#: the same for "compute logits for the last N positions only" (renamed in transformers 4.45)
LOGITS_TO_KEEP_NAMES = ("logits_to_keep", "num_logits_to_keep")

_KEYWORD_BY_CLASS: dict[tuple[type, tuple[str, ...]], str | None] = {}


def _declared(function: Any, names: tuple[str, ...]) -> tuple[str | None, bool]:
    """(the first of `names` that `function` declares, whether it takes **kwargs)."""
    try:
        params = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return None, False
    name = next((n for n in names if n in params), None)
    return name, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def declared_keyword(model: nn.Module, names: tuple[str, ...]) -> str | None:
    """Which of `names` (one argument under each of its release names) `model.forward` takes.

    Task models such as BertForSequenceClassification only forward **kwargs to their backbone, so
    the backbone's forward decides for them.
    """
    key = (type(model), names)
    if key not in _KEYWORD_BY_CLASS:
        name, passes_kwargs = _declared(model.forward, names)
        backbone = getattr(model, "base_model", None)
        if name is None and passes_kwargs and isinstance(backbone, nn.Module) and backbone is not model:
            name = _declared(backbone.forward, names)[0]
        _KEYWORD_BY_CLASS[key] = name
    return _KEYWORD_BY_CLASS[key]


def cache_keyword(model: nn.Module) -> str | None:
    """The keyword under which `model.forward` takes a cache, or None if it takes none."""
    return declared_keyword(model, CACHE_NAMES)


def last_logits_only(model: nn.Module) -> dict[str, int]:
    """The keyword argument that makes a causal LM compute the last position's logits only
    ({} if it has none: it then computes them all, which is slower but the same)."""
    keyword = declared_keyword(model, LOGITS_TO_KEEP_NAMES)
    return {keyword: 1} if keyword else {}


def given_cache(kwargs: Mapping[str, Any]) -> tuple[str | None, Any]:
    """(the name, the cache) that a call's keyword arguments carry; (None, None) when none does."""
    found = [(n, kwargs[n]) for n in CACHE_NAMES if kwargs.get(n) is not None]
    if len(found) > 1:
        raise TargetError(f"a call passed its cache twice, as {' and '.join(n for n, _ in found)}; pass one")
    return found[0] if found else (None, None)


def with_cache(model: nn.Module, kwargs: dict[str, Any], cache: Any) -> dict[str, Any]:
    """`kwargs` with `cache` under the model's own keyword (and under no other name)."""
    keyword = cache_keyword(model)
    if keyword is None:
        raise TargetError(f"{type(model).__name__}.forward takes no key/value cache (looked for {CACHE_NAMES})")
    out = {k: v for k, v in kwargs.items() if k not in CACHE_NAMES}
    out[keyword] = cache
    return out


def output_cache(output: Any) -> Any:
    """The cache a model returned (`output.cache` or `output.past_key_values`), or None."""
    for name in CACHE_NAMES:
        value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
        if value is not None:
            return value
    return None


def enable_activation_checkpointing(model: nn.Module) -> bool:
    """Recompute activations in backward (non-reentrant); False if the model has no such switch."""
    for method, keyword in (("activation_checkpointing_enable", "activation_checkpointing_kwargs"),
                            ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs")):
        if hasattr(type(model), method):
            getattr(model, method)(**{keyword: {"use_reentrant": False}})
            return True
    return False


def checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """The modules transformers recomputes in backward. Each reads its *own* `training` flag, so
    a frozen base in eval mode keeps these flags on to keep checkpointing (their dropout stays off)."""
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]


def checkpointing_active(model: nn.Module) -> bool:
    """Whether a forward of `model` now would drop activations and recompute them in backward."""
    return any(m.training for m in checkpointed_layers(model))


def activation_checkpointing_on(model: nn.Module) -> bool:
    """Whether activation checkpointing is on (read without touching a deprecated property)."""
    for prop in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), prop):
            return bool(getattr(model, prop))
    return False


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in record.getMessage() for fragment in self.fragments)


#: what importing torchao logs on a machine without its CUDA kernels: none of it is about a user's job
_TORCHAO_IMPORT_NOISE = {
    "torchao": ("Failed to load",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
}

_BITSANDBYTES_IMPORT_NOISE = {
    "bitsandbytes.backends.cpu.ops": _DropMessages(("Failed to load CPU gemm_4bit_forward from kernels-community",)),
    "kernels._internals.hf_hub": _DropMessages(("Skipping publisher trust check for 'kernels-community/",)),
}


def import_torchao_quietly() -> None:
    """Import torchao, if installed, without its import-time messages (and drop bitsandbytes' two
    import-time lines whenever it is imported later).

    transformers imports torchao with its first model class whenever torchao is installed, and
    torchao then logs that its CUDA kernels did not load and torch warns about two of its enums:
    lines a CPU user's `adapterkit train` would print before anything of its own. Only those
    messages, from those two loggers, are dropped: torchao's during this import, torch's enum
    notice for the rest of the process (transformers imports more torchao modules later)."""
    # bitsandbytes (imported by transformers when installed) asks the hub for a CPU kernel at import and
    # logs that it fell back to its own when it cannot have one (offline, or untrusted): that fallback
    # is what runs here, so the two lines say nothing a user can act on
    for name, dropped in _BITSANDBYTES_IMPORT_NOISE.items():
        logging.getLogger(name).addFilter(dropped)  # (the same filter object: added once however often called)
    if importlib.util.find_spec("torchao") is None:
        return
    filters = {name: _DropMessages(fragments) for name, fragments in _TORCHAO_IMPORT_NOISE.items()}
    for name, dropped in filters.items():
        logging.getLogger(name).addFilter(dropped)
    try:
        importlib.import_module("torchao")
    except Exception:  # noqa: BLE001 - a broken optional install surfaces where torchao is used, not here
        pass
    finally:
        logging.getLogger("torchao").removeFilter(filters["torchao"])

