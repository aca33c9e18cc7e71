"""The one way an adapter read from somewhere becomes an attached adapter: all of it, or nothing.

Every source turns what it read into our manifest (see io/files.py) plus tensors under our keys,
then calls `install`: our own files, the PEFT and AdapterHub imports, and the serving cache.
Whatever goes wrong, the model is left as it was and the error is an `AdapterError`:
`AdapterFileError` for a file that does not fit this model, `AdapterExistsError` for a taken name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..adapter import SITES
from ..build import build_site_methods
from ..composition import Fuse, setup_from_dict
from ..config import config_from_dict
from ..errors import AdapterConfigError, AdapterError, AdapterExistsError, AdapterFileError, CompositionError
from ..methods import is_model_level

if TYPE_CHECKING:
    from ..model import AdaptedModel


def install(
    am: AdaptedModel, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], *, name: str | None = None,
    source: str = "adapter", check_base: bool = True, hint: str = "",
) -> str:
    """Attach the adapter that `manifest` describes, with `tensors`, as `name` (default: its saved
    name); returns the name. `source` names where it came from in every error; `hint` is added to
    errors that say the file does not match this model."""
    check_manifest(manifest, source)
    name = name or manifest.get("name")
    if not isinstance(name, str):
        raise AdapterFileError(f"{source}: the adapter has no name; pass name=")
    try:
        config = config_from_dict(manifest["config"])
        config.validate()
    except (AdapterConfigError, KeyError, TypeError, ValueError) as err:
        raise AdapterFileError(f"{source}: adapter {name!r}: manifest field 'config': {err}") from None
    if check_base:
        _check_base(am, manifest, f"adapter {name!r} ({source})")
    head = manifest.get("head") or None
    labels = manifest.get("labels")
    num_labels = (head or {}).get("num_labels") if labels is None else None
    sites = manifest.get("sites")
    try:
        if head:
            _check_head_width(tensors, len(labels) if labels is not None else num_labels, source)
        if sites is not None and not is_model_level(config):
            _check_shapes_before_building(am, name, config, sites, tensors, source, hint)
        am.add(name, config, labels=labels, num_labels=num_labels, head=bool(head), sites=sites)
    except AdapterExistsError:
        raise
    except AdapterFileError:
        raise
    except (AdapterError, ValueError, TypeError, OverflowError) as err:  # e.g. r = 10**30
        raise AdapterFileError(f"{source}: {err}") from None
    try:
        _check_sites(am, name, manifest.get("sites"), source, hint)
        try:
            am.load_adapter_state_dict(name, tensors)
        except AdapterFileError as err:
            raise AdapterFileError(f"{source}: {err}{hint}") from None
        # the labels were checked above and belong to the head; a "labels" in meta must not replace them
        am.adapter(name).meta.update({k: v for k, v in (manifest.get("meta") or {}).items() if k != "labels"})
        _check_finite(am, name, source)
    except BaseException:
        am.delete(name, collect=False)
        raise
    return name


def install_fusion(am: AdaptedModel, manifest: dict[str, Any], tensors: dict[str, torch.Tensor],
                   source: str = "fusion") -> Fuse:
    """Set up a saved AdapterFusion on the loaded adapters it was trained on; returns its Fuse."""
    try:
        fuse = setup_from_dict(manifest.get("setup"))
    except CompositionError as err:
        raise AdapterFileError(f"{source}: {err}") from None
    if not isinstance(fuse, Fuse):
        raise AdapterFileError(f"{source}: a fusion file holds a Fuse, not {fuse!r}")
    _check_base(am, manifest, f"fusion {fuse} ({source})")
    fused = manifest.get("fused") or {}
    missing = [n for n in fuse.names if n not in am.adapters]
    if missing:
        raise AdapterFileError(f"{source}: load the fused adapters {missing} first; this fusion was trained on them")
    changed = [n for n in fuse.names if fused.get(n) != am.adapter(n).fingerprint()]
    if changed:
        raise AdapterFileError(
            f"{source}: the loaded adapters {changed} are not the ones this fusion was trained on "
            "(their weights differ); load the versions it was trained with"
        )
    fresh = fuse.key not in am.fusions
    am.add_fusion(fuse)
    try:
        am.load_adapter_state_dict(fuse, tensors)
    except AdapterFileError as err:
        if fresh:
            am.delete_fusion(fuse)
        raise AdapterFileError(f"{source}: {err}") from None
    return fuse


def check_manifest(manifest: Any, source: str = "adapter", need_sites: bool = False) -> None:
    """Every field an install reads has the type and range it needs; AdapterFileError names the field.

    `need_sites`: a per-site adapter must list its sites (uploads: without them its config's target
    patterns would be matched, and its sizes built before anything checks them)."""
    def bad(field: str, why: str) -> AdapterFileError:
        return AdapterFileError(f"{source}: manifest field {field!r} {why}")

    if not isinstance(manifest, dict):
        raise AdapterFileError(f"{source}: the manifest is a {type(manifest).__name__}, not a JSON object")
    if not isinstance(manifest.get("config"), dict) or not isinstance(manifest["config"].get("method"), str):
        raise bad("config", "must be an object with a 'method' name")
    if manifest.get("name") is not None and not isinstance(manifest["name"], str):
        raise bad("name", "must be a string")
    sites = manifest.get("sites")
    if sites is not None and not (isinstance(sites, dict) and all(
            isinstance(k, str) and k and (v is None or isinstance(v, str)) for k, v in sites.items())):
        raise bad("sites", "must map module names to 'input' / 'output'")
    if need_sites and sites is None and manifest["config"].get("method") not in ("prompt", "prefix"):
        raise bad("sites", "is required: the modules the adapter is attached to")
    labels = manifest.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise bad("labels", "must be a non-empty list of label names (strings)")
        if len(set(labels)) != len(labels):
            raise bad("labels", "lists a label twice")
    head = manifest.get("head")
    if head is not None:
        if not isinstance(head, dict):
            raise bad("head", "must be an object or null")
        width = head.get("num_labels")
        if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
            raise bad("head.num_labels", "must be a positive integer")
        if labels is not None and width is not None and width != len(labels):
            raise bad("head.num_labels", f"is {width} but there are {len(labels)} labels")
    if manifest.get("meta") is not None and not isinstance(manifest["meta"], dict):
        raise bad("meta", "must be an object")
    if manifest.get("base") is not None and not isinstance(manifest["base"], dict):
        raise bad("base", "must be an object")


def _check_head_width(tensors: dict[str, torch.Tensor], width: int | None, source: str) -> None:
    """The head's output width must be one the file's head tensors have, before a head is built."""
    widths = {t.shape[0] for k, t in tensors.items() if k.startswith("head.") and t.dim() >= 1}
    if width is not None and width not in widths:
        raise AdapterFileError(f"{source}: the head is said to have {width} outputs, but no head tensor has that size")


def _check_shapes_before_building(am: AdaptedModel, name: str, config: Any, sites: dict[str, str | None],
                                  tensors: dict[str, torch.Tensor], source: str, hint: str) -> None:
    """Build the site modules on the meta device (no memory) and compare their shapes with the file's,
    so that a config asking for a huge rank or bottleneck fails before anything is allocated."""
    with torch.device("meta"):
        built = build_site_methods(am.base, name, config, am.head_path, sites)
    for module_name, method in built.items():
        for pname, p in method.state_dict().items():
            key = f"{SITES}.{module_name}.{pname}"
            if key not in tensors:
                raise AdapterFileError(f"{source}: adapter {name!r}: tensor {key!r} is missing{hint}")
            if tuple(tensors[key].shape) != tuple(p.shape):
                raise AdapterFileError(
                    f"{source}: adapter {name!r}: tensor {key!r} has shape {tuple(tensors[key].shape)}, the "
                    f"config makes {tuple(p.shape)}{hint}"
                )


def _check_base(am: AdaptedModel, manifest: dict[str, Any], what: str) -> None:
    base = manifest.get("base") or {}
    if base.get("fingerprint") != am.fingerprint():
        raise AdapterFileError(
            f"{what} was trained on base {base.get('name')!r} (fingerprint {base.get('fingerprint')}), "
            f"not on this model {am.base_name!r} ({am.fingerprint()})"
        )


def _check_sites(am: AdaptedModel, name: str, saved: dict[str, str | None] | None, source: str, hint: str) -> None:
    """The file's sites must be the ones the config finds here (a side of None: any side)."""
    if saved is None:
        return
    here = am.site_names(name)
    extra, missing = sorted(set(here) - set(saved)), sorted(set(saved) - set(here))
    sides = sorted(m for m, side in saved.items() if side is not None and m in here and here[m] != side)
    if extra or missing or sides:
        raise AdapterFileError(
            f"{source}: adapter {name!r} was saved for other modules than this model has (not in the file: "
            f"{extra[:4]}, not found here: {missing[:4]}, other side: {sides[:4]}){hint}"
        )


def _check_finite(am: AdaptedModel, name: str, source: str) -> None:
    bad = [k for k, t in am.adapter(name).tensors().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise AdapterFileError(f"{source}: adapter {name!r}: tensors {bad[:4]} hold NaN or infinite values")
