"""One adapter, one record: its config, its facts and every module it owns.

An `AdaptedModel` keeps one `Adapter` per name and nothing else about adapters: deleting one,
counting or saving its parameters, moving it to a device or switching it to eval mode all walk
`parts()`, the same iteration PEFT does over one adapter's layers. The sites and head switches
hold references to these modules for the forward pass; the record is what owns them.
"""

from __future__ import annotations

import hashlib
from collections.abc import ItemsView, Iterator, KeysView, Mapping, ValuesView
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch
from torch import nn

from .config import MethodConfig

if TYPE_CHECKING:
    from .methods.base import ModelMethod, SiteMethod
    from .methods.fusion import FusionLayer
    from .setups import Fuse

#: the key prefixes of an adapter's tensors in files: sites.<module>.*, model.*, head.*, copies.<module>.*
SITES, MODEL, HEAD, COPIES = "sites", "model", "head", "copies"


ModuleT = TypeVar("ModuleT", bound=nn.Module)

if TYPE_CHECKING:

    class ModuleMap(nn.Module, Generic[ModuleT]):
        """An `nn.ModuleDict` whose modules are all `ModuleT`s, as type checkers see it. At run time
        it is `nn.ModuleDict` itself, so state-dict keys, repr and behaviour are the ModuleDict's."""

        def __init__(self, modules: Mapping[str, ModuleT] | None = None) -> None: ...
        def __getitem__(self, key: str) -> ModuleT: ...
        def __setitem__(self, key: str, module: ModuleT) -> None: ...
        def __delitem__(self, key: str) -> None: ...
        def __len__(self) -> int: ...
        def __iter__(self) -> Iterator[str]: ...
        def __contains__(self, key: str) -> bool: ...
        def clear(self) -> None: ...
        def pop(self, key: str) -> ModuleT: ...
        def keys(self) -> KeysView[str]: ...
        def items(self) -> ItemsView[str, ModuleT]: ...
        def values(self) -> ValuesView[ModuleT]: ...
        def update(self, modules: Mapping[str, ModuleT]) -> None: ...

else:
    ModuleMap = nn.ModuleDict


def module_key(path: str) -> str:
    """A module path as an nn.ModuleDict key ("." is not allowed in one)."""
    return path.replace(".", "/")


def module_path(key: str) -> str:
    return key.replace("/", ".")


class Adapter(nn.Module):
    """Everything one named adapter is.

    - `config`: its method config; `meta`: facts that travel in its file (labels, task, origin).
    - `site_methods`: the method's module at each site, keyed by the site's module path.
    - `model_method`: a prompt / prefix module that acts on the whole model's call, or None.
    - `head`: its own task head (a copy of the base model's), or None.
    - `copies`: its trainable copies of base modules (`modules_to_save`), keyed by module path.
    """

    def __init__(self, name: str, config: MethodConfig, meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.name = name
        self.config = config
        self.meta: dict[str, Any] = dict(meta or {})
        self.site_methods: ModuleMap[SiteMethod] = ModuleMap()
        self.copies: ModuleMap[nn.Module] = ModuleMap()
        self.model_method: ModelMethod | None = None
        self.head: nn.Module | None = None

    def parts(self) -> Iterator[tuple[str, nn.Module]]:
        """(file key prefix, module) for every module the adapter owns."""
        for key, method in self.site_methods.items():
            yield f"{SITES}.{module_path(key)}", method
        if self.model_method is not None:
            yield MODEL, self.model_method
        if self.head is not None:
            yield HEAD, self.head
        for key, copy in self.copies.items():
            yield f"{COPIES}.{module_path(key)}", copy

    @property
    def methods_by_path(self) -> dict[str, SiteMethod]:
        """Module path -> the method's module there. (`AdaptedModel.sites` are the hooks on the frozen
        modules; a manifest's "sites" names the module paths and sides, as the file format has it.)"""
        return {module_path(k): m for k, m in self.site_methods.items()}

    @property
    def copied_paths(self) -> list[str]:
        return [module_path(k) for k in self.copies]

    def copy_of(self, path: str) -> nn.Module:
        return self.copies[module_key(path)]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors under the keys its file uses (detached, not copied)."""
        return tensors_of(self.parts())

    def fingerprint(self) -> str:
        """A hash of the adapter's tensor values: what a fusion trained on top of it depends on."""
        return tensor_fingerprint(self.tensors())

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"name={self.name!r}, method={self.config.method!r}"


class Fusion(nn.Module):
    """A trained AdapterFusion: one fusion layer per site, over the outputs of `fuse`'s children.

    It belongs to the adapters it fuses: deleting one of them deletes it. Saved as a file of its
    own, with the fused adapters' names and fingerprints, so it is only ever loaded onto the
    adapters it was trained with.
    """

    def __init__(self, fuse: Fuse) -> None:
        super().__init__()
        self.fuse = fuse
        self.layers: ModuleMap[FusionLayer] = ModuleMap()  # site module path ("." → "/") -> FusionLayer

    def parts(self) -> Iterator[tuple[str, nn.Module]]:
        for key, layer in self.layers.items():
            yield f"{SITES}.{module_path(key)}", layer

    def tensors(self) -> dict[str, torch.Tensor]:
        return tensors_of(self.parts())

    def extra_repr(self) -> str:
        return f"{self.fuse!r}"


def tensor_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def tensors_of(parts: Iterator[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
    """`<prefix>.<param>` -> tensor (detached, not copied) for every (prefix, module) of a record."""
    return {f"{prefix}.{k}": v.detach() for prefix, module in parts for k, v in module.state_dict().items()}


#: the dtypes a file may hold a parameter in (it is copied into the record's own dtype)
FLOAT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})


def tensor_mismatch(expected: dict[str, torch.Tensor], tensors: dict[str, Any]) -> str | None:
    """Why `tensors` cannot fill a record whose own tensors are `expected` (same names, tensors,
    floating dtypes for floating parameters, same shapes); None when they can."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        return f"tensors do not match this model; missing {missing[:5]}, unexpected {unexpected[:5]}"
    for key, target in expected.items():
        given = tensors[key]
        if not isinstance(given, torch.Tensor):
            return f"{key!r} is not a tensor"
        if target.is_floating_point() and given.dtype not in FLOAT_DTYPES:
            allowed = ", ".join(sorted(str(d).removeprefix("torch.") for d in FLOAT_DTYPES))
            return f"tensor {key!r} is {str(given.dtype).removeprefix('torch.')}; parameters are stored as {allowed}"
        if tuple(given.shape) != tuple(target.shape):
            return f"tensor {key!r} has shape {tuple(given.shape)}, the config makes {tuple(target.shape)}"
    return None

