"""AdapterHub (`adapters` library) interop: read and write its adapter folders.

A folder holds `adapter_config.json` ({"config": {...}, "name", "model_type", "hidden_size",
"model_class", "model_name", "version"}) and `adapter.safetensors` (AdapterHub's
`save_adapter(..., use_safetensors=True)`), or `pytorch_adapter.bin`, a pickle we refuse.

BERT-style blocks (`attention.output` and `output`) compute LN(dropout(dense(x)) + r), r their second
argument. With d = dense(x), z = d + r, f(u) = s·up(act(down(u))), AdapterHub's placements map to sites:

    original_ln_before  original_ln_after  residual_before_ln  AdapterHub computes   adapterkit site
    False (Houlsby)     True               any bool            LN(d + f(d) + r)      serial at <block>.dense
    True (Pfeiffer)     True               True                LN(z + f(LN z))       renorm at <block>.LayerNorm
    True                False              False               LN z + f(LN z)        serial at <block>.LayerNorm
    is_parallel=True (par_bn): original_ln_after True, the other two unused:
                                                               LN(d + r + f(r))      input_arg=1 at <block>

mh_adapter is the `attention.output` block, output_adapter the `output` block; leave_out becomes
`exclude`. LoRA: selfattn_lora with attn_matrices q/k/v -> attention.self.query/key/value,
intermediate_lora -> intermediate.dense, output_lora -> output.dense; s = alpha / r in both.
Tensors: <block>.adapters.<name>.adapter_down.0.* / adapter_up.* <-> sites.<block>[.<leaf>].down.* /
up.*, and <linear>.loras.<name>.lora_A / lora_B <-> sites.<linear>.lora_A / lora_B (same shapes).

Dropout (training only) sits elsewhere: AdapterHub drops the scaled up-projection and reads d after
the block's dropout, adapterkit drops the bottleneck activations and reads d before it. In eval
mode both are identities, so outputs match exactly; further training differs slightly.

This module never imports `adapters` (a file format needs no library); tests/fixtures/adapterhub/
make_fixtures.py checks both directions against the real library.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save
from torch import nn

from ..config import FORMAT_VERSION, Bottleneck, LoRA
from ..errors import AdapterFileError, CompositionError
from ..methods.base import SiteMethod
from ..methods.bottleneck import BottleneckAdapter
from ..methods.lora import LoRAAdapter
from .install import install
from .storage import PICKLE_SUFFIXES, atomic_folder, load_tensors

if TYPE_CHECKING:
    from ..model import AdaptedModel

CONFIG_FILE, WEIGHTS_FILE, PICKLE_FILE = "adapter_config.json", "adapter.safetensors", "pytorch_adapter.bin"
#: the version string we write: the file layout of the adapters release the writer was checked against
WRITES_VERSION = "adapters.1.3.0"
#: model types whose layers are BERT-style post-norm blocks under BERT's module names
BERT_STYLE = ("bert", "roberta", "xlm-roberta", "camembert", "electra")

_BN_DEFAULTS: dict[str, Any] = {
    "adapter_residual_before_ln": False, "cross_adapter": False, "dropout": 0.0, "factorized_phm_W": True,
    "factorized_phm_rule": False, "hypercomplex_nonlinearity": "glorot-uniform", "init_weights": "bert",
    "init_weights_seed": None, "inv_adapter": None, "inv_adapter_reduction_factor": None, "is_parallel": False,
    "learn_phm": True, "leave_out": [], "ln_after": False, "ln_before": False, "original_ln_after": True,
    "original_ln_before": False, "phm_bias": True, "phm_c_init": "normal", "phm_dim": 4, "phm_init_range": 0.0001,
    "phm_layer": False, "phm_rank": 1, "residual_before_ln": True, "scaling": 1.0, "shared_W_phm": False,
    "shared_phm_rule": True, "stochastic_depth": 0.0, "use_gating": False,
}
_LORA_DEFAULTS: dict[str, Any] = {
    "architecture": "lora", "selfattn_lora": True, "intermediate_lora": False, "output_lora": False,
    "leave_out": [], "r": 8, "alpha": 8, "dropout": 0.0, "attn_matrices": ["q", "v"], "composition_mode": "add",
    "init_weights": "lora", "init_weights_seed": None, "use_gating": False, "use_dora": False, "vera_d": None,
    "vera_b": None, "dtype": None,
}
_SEQ = {"original_ln_before": True, "mh_adapter": False, "output_adapter": True, "non_linearity": "relu",
        "reduction_factor": 16}
_DOUBLE = {"mh_adapter": True, "output_adapter": True, "non_linearity": "swish", "reduction_factor": 16}
_PAR = {"mh_adapter": False, "output_adapter": True, "non_linearity": "relu", "reduction_factor": 2,
        "init_weights": "mam_adapter", "is_parallel": True, "scaling": 4.0}
#: AdapterHub's config names for the methods mapped here (older names first)
PRESETS = {"pfeiffer": _SEQ, "seq_bn": _SEQ, "houlsby": _DOUBLE, "double_seq_bn": _DOUBLE, "parallel": _PAR,
           "par_bn": _PAR, "lora": {"architecture": "lora"}}

_ACT_IN = {"relu": "relu", "swish": "silu", "silu": "silu", "gelu": "gelu", "tanh": "tanh"}
_ACT_OUT = {"relu": "relu", "silu": "swish", "gelu": "gelu", "tanh": "tanh"}
_BLOCKS = {"mh_adapter": r"attention\.output", "output_adapter": r"output"}
_LORA_PLACES = {"q": r"attention\.self\.query", "k": r"attention\.self\.key", "v": r"attention\.self\.value",
                "intermediate_lora": r"intermediate\.dense", "output_lora": r"output\.dense"}
_LEGACY_NAMES = ("attention_text_task_adapters", "attention_text_lang_adapters", "layer_text_task_adapters",
                 "layer_text_lang_adapters")
_BN_KEY = re.compile(
    r"^(?P<module>.+)\.adapters\.(?P<name>[^.]+)\.(?P<param>adapter_down\.0|adapter_up)\.(?P<t>weight|bias)$")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.loras\.(?P<name>[^.]+)\.(?P<param>lora_A|lora_B)$")


# --- reading ---------------------------------------------------------------------------------


def read_adapterhub(path: str | os.PathLike, am: AdaptedModel) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Our manifest and tensors (keys `sites.<module>.<param>` of `am`'s modules) for an AdapterHub folder."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise AdapterFileError(_pickle_message(path.parent, path.name))
    if not path.is_dir() or not (path / CONFIG_FILE).exists():
        raise AdapterFileError(f"{path}: not an AdapterHub adapter folder ({CONFIG_FILE} is missing)")
    if not (path / WEIGHTS_FILE).exists():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterFileError(_pickle_message(path, pickles[0]))
        raise AdapterFileError(f"{path}: no {WEIGHTS_FILE} beside {CONFIG_FILE}")
    try:
        saved = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path / CONFIG_FILE}: truncated or not JSON ({err})") from None
    if not isinstance(saved, dict) or "config" not in saved:
        raise AdapterFileError(f"{path / CONFIG_FILE}: not an AdapterHub adapter config (no 'config')")
    source = f"AdapterHub adapter {path}"
    raw = _full_config(saved, source)
    _check_model(saved, am, source)
    name = saved.get("name") or path.name
    config = _lora_config(raw, source) if raw.get("architecture") == "lora" else _bottleneck_config(raw, source)
    tensors, sites = _our_tensors(load_tensors(path / WEIGHTS_FILE), name, raw, am, source)
    imported = {"format": "adapterhub", "path": str(path), "version": saved.get("version"),
                "model_name": saved.get("model_name"), "model_class": saved.get("model_class"), "config": raw}
    return {"format": "adapterkit", "format_version": FORMAT_VERSION, "name": name, "config": config.to_dict(),
            "base": {"name": saved.get("model_name") or None, "fingerprint": None}, "head": None, "labels": None,
            "sites": sites, "params": sum(t.numel() for t in tensors.values()),
            "meta": {"imported_from": imported}}, tensors


def load_adapterhub(am: AdaptedModel, path: str | os.PathLike, name: str | None = None) -> str:
    """Read an AdapterHub folder and attach it to `am` as `name` (default: its saved name), all or nothing."""
    manifest, tensors = read_adapterhub(path, am)
    return install(am, manifest, tensors, name=name or manifest["name"], source=f"AdapterHub adapter {path}",
                   check_base=False)


def _pickle_message(folder: Path, filename: str) -> str:
    return (
        f"{folder / filename}: a pickle file, which adapterkit never loads (unpickling runs code). "
        "Convert it once, in an environment you trust:\n"
        "    import torch; from safetensors.torch import save_file\n"
        f"    state = torch.load({str(folder / filename)!r}, map_location='cpu', weights_only=True)\n"
        f"    save_file({{k: v.contiguous() for k, v in state.items()}}, {str(folder / WEIGHTS_FILE)!r})\n"
        f"AdapterHub itself reads {WEIGHTS_FILE} (load_adapter(..., use_safetensors=True)); "
        "or save it from the adapters library with save_adapter(..., use_safetensors=True)."
    )


def _full_config(saved: dict[str, Any], source: str) -> dict[str, Any]:
    """The method config with AdapterHub's defaults filled in, and its loader's fix-ups applied."""
    config = saved["config"]
    if isinstance(config, str):
        if config not in PRESETS:
            raise AdapterFileError(f"{source}: config {config!r} is not supported; "
                                   f"adapterkit reads {sorted(PRESETS)}")
        config = PRESETS[config]
    if not isinstance(config, dict):
        raise AdapterFileError(f"{source}: 'config' must be an object, not {type(config).__name__}")
    architecture = config.get("architecture")
    if architecture not in (None, "lora"):
        raise AdapterFileError(f"{source}: architecture {architecture!r} is not supported; "
                               "adapterkit reads bottleneck adapters and LoRA")
    if architecture is None:
        required = [k for k in ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity")
                    if k not in config]
        if required:
            raise AdapterFileError(f"{source}: bottleneck config lacks {required}")
    full = {**(_LORA_DEFAULTS if architecture == "lora" else _BN_DEFAULTS), **config}
    version = str(saved.get("version") or "")
    if not version and architecture is None:  # files from before versions were written name GELUs differently
        full["non_linearity"] = {"gelu": "gelu_new", "gelu_orig": "gelu"}.get(full["non_linearity"],
                                                                               full["non_linearity"])
    if architecture == "lora" and version.startswith("adapters.") and _older(version[9:], (1, 1, 0)):
        full["alpha"] = full["r"]  # adapters < 1.1 scaled LoRA by 1 whatever alpha said; its loader does this too
    if full.get("invertible_adapter"):  # the nested form older files use for inv_adapter
        raise AdapterFileError(f"{source}: option invertible_adapter={full['invertible_adapter']!r} "
                               "is not supported")
    return full


def _older(version: str, than: tuple[int, ...]) -> bool:
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:3])
    return bool(parts) and parts < than


def _check_model(saved: dict[str, Any], am: AdaptedModel, source: str) -> None:
    ours = getattr(am.base, "config", None)
    model_type = getattr(ours, "model_type", None)
    if ours is None or model_type not in BERT_STYLE:  # no config: no model_type either
        raise AdapterFileError(f"{source}: adapterkit maps AdapterHub adapters onto BERT-style models "
                               f"({', '.join(BERT_STYLE)}), not {model_type or type(am.base).__name__}")
    theirs = saved.get("model_type")
    if theirs is not None and theirs != model_type:
        raise AdapterFileError(f"{source}: trained on a {theirs!r} model, this is a {model_type!r} model")
    hidden = saved.get("hidden_size")
    if hidden is not None and hidden != ours.hidden_size:
        raise AdapterFileError(f"{source}: trained on hidden size {hidden}, this model has {ours.hidden_size}")


def _unsupported(config: dict[str, Any], checks: dict[str, Any], source: str) -> None:
    """Refuse the first option whose value is not the one adapterkit can compute."""
    for key, wanted in checks.items():
        value = config.get(key)
        ok = wanted(value) if callable(wanted) else value == wanted
        if not ok:
            raise AdapterFileError(f"{source}: option {key}={value!r} is not supported by adapterkit's import")


def _placement(raw: dict[str, Any], source: str) -> tuple[str, bool]:
    """(the site below the block: "dense", "LayerNorm" or "" for the block itself; renorm)."""
    before, after, res_before = raw["original_ln_before"], raw["original_ln_after"], raw["residual_before_ln"]
    if raw["is_parallel"]:  # ParallelAdapter.pre_forward ignores the other two; without `after`: d + f(r)
        if after:
            return "", False
        raise AdapterFileError(f"{source}: option original_ln_after=False with is_parallel=True is not supported")
    if not before and after and isinstance(res_before, bool):
        return "dense", False
    if before and isinstance(after, bool) and res_before is after:  # (True, True, True) renorm, (True, False, False)
        return "LayerNorm", after
    raise AdapterFileError(
        f"{source}: options original_ln_before={before!r}, original_ln_after={after!r}, "
        f"residual_before_ln={res_before!r} are not supported (adapterkit maps (False, True, *), "
        "(True, True, True) and (True, False, False), and is_parallel with original_ln_after=True)"
    )


def _bottleneck_config(raw: dict[str, Any], source: str) -> Bottleneck:
    _unsupported(raw, {"ln_before": False, "ln_after": False, "use_gating": False, "phm_layer": False,
                       "inv_adapter": None, "cross_adapter": False, "stochastic_depth": lambda v: not v,
                       "scaling": lambda v: isinstance(v, float | int) and not isinstance(v, bool),
                       "non_linearity": lambda v: str(v).lower() in _ACT_IN}, source)
    leaf, renorm = _placement(raw, source)
    blocks = [b for b in _BLOCKS if raw[b]]
    if not blocks:
        raise AdapterFileError(f"{source}: neither mh_adapter nor output_adapter is set: the adapter has no site")
    below = rf"\.{leaf}" if leaf else ""
    return Bottleneck(placement="custom", targets=[rf"re:(^|\.)layer\.\d+\.{_BLOCKS[b]}{below}$" for b in blocks],
                      exclude=_leave_out(raw["leave_out"]), reduction=_reduction(raw["reduction_factor"], source),
                      activation=_ACT_IN[raw["non_linearity"].lower()], dropout=float(raw["dropout"]),
                      scaling=float(raw["scaling"]), renorm=renorm, input_arg=1 if raw["is_parallel"] else None)


def _reduction(value: Any, source: str) -> float:
    if isinstance(value, dict):  # per-layer factors: one factor for all is all a config of ours holds
        if len(set(value.values())) != 1:
            raise AdapterFileError(f"{source}: option reduction_factor={value!r} (per-layer sizes) "
                                   "is not supported")
        value = next(iter(value.values()))
    if not isinstance(value, float | int) or value <= 0:
        raise AdapterFileError(f"{source}: option reduction_factor={value!r} is not supported")
    return value


def _lora_config(raw: dict[str, Any], source: str) -> LoRA:
    _unsupported(raw, {"composition_mode": "add", "use_gating": False, "use_dora": False, "vera_d": None,
                       "vera_b": None}, source)
    places = [m for m in ("q", "k", "v") if raw["selfattn_lora"] and m in raw["attn_matrices"]]
    places += [k for k in ("intermediate_lora", "output_lora") if raw[k]]
    if not places:
        raise AdapterFileError(f"{source}: the LoRA config selects no matrix (selfattn_lora / attn_matrices, "
                               "intermediate_lora, output_lora)")
    targets = [rf"re:(^|\.)layer\.\d+\.{_LORA_PLACES[p]}$" for p in places]
    return LoRA(targets=targets, exclude=_leave_out(raw["leave_out"]), r=int(raw["r"]), alpha=raw["alpha"],
                dropout=float(raw["dropout"]))


def _leave_out(layers: list[int]) -> list[str]:
    return [rf"(^|\.)layer\.({'|'.join(str(int(i)) for i in sorted(layers))})\."] if layers else []


def _our_tensors(state: dict[str, torch.Tensor], name: str, raw: dict[str, Any], am: AdaptedModel,
                 source: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    lora = raw.get("architecture") == "lora"
    leaf = "" if lora else _placement(raw, source)[0]
    side = "input" if not lora and raw["is_parallel"] else "output"
    modules = dict(am.base.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    sites: dict[str, str] = {}
    for key, value in state.items():
        for old in _LEGACY_NAMES:
            key = key.replace(old, "adapters")
        match = (_LORA_KEY if lora else _BN_KEY).match(key)
        if match is None or match["name"] != name:
            kind = "LoRA" if lora else "bottleneck"
            raise AdapterFileError(f"{source}: tensor {key!r} is not a {kind} tensor of adapter {name!r}; "
                                   "adapterkit cannot map it")
        module = _our_module(match["module"], modules, am.base)
        if module is None:
            raise AdapterFileError(f"{source}: tensor {key!r} belongs to module {match['module']!r}, "
                                   "which this model does not have")
        site = f"{module}.{leaf}" if leaf else module
        sites[site] = side
        if lora:
            tensors[f"sites.{site}.{match['param']}"] = value
        else:
            param = "down" if match["param"] == "adapter_down.0" else "up"
            tensors[f"sites.{site}.{param}.{match['t']}"] = value
    return tensors, dict(sorted(sites.items()))


def _our_module(theirs: str, modules: dict[str, nn.Module], base: nn.Module) -> str | None:
    """`theirs` as a module path of our model: AdapterHub writes paths with or without the base
    model's prefix ("bert."), depending on the model class that saved them."""
    prefix = getattr(base, "base_model_prefix", "") or ""
    for candidate in (theirs, theirs.removeprefix(prefix + "."), f"{prefix}.{theirs}"):
        if candidate in modules:
            return candidate
    return None


