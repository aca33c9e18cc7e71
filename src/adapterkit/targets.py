"""Which modules of a model an adapter attaches to.

A target is a name suffix ("query" matches "...attention.self.query"), a regex ("re:layer\\.\\d+\\.output\\.dense$"),
a module class or class name ("Conv2d", nn.LSTM), or "all-linear". No per-architecture code: a small
table of name patterns gives defaults for common families, and users can always name their own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .config import MethodConfig
from .errors import TargetError
from .methods.base import HFConv1D

BERT_FFN_OUT = r"re:(^|\.)layer\.\d+\.output\.dense$"
BERT_ATTN_OUT = r"re:attention\.output\.dense$"

#: family -> method/placement -> targets (IA³: output targets, input targets)
DEFAULT_TARGETS: dict[str, dict[str, list]] = {
    "bert": {
        "lora": ["query", "value"],
        "pfeiffer": [BERT_FFN_OUT],
        "houlsby": [BERT_ATTN_OUT, BERT_FFN_OUT],
        "parallel": [BERT_FFN_OUT],
        "ia3": ["key", "value"],
        "ia3_input": [BERT_FFN_OUT],
        "bitfit": ["all-linear"],
    },
    "gpt2": {
        "lora": ["c_attn"],
        "pfeiffer": ["mlp.c_proj"],
        "houlsby": ["attn.c_proj", "mlp.c_proj"],
        "parallel": ["re:\\.mlp$"],
        "ia3": ["c_attn"],
        "ia3_input": ["mlp.c_proj"],
        "bitfit": ["all-linear"],
    },
    "llama": {
        "lora": ["q_proj", "v_proj"],
        "pfeiffer": ["mlp.down_proj"],
        "houlsby": ["self_attn.o_proj", "mlp.down_proj"],
        "parallel": ["re:\\.mlp$"],
        "ia3": ["k_proj", "v_proj"],
        "ia3_input": ["down_proj"],
        "bitfit": ["all-linear"],
    },
    "cnn": {
        "lora": ["Conv2d", "Conv1d"],
        "pfeiffer": ["re:^layer\\d+\\.\\d+$"],
        "houlsby": ["re:^layer\\d+\\.\\d+$"],
        "parallel": ["re:^layer\\d+\\.\\d+$"],
        "ia3": ["Conv2d", "Conv1d"],
        "ia3_input": [],
        "bitfit": ["Conv2d", "Conv1d", "Linear"],
    },
    "recurrent": {
        "lora": ["all-linear"],
        "pfeiffer": ["LSTM", "GRU"],
        "houlsby": ["LSTM", "GRU"],
        "parallel": ["LSTM", "GRU"],
        "ia3": ["LSTM", "GRU"],
        "ia3_input": [],
        "bitfit": ["LSTM", "GRU", "Linear"],
    },
}
DEFAULT_TARGETS["vit"] = DEFAULT_TARGETS["bert"]

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
    """(targets, input-side targets) that `config` uses on `model` when it names none."""
    family = model_family(model)
    key = config.default_targets_key
    if family is None or key is None or key not in DEFAULT_TARGETS[family]:
        raise TargetError(
            f"no default targets for {type(config).__name__} on a {type(model).__name__}; "
            f"pass targets=[...]. Candidate modules: {candidates(model)}"
        )
    table = DEFAULT_TARGETS[family]
    return list(table[key]), list(table.get(f"{key}_input", []))


def matches(name: str, module: nn.Module, target: str | type) -> bool:
    if isinstance(target, type):
        return isinstance(module, target)
    if target == "all-linear":
        is_linear = isinstance(module, nn.Linear) or (HFConv1D and isinstance(module, HFConv1D))
        return bool(is_linear) and not any(name == h or name.endswith("." + h) for h in OUTPUT_HEADS)
    if target.startswith("re:"):
        return re.search(target[3:], name) is not None
    if any(target == cls.__name__ for cls in type(module).__mro__[:-2]):  # a class name matches subclasses too
        return True
    return name == target or name.endswith("." + target)


def find_sites(
    model: nn.Module, targets: Iterable[str | type], exclude: Iterable[str] = (), method: str = "adapter"
) -> list[str]:
    """Names of the modules matched by `targets`, outermost first; nested matches are dropped."""
    targets, exclude = list(targets), [re.compile(p) for p in exclude]
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or any(p.search(name) for p in exclude):
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
