"""What every per-site method shares: the shape of its site and the row layout used for routing."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, NamedTuple, TypeVar

import torch
from torch import nn

from ..errors import CompositionError, TargetError

if TYPE_CHECKING:
    from typing_extensions import Self

def hf_conv1d() -> tuple[type[nn.Module], ...]:
    """GPT-2's transposed linear (transformers' Conv1D, weight stored [in, out]) as a tuple for
    isinstance; empty until transformers.pytorch_utils has been imported, since no module can be a
    Conv1D before its class exists, and importing transformers here costs every process a second."""
    module = sys.modules.get("transformers.pytorch_utils")
    return (module.Conv1D,) if module is not None else ()


def conv1d_dims(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a GPT-2 Conv1D, whose weight is stored [in, out]."""
    weight = module.get_parameter("weight")
    return int(weight.shape[0]), int(weight.shape[1])


#: module-name patterns of common model families that several methods' default targets use
BERT_FFN_OUT = r"re:(^|\.)layer\.\d+\.output\.dense$"
BERT_ATTN_OUT = r"re:attention\.output\.dense$"
#: the FFN's output projection (or, for parallel adapters, the FFN block) by family
FFN_OUT = {"bert": BERT_FFN_OUT, "vit": BERT_FFN_OUT, "gpt2": "mlp.c_proj", "llama": "mlp.down_proj"}
FFN_BLOCK = {"bert": BERT_FFN_OUT, "vit": BERT_FFN_OUT, "gpt2": "re:\\.mlp$", "llama": "re:\\.mlp$"}
ATTN_OUT = {"bert": BERT_ATTN_OUT, "vit": BERT_ATTN_OUT, "gpt2": "attn.c_proj", "llama": "self_attn.o_proj"}
CNN_BLOCK = "re:^layer\\d+\\.\\d+$"


@dataclass(frozen=True)
class SiteShape:
    """How a frozen module's input and output are laid out.

    `kind` is one of linear, hf_conv1d (weight stored [in, out]), conv, embedding, recurrent, other.
    Features sit at `feature_dim` of the output (1 for convolutions, -1 otherwise); rows of the
    batch at `batch_dim` (1 only for recurrent layers without batch_first).
    """

    kind: str
    in_features: int | None
    out_features: int
    feature_dim: int = -1
    batch_dim: int = 0

    @staticmethod
    def of(module: nn.Module, name: str) -> SiteShape:
        if isinstance(module, nn.Linear):
            return SiteShape("linear", module.in_features, module.out_features)
        if isinstance(module, hf_conv1d()):
            return SiteShape("hf_conv1d", *conv1d_dims(module))
        if isinstance(module, nn.modules.conv._ConvNd):
            return SiteShape("conv", module.in_channels, module.out_channels, feature_dim=1)
        if isinstance(module, nn.Embedding):
            return SiteShape("embedding", None, module.embedding_dim)
        if isinstance(module, nn.RNNBase):
            hidden = module.proj_size or module.hidden_size
            out = hidden * (2 if module.bidirectional else 1)
            return SiteShape("recurrent", module.input_size, out, batch_dim=0 if module.batch_first else 1)
        width = _output_width(module)
        if width is None:
            raise TargetError(
                f"module {name!r} ({type(module).__name__}): cannot tell its output width; "
                "target a Linear/Conv/Embedding/LSTM/GRU module or a block ending in one"
            )
        # features at dim 1: convolutions, and every BatchNorm (also BatchNorm1d on [B, C] or [B, C, T])
        conv_like = any(isinstance(m, nn.modules.conv._ConvNd | nn.modules.batchnorm._BatchNorm) for m in module.modules())
        return SiteShape("other", _input_width(module), width, feature_dim=1 if conv_like else -1)


def _input_width(module: nn.Module) -> int | None:
    """The feature width a composite block reads, from its first sized submodule."""
    for sub in module.modules():
        if isinstance(sub, hf_conv1d()):  # GPT-2's Conv1D stores W as [in, out]
            return conv1d_dims(sub)[0]
        for attr in ("in_features", "in_channels", "input_size"):
            value = getattr(sub, attr, None)
            if isinstance(value, int):
                return value
    return None


def _output_width(module: nn.Module) -> int | None:
    """The feature width of a composite block, read off its last sized submodule."""
    for sub in reversed(list(module.modules())):
        if isinstance(sub, hf_conv1d()):
            return conv1d_dims(sub)[1]
        for attr in ("out_features", "out_channels", "num_features", "embedding_dim", "hidden_size"):
            value = getattr(sub, attr, None)
            if isinstance(value, int):
                return value
        shape = getattr(sub, "normalized_shape", None)
        if shape:
            return int(shape[-1])
    return None


