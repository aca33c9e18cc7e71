"""Per-adapter trainable copies of base modules (what PEFT calls `modules_to_save`).

Some modules matter to a task but are not worth an adapter: a BERT pooler, say, which full
fine-tuning retrains and a frozen base would keep as pre-training left it. An adapter can own a
copy of such a module (`modules_to_save=["bert.pooler"]` in its config): the copy trains with the
adapter, is saved in its file, and answers for the base module whenever the adapter is active
(per row when routing), in the same way as the adapter's task head.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Sequence

from torch import nn

from .adapter import Adapter, ModuleMap, module_path
from .errors import TargetError
from .heads import HeadSwitch, new_head
from .site import ActiveState


class CopySwitches:
    """One switch per copied base module, answering with the active adapter's copy.

    The copies themselves belong to the adapters' records (`Adapter.copies`); this keeps only
    the hooks, one per base module that at least one loaded adapter copies.
    """

    def __init__(self, base: nn.Module, state: ActiveState, adapters: ModuleMap[Adapter]) -> None:
        self.base, self.state, self.adapters = base, state, adapters
        self._switches: dict[str, HeadSwitch] = {}

    def check(self, name: str, paths: Sequence[str], head_path: str | None) -> list[str]:
        """The module paths to copy for a new adapter, or a TargetError saying what is wrong."""
        if isinstance(paths, str):
            paths = [paths]
        modules = dict(self.base.named_modules())
        checked: list[str] = []
        for path in paths:
            if not isinstance(path, str) or path not in modules or path == "":
                near = difflib.get_close_matches(str(path), [n for n in modules if n], n=6, cutoff=0.5)
                raise TargetError(
                    f"adapter {name!r}: modules_to_save names {path!r}, which is not a module of this model; "
                    f"closest names: {near or [n for n, _ in self.base.named_children()]}"
                )
            if not any(True for _ in modules[path].parameters()):
                raise TargetError(f"adapter {name!r}: module {path!r} has no weights to train a copy of")
            if head_path and (path == head_path or path.startswith(head_path + ".")):
                raise TargetError(
                    f"adapter {name!r}: {path!r} is the task head, which labels=/num_labels=/head= give the adapter"
                )
            if any(path.startswith(p + ".") or p.startswith(path + ".") or p == path for p in checked):
                raise TargetError(f"adapter {name!r}: modules_to_save lists {path!r} twice or inside another entry")
            checked.append(path)
        return checked

    def build(self, paths: list[str]) -> dict[str, nn.Module]:
        """Fresh copies (frozen until train_adapter), without the switch hooks of the originals."""
        return {path: new_head(self.base.get_submodule(path), None) for path in paths}

    def attach(self, adapter: Adapter) -> None:
        for key in adapter.copies:
            if key not in self._switches:
                own = functools.partial(_copy_in, self.adapters, key)
                self._switches[key] = HeadSwitch(self.base.get_submodule(module_path(key)), own, self.state)

    def detach(self, adapter: Adapter) -> None:
        """Remove the switches that no adapter but this one needs."""
        for key in adapter.copies:
            others = any(key in a.copies for a in self.adapters.values() if a is not adapter)
            if not others and key in self._switches:
                self._switches.pop(key).remove()


def _copy_in(adapters: ModuleMap[Adapter], key: str, name: str) -> nn.Module | None:
    return adapters[name].copies._modules.get(key) if name in adapters else None
