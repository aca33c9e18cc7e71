"""Hugging Face PEFT interop for LoRA: write and read PEFT's `adapter_config.json` + `adapter_model.safetensors`.

Our LoRA tensors already use PEFT's shapes (A: [r, in, *kernel], B: [out, r, 1...]; embeddings
A: [r, vocab], B: [dim, r]), so conversion is a renaming of keys:

    ours                               PEFT
    sites.<module>.lora_A              base_model.model.<module>.lora_A.weight      (Linear, Conv, GPT-2 Conv1D)
    sites.<module>.lora_B              base_model.model.<module>.lora_B.weight
    sites.<module>.lora_A / lora_B     base_model.model.<module>.lora_embedding_A / _B   (Embedding)
    sites.<module>.magnitude           base_model.model.<module>.lora_magnitude_vector  (DoRA: use_dora)
    head.<param>                       base_model.model.<head>.<param>   (a `modules_to_save` entry)
    copies.<module>.<param>            base_model.model.<module>.<param> (a `modules_to_save` entry)

This module never imports peft: peft is a test-only dependency, and a file format needs no library.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save
from torch import nn

from ..config import DoRA, LoRA
from ..errors import AdapterFileError, CompositionError
from ..methods.dora import DoRAAdapter
from ..methods.lora import LoRAAdapter
from .install import install
from .storage import PICKLE_SUFFIXES, atomic_folder, load_tensors

if TYPE_CHECKING:
    from ..model import AdaptedModel

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

#: PEFT's task types by the suffix of a transformers model class (the first match wins)
_TASK_BY_CLASS_SUFFIX = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
)

#: modules that PEFT puts into `modules_to_save` on its own for a task type; LoRA never lands inside them
_AUTO_MODULES_TO_SAVE = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
                         "QUESTION_ANS": ["qa_outputs"]}

#: LoraConfig fields that change what the forward pass computes in ways plain LoRA cannot express
_UNSUPPORTED_OPTIONS = {
    "lora_bias": "LoRA bias terms (lora_bias)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<param>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
                       r"|lora_magnitude_vector)$")
_PEFT_PARAM = {"lora_A.weight": ("lora_A", False), "lora_B.weight": ("lora_B", False),
               "lora_embedding_A": ("lora_A", True), "lora_embedding_B": ("lora_B", True),
               "lora_magnitude_vector": ("magnitude", False)}


# --- export --------------------------------------------------------------------------------


def export_peft_lora(
    am: AdaptedModel, name: str, path: str | os.PathLike, base_model_name_or_path: str | None = None
) -> Path:
    """Write LoRA adapter `name` as a PEFT folder that `peft.PeftModel.from_pretrained` loads.

    The folder is written atomically (built beside the target, then renamed into place).
    """
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise AdapterFileError(f"{path}: adapterkit writes safetensors only, never pickle")
    record = am.adapter(name)
    config = record.config
    if not isinstance(config, LoRA):
        raise CompositionError(
            f"adapter {name!r} is a {config.method} adapter; only LoRA adapters have a Hugging Face PEFT layout "
            "(use am.save() for adapterkit's own format)"
        )
    sites = record.methods_by_path
    task_type = _task_type(am.base)
    copied = record.copied_paths
    heads: list[str] = []
    if record.head is not None:
        if am.head_path is None:  # a head given as a module (head=...) to a model adapted with head=None
            raise CompositionError(f"adapter {name!r} has its own task head but the model has no head module "
                                   "for PEFT's modules_to_save to name")
        heads = [am.head_path]
    modules_to_save = heads + copied or None
    auto_saved = _AUTO_MODULES_TO_SAVE.get(task_type, []) if task_type is not None else []
    _check_not_inside_saved_modules(sites, (modules_to_save or []) + auto_saved)

    tensors: dict[str, torch.Tensor] = {}
    for module_name, adapter in sites.items():
        if not isinstance(adapter, LoRAAdapter):
            raise CompositionError(f"adapter {name!r}: module {module_name!r} holds a "
                                   f"{type(adapter).__name__}, not a LoRA layer")
        embedding = adapter.shape.kind == "embedding"
        _check_peft_computes_the_same(module_name, am.base.get_submodule(module_name))
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PEFT_PREFIX}{module_name}.{a_key}"] = adapter.lora_A.detach()
        tensors[f"{PEFT_PREFIX}{module_name}.{b_key}"] = adapter.lora_B.detach()
        if isinstance(adapter, DoRAAdapter):
            tensors[f"{PEFT_PREFIX}{module_name}.lora_magnitude_vector"] = adapter.magnitude.detach()
    if record.head is not None:
        for pname, value in record.head.state_dict().items():
            tensors[f"{PEFT_PREFIX}{am.head_path}.{pname}"] = value.detach()
    for module_path in copied:
        for pname, value in record.copy_of(module_path).state_dict().items():
            tensors[f"{PEFT_PREFIX}{module_path}.{pname}"] = value.detach()
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}

    peft_config: dict[str, Any] = {
        # Only fields every PEFT release since LoRA's introduction reads; older releases refuse unknown keys.
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path or _base_identity(am),
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": _plain_number(config.alpha),
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "use_dora": isinstance(config, DoRA),
        "target_modules": _target_modules(am.base, list(sites)),
        "bias": "none",
        # GPT-2's Conv1D stores its weight as [in, out]; PEFT wants this flag set for such layers.
        "fan_in_fan_out": any(a.shape.kind == "hf_conv1d" for a in sites.values()),
        "modules_to_save": modules_to_save,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    atomic_folder(path, {
        WEIGHTS_FILE: save(tensors, metadata={"format": "pt"}),  # transformers checks for format "pt"
        CONFIG_FILE: json.dumps(peft_config, indent=2).encode(),
    })
    return path


def _task_type(model: nn.Module) -> str | None:
    class_name = type(model).__name__
    for suffix, task in _TASK_BY_CLASS_SUFFIX:
        if class_name.endswith(suffix):
            return task
    return None


def _base_identity(am: AdaptedModel) -> str | None:
    """The base's hub id or path, or None when we only know its class name (PEFT would try to fetch it)."""
    name = am.base_name
    return None if not name or name == type(am.base).__name__ else name


