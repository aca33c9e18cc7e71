"""From a method config to a new, unattached Adapter record: every module built, none attached.

Building everything first is what makes `AdaptedModel.add` all or nothing: a config that fails
at its tenth site leaves no trace at the first nine.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from .adapter import Adapter, module_key
from .config import MethodConfig
from .errors import CompositionError, TargetError
from .heads import new_head
from .methods import SiteMethod, SiteShape, build_model_method, build_site_method, is_model_level
from .targets import default_targets, find_sites, matches


def build_adapter(
    base: nn.Module, name: str, config: MethodConfig, head_path: str | None, *,
    labels: Sequence[str] | None = None, num_labels: int | None = None, head: bool | nn.Module | None = None,
    sites: dict[str, str | None] | None = None,
) -> Adapter:
    """The record of a new adapter `name` on `base` (its module copies are added by the caller).

    `sites`: exactly these modules (name -> side, None: the config decides), not the targets' matches.
    """
    record = Adapter(name, config, {"labels": list(labels) if labels is not None else None})
    record.head = build_head(base, name, head_path, labels, num_labels, head)
    if is_model_level(config):
        record.model_method = build_model_method(config, base)
    else:
        for module_name, method in build_site_methods(base, name, config, head_path, sites).items():
            record.site_methods[module_key(module_name)] = method
    return record


def build_site_methods(base: nn.Module, name: str, config: MethodConfig, head_path: str | None,
                       sites: dict[str, str | None] | None = None) -> dict[str, SiteMethod]:
    """Module name -> the method's module there, for every site the config's targets find (or `sites`)."""
    if sites is not None:
        return _build_at(base, name, config, head_path, sites)
    if config.targets is None:
        targets, input_targets = default_targets(base, config)
    else:
        targets = [config.targets] if isinstance(config.targets, str) else list(config.targets)
        input_targets = list(getattr(config, "input_targets", None) or [])
    exclude = list(config.exclude) + ([rf"(^|\.){re.escape(head_path)}$"] if head_path else [])
    # a module the adapter copies is replaced whole while it is active, so no site goes inside it
    exclude += [rf"^{re.escape(p)}(\.|$)" for p in config.modules_to_save]
    built: dict[str, SiteMethod] = {}
    for module_name in find_sites(base, targets + input_targets, exclude, method=f"adapter {name!r}"):
        module = base.get_submodule(module_name)
        on_input = any(matches(module_name, module, t) for t in input_targets)
        try:
            built[module_name] = build_site_method(config, SiteShape.of(module, module_name), module, on_input)
        except TargetError as err:
            raise TargetError(f"adapter {name!r} at module {module_name!r}: {err}") from None
    return built


def _build_at(base: nn.Module, name: str, config: MethodConfig, head_path: str | None,
              sites: dict[str, str | None]) -> dict[str, SiteMethod]:
    """The method at exactly the named modules: looked up by name, never matched by a pattern."""
    modules = dict(base.named_modules())
    fenced = ([head_path] if head_path else []) + list(config.modules_to_save)
    built: dict[str, SiteMethod] = {}
    for module_name, side in sites.items():
        module = modules.get(module_name) if isinstance(module_name, str) and module_name else None
        if module is None:
            raise TargetError(f"adapter {name!r}: this model has no module {module_name!r}")
        if any(module_name == f or module_name.startswith(f + ".") for f in fenced):
            raise TargetError(f"adapter {name!r}: module {module_name!r} is the task head or a module it copies")
        try:
            method = build_site_method(config, SiteShape.of(module, module_name), module, side == "input")
        except TargetError as err:
            raise TargetError(f"adapter {name!r} at module {module_name!r}: {err}") from None
        if side is not None and method.side != side:
            raise TargetError(f"adapter {name!r}: at {module_name!r} the method acts on its {method.side}, not {side}")
        built[module_name] = method
    if not built:
        raise TargetError(f"adapter {name!r}: no sites given")
    return built


def build_head(base: nn.Module, name: str, head_path: str | None, labels: Sequence[str] | None,
               num_labels: int | None, head: bool | nn.Module | None) -> nn.Module | None:
    """The adapter's own task head: a given module, a resized copy of the base head, or None."""
    if labels is not None:
        if num_labels is not None and num_labels != len(labels):
            raise CompositionError(f"adapter {name!r}: {len(labels)} labels but num_labels={num_labels}")
        num_labels = len(labels)
    if isinstance(head, nn.Module):
        return head
    if head is False or (head is None and num_labels is None):
        return None
    if head_path is None:
        raise TargetError(f"adapter {name!r}: this model has no head module to copy; pass head=<module>")
    return new_head(base.get_submodule(head_path), num_labels)
