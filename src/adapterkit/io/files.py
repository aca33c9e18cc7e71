"""Adapter files: tensors in safetensors (never pickle), facts in JSON, written atomically.

A saved adapter is a folder holding
    adapter.safetensors   `sites.<module>.<param>`, `head.<param>`, `model.<param>` tensors
    adapter.json          format version, method config, base identity, head, labels, sites
or one `.safetensors` file carrying the same JSON in its header metadata.

A trained AdapterFusion is saved the same way, with `"kind": "fusion"`, its setup, and the names
and fingerprints of the adapters it fuses instead of a method config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save as save_tensors

from ..config import FORMAT_VERSION
from ..errors import AdapterFileError
from ..heads import head_width
from ..setups import Fuse
from .install import install, install_fusion
from .storage import PICKLE_SUFFIXES, atomic_folder, atomic_write, load_tensors

if TYPE_CHECKING:
    from ..model import AdaptedModel

TENSORS, MANIFEST = "adapter.safetensors", "adapter.json"


def manifest_of(am: AdaptedModel, name: str) -> dict[str, Any]:
    record = am.adapter(name)
    head = None
    if record.head is not None:
        head = {"path": am.head_path, "num_labels": head_width(record.head)}
    return {
        "format": "adapterkit",
        "format_version": FORMAT_VERSION,
        "name": name,
        "config": record.config.to_dict(),
        "base": {"name": am.base_name, "fingerprint": am.fingerprint()},
        "head": head,
        "labels": record.meta.get("labels"),
        "sites": am.site_names(name),
        "params": record.parameter_count(),
        "meta": {k: v for k, v in record.meta.items() if k != "labels"},
    }


def fusion_manifest_of(am: AdaptedModel, fuse: Fuse) -> dict[str, Any]:
    fusion = am.fusion(fuse)
    return {
        "format": "adapterkit",
        "format_version": FORMAT_VERSION,
        "kind": "fusion",
        "setup": fuse.to_dict(),
        "fused": {n: am.adapter(n).fingerprint() for n in fuse.names},
        "base": {"name": am.base_name, "fingerprint": am.fingerprint()},
        "sites": sorted(p for p, _ in fusion.parts()),
        "params": sum(p.numel() for p in fusion.parameters()),
    }


def save(am: AdaptedModel, what: str | Fuse, path: str | os.PathLike) -> Path:
    """Write one adapter (a name) or one trained fusion (a Fuse) to a folder or a `.safetensors` file."""
    if isinstance(what, Fuse):
        return _write(path, fusion_manifest_of(am, what), am.fusion(what).tensors())
    return _write(path, manifest_of(am, what), am.adapter_state_dict(what))


def save_adapter(am: AdaptedModel, name: str, path: str | os.PathLike) -> Path:
    """Write one adapter to a folder (or a single `.safetensors` file); atomic, no pickle."""
    return save(am, name, path)


def _write(path: str | os.PathLike, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise AdapterFileError(f"{path}: adapterkit writes safetensors only, never pickle")
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        blob = save_tensors(tensors, metadata={"adapterkit": json.dumps(manifest)})
        atomic_write(path, blob)
        return path
    atomic_folder(path, {TENSORS: save_tensors(tensors), MANIFEST: json.dumps(manifest, indent=2).encode()})
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
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise AdapterFileError(f"{manifest_path}: truncated or not JSON ({err})") from None
        tensors = load_tensors(tensor_path)
    elif path.suffix == ".safetensors" and path.exists():
        tensors = load_tensors(path)
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            header = (handle.metadata() or {}).get("adapterkit")
        if header is None:
            raise AdapterFileError(f"{path}: a safetensors file without an adapterkit header")
        try:
            manifest = json.loads(header)
        except (json.JSONDecodeError, RecursionError) as err:
            raise AdapterFileError(f"{path}: the adapterkit header is not JSON ({err})") from None
    else:
        raise AdapterFileError(f"{path}: no such adapter folder or .safetensors file")
    if not isinstance(manifest, dict):
        raise AdapterFileError(f"{path}: the manifest is a {type(manifest).__name__}, not a JSON object")
    wanted = "setup" if manifest.get("kind") == "fusion" else "config"
    if manifest.get("format") != "adapterkit" or wanted not in manifest:
        raise AdapterFileError(f"{path}: adapter.json is not an adapterkit manifest")
    version = manifest.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise AdapterFileError(f"{path}: manifest field 'format_version' must be an integer, not {version!r}")
    if version > FORMAT_VERSION:
        import warnings

        warnings.warn(f"{path}: written by a newer adapterkit (format {manifest['format_version']})", stacklevel=2)
    return manifest, tensors


def load(am: AdaptedModel, path: str | os.PathLike, name: str | None = None) -> str | Fuse:
    """Load an adapter file into `am` and return its name, or a fusion file and return its Fuse.

    Our folders and `.safetensors` files, PEFT LoRA folders and AdapterHub folders are told apart
    by the files they hold; each goes through `install`, so a failure leaves `am` as it was.
    """
    path = Path(path)
    if path.is_dir() and (path / "adapter_config.json").exists() and not (path / MANIFEST).exists():
        if _written_by_adapterhub(path / "adapter_config.json"):
            from .adapterhub import load_adapterhub

            return load_adapterhub(am, path, name=name)
        from .peft import load_peft_lora

        return load_peft_lora(am, path, name=name or path.name)
    manifest, tensors = read_adapter(path)
    if manifest.get("kind") == "fusion":
        if name is not None:
            raise AdapterFileError(f"{path}: a fusion is named by the adapters it fuses; load it without name=")
        return install_fusion(am, manifest, tensors, source=str(path))
    return install(am, manifest, tensors, name=name or manifest.get("name") or path.stem, source=str(path))


def load_adapter(am: AdaptedModel, path: str | os.PathLike, name: str | None = None, check_base: bool = True) -> str:
    """Load a saved adapter into `am` under `name` (default: its saved name); returns the name."""
    path = Path(path)
    manifest, tensors = read_adapter(path)
    if manifest.get("kind") == "fusion":
        raise AdapterFileError(f"{path}: a fusion file; load it with am.load(path)")
    return install(am, manifest, tensors, name=name or manifest.get("name") or path.stem, source=str(path),
                   check_base=check_base)


def _written_by_adapterhub(config_file: Path) -> bool:
    """PEFT's adapter_config.json names its `peft_type`; AdapterHub's nests the method `config`."""
    try:
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(data, dict) and "peft_type" not in data and isinstance(data.get("config"), dict)