def _plain_number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def _target_modules(model: nn.Module, sites: list[str]) -> list[str]:
    """The shortest name suffixes that make PEFT match exactly our sites, else the full module names.

    Short suffixes ("query", "c_attn") are what PEFT users and servers such as vLLM expect; they are
    used only when PEFT's rule (name == t or name ends with "." + t) selects no other module.
    """
    all_names = [n for n, _ in model.named_modules() if n]
    wanted = set(sites)
    for depth in (1, 2, 3):
        suffixes = sorted({".".join(s.split(".")[-depth:]) for s in sites})
        matched = {n for n in all_names if any(n == t or n.endswith("." + t) for t in suffixes)}
        if matched == wanted:
            return suffixes
    return list(sites)


def _check_not_inside_saved_modules(sites: Iterable[str], modules_to_save: list[str]) -> None:
    """PEFT never puts LoRA inside a `modules_to_save` module, so such a site would be silently lost."""
    for site in sites:
        for m in modules_to_save:
            if re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", site):
                raise CompositionError(
                    f"LoRA site {site!r} lies inside {m!r}, which PEFT trains as a whole module "
                    "(modules_to_save) and never gives LoRA layers; PEFT would drop this site"
                )


def _check_peft_computes_the_same(module_name: str, module: nn.Module) -> None:
    """PEFT's LoRA conv omits the base layer's dilation, so a dilated conv would compute something else."""
    if isinstance(module, nn.modules.conv._ConvNd) and any(d != 1 for d in module.dilation):
        raise CompositionError(
            f"module {module_name!r}: PEFT's LoRA ignores the dilation {tuple(module.dilation)} of this "
            "convolution, so a PEFT file would not reproduce this adapter's outputs"
        )


# --- import --------------------------------------------------------------------------------


def load_peft_lora(am: AdaptedModel, path: str | os.PathLike, name: str | None = None) -> str:
    """Add the PEFT LoRA adapter in folder `path` to `am` as `name` (default: the folder name).

    The folder is checked and translated into our manifest and keys (`read_peft_lora`), then
    installed like any adapter file: all of it, or on any failure nothing.
    """
    path = Path(path)
    manifest, tensors = read_peft_lora(am, path)
    return install(am, manifest, tensors, name=name or path.name, source=str(path), check_base=False,
                   hint=" (is this PEFT adapter for another base model?)")


