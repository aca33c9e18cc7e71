"""The one way an adapter read from somewhere becomes an attached adapter: all of it, or nothing.

Every source turns what it read into our manifest (see io/files.py) plus tensors under our keys,
then calls `install`: our own files, the PEFT and AdapterHub imports, and the serving cache.
Whatever goes wrong, the model is left as it was and the error is an `AdapterError`:
`AdapterFileError` for a file that does not fit this model, `AdapterExistsError` for a taken name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..adapter import Adapter, tensor_mismatch
from ..config import MethodConfig
from ..errors import AdapterConfigError, AdapterError, AdapterExistsError, AdapterFileError, CompositionError
from ..methods import METHODS, config_from_dict, is_model_level
from ..setups import Fuse, setup_from_dict

if TYPE_CHECKING:
    from ..model import AdaptedModel


def install(
    am: AdaptedModel, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], *, name: str | None = None,
    source: str = "adapter", check_base: bool = True, hint: str = "",
) -> str:
    """Attach the adapter that `manifest` describes, with `tensors`, as `name` (default: its saved
    name); returns the name. `source` names where it came from in every error; `hint` is added to
    errors that say the file does not match this model."""
    record = prepare(am, manifest, tensors, name=name, source=source, check_base=check_base, hint=hint)
    am.attach(record)
    return record.name


def prepare(
    am: AdaptedModel, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], *, name: str | None = None,
    source: str = "adapter", check_base: bool = True, hint: str = "", reuse: Adapter | None = None,
) -> Adapter:
    """Everything `install` does but the attaching: the record built, filled and checked.

    It reads the model and changes nothing, so a server can prepare on an I/O thread while the model
    thread serves, and attach between two batches (serve/cache.py). The per-site modules are built on
    the meta device and given the file's tensors, so nothing is allocated before the sizes are checked
    and nothing is initialised only to be overwritten.

    `reuse`: a deleted record that a server kept; when it has this adapter's config, sites and tensor
    shapes, the file's tensors are copied into it instead of building a new one (serve/cache.py)."""
    check_manifest(manifest, source)
    name = name or manifest.get("name")
    if not isinstance(name, str):
        raise AdapterFileError(f"{source}: the adapter has no name; pass name=")
    config = check_adapter(manifest, tensors, source, name=name,
                           fingerprint=am.fingerprint() if check_base else None, base_name=am.base_name)
    head = manifest.get("head") or None
    labels = manifest.get("labels")
    num_labels = (head or {}).get("num_labels") if labels is None else None
    sites = manifest.get("sites")
    if reuse is not None and _refill(reuse, name, config, labels, sites, tensors):
        return _finish(reuse, manifest)
    # prompt / prefix modules may be initialised from the base model's embeddings: built for real
    on_meta = not is_model_level(config)
    try:
        record = am.build(name, config, labels=labels, num_labels=num_labels, head=bool(head), sites=sites,
                          on_meta=on_meta)
    except AdapterExistsError:
        raise
    except (AdapterError, ValueError, TypeError, OverflowError) as err:  # e.g. r = 10**30
        raise AdapterFileError(f"{source}: {err}") from None
    _check_sites(record, sites, source, hint)
    _check_tensors(record, tensors, source, hint)
    narrowed = _fill(record, tensors, am.device)
    if any(t.is_meta for t in [*record.parameters(), *record.buffers()]):  # state the file cannot hold
        record = am.build(name, config, labels=labels, num_labels=num_labels, head=bool(head), sites=sites)
        narrowed = _fill(record, tensors, am.device)
    _check_finite(narrowed, name, source)
    return _finish(record, manifest)


def _finish(record: Adapter, manifest: dict[str, Any]) -> Adapter:
    # the labels were checked above and belong to the head; a "labels" in meta must not replace them
    record.meta.update({k: v for k, v in (manifest.get("meta") or {}).items() if k != "labels"})
    return record


@torch.no_grad()
def _refill(record: Adapter, name: str, config: Any, labels: list[str] | None, sites: dict[str, str | None] | None,
            tensors: dict[str, torch.Tensor]) -> bool:
    """Copy an adapter's tensors into a record built for another of the same structure; False if it is not."""
    if sites is None or record.config != config or record.model_method is not None:
        return False
    here = {path: method.side for path, method in record.methods_by_path.items()}
    if here.keys() != sites.keys() or any(side is not None and here[m] != side for m, side in sites.items()):
        return False
    expected = record.tensors()
    if expected.keys() != tensors.keys() or any(
            not isinstance(tensors[k], torch.Tensor) or tensors[k].shape != t.shape for k, t in expected.items()):
        return False
    if any(t.dtype != tensors[k].dtype for k, t in expected.items()):
        return False  # a narrower dtype could overflow: left to the full path, which checks after the copy
    for key, target in expected.items():
        target.copy_(tensors[key])  # bumps the versions that routing stacks check
    record.name, record.meta = name, {"labels": list(labels) if labels is not None else None}
    return True


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


