"""The one way an adapter read from somewhere becomes an attached adapter: all of it, or nothing.

Every source turns what it read into our manifest (see io/files.py) plus tensors under our keys,
then calls `install`: our own files, the PEFT and AdapterHub imports, and the serving cache.
Whatever goes wrong, the model is left as it was and the error is an `AdapterError`:
`AdapterFileError` for a file that does not fit this model, `AdapterExistsError` for a taken name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..composition import Fuse, setup_from_dict
from ..config import config_from_dict
from ..errors import AdapterConfigError, AdapterError, AdapterExistsError, AdapterFileError, CompositionError

if TYPE_CHECKING:
    from ..model import AdaptedModel


def install(
    am: AdaptedModel, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], *, name: str | None = None,
    source: str = "adapter", check_base: bool = True, hint: str = "",
) -> str:
    """Attach the adapter that `manifest` describes, with `tensors`, as `name` (default: its saved
    name); returns the name. `source` names where it came from in every error; `hint` is added to
    errors that say the file does not match this model."""
    name = name or manifest.get("name")
    if not isinstance(name, str):
        raise AdapterFileError(f"{source}: the adapter has no name; pass name=")
    try:
        config = config_from_dict(manifest["config"])
    except (AdapterConfigError, KeyError, TypeError) as err:
        raise AdapterFileError(f"{source}: adapter {name!r}: {err}") from None
    if check_base:
        _check_base(am, manifest, f"adapter {name!r} ({source})")
    head = manifest.get("head") or None
    labels = manifest.get("labels")
    try:
        am.add(name, config, labels=labels, num_labels=(head or {}).get("num_labels") if labels is None else None,
               head=bool(head))
    except AdapterExistsError:
        raise
    except (AdapterError, ValueError) as err:
        raise AdapterFileError(f"{source}: {err}") from None
    try:
        _check_sites(am, name, manifest.get("sites"), source, hint)
        try:
            am.load_adapter_state_dict(name, tensors)
        except AdapterFileError as err:
            raise AdapterFileError(f"{source}: {err}{hint}") from None
        am.adapter(name).meta.update(manifest.get("meta") or {})
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
