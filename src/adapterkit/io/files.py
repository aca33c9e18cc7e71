"""Adapter files: tensors in safetensors (never pickle), facts in JSON, written atomically.

A saved adapter is a folder holding
    adapter.safetensors   `sites.<module>.<param>`, `head.<param>`, `model.<param>` tensors
    adapter.json          format version, method config, base identity, head, labels, sites
or one `.safetensors` file carrying the same JSON in its header metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save

from ..config import FORMAT_VERSION, config_from_dict
from ..errors import AdapterConfigError, AdapterFileError
from .storage import PICKLE_SUFFIXES, atomic_folder, atomic_write, load_tensors

if TYPE_CHECKING:
    from ..model import AdaptedModel

TENSORS, MANIFEST = "adapter.safetensors", "adapter.json"


def manifest_of(am: AdaptedModel, name: str) -> dict[str, Any]:
    info = am.adapter_info(name)
    head = None
    if name in am.heads:
        head = {"path": am.head_path, "num_labels": _head_width(am.heads[name])}
    return {
        "format": "adapterkit",
        "format_version": FORMAT_VERSION,
        "name": name,
        "config": am.configs[name].to_dict(),
        "base": {"name": am.base_name, "fingerprint": am.fingerprint()},
        "head": head,
        "labels": am.meta[name].get("labels"),
        "sites": am.site_names(name),
        "params": info["params"],
        "meta": {k: v for k, v in am.meta[name].items() if k != "labels"},
    }


def save_adapter(am: AdaptedModel, name: str, path: str | os.PathLike) -> Path:
    """Write one adapter to a folder (or a single `.safetensors` file); atomic, no pickle."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise AdapterFileError(f"{path}: adapterkit writes safetensors only, never pickle")
    manifest = manifest_of(am, name)
    tensors = {k: v.contiguous().cpu() for k, v in am.adapter_state_dict(name).items()}
    if path.suffix == ".safetensors":
        blob = save(tensors, metadata={"adapterkit": json.dumps(manifest)})
        atomic_write(path, blob)
        return path
    atomic_folder(path, {TENSORS: save(tensors), MANIFEST: json.dumps(manifest, indent=2).encode()})
    return path


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest and tensors of a saved adapter, with clear errors for every way a file goes bad."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise AdapterFileError(f"{path}: refusing a pickle file; adapterkit reads safetensors only")
    if path.is_dir():
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if not (path / TENSORS).exists() and pickles:
            raise AdapterFileError(f"{path}: holds only pickle files {pickles}; refusing to unpickle")
        manifest_path, tensor_path = path / MANIFEST, path / TENSORS
        for needed in (manifest_path, tensor_path):
            if not needed.exists():
                raise AdapterFileError(f"{path}: not an adapter folder, {needed.name} is missing")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise AdapterFileError(f"{manifest_path}: truncated or not JSON ({err})") from None
        tensors = load_tensors(tensor_path)
    elif path.suffix == ".safetensors" and path.exists():
        tensors = load_tensors(path)
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            header = (handle.metadata() or {}).get("adapterkit")
        if header is None:
            raise AdapterFileError(f"{path}: a safetensors file without an adapterkit header")
        manifest = json.loads(header)
    else:
        raise AdapterFileError(f"{path}: no such adapter folder or .safetensors file")
    if manifest.get("format") != "adapterkit" or "config" not in manifest:
        raise AdapterFileError(f"{path}: adapter.json is not an adapterkit manifest")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        import warnings

        warnings.warn(f"{path}: written by a newer adapterkit (format {manifest['format_version']})", stacklevel=2)
    return manifest, tensors


def load_adapter(am: AdaptedModel, path: str | os.PathLike, name: str | None = None, check_base: bool = True) -> str:
    """Load a saved adapter into `am` under `name` (default: its saved name); returns the name."""
    path = Path(path)
    if path.is_dir() and (path / "adapter_config.json").exists() and not (path / MANIFEST).exists():
        from .peft import load_peft_lora

        return load_peft_lora(am, path, name=name or path.name)
    manifest, tensors = read_adapter(path)
    name = name or manifest.get("name") or path.stem
    try:
        config = config_from_dict(manifest["config"])
    except AdapterConfigError as err:
        raise AdapterFileError(f"{path}: adapter {name!r}: {err}") from None
    base = manifest.get("base", {})
    if check_base and base.get("fingerprint") != am.fingerprint():
        raise AdapterFileError(
            f"adapter {name!r} ({path}) was trained on base {base.get('name')!r} (fingerprint "
            f"{base.get('fingerprint')}), not on this model {am.base_name!r} ({am.fingerprint()})"
        )
    head = manifest.get("head")
    labels = manifest.get("labels")
    am.add(name, config, labels=labels, num_labels=(head or {}).get("num_labels") if labels is None else None,
           head=bool(head))
    try:
        saved_sites = manifest.get("sites")
        if saved_sites is not None and saved_sites != am.site_names(name):
            raise AdapterFileError(
                f"adapter {name!r}: saved for modules {sorted(saved_sites)[:4]}…, which this model does not match"
            )
        am.load_adapter_state_dict(name, tensors)
    except Exception:
        am.delete(name)
        raise
    am.meta[name].update(manifest.get("meta") or {})
    return name


def _head_width(head: torch.nn.Module) -> int | None:
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1].out_features if linears else None