# --- writing ---------------------------------------------------------------------------------


def export_adapterhub(am: AdaptedModel, name: str, path: str | os.PathLike) -> Path:
    """Write adapter `name` as an AdapterHub folder that `adapters`' `load_adapter(path, use_safetensors=True)`
    loads; refuses adapters AdapterHub cannot express (written atomically)."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise AdapterFileError(f"{path}: adapterkit writes safetensors only, never pickle")
    record = am.adapter(name)
    config = record.config
    what = f"adapter {name!r}"
    if record.head is not None or record.model_method is not None or len(record.copies):
        raise CompositionError(f"{what}: AdapterHub's adapter file holds per-layer weights only; this adapter also "
                               "has a head, copied modules or a prompt/prefix (save it with am.save instead)")
    base_config = getattr(am.base, "config", None)
    model_type = getattr(base_config, "model_type", None)
    if base_config is None or model_type not in BERT_STYLE:  # no config: no model_type either
        raise CompositionError(f"{what}: adapterkit writes AdapterHub files for BERT-style models "
                               f"({', '.join(BERT_STYLE)}), not {model_type or type(am.base).__name__}")
    layers = int(base_config.num_hidden_layers)
    hidden = int(base_config.hidden_size)
    sites = record.methods_by_path
    if isinstance(config, Bottleneck):
        method_config, tensors = _bottleneck_out(config, sites, name, layers, hidden, what)
    elif isinstance(config, LoRA):
        method_config, tensors = _lora_out(config, sites, name, layers, what)
    else:
        raise CompositionError(f"{what}: a {config.method} adapter; adapterkit writes AdapterHub bottleneck and "
                               "LoRA adapters only")
    saved = {"config": method_config, "hidden_size": hidden, "model_class": type(am.base).__name__,
             "model_name": am.base_name if am.base_name != type(am.base).__name__ else "",
             "model_type": model_type, "name": name, "version": WRITES_VERSION}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_folder(path, {WEIGHTS_FILE: save(tensors),
                         CONFIG_FILE: json.dumps(saved, indent=2, sort_keys=True).encode()})
    return path


def _place(path: str, forms: dict[str, str], what: str) -> tuple[int, str]:
    """(layer, place) of a site path `<prefix>layer.N.<form>`, or a refusal."""
    for place, form in forms.items():
        match = re.match(rf"^(?:.*\.)?layer\.(?P<n>\d+)\.{form}$", path)
        if match:
            return int(match["n"]), place
    raise CompositionError(f"{what}: site {path!r} is not at a place AdapterHub has for this method")


def _same_layers(found: dict[str, set[int]], layers: int, what: str) -> list[int]:
    """AdapterHub's leave_out applies to every place at once, so every place must have the same layers."""
    if len({frozenset(v) for v in found.values()}) != 1:
        raise CompositionError(f"{what}: its places cover different layers {found}; AdapterHub's leave_out "
                               "cannot express that")
    present = next(iter(found.values()))
    if not present <= set(range(layers)):
        raise CompositionError(f"{what}: sites in layers {sorted(present)}, the model has {layers}")
    return sorted(set(range(layers)) - present)