def as_rows(t: torch.Tensor, shape: SiteShape) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """View `t` as [rows, positions, features] and return the function that undoes it."""
    moved = t.movedim(1, -1) if shape.feature_dim == 1 else t
    if shape.batch_dim != 0:
        moved = moved.movedim(shape.batch_dim, 0)
    rows = moved.reshape(moved.shape[0], -1, moved.shape[-1])

    def restore(r: torch.Tensor) -> torch.Tensor:
        out = r.reshape(moved.shape)
        if shape.batch_dim != 0:
            out = out.movedim(0, shape.batch_dim)
        return out.movedim(-1, 1) if shape.feature_dim == 1 else out

    return rows, restore


def features_last(t: torch.Tensor, shape: SiteShape) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Move the feature dim last (a no-op for Linear outputs) and return the inverse."""
    if shape.feature_dim in (-1, t.dim() - 1):
        return t, lambda r: r
    return t.movedim(shape.feature_dim, -1), lambda r: r.movedim(-1, shape.feature_dim)


def positional_parameters(module: nn.Module) -> tuple[tuple[str, ...], bool]:
    """The names of the positional parameters of `module.forward`, and whether it takes *args."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature: assume anything goes
        return (), True
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return (tuple(p.name for p in params if p.kind in kinds),
            any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params))


def union_targets(target_lists: list) -> list | None:
    """The targets of a combined adapter: every target of the parts, in order, once."""
    if any(t is None for t in target_lists):
        if all(t is None for t in target_lists):
            return None
        raise CompositionError("combine needs all adapters to use default targets or all to name their targets")
    seen: list = []
    for targets in target_lists:
        for t in [targets] if isinstance(targets, str) else targets:
            if t not in seen:
                seen.append(t)
    return seen


