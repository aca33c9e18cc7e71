"""AdaptedModel: one frozen base model, many named adapters, plain verbs.

The model object is the only place that knows adapter names. It keeps one `Adapter` record per
name (adapter.py) and one `Fusion` record per trained AdapterFusion; the sites and head switches
only hold references to the records' modules for the forward pass, and methods know nothing of
names at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from . import combine as combining
from .adapter import Adapter, Fusion, ModuleMap, module_key, module_path, tensor_mismatch
from .build import build_adapter
from .config import MethodConfig
from .copies import CopySwitches
from .errors import (
    AdapterExistsError,
    AdapterFileError,
    AdapterNotFoundError,
    CompositionError,
    PrecisionError,
    TargetError,
)
from .heads import HeadSwitch, find_head
from .hf_names import checkpointed_layers
from .methods import check_config
from .methods.fusion import FusionLayer
from .precision import dequantize_, full_precision_shapes, requantize_, scheme_of
from .routes import RouteEntry, route_of
from .setups import Average, Fuse, Setup, Stack, fuses_in, names_in
from .site import ActiveState, Site

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


class AdaptedModel(nn.Module):
    """A frozen base model with named adapters. Call it like the base model."""

    def __init__(self, model: nn.Module, base_name: str | None = None, head: str | None = "auto",
                 adapter_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.base = model
        #: the dtype new adapters (and their heads and module copies) hold their parameters in: fp32 by
        #: default, a master copy beside a bf16 or quantized base; the sites cast in and out of it
        self.adapter_dtype = adapter_dtype
        for p in model.parameters():
            p.requires_grad_(False)
        self.loaded: ModuleMap[Adapter] = ModuleMap()  # adapter name -> Adapter: the one registry of adapters
        self.fusions: ModuleMap[Fusion] = ModuleMap()  # Fuse key -> Fusion
        self.state = ActiveState()
        # Hooks on the frozen modules, keyed by module path ("." -> "/"). A plain dict, not submodules:
        # the modules they apply belong to the records above.
        self.sites: dict[str, Site] = {}
        self._copy_switches = CopySwitches(model, self.state, self.loaded)
        # merged adapter -> the frozen tensors it changed, as they were (merge(..., keep_original=True))
        self._originals: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        # adapters merged into quantized weights that were quantized again: no exact unmerge
        self._requantized: set[str] = set()
        config = getattr(model, "config", None)
        self.base_name = base_name or getattr(config, "_name_or_path", None) or type(model).__name__
        self.head_path = find_head(model) if head == "auto" else head
        head_module = model.get_submodule(self.head_path) if self.head_path else None
        own_head = functools.partial(_head_in, self.loaded)
        self._head_switch = HeadSwitch(head_module, own_head, self.state) if head_module is not None else None
        self._model_hook = model.register_forward_pre_hook(self._prepare_call, with_kwargs=True)

    # --- calling ---------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's `generate` with the active setup (hooks apply at every step)."""
        generate = getattr(self.base, "generate", None)
        if not callable(generate):
            raise AttributeError(f"{type(self.base).__name__!r} object has no attribute 'generate' "
                                 "(only generative models have one)")
        return generate(*args, **kwargs)

    def _prepare_call(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if self.state.route is not None:  # routing replaces the active setup for its block
            return None
        live = [m for m in (self.loaded[n].model_method for n in names_in(self.state.setup)) if m is not None]
        for method in live:
            args, kwargs = method.prepare(self.base, args, kwargs)
        return (args, kwargs) if live else None

    # --- adding and removing ---------------------------------------------------------------

    def add(
        self, name: str, config: MethodConfig, *, labels: Sequence[str] | None = None,
        num_labels: int | None = None, head: bool | nn.Module | None = None,
        sites: dict[str, str | None] | None = None,
    ) -> None:
        """Attach a new adapter. `labels`/`num_labels`/`head=True` give it its own task head.

        `sites` (module name -> "input"/"output"/None) attaches it at exactly those modules instead
        of the ones the config's targets match, as a saved file lists them: no pattern is run.
        Everything is built before anything is attached, so a failure leaves the model as it was.
        """
        self.attach(self.build(name, config, labels=labels, num_labels=num_labels, head=head, sites=sites))

    def build(
        self, name: str, config: MethodConfig, *, labels: Sequence[str] | None = None,
        num_labels: int | None = None, head: bool | nn.Module | None = None,
        sites: dict[str, str | None] | None = None, on_meta: bool = False,
    ) -> Adapter:
        """The record `add` attaches, built and not attached: this reads the model and changes nothing.

        `on_meta`: its new parameters on the meta device, neither allocated nor initialised, for a
        loader that assigns the file's tensors to them (io/install.py) and then calls `attach`.
        """
        self._check_new_name(name)
        if not isinstance(config, MethodConfig):
            raise TargetError(f"adapter {name!r}: expected a method config (ak.LoRA(...), ...), got {config!r}")
        check_config(config)
        copied = self._copy_switches.check(name, config.modules_to_save, self.head_path)
        if config.modules_to_save != copied:  # one name given as a plain string
            config = dataclasses.replace(config, modules_to_save=copied)
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            record = build_adapter(self.base, name, config, self.head_path, labels=labels, num_labels=num_labels,
                                   head=head, sites=sites)
            for path, copy in self._copy_switches.build(copied).items():
                record.copies[module_key(path)] = copy
        if not on_meta:
            record.to(self.device, dtype=self.adapter_dtype)
        return record.train(self.training)

    def attach(self, record: Adapter) -> None:
        """Attach a record from `build` (its tensors real, no longer meta): the one step that changes the model."""
        self._check_new_name(record.name)
        self._attach(record)

    def _attach(self, record: Adapter) -> None:
        self.loaded[record.name] = record
        for key, method in record.site_methods.items():
            if key not in self.sites:
                path = module_path(key)
                self.sites[key] = Site(path, self.base.get_submodule(path), self.state)
            self.sites[key].adapters[record.name] = method
        self._copy_switches.attach(record)

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise CompositionError(f"adapter name {name!r}: use letters, digits, '_' or '-'")
        if name in self.loaded:
            raise AdapterExistsError(f"an adapter named {name!r} is already loaded; delete it or pick another name")

    def delete(self, name: str, *, collect: bool = True) -> None:
        """Remove an adapter and free its memory (unmerging it first if merged).

        `collect=False` skips the full `gc.collect()` (about 0.5 s with transformers loaded), for
        servers that evict adapters between batches; reference counting still frees the tensors.
        """
        record = self.adapter(name)
        if name in self.state.merged:
            self.unmerge(name)
        if name in names_in(self.state.setup):
            self.state.setup = None
        for fusion in [f for f in self.fusions.values() if name in f.fuse.names]:
            self.delete_fusion(fusion.fuse)
        for key in record.site_methods:
            site = self.sites[key]
            del site.adapters[name]
            if len(site.adapters) == 0:
                site.detach_hooks()
                del self.sites[key]
        self._copy_switches.detach(record)
        del self.loaded[name]
        if collect:
            gc.collect()

    # --- choosing what runs ----------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        """The names of the loaded adapters, in the order they were added."""
        return list(self.loaded)

    def adapter(self, name: str) -> Adapter:
        """The record of a loaded adapter: config, meta and every module it owns."""
        if not isinstance(name, str) or name not in self.loaded:
            raise AdapterNotFoundError(f"no adapter named {name!r} is loaded; loaded: {self.adapters}")
        return self.loaded[name]

    def fusion(self, fuse: Fuse) -> Fusion:
        """The trained layers of an AdapterFusion (made when the Fuse is first activated)."""
        if not isinstance(fuse, Fuse) or fuse.key not in self.fusions:
            raise AdapterNotFoundError(f"no fusion {fuse!r} is set up; activate it first (or load its file)")
        return self.fusions[fuse.key]

    @property
    def active(self) -> Setup:
        return self.state.setup

    def activate(self, setup: Setup) -> None:
        """Use one adapter (a name), a Stack, a Fuse, an Average (nested as setups.py says), or None."""
        for name in names_in(setup):
            self.adapter(name)
        whole_model = [n for f in _fuse_or_average_nodes(setup) for n in f.names
                       if self.loaded[n].model_method is not None]
        if whole_model:
            raise CompositionError(
                f"prompt/prefix adapters ({sorted(set(whole_model))}) can be used alone or in a Stack, "
                "not in Fuse or Average"
            )
        for fuse in fuses_in(setup):
            self.add_fusion(fuse)
        self.state.setup = setup

    def train_adapter(self, setup: str | Fuse, *, base_in_train_mode: bool = False) -> list[nn.Parameter]:
        """Activate `setup`, make only its parameters (and its head) trainable and return them.

        The frozen base goes to eval mode, as inference has it: its BatchNorm keeps its statistics
        and its dropout stays off. Only the modules that train (the adapter's, or the fusion's) are
        in train mode. `base_in_train_mode=True` puts the whole model in train mode instead, as
        PEFT and transformers' Trainer do (dropout on in the base, BatchNorm statistics updated).
        Layers under activation checkpointing keep their own train flag, which transformers reads
        to decide whether to recompute, so checkpointing stays on with the base in eval mode."""
        self.activate(setup)
        for p in self.parameters():
            p.requires_grad_(False)
        params = list(self.adapter_parameters(setup))
        for p in params:
            p.requires_grad_(True)
        if base_in_train_mode:
            self.train()
        else:
            self.eval()
            (self.fusion(setup) if isinstance(setup, Fuse) else self.adapter(setup)).train()
            for layer in checkpointed_layers(self.base):
                layer.training = True
        return params

    def adapter_parameters(self, setup: str | Fuse) -> Iterator[nn.Parameter]:
        """The parameters that training `setup` moves: an adapter's (with its head and copies), or a fusion's."""
        if isinstance(setup, Fuse):
            return self.fusion(setup).parameters()
        return self.adapter(setup).parameters()

    def add_fusion(self, fuse: Fuse) -> Fusion:
        """The Fusion record of `fuse`, made with fresh layers at every site one of its adapters is at."""
        if fuse.key in self.fusions:
            return self.fusions[fuse.key]
        fusion = Fusion(fuse)
        for key, site in self.sites.items():
            here = [site.adapters[n] for n in fuse.names if n in site.adapters]
            if here:
                first = next(here[0].parameters())
                fusion.layers[key] = FusionLayer(site.fusion_width()).to(first.device, dtype=first.dtype)
        if len(fusion.layers) == 0:
            raise CompositionError(f"{fuse}: none of these adapters has a per-site module to fuse")
        fusion.train(self.training)
        self.fusions[fuse.key] = fusion
        for key, layer in fusion.layers.items():
            self.sites[key].fusions[fuse.key] = layer
        return fusion

    def delete_fusion(self, fuse: Fuse) -> None:
        """Remove a fusion's layers (deleting one of its adapters does this too)."""
        fusion = self.fusion(fuse)
        if any(fuse == f for f in fuses_in(self.state.setup)):
            self.state.setup = None
        for site_key in fusion.layers:
            if site_key in self.sites:
                del self.sites[site_key].fusions[fuse.key]
        del self.fusions[fuse.key]

    @contextlib.contextmanager
    def route(self, names: Sequence[RouteEntry]) -> Iterator[None]:
        """Within the block, row i of the batch uses adapter names[i] (None = the base model), or a
        weighted mixture {name: weight, ...} of adapters (routes.py says what a mixture computes)."""
        route = route_of(names)
        for name in sorted(route.used):
            if self.adapter(name).model_method is not None:
                raise CompositionError(f"adapter {name!r}: per-row routing does not support prompt/prefix tuning")
        if self.state.merged:
            raise CompositionError(f"unmerge {sorted(self.state.merged)} before routing: merged weights change every row")
        previous = self.state.route
        self.state.route = route
        try:
            yield
        finally:
            self.state.route = previous

    # --- merging and combining -------------------------------------------------------------

    def merge(self, name: str, *, keep_original: bool = False, quantized: str | None = None) -> None:
        """Fold a LoRA / IA³ / BitFit adapter into the frozen weights (outputs stay the same).

        `keep_original`: keep a copy of every frozen tensor the merge changes, so that `unmerge`
        restores them bit for bit instead of subtracting (W + ΔW − ΔW is W only up to rounding, and
        not at all when ΔW overflows). It costs that copy in memory, and needs nothing else merged.

        `quantized`: how to merge into quantized Linear layers, which must be said: "dequantize"
        turns each into a float Linear (the weight it computed with) and merges there, exactly;
        "requantize" then quantizes the merged weight again, which adds rounding (measure it
        against the unmerged outputs) and cannot be unmerged exactly."""
        sites = self._mergeable_sites(name)
        quantized_sites = {s.module_name: scheme for s in sites if (scheme := scheme_of(s.frozen)) is not None}
        if quantized_sites and quantized not in ("dequantize", "requantize"):
            raise PrecisionError(
                f"adapter {name!r} would merge into {len(quantized_sites)} quantized layers "
                f"({sorted(set(quantized_sites.values()))}); say how: merge(..., quantized='dequantize') "
                "keeps the merged layers in full precision, 'requantize' quantizes them again (adds rounding)")
        if quantized_sites and keep_original:
            raise PrecisionError(f"merge {name!r}: keep_original keeps float tensors; a quantized base cannot "
                                 "take them back (reload the base to undo)")
        if name in self.state.merged:
            raise CompositionError(f"adapter {name!r} is already merged")
        if self.state.route is not None:
            raise CompositionError(f"cannot merge {name!r} inside a route() block: merged weights change every row")
        if keep_original and self.state.merged:
            raise CompositionError(f"merge {name!r} with keep_original needs no other adapter merged; "
                                   f"merged now: {sorted(self.state.merged)}")
        # a copy taken before another merge would undo that merge too: from here on, unmerge subtracts
        self._originals.clear()
        if keep_original:
            with torch.inference_mode(False), torch.no_grad():  # the copies must outlive any inference block
                self._originals[name] = [(p, p.detach().clone()) for s in sites
                                         for p in s.frozen.parameters(recurse=False)]
        for site in sites:
            if site.module_name in quantized_sites:
                dequantize_(site.frozen)
        try:
            _all_or_none(sites, lambda s: s.adapters[name].merge_into(s.frozen),
                         lambda s: s.adapters[name].unmerge_from(s.frozen))
        except Exception:
            self._originals.pop(name, None)
            raise
        if quantized == "requantize" and quantized_sites:
            for site in sites:
                if site.module_name in quantized_sites:
                    requantize_(site.frozen, quantized_sites[site.module_name])
            self._requantized.add(name)
        self.state.merged.add(name)

    def unmerge(self, name: str) -> None:
        """Take a merged adapter back out of the frozen weights (bit for bit if it was merged with
        `keep_original`)."""
        sites = self._mergeable_sites(name)
        if name not in self.state.merged:
            raise CompositionError(f"adapter {name!r} is not merged")
        if name in self._requantized:
            raise PrecisionError(f"adapter {name!r} was merged into weights that were quantized again, which "
                                 "rounded them: it cannot be taken out exactly; reload the base")
        originals = self._originals.pop(name, None)
        if originals is not None:
            with torch.no_grad():
                for param, original in originals:
                    param.copy_(original)
        else:
            _all_or_none(sites, lambda s: s.adapters[name].unmerge_from(s.frozen),
                         lambda s: s.adapters[name].merge_into(s.frozen))
        self.state.merged.discard(name)

    def merged_tensors(self, name: str) -> list[torch.Tensor]:
        """The frozen tensors that a merge of `name` changes (to check them after the merge)."""
        return [p for s in self._mergeable_sites(name) for p in s.frozen.parameters(recurse=False)]

    def _mergeable_sites(self, name: str) -> list[Site]:
        record = self.adapter(name)
        sites = [self.sites[key] for key in record.site_methods]
        blocked = [s.module_name for s in sites if not s.adapters[name].mergeable]
        if record.model_method is not None or blocked:
            raise CompositionError(
                f"adapter {name!r} ({record.config.method}) cannot be merged: only LoRA, IA³ and BitFit are "
                "linear in the frozen weights; bottleneck adapters have a nonlinearity, prompt/prefix add tokens"
            )
        for site in sites:
            if scheme_of(site.frozen) is not None:  # merge() dequantizes it first, when told to
                continue
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
        configs = {n: self.adapter(n).config for n in weights}
        config = combining.combined_config(configs, weights)
        self.add(new_name, config)
        try:
            for key, new in self.loaded[new_name].site_methods.items():
                site = self.sites[key]
                parts = [(site.adapters[n] if n in site.adapters else None, w) for n, w in weights.items()]
                combining.fill(new, parts)
        except Exception:
            self.delete(new_name)
            raise
        self.loaded[new_name].meta["combined_from"] = dict(weights)

    # --- facts -------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the base's weights live (CPU for a model with no parameters)."""
        return next(iter(self.base.parameters()), torch.empty(0)).device

    def base_parameter_count(self) -> int:
        return sum(p.numel() for p in self.base.parameters())

    def adapter_info(self, name: str) -> dict[str, Any]:
        record = self.adapter(name)
        count = record.parameter_count()
        return {
            "name": name, "method": record.config.method, "params": count,
            "percent_of_base": 100.0 * count / max(1, self.base_parameter_count()),
            "bytes": record.parameter_bytes(), "sites": len(record.site_methods),
            "head": record.head is not None, "labels": record.meta.get("labels"),
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
        """Hash of the frozen weights' names and full-precision shapes (the head left out): the same
        for the base in fp32, bf16 or quantized (precision.full_precision_shapes)."""
        digest = hashlib.sha256()
        for pname, (shape, dtype) in sorted(full_precision_shapes(self.base).items()):
            if self.head_path and (pname.startswith(self.head_path + ".")):
                continue
            digest.update(f"{pname}:{shape}:{dtype};".encode())
        return digest.hexdigest()[:16]

    # --- tensors of one adapter, as files hold them --------------------------------------------

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """`sites.<module>.<param>`, `model.<param>`, `head.<param>` and `copies.<module>.<param>` tensors."""
        return self.adapter(name).tensors()

    def site_names(self, name: str) -> dict[str, str]:
        """Module name -> side ("input"/"output") of every site the adapter is attached to."""
        return {path: method.side for path, method in self.adapter(name).methods_by_path.items()}

    @torch.no_grad()
    def load_adapter_state_dict(self, name: str | Fuse, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors into an adapter (or a fusion) after checking that every key and shape matches."""
        record = self.fusion(name) if isinstance(name, Fuse) else self.adapter(name)
        expected = record.tensors()
        why = tensor_mismatch(expected, tensors)
        if why is not None:
            raise AdapterFileError(f"adapter {name!r}: {why}")
        for key, target in expected.items():
            target.copy_(tensors[key].to(target.dtype))  # bumps the version the routing stacks check

    # --- files: the one delegate to the io layer --------------------------------------------

    def save(self, what: str | Fuse, path: str) -> None:
        """Write an adapter (by name) or a trained fusion (a Fuse) to `path` (see io/files.py)."""
        from .io.files import save

        save(self, what, path)

    def load(self, path: str, name: str | None = None) -> str | Fuse:
        """Load an adapter file (ours, PEFT's or AdapterHub's) and return its name, or a fusion
        file (once the adapters it fuses are loaded) and return its Fuse."""
        from .io.files import load

        return load(self, path, name=name)


def _all_or_none(sites: list[Site], do: Callable[[Site], None], undo: Callable[[Site], None]) -> None:
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


def _head_in(loaded: ModuleMap[Adapter], name: str) -> nn.Module | None:
    return loaded[name].head if name in loaded else None


def _fuse_or_average_nodes(setup: Setup) -> list[Fuse | Average]:
    if isinstance(setup, Fuse | Average):
        return [setup]
    if isinstance(setup, Stack):
        return [n for c in setup.children for n in _fuse_or_average_nodes(c)]
    return []


def adapt(model: nn.Module, base_name: str | None = None, head: str | None = "auto",
          adapter_dtype: torch.dtype = torch.float32) -> AdaptedModel:
    """Freeze `model` and return an AdaptedModel around it (new adapters in `adapter_dtype`)."""
    return AdaptedModel(model, base_name=base_name, head=head, adapter_dtype=adapter_dtype)


__all__ = ["AdaptedModel", "Average", "Fuse", "Stack", "adapt"]
