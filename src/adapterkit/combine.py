"""Weighted combination of adapters into a new one: Σ w_i · delta_i.

The arithmetic belongs to each method (`combined_config` and `fill_combined` in its file: exact for
LoRA, IA³ and BitFit, parameter averaging for bottlenecks); this module only checks that the parts
can be combined and walks the sites.
"""

from __future__ import annotations

import dataclasses

from .config import MethodConfig
from .errors import CompositionError, TargetError
from .methods import is_model_level, site_method_class
from .methods.base import SiteMethod, union_targets


def combined_config(configs: dict[str, MethodConfig], weights: dict[str, float]) -> MethodConfig:
    chosen = [configs[n] for n in weights]
    if len({type(c) for c in chosen}) != 1 or is_model_level(chosen[0]):
        raise CompositionError(
            f"combine needs per-site adapters of one method; got {[c.method for c in chosen]}"
        )
    if any(c.modules_to_save for c in chosen):
        raise CompositionError(
            "combine works on adapter deltas; these adapters also own copies of base modules "
            "(modules_to_save), which have no delta to weight"
        )
    try:
        config = site_method_class(chosen[0]).combined_config(chosen)
    except TargetError as err:
        raise CompositionError(f"combine: {err}") from None
    return dataclasses.replace(config, targets=union_targets([c.targets for c in chosen]))


def fill(new: SiteMethod, parts: list[tuple[SiteMethod | None, float]]) -> None:
    """Set the parameters of `new` (already attached at this site) to the weighted combination."""
    new.fill_combined([(a, w) for a, w in parts if a is not None])
