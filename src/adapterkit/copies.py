"""Per-adapter trainable copies of base modules (what PEFT calls `modules_to_save`).

Some modules matter to a task but are not worth an adapter: a BERT pooler, say, which full
fine-tuning retrains and a frozen base would keep as pre-training left it. An adapter can own a
copy of such a module (`modules_to_save=["bert.pooler"]` in its config): the copy trains with the
adapter, is saved in its file, and answers for the base module whenever the adapter is active
(per row when routing), in the same way as the adapter's task head.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .errors import TargetError
from .heads import HeadSwitch, new_head
from .site import ActiveState

PREFIX = "copies."


class ModuleCopies(nn.Module):
    """`tables[<module path with "/" for ".">][<adapter name>]` = that adapter's copy."""

    def __init__(self, base: nn.Module, state: ActiveState) -> None:
        super().__init__()
        object.__setattr__(self, "base", base)  # not a submodule: the base belongs to the AdaptedModel
        object.__setattr__(self, "state", state)
        self.tables = nn.ModuleDict()
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

    def add(self, name: str, paths: list[str], device: torch.device) -> None:
        for path in paths:
            key = path.replace(".", "/")
            if key not in self.tables:
                self.tables[key] = nn.ModuleDict()
                module = self.base.get_submodule(path)
                self._switches[key] = HeadSwitch(module, self.tables[key], self.state)
            # new_head copies without the switch hook; the copy stays frozen until train_adapter
            self.tables[key][name] = new_head(self.base.get_submodule(path), None).to(device)

    def delete(self, name: str) -> None:
        for key in list(self.tables):
            table = self.tables[key]
            if name in table:
                del table[name]
            if len(table) == 0:
                self._switches.pop(key).remove()
                del self.tables[key]

    def paths_of(self, name: str) -> list[str]:
        return [key.replace("/", ".") for key, table in self.tables.items() if name in table]

    def parameters_of(self, name: str) -> Iterator[nn.Parameter]:
        for table in self.tables.values():
            if name in table:
                yield from table[name].parameters()

    def state_dict_of(self, name: str) -> dict[str, torch.Tensor]:
        """`copies.<module path>.<param>` tensors of one adapter."""
        state: dict[str, torch.Tensor] = {}
        for key, table in self.tables.items():
            if name in table:
                path = key.replace("/", ".")
                state.update({f"{PREFIX}{path}.{k}": v.detach() for k, v in table[name].state_dict().items()})
        return state

    def copy_of(self, name: str, path: str) -> nn.Module:
        return self.tables[path.replace(".", "/")][name]