def _bottleneck_out(config: Bottleneck, sites: dict[str, SiteMethod], name: str, layers: int, hidden: int,
                    what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if config.is_parallel:
        raise CompositionError(f"{what}: a parallel bottleneck reads its module's input; AdapterHub's parallel "
                               "adapter reads the block's residual input (input_arg=1 at the block computes that)")
    if config.input_arg not in (None, 1):
        raise CompositionError(f"{what}: input_arg={config.input_arg}; AdapterHub's parallel adapter is input_arg=1")
    if config.activation not in _ACT_OUT:
        raise CompositionError(f"{what}: activation {config.activation!r} has no AdapterHub name")
    parallel = config.input_arg == 1
    leaf = "" if parallel else "LayerNorm" if any(p.endswith(".LayerNorm") for p in sites) else "dense"
    forms = {b: _BLOCKS[b] + (rf"\.{leaf}" if leaf else "") for b in _BLOCKS}
    found: dict[str, set[int]] = {}
    tensors: dict[str, torch.Tensor] = {}
    sizes: set[int] = set()
    for path, method in sites.items():
        if not isinstance(method, BottleneckAdapter):
            raise CompositionError(f"{what}: site {path!r} holds a {type(method).__name__}, "
                                   "not a bottleneck adapter")
        layer, block = _place(path, forms, what)
        found.setdefault(block, set()).add(layer)
        module = path if parallel else path.rsplit(".", 1)[0]
        for ours, theirs in (("down", "adapter_down.0"), ("up", "adapter_up")):
            for t in ("weight", "bias"):
                tensors[f"{module}.adapters.{name}.{theirs}.{t}"] = getattr(getattr(method, ours), t)
        sizes.add(method.down.out_features)
    factor = config.reduction if config.bottleneck_size is None else hidden / config.bottleneck_size
    if factor is None:  # Bottleneck.validate() refuses this config
        raise CompositionError(f"{what}: its config has neither reduction nor bottleneck_size")
    if len(sizes) != 1 or sizes != {max(1, int(hidden // factor))}:
        raise CompositionError(f"{what}: bottleneck sizes {sorted(sizes)} are not AdapterHub's int({hidden} // "
                               f"reduction_factor) for one reduction_factor")
    placement: dict[str, bool | str] = {
        "original_ln_before": leaf == "LayerNorm", "original_ln_after": config.renorm or leaf != "LayerNorm",
        "residual_before_ln": config.renorm or leaf != "LayerNorm"}
    if parallel:  # the library's par_bn preset; init_weights only decides how a new adapter starts
        placement.update(is_parallel=True, init_weights="mam_adapter")
    return {**_BN_DEFAULTS, **placement, "mh_adapter": "mh_adapter" in found,
            "output_adapter": "output_adapter" in found,
            "leave_out": _same_layers(found, layers, what), "reduction_factor": _plain(factor),
            "non_linearity": _ACT_OUT[config.activation], "scaling": float(config.scaling),
            "dropout": float(config.dropout)}, tensors


def _lora_out(config: LoRA, sites: dict[str, SiteMethod], name: str, layers: int,
              what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if config.rslora:
        raise CompositionError(f"{what}: rsLoRA scaling (alpha / sqrt(r)) has no AdapterHub option")
    found: dict[str, set[int]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for path, method in sites.items():
        if not isinstance(method, LoRAAdapter):
            raise CompositionError(f"{what}: site {path!r} holds a {type(method).__name__}, not a LoRA layer")
        if method.shape.kind != "linear":
            raise CompositionError(f"{what}: site {path!r} is a {method.shape.kind}; "
                                   "AdapterHub's BERT LoRA wraps Linears only")
        layer, place = _place(path, _LORA_PLACES, what)
        found.setdefault(place, set()).add(layer)
        tensors[f"{path}.loras.{name}.lora_A"] = method.lora_A
        tensors[f"{path}.loras.{name}.lora_B"] = method.lora_B
    matrices = [m for m in ("q", "k", "v") if m in found]
    return {**_LORA_DEFAULTS, "selfattn_lora": bool(matrices), "attn_matrices": matrices or ["q", "v"],
            "intermediate_lora": "intermediate_lora" in found, "output_lora": "output_lora" in found,
            "leave_out": _same_layers(found, layers, what), "r": config.r, "alpha": _plain(config.alpha),
            "dropout": float(config.dropout)}, tensors


def _plain(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


__all__ = ["export_adapterhub", "load_adapterhub", "read_adapterhub"]