def check_adapter(manifest: dict[str, Any], tensors: dict[str, torch.Tensor], source: str = "adapter", *,
                  name: str | None = None, fingerprint: str | None = None, base_name: str | None = None,
                  need_sites: bool = False) -> MethodConfig:
    """The one check of an adapter file before anything is built from it (installs and the server's
    store alike): its manifest's fields, its config, its head's width against the tensors, finite
    tensors, and (when `fingerprint` is given) the base it was trained on. Its config, or
    AdapterFileError naming what is wrong."""
    check_manifest(manifest, source, need_sites=need_sites)
    name = name or manifest.get("name") or "adapter"
    try:
        config = config_from_dict(manifest["config"])
    except (AdapterConfigError, KeyError, TypeError, ValueError) as err:
        raise AdapterFileError(f"{source}: adapter {name!r}: manifest field 'config': {err}") from None
    if fingerprint is not None:
        base = manifest.get("base") or {}
        if base.get("fingerprint") != fingerprint:
            raise AdapterFileError(
                f"adapter {name!r} ({source}) was trained on base {base.get('name')!r} (fingerprint "
                f"{base.get('fingerprint')}), not on this model {base_name!r} ({fingerprint})"
            )
    head, labels = manifest.get("head") or None, manifest.get("labels")
    if head:
        _check_head_width(tensors, len(labels) if labels is not None else head.get("num_labels"), source)
    _check_finite(tensors, name, source)  # before anything is built; a narrower dtype is checked after the copy
    return config


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
    known = METHODS.get(manifest["config"]["method"])
    if need_sites and sites is None and not (known is not None and known.model_level):
        raise bad("sites", "is required: the modules the adapter is attached to")
    _check_labels_and_head(manifest, bad)
    if manifest.get("meta") is not None and not isinstance(manifest["meta"], dict):
        raise bad("meta", "must be an object")
    if manifest.get("base") is not None and not isinstance(manifest["base"], dict):
        raise bad("base", "must be an object")


def _check_labels_and_head(manifest: dict[str, Any], bad: Callable[[str, str], AdapterFileError]) -> None:
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


def _check_head_width(tensors: dict[str, torch.Tensor], width: int | None, source: str) -> None:
    """The head's output width must be one the file's head tensors have, before a head is built."""
    widths = {t.shape[0] for k, t in tensors.items() if k.startswith("head.") and t.dim() >= 1}
    if width is not None and width not in widths:
        raise AdapterFileError(f"{source}: the head is said to have {width} outputs, but no head tensor has that size")


def _check_tensors(record: Adapter, tensors: dict[str, torch.Tensor], source: str, hint: str) -> None:
    """The file holds exactly the record's tensors, each with the shape the config makes."""
    why = tensor_mismatch(record.tensors(), tensors)
    if why is not None:
        raise AdapterFileError(f"{source}: adapter {record.name!r}: {why}{hint}")


def _fill(record: Adapter, tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Give every module of the record its tensors from the file: copies, in the module's dtype, so
    that the record shares no memory with what the caller passed. Returns the copies made in another
    dtype than the file's (a finite value can overflow a narrower one)."""
    converted = {}
    for prefix, module in record.parts():
        own = module.state_dict()
        values = {k: tensors[f"{prefix}.{k}"].to(device=device, dtype=v.dtype, copy=True) for k, v in own.items()}
        module.load_state_dict(values, assign=True)
        converted.update({f"{prefix}.{k}": t for k, t in values.items() if t.dtype != tensors[f"{prefix}.{k}"].dtype})
    return converted


def _check_base(am: AdaptedModel, manifest: dict[str, Any], what: str) -> None:
    base = manifest.get("base") or {}
    if base.get("fingerprint") != am.fingerprint():
        raise AdapterFileError(
            f"{what} was trained on base {base.get('name')!r} (fingerprint {base.get('fingerprint')}), "
            f"not on this model {am.base_name!r} ({am.fingerprint()})"
        )


def _check_sites(record: Adapter, saved: dict[str, str | None] | None, source: str, hint: str) -> None:
    """The file's sites must be the ones the config finds here (a side of None: any side)."""
    if saved is None:
        return
    here = {path: method.side for path, method in record.methods_by_path.items()}
    extra, missing = sorted(set(here) - set(saved)), sorted(set(saved) - set(here))
    sides = sorted(m for m, side in saved.items() if side is not None and m in here and here[m] != side)
    if extra or missing or sides:
        raise AdapterFileError(
            f"{source}: adapter {record.name!r} was saved for other modules than this model has (not in the file: "
            f"{extra[:4]}, not found here: {missing[:4]}, other side: {sides[:4]}){hint}"
        )


def _check_finite(tensors: dict[str, torch.Tensor], name: str, source: str) -> None:
    floats = {k: t for k, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    # A finite sum means finite elements (a NaN or an infinity makes it NaN or infinite); checking the
    # sums is ~5x faster than isfinite per tensor, and a sum that overflows falls to the exact check.
    if not floats or torch.stack([t.sum() for t in floats.values()]).isfinite().all():
        return
    bad = [k for k, t in floats.items() if not torch.isfinite(t).all()]
    if bad:
        raise AdapterFileError(f"{source}: adapter {name!r}: tensors {bad[:4]} hold NaN or infinite values")