def read_peft_lora(am: AdaptedModel, path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A PEFT LoRA folder as our manifest and tensors, checked against this model's modules."""
    path = Path(path)
    peft_config, tensors = _read_peft_folder(path)
    _check_peft_config(path, peft_config)
    saved = peft_config.get("modules_to_save") or []
    lora, head, copies = _split_keys(am, path, tensors, saved if isinstance(saved, list) else [saved])
    dora = bool(peft_config.get("use_dora", False))
    _check_lora_modules(am, path, lora, int(peft_config["r"]), dora)
    config = (DoRA if dora else LoRA)(
        r=int(peft_config["r"]),
        alpha=_plain_number(peft_config.get("lora_alpha", 8)),
        dropout=float(peft_config.get("lora_dropout") or 0.0),
        rslora=bool(peft_config.get("use_rslora", False)),
        targets=list(lora),
        modules_to_save=sorted(copies),
    )
    num_labels = _head_num_labels(am, path, head) if head else None
    ours = {f"sites.{module}.{param}": t for module, params in lora.items() for param, t in params.items()}
    ours.update({f"head.{k}": v for k, v in head.items()})
    ours.update({f"copies.{module}.{k}": v for module, params in copies.items() for k, v in params.items()})
    manifest = {
        "format": "adapterkit", "config": config.to_dict(),
        "head": {"path": am.head_path, "num_labels": num_labels} if head else None,
        "sites": dict.fromkeys(lora),
        "meta": {"imported_from": {
            "format": "peft", "base_model_name_or_path": peft_config.get("base_model_name_or_path"),
            "task_type": peft_config.get("task_type"),
        }},
    }
    return manifest, ours


def _read_peft_folder(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not path.is_dir():
        raise AdapterFileError(f"{path}: not a folder; a PEFT adapter is a folder with {CONFIG_FILE} and {WEIGHTS_FILE}")
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_path.exists():
        raise AdapterFileError(f"{path}: not a PEFT adapter folder, {CONFIG_FILE} is missing")
    if not weights_path.exists():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterFileError(
                f"{path}: holds only pickle weights {pickles}; refusing to unpickle (arbitrary code could run). "
                f"Re-save it with safetensors (PEFT's default: save_pretrained(..., safe_serialization=True))"
            )
        raise AdapterFileError(f"{path}: {WEIGHTS_FILE} is missing")
    try:
        peft_config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{config_path}: truncated or not JSON ({err})") from None
    if not isinstance(peft_config, dict):
        raise AdapterFileError(f"{config_path}: not a PEFT config (expected a JSON object)")
    return peft_config, load_tensors(weights_path)


def _check_peft_config(path: Path, cfg: dict[str, Any]) -> None:
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterFileError(
            f"{path}: a PEFT {cfg.get('peft_type')!r} adapter; adapterkit imports PEFT LoRA adapters only"
        )
    unsupported = [label for key, label in _UNSUPPORTED_OPTIONS.items() if cfg.get(key)]
    if unsupported:
        raise AdapterFileError(f"{path}: this PEFT LoRA uses {', '.join(unsupported)}, which adapterkit does not support")
    if cfg.get("bias", "none") != "none":
        raise AdapterFileError(
            f"{path}: PEFT bias={cfg.get('bias')!r} trains the base model's biases; adapterkit imports bias='none' only"
        )
    if cfg.get("init_lora_weights") == "loftq" or cfg.get("loftq_config"):
        raise AdapterFileError(f"{path}: a LoftQ adapter needs LoftQ's modified base weights; not supported")
    if not isinstance(cfg.get("r"), int) or cfg["r"] < 1:
        raise AdapterFileError(f"{path}: PEFT config has no valid rank r ({cfg.get('r')!r})")


def _split_keys(
    am: AdaptedModel, path: Path, tensors: dict[str, torch.Tensor], saved: list[str]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(module -> {"lora_A", "lora_B", "_embedding"}, head param -> tensor,
    copied module -> {param -> tensor}) from PEFT's keys.

    The modules that the config's `modules_to_save` names (besides the task head) become the
    adapter's module copies. Full base tensors that PEFT sometimes saves alongside (the embedding
    matrix when an embedding is targeted) are accepted only if they equal this base model's, since
    our base stays frozen.
    """
    lora: dict[str, dict[str, Any]] = {}
    head: dict[str, torch.Tensor] = {}
    copies: dict[str, dict[str, torch.Tensor]] = {}
    copy_paths = _saved_module_paths(am, saved)
    base_params = dict(am.base.named_parameters(remove_duplicate=False))
    for key, tensor in tensors.items():
        rest = key.removeprefix(PEFT_PREFIX)
        match = _LORA_KEY.match(rest)
        if match:
            param, embedding = _PEFT_PARAM[match["param"]]
            entry = lora.setdefault(match["module"], {})
            entry[param], entry["_embedding"] = tensor, embedding
            continue
        if am.head_path and rest.startswith(am.head_path + "."):
            head[rest[len(am.head_path) + 1 :]] = tensor
            continue
        if ".lora_" in rest:
            raise AdapterFileError(f"{path}: tensor {key!r} is a LoRA variant adapterkit does not support")
        module = next((m for m in copy_paths if rest.startswith(m + ".")), None)
        if module is not None:
            copies.setdefault(module, {})[rest[len(module) + 1 :]] = tensor
            continue
        base_key = rest.replace(".base_layer.", ".")
        own = base_params.get(base_key)
        if own is not None and own.shape == tensor.shape and torch.equal(own.detach().cpu(), tensor.to(own.dtype)):
            continue  # an unchanged copy of a frozen base tensor: nothing to import
        raise AdapterFileError(
            f"{path}: tensor {key!r} replaces base weight {base_key!r} but its module is not in the config's "
            f"modules_to_save {saved} (a resized or trained embedding?); adapterkit keeps the base frozen"
        )
    return lora, head, copies


def _saved_module_paths(am: AdaptedModel, saved: list[str]) -> list[str]:
    """The base modules that PEFT copies for `modules_to_save`, outermost only, the head excluded.

    PEFT matches each entry as a suffix of the module's name ("pooler" finds "bert.pooler").
    """
    head = am.head_path
    found: list[str] = []
    for module_name, _ in am.base.named_modules():
        if not module_name or not any(isinstance(e, str) and module_name.endswith(e) for e in saved):
            continue
        if head and (module_name == head or module_name.startswith(head + ".")):
            continue
        if not any(module_name.startswith(outer + ".") for outer in found):
            found.append(module_name)
    return found


def _check_lora_modules(am: AdaptedModel, path: Path, lora: dict[str, dict[str, Any]], r: int, dora: bool) -> None:
    if not lora:
        raise AdapterFileError(f"{path}: no LoRA tensors (lora_A / lora_B) in {WEIGHTS_FILE}")
    modules = dict(am.base.named_modules())
    for module_name, entry in lora.items():
        for param in ("lora_A", "lora_B", *(["magnitude"] if dora else [])):
            if param not in entry:
                raise AdapterFileError(f"{path}: module {module_name!r} has no {param} tensor")
        if not dora and "magnitude" in entry:
            raise AdapterFileError(f"{path}: module {module_name!r} has a DoRA magnitude but the config's use_dora "
                                   "is not set")
        module = modules.get(module_name)
        if module is None:
            raise AdapterFileError(
                f"{path}: the adapter has LoRA weights for module {module_name!r}, which this model does not "
                "have; was it trained on another base model?"
            )
        if entry.pop("_embedding") != isinstance(module, nn.Embedding):
            raise AdapterFileError(
                f"{path}: module {module_name!r} is a {type(module).__name__} here, but the file's LoRA tensors "
                "for it are of the other kind (embedding vs. linear)"
            )
        rank = entry["lora_A"].shape[0]
        if rank != r:
            raise AdapterFileError(f"{path}: module {module_name!r} has rank {rank} but the config says r={r}")
        _check_peft_computes_the_same(module_name, module)
        if am.head_path and (module_name == am.head_path or module_name.startswith(am.head_path + ".")):
            raise AdapterFileError(
                f"{path}: the adapter puts LoRA on {module_name!r}, which adapterkit treats as the task head; "
                "wrap the model with adapt(model, head=None) to load it"
            )


def _head_num_labels(am: AdaptedModel, path: Path, head: dict[str, torch.Tensor]) -> int | None:
    """The output width of the saved head, read from the weight of the head's last Linear."""
    if am.head_path is None:  # _split_keys finds head tensors only under the model's head module
        raise AdapterFileError(f"{path}: the file holds task-head tensors but this model has no head module")
    template = am.base.get_submodule(am.head_path)
    last = [n for n, m in template.named_modules() if isinstance(m, nn.Linear)]
    if not last:
        return None
    key = f"{last[-1]}.weight" if last[-1] else "weight"
    if key not in head:
        raise AdapterFileError(f"{path}: the saved task head {am.head_path!r} has no tensor {key!r}")
    return int(head[key].shape[0])


__all__ = ["export_peft_lora", "load_peft_lora", "read_peft_lora"]
