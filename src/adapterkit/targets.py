"""Which modules of a model an adapter attaches to.

A target is a name suffix ("query" matches "...attention.self.query"), a regex ("re:layer\\.\\d+\\.output\\.dense$"),
a module class or class name ("Conv2d", nn.LSTM), or "all-linear". No per-architecture code: each
method's file has a small table of name patterns for common families (its `default_targets`), and
users can always name their own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .config import MethodConfig
from .errors import TargetError
from .methods import site_method_class
from .methods.base import hf_conv1d

_FAMILY_BY_MODEL_TYPE = {
    "gpt2": "gpt2", "gpt_neo": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama",
    "qwen3": "llama", "gemma": "llama", "gemma2": "llama", "phi3": "llama", "vit": "vit", "deit": "vit",
}

#: final projection layers that "all-linear" leaves alone, as PEFT does
OUTPUT_HEADS = ("classifier", "score", "lm_head", "head", "fc", "cls", "qa_outputs", "pooler.dense")


def model_family(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is not None:
        return _FAMILY_BY_MODEL_TYPE.get(model_type, "bert" if _has_suffix(model, "attention.self.query") else None)
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        return "recurrent"
    if any(isinstance(m, nn.Conv1d | nn.Conv2d) for m in model.modules()):
        return "cnn"
    return None


def default_targets(model: nn.Module, config: MethodConfig) -> tuple[list, list]:
    """(targets, input-side targets) that `config` uses on `model` when it names none: its method's
    own answer for the model's family (`SiteMethod.default_targets`)."""
    family = model_family(model)
    found = site_method_class(config).default_targets(config, family) if family is not None else None
    if found is None:
        raise TargetError(
            f"no default targets for {type(config).__name__} on a {type(model).__name__}; "
            f"pass targets=[...]. Candidate modules: {candidates(model)}"
        )
    return list(found[0]), list(found[1])


def matches(name: str, module: nn.Module, target: str | type) -> bool:
    if isinstance(target, type):
        return isinstance(module, target)
    if target == "all-linear":
        is_linear = isinstance(module, (nn.Linear, *hf_conv1d()))
        return is_linear and not any(name == h or name.endswith("." + h) for h in OUTPUT_HEADS)
    if target.startswith("re:"):
        return re.search(target[3:], name) is not None
    if any(target == cls.__name__ for cls in type(module).__mro__[:-2]):  # a class name matches subclasses too
        return True
    return name == target or name.endswith("." + target)


def find_sites(
    model: nn.Module, targets: Iterable[str | type], exclude: Iterable[str] = (), method: str = "adapter"
) -> list[str]:
    """Names of the modules matched by `targets`, outermost first; nested matches are dropped."""
    targets, excluded = list(targets), [re.compile(p) for p in exclude]
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or any(p.search(name) for p in excluded):
            continue
        if any(matches(name, module, t) for t in targets):
            if not any(name.startswith(f + ".") for f in found):
                found.append(name)
    if not found:
        raise TargetError(f"{method}: targets {targets} matched no module. Candidate modules: {candidates(model)}")
    return found


def candidates(model: nn.Module, limit: int = 40) -> str:
    """Distinct module-name suffixes with their types, for error messages."""
    seen: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        short = re.sub(r"(^|\.)\d+(?=\.|$)", r"\1N", name)
        seen.setdefault(short, type(module).__name__)
    items = [f"{n} ({t})" for n, t in seen.items()]
    more = f" … and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _has_suffix(model: nn.Module, suffix: str) -> bool:
    return any(name.endswith(suffix) for name, _ in model.named_modules())
