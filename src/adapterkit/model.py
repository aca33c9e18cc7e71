"""AdaptedModel: one frozen base model, many named adapters, plain verbs.

The model object is the only place that knows adapter names; sites only hold modules keyed by
them, and methods know nothing of names at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from . import combine as combining
from .composition import Average, Fuse, Setup, Stack, names_in
from .config import MethodConfig
from .copies import ModuleCopies
from .errors import AdapterExistsError, AdapterFileError, AdapterNotFoundError, CompositionError, TargetError
from .heads import HeadSwitch, find_head, new_head
from .methods import SiteShape, build_model_method, build_site_method, is_model_level
from .site import ActiveState, Route, Site
from .targets import default_targets, find_sites, matches

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


class AdaptedModel(nn.Module):
    """A frozen base model with named adapters. Call it like the base model."""

    def __init__(self, model: nn.Module, base_name: str | None = None, head: str | None = "auto") -> None:
        super().__init__()
        self.base = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.sites = nn.ModuleDict()  # keyed by module name with "." -> "/"
        self.heads = nn.ModuleDict()  # adapter name -> its task head
        self.model_level = nn.ModuleDict()  # adapter name -> prompt / prefix module
        self.state = ActiveState()
        self.copies = ModuleCopies(model, self.state)  # per-adapter copies of base modules
        self.configs: dict[str, MethodConfig] = {}
        self.meta: dict[str, dict[str, Any]] = {}
        config = getattr(model, "config", None)
        self.base_name = base_name or getattr(config, "_name_or_path", None) or type(model).__name__
        self.head_path = find_head(model) if head == "auto" else head
        head_module = model.get_submodule(self.head_path) if self.head_path else None
        self._head_switch = HeadSwitch(head_module, self.heads, self.state) if head_module is not None else None
        self._model_hook = model.register_forward_pre_hook(self._prepare_call, with_kwargs=True)

    # --- calling ---------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's `generate` with the active setup (hooks apply at every step)."""
        return self.base.generate(*args, **kwargs)

    def _prepare_call(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if self.state.route is not None:  # routing replaces the active setup for its block
            return None
        live = [n for n in names_in(self.state.setup) if n in self.model_level]
        for name in live:
            args, kwargs = self.model_level[name].prepare(self.base, args, kwargs)
        return (args, kwargs) if live else None

    # --- adding and removing ---------------------------------------------------------------

    def add(
        self, name: str, config: MethodConfig, *, labels: Sequence[str] | None = None,
        num_labels: int | None = None, head: bool | nn.Module | None = None,
    ) -> None:
        """Attach a new adapter. `labels`/`num_labels`/`head=True` give it its own task head."""
        self._check_new_name(name)
        if not isinstance(config, MethodConfig):
            raise TargetError(f"adapter {name!r}: expected a method config (ak.LoRA(...), ...), got {config!r}")
        config.validate()
        copied = self.copies.check(name, config.modules_to_save, self.head_path)
        if config.modules_to_save != copied:  # one name given as a plain string
            config = dataclasses.replace(config, modules_to_save=copied)
        head_module = self._build_head(name, labels, num_labels, head)
        if is_model_level(config):
            self.model_level[name] = build_model_method(config, self.base).to(self._device())
        else:
            built = self._build_site_methods(name, config)
            for module_name, method in built.items():
                key = module_name.replace(".", "/")
                if key not in self.sites:
                    self.sites[key] = Site(module_name, self.base.get_submodule(module_name), self.state)
                self.sites[key].adapters[name] = method
        if head_module is not None:
            self.heads[name] = head_module
        self.copies.add(name, copied, self._device())
        self.configs[name] = config
        self.meta[name] = {"labels": list(labels) if labels is not None else None}

    def _build_site_methods(self, name: str, config: MethodConfig) -> dict[str, nn.Module]:
        """Every module of the new adapter, built before any is attached, so errors leave no trace."""
        if config.targets is None:
            targets, input_targets = default_targets(self.base, config)
        else:
            targets = [config.targets] if isinstance(config.targets, str) else list(config.targets)
            input_targets = list(getattr(config, "input_targets", None) or [])
        exclude = list(config.exclude) + ([rf"(^|\.){re.escape(self.head_path)}$"] if self.head_path else [])
        # a module the adapter copies is replaced whole while it is active, so no site goes inside it
        exclude += [rf"^{re.escape(p)}(\.|$)" for p in config.modules_to_save]
        found = find_sites(self.base, targets + input_targets, exclude, method=f"adapter {name!r}")
        device = self._device()
        built = {}
        for module_name in found:
            module = self.base.get_submodule(module_name)
            on_input = any(matches(module_name, module, t) for t in input_targets)
            try:
                method = build_site_method(config, SiteShape.of(module, module_name), module, on_input)
            except TargetError as err:
                raise TargetError(f"adapter {name!r} at module {module_name!r}: {err}") from None
            built[module_name] = method.to(device)
        return built

    def _build_head(self, name: str, labels, num_labels, head) -> nn.Module | None:
        if labels is not None:
            if num_labels is not None and num_labels != len(labels):
                raise CompositionError(f"adapter {name!r}: {len(labels)} labels but num_labels={num_labels}")
            num_labels = len(labels)
        if isinstance(head, nn.Module):
            return head.to(self._device())
        if head is False or (head is None and num_labels is None):
            return None
        if self.head_path is None:
            raise TargetError(f"adapter {name!r}: this model has no head module to copy; pass head=<module>")
        return new_head(self.base.get_submodule(self.head_path), num_labels)

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise CompositionError(f"adapter name {name!r}: use letters, digits, '_' or '-'")
        if name in self.configs:
            raise AdapterExistsError(f"an adapter named {name!r} is already loaded; delete it or pick another name")

    def delete(self, name: str, *, collect: bool = True) -> None:
        """Remove an adapter and free its memory (unmerging it first if merged).

        `collect=False` skips the full `gc.collect()` (about 0.5 s with transformers loaded), for
        servers that evict adapters between batches; reference counting still frees the tensors.
        """
        self._require(name)
        if name in self.state.merged:
            self.unmerge(name)
        if name in names_in(self.state.setup):
            self.state.setup = None
        for key in list(self.sites):
            site = self.sites[key]
            if name in site.adapters:
                del site.adapters[name]
                for fkey in [k for k in site.fusions if name in k[len("fuse:") :].split("+")]:
                    del site.fusions[fkey]
                site.forget_stacks()
            if len(site.adapters) == 0:
                site.detach_hooks()
                del self.sites[key]
        for table in (self.heads, self.model_level):
            if name in table:
                del table[name]
        self.copies.delete(name)
        del self.configs[name], self.meta[name]
        if collect:
            gc.collect()

    # --- choosing what runs ----------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        return list(self.configs)

    @property
    def active(self) -> Setup:
        return self.state.setup

    def activate(self, setup: Setup) -> None:
        """Use one adapter (a name), a Stack, a Fuse, an Average, or None (the base model)."""
        for name in names_in(setup):
            self._require(name)
        if isinstance(setup, Fuse):
            self._add_fusion(setup)
        if isinstance(setup, Fuse | Average) and any(n in self.model_level for n in setup.names):
            raise CompositionError("prompt/prefix adapters can be used alone or in a Stack, not in Fuse or Average")
        self.state.setup = setup

    def train_adapter(self, setup: str | Fuse) -> list[nn.Parameter]:
        """Activate `setup` and make only its parameters (and its head) trainable."""
        self.activate(setup)
        for p in self.parameters():
            p.requires_grad_(False)
        params = list(self.adapter_parameters(setup))
        for p in params:
            p.requires_grad_(True)
        self.train()
        return params

    def adapter_parameters(self, setup: str | Fuse) -> Iterator[nn.Parameter]:
        if isinstance(setup, Fuse):
            for site in self.sites.values():
                if setup.key in site.fusions:
                    yield from site.fusions[setup.key].parameters()
            return
        self._require(setup)
        for site in self.sites.values():
            if setup in site.adapters:
                yield from site.adapters[setup].parameters()
        for table in (self.model_level, self.heads):
            if setup in table:
                yield from table[setup].parameters()
        yield from self.copies.parameters_of(setup)

    def _add_fusion(self, fuse: Fuse) -> None:
        added = [site.add_fusion(fuse) for site in self.sites.values()]
        if not any(added) and not any(fuse.key in s.fusions for s in self.sites.values()):
            raise CompositionError(f"{fuse}: none of these adapters has a per-site module to fuse")

    @contextlib.contextmanager
    def route(self, names: Sequence[str | None]) -> Iterator[None]:
        """Within the block, row i of the batch uses adapter names[i] (None = the base model)."""
        if isinstance(names, str) or not isinstance(names, Sequence) or len(names) == 0:
            raise CompositionError("route() takes a non-empty list with one adapter name (or None) per row")
        for name in set(names) - {None}:
            self._require(name)
            if name in self.model_level:
                raise CompositionError(f"adapter {name!r}: per-row routing does not support prompt/prefix tuning")
        if self.state.merged:
            raise CompositionError(f"unmerge {sorted(self.state.merged)} before routing: merged weights change every row")
        previous = self.state.route
        self.state.route = Route(tuple(names))
        try:
            yield
        finally:
            self.state.route = previous

    # --- merging and combining -------------------------------------------------------------

    def merge(self, name: str) -> None:
        """Fold a LoRA / IA³ / BitFit adapter into the frozen weights (outputs stay the same)."""
        sites = self._mergeable_sites(name)
        if name in self.state.merged:
            raise CompositionError(f"adapter {name!r} is already merged")
        if self.state.route is not None:
            raise CompositionError(f"cannot merge {name!r} inside a route() block: merged weights change every row")
        _all_or_none(sites, lambda s: s.adapters[name].merge_into(s.frozen),
                     lambda s: s.adapters[name].unmerge_from(s.frozen))
        self.state.merged.add(name)

    def unmerge(self, name: str) -> None:
        """Take a merged adapter back out of the frozen weights."""
        sites = self._mergeable_sites(name)
        if name not in self.state.merged:
            raise CompositionError(f"adapter {name!r} is not merged")
        _all_or_none(sites, lambda s: s.adapters[name].unmerge_from(s.frozen),
                     lambda s: s.adapters[name].merge_into(s.frozen))
        self.state.merged.discard(name)

    def _mergeable_sites(self, name: str) -> list[Site]:
        self._require(name)
        sites = [s for s in self.sites.values() if name in s.adapters]
        blocked = [s.module_name for s in sites if not s.adapters[name].mergeable]
        if name in self.model_level or blocked:
            raise CompositionError(
                f"adapter {name!r} ({self.configs[name].method}) cannot be merged: only LoRA, IA³ and BitFit are "
                "linear in the frozen weights; bottleneck adapters have a nonlinearity, prompt/prefix add tokens"
            )
        for site in sites:
            try:
                site.adapters[name].check_merge(site.frozen, site.module_name)
            except TargetError as err:
                raise TargetError(f"adapter {name!r}: {err}") from None
            own = {id(p) for p in site.frozen.parameters(recurse=False)}
            tied = [n for n, m in self.base.named_modules()
                    if m is not site.frozen and any(id(p) in own for p in m.parameters(recurse=False))]
            if tied:
                raise CompositionError(
                    f"adapter {name!r} cannot be merged: {site.module_name!r} shares its weights with {tied} "
                    "(tied embeddings), so merging would change those modules too; keep it unmerged"
                )
        return sites

    def combine(self, new_name: str, weights: dict[str, float]) -> None:
        """A new adapter whose delta is Σ w_i · delta_i (exact for LoRA, IA³ and BitFit)."""
        for name in weights:
            self._require(name)
        config = combining.combined_config(self.configs, weights)
        self.add(new_name, config)
        try:
            for site in self.sites.values():
                if new_name in site.adapters:
                    parts = [(site.adapters[n] if n in site.adapters else None, w) for n, w in weights.items()]
                    combining.fill(site.adapters[new_name], parts)
        except Exception:
            self.delete(new_name)
            raise
        self.meta[new_name]["combined_from"] = dict(weights)

    # --- facts -------------------------------------------------------------------------------

    def _require(self, name: str) -> None:
        if not isinstance(name, str) or name not in self.configs:
            raise AdapterNotFoundError(f"no adapter named {name!r} is loaded; loaded: {self.adapters}")

    def _device(self) -> torch.device:
        return next(iter(self.base.parameters()), torch.empty(0)).device

    def base_parameter_count(self) -> int:
        return sum(p.numel() for p in self.base.parameters())

    def adapter_info(self, name: str) -> dict[str, Any]:
        params = list(self.adapter_parameters(name))
        count = sum(p.numel() for p in params)
        return {
            "name": name, "method": self.configs[name].method, "params": count,
            "percent_of_base": 100.0 * count / max(1, self.base_parameter_count()),
            "bytes": sum(p.numel() * p.element_size() for p in params),
            "sites": sum(name in s.adapters for s in self.sites.values()),
            "head": name in self.heads, "labels": self.meta[name].get("labels"),
            "merged": name in self.state.merged,
        }

    def summary(self) -> str:
        lines = [f"{self.base_name}: {self.base_parameter_count():,} frozen parameters; active: {self.active!r}"]
        lines.append(f"{'adapter':<20}{'method':<12}{'params':>12}{'% base':>9}{'bytes':>12}{'sites':>7}")
        for name in self.adapters:
            i = self.adapter_info(name)
            lines.append(
                f"{name:<20}{i['method']:<12}{i['params']:>12,}{i['percent_of_base']:>8.3f}%{i['bytes']:>12,}{i['sites']:>7}"
            )
        return "\n".join(lines)

    def fingerprint(self) -> str:
        """Hash of the frozen weights' names, shapes and dtypes (the head left out)."""
        digest = hashlib.sha256()
        for pname, p in sorted(self.base.state_dict().items()):
            if self.head_path and (pname.startswith(self.head_path + ".")):
                continue
            digest.update(f"{pname}:{tuple(p.shape)}:{p.dtype};".encode())
        return digest.hexdigest()[:16]

    # --- tensors of one adapter, as files hold them --------------------------------------------

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """`sites.<module>.<param>`, `head.<param>` and `model.<param>` tensors of one adapter."""
        self._require(name)
        state: dict[str, torch.Tensor] = {}
        for site in self.sites.values():
            if name in site.adapters:
                for pname, p in site.adapters[name].state_dict().items():
                    state[f"sites.{site.module_name}.{pname}"] = p.detach()
        for prefix, table in (("head", self.heads), ("model", self.model_level)):
            if name in table:
                state.update({f"{prefix}.{k}": v.detach() for k, v in table[name].state_dict().items()})
        state.update(self.copies.state_dict_of(name))
        return state

    def site_names(self, name: str) -> dict[str, str]:
        """Module name -> side ("input"/"output") of every site the adapter is attached to."""
        return {s.module_name: s.adapters[name].side for s in self.sites.values() if name in s.adapters}

    @torch.no_grad()
    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors into an adapter after checking that every key and shape matches."""
        expected = self.adapter_state_dict(name)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise AdapterFileError(
                f"adapter {name!r}: tensors do not match this model; missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for key, target in expected.items():
            if tuple(tensors[key].shape) != tuple(target.shape):
                raise AdapterFileError(
                    f"adapter {name!r}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                    f"the module here needs {tuple(target.shape)}"
                )
        for key, target in expected.items():
            target.copy_(tensors[key].to(target.dtype))
        for site in self.sites.values():
            site.forget_stacks()

    # --- files (the io layer does the work) --------------------------------------------------

    def save(self, name: str, path: str) -> None:
        from .io.files import save_adapter

        save_adapter(self, name, path)

    def load(self, path: str, name: str | None = None) -> str:
        from .io.files import load_adapter

        return load_adapter(self, path, name=name)


def _all_or_none(sites: list[Site], do, undo) -> None:
    """Apply `do` to every site; if one fails, undo the ones already done and re-raise."""
    done: list[Site] = []
    try:
        for site in sites:
            do(site)
            done.append(site)
    except Exception:
        for site in reversed(done):
            undo(site)
        raise


def adapt(model: nn.Module, base_name: str | None = None, head: str | None = "auto") -> AdaptedModel:
    """Freeze `model` and return an AdaptedModel around it."""
    return AdaptedModel(model, base_name=base_name, head=head)


__all__ = ["AdaptedModel", "Average", "Fuse", "Stack", "adapt"]