def pad_to(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Zero-pad `t` along `dim` to `size`; zero rank/bottleneck rows change nothing."""
    missing = size - t.shape[dim]
    if missing == 0:
        return t
    pad_shape = list(t.shape)
    pad_shape[dim] = missing
    return torch.cat([t, t.new_zeros(pad_shape)], dim=dim)


def broadcast_rows(vector: torch.Tensor, h: torch.Tensor, shape: SiteShape) -> torch.Tensor:
    """Shape a per-row vector [rows, features] so it broadcasts against the site output `h`."""
    view = [1] * h.dim()
    view[shape.batch_dim % h.dim()] = vector.shape[0]
    view[shape.feature_dim % h.dim()] = vector.shape[1]
    return vector.reshape(view)


def broadcast_features(vector: torch.Tensor, h: torch.Tensor, shape: SiteShape) -> torch.Tensor:
    """Shape a [features] vector so it broadcasts against `h` at its feature dim."""
    view = [1] * h.dim()
    view[shape.feature_dim % h.dim()] = vector.shape[0]
    return vector.reshape(view)


def sum_of(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ terms, added in order as Python's `sum` adds them: the weighted parts of a combination
    (`fill_combined`), of which a site has at least one."""
    total = sum(terms)
    if not isinstance(total, torch.Tensor):
        raise CompositionError("combine: no adapter at this site to combine")
    return total


def site_output(h: torch.Tensor | None, method: type[SiteMethod]) -> torch.Tensor:
    """`h` for a method that acts on the site's output; only input-side methods are called without one."""
    if h is None:
        raise CompositionError(f"{method.__name__} acts on a module's output and was called without one")
    return h


@dataclass
class RouteStack:
    """What `SiteMethod.stack` returns: the adapters of one routing group at a site as batched
    tensors, slot i holding adapter i and the last slot the zero adapter (rows without one). Each
    method subclasses it with the fields its `route` reads."""


#: the RouteStack subclass of one method: what its `stack` returns and its `route` and `write_slot` read
StackT = TypeVar("StackT", bound=RouteStack)


class RouteKey(NamedTuple):
    """Which adapters of a site route together: one method class, equal `route_group()` values,
    and for input-side methods the argument they read (None: the output side)."""

    method: type[SiteMethod]
    group: tuple
    input_arg: int | None = None


class ModelMethod(nn.Module):
    """A method that acts on the whole model's call (prompt, prefix tuning), built once per model as
    `cls(config, model)`; before each call of the base it rewrites the call's arguments."""

    def prepare(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The call's (args, kwargs) with this method's part added (virtual tokens, a key/value prefix)."""
        raise NotImplementedError(f"{type(self).__name__} must define prepare(model, args, kwargs)")


class SiteMethod(nn.Module, Generic[StackT]):
    """One adapter's delta at one site.

    `side` says which hook applies it: "output" methods map (x, h) -> h', "input" methods map
    x -> x' before the frozen module runs, where x is the module's positional argument number
    `input_arg` (0: the first, or the first tensor keyword argument when none is positional; a
    later one is read by name when passed by keyword). Routing is a classmethod pair: `stack` turns the
    adapters present at a site into batched tensors once, `route` applies them per row.

    A method owns all of its own behaviour: `build` (from its config), `merge_into`/`unmerge_from`
    (with `check_merge` first), `combined_config`/`fill_combined` (weighted combination) and
    `stack`/`route`. Nothing outside its file asks which method it is; `methods.register` adds a
    new one, also from outside the package.

    It is generic in its routing record: `class MyAdapter(SiteMethod[MyStack])` makes `stack` return
    a MyStack and `route` and `write_slot` take one; their adapters are of the subclass itself.
    """

    #: "output": maps (x, h) -> h' after the frozen module; "input": maps x -> x' before it (an
    #: instance may set its own)
    side: str = "output"
    #: which positional argument an input-side method reads (an instance may set its own)
    input_arg: int = 0
    #: linear in the frozen weights: `merge_into`/`unmerge_from` fold the delta in and out
    mergeable: ClassVar[bool] = False
    #: `forward` and `route` may add into an output only the site holds (`inplace=True`)
    adds_in_place: ClassVar[bool] = False
    #: it can attach to a quantized Linear (precision.py) and train there: its delta reads the frozen
    #: module's input and output, never its weight (merging dequantizes first, in the model)
    on_quantized: ClassVar[bool] = True

    def __init__(self, shape: SiteShape) -> None:
        super().__init__()
        self.shape = shape

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Raise AdapterConfigError for settings this implementation cannot run (beyond what the
        config's own `validate` knows); called whenever a config is read or an adapter added."""

    @classmethod
    def default_targets(cls, config: Any, family: str) -> tuple[list, list] | None:
        """(targets, input-side targets) on a model of `family` (targets.model_family) when the
        config names none; None: no defaults there."""
        return None

    @classmethod
    def build(cls, config: Any, shape: SiteShape, module: nn.Module, on_input: bool = False) -> SiteMethod:
        """The method's module for one site. `on_input`: the site matched an input-side target."""
        return cls(shape)

    def check_merge(self, module: nn.Module, module_name: str) -> None:
        """Raise TargetError (naming `module_name`) if this adapter cannot merge into `module`;
        called for every site before any weight changes."""
        if not self.mergeable:
            raise TargetError(f"{type(self).__name__} cannot be merged into the frozen weights")

    @classmethod
    def combined_config(cls, configs: list[Any]) -> Any:
        """The config of an adapter that holds Σ w_i · delta_i of adapters with these configs."""
        raise TargetError(f"{cls.__name__} adapters cannot be combined")

    @torch.no_grad()
    def fill_combined(self, parts: list[tuple[Self, float]]) -> None:
        """Set this (new, combined) adapter's parameters from (adapter, weight) pairs at its site."""
        raise TargetError(f"{type(self).__name__} adapters cannot be combined")

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """The site's output with this adapter applied (input-side methods: `forward(x)` -> x')."""
        raise NotImplementedError

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This adapter as h' = h + x Aᵀ Bᵀ at a features-last site (A [r, in], B [out, r], every
        scale folded into B), which a captured decode step adds from fixed buffers
        (serve/captured.py); None: it has no such form, and a step that uses it runs eagerly."""
        return None

    def routed_bytes(self) -> int:
        """Bytes this adapter's slot takes in the routing stacks (padding included)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def reference(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The method's equation, written plainly. A method whose `forward` uses a fast kernel
        (methods/kernels.py) overrides this; tests/test_kernels.py checks the two agree."""
        return self.forward(x, h)

    def merge_into(self, module: nn.Module) -> None:
        raise NotImplementedError

    def unmerge_from(self, module: nn.Module) -> None:
        raise NotImplementedError

    def route_group(self) -> tuple:
        """Adapters of one class route together only when these values agree."""
        return ()

    @classmethod
    def stack(cls, adapters: list[Self]) -> StackT:
        """The adapters of one routing group (all `route_group()`-equal) as one RouteStack."""
        raise TargetError(f"{cls.__name__} adapters cannot be routed per row")

    @classmethod
    def write_slot(cls, stacked: StackT, slot: int, adapter: Self) -> bool:
        """Write `adapter` over slot `slot` of a `stack` result in place (slots.py: a server's install
        changes one slot, not all); False when the stack cannot hold it and must be rebuilt."""
        return False

    @classmethod
    def route(
        cls, stacked: StackT, rows: torch.Tensor, x: torch.Tensor, h: torch.Tensor | None,
        shape: SiteShape, inplace: bool = False,
    ) -> torch.Tensor:
        """Row i of the batch with the adapter of slot rows[i]: the new h (input side: the new x, and
        h is None; `site_output` narrows h for output-side methods).
        `inplace`: h is a fresh output only the site holds (asked only of `adds_in_place` methods)."""
        raise TargetError(f"{cls.__name__} adapters cannot be routed per row")
