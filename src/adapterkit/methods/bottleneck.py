"""Bottleneck adapter (Houlsby et al. 2019; Pfeiffer et al. 2020; parallel: He et al. 2022).

    serial:    h' = h + s · up(act(down(h)))
    parallel:  h' = f(x) + s · up(act(down(x)))
    renorm:    h' = LN(x + s · up(act(down(h)))),  h = LN(x)   (serial, on a LayerNorm site)
    input k:   u' = u + s · up(act(down(u))), u = argument k of f, before f runs   (input_arg=k)

renorm puts the delta inside a post-norm block's residual sum: the site is the block's LayerNorm,
x the sum it normalises (sublayer output + residual), and the frozen norm runs again on x + delta.
That is AdapterHub's `original_ln_before` placement (Pfeiffer et al. 2020).

input k acts before the module runs, on its k-th positional argument (0: of the module's input width,
later ones: of its output width). On a BERT-style block f(x, r) = LN(dropout(dense(x)) + r), k = 1 gives
LN(d + r + s·up(act(down(r)))), AdapterHub's parallel adapter (par_bn).

`up` starts at zero, so a new adapter is the identity. On convolutional sites the bottleneck
works over channels: a Linear over the channel dim is exactly a 1×1 convolution.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Bottleneck
from ..errors import AdapterConfigError, CompositionError, TargetError
from . import kernels
from .base import (
    ATTN_OUT,
    CNN_BLOCK,
    FFN_BLOCK,
    FFN_OUT,
    RouteStack,
    SiteMethod,
    SiteShape,
    as_rows,
    features_last,
    pad_to,
    positional_parameters,
    site_output,
    sum_of,
)

ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh,
}


@dataclass
class BottleneckStack(RouteStack):
    """down: [N+1, b, in], up: [N+1, out, b] (scaling folded in), biases as [N+1, 1, *]; sizes
    zero-padded to the largest. `norm`: the site's frozen LayerNorm when renorm, else None."""

    down: torch.Tensor
    down_b: torch.Tensor
    up: torch.Tensor
    up_b: torch.Tensor
    parallel: bool
    on_input: bool
    activation: str
    norm: nn.LayerNorm | None


class BottleneckAdapter(SiteMethod[BottleneckStack]):
    #: forward accepts inplace=True: the site lets it add into an output it owns
    adds_in_place = True
    #: the site's frozen LayerNorm when renorm, else None (set with object.__setattr__: not a submodule)
    norm: nn.LayerNorm | None

    def __init__(self, config: Bottleneck, shape: SiteShape, module: nn.Module | None = None) -> None:
        super().__init__(shape)
        self.parallel = config.is_parallel
        self.renorm = config.renorm
        if self.renorm and not isinstance(module, nn.LayerNorm):
            raise TargetError(
                f"a renorm bottleneck adds its delta before a LayerNorm and runs the norm again, so its site must be "
                f"an nn.LayerNorm, not a {type(module).__name__}"
            )
        # The frozen norm, read (never owned) for renorm: a plain attribute keeps it out of state_dict.
        object.__setattr__(self, "norm", module if self.renorm else None)
        if config.input_arg is not None:
            self.side, self.input_arg = "input", config.input_arg
            _check_argument(module, config.input_arg)
            width = shape.in_features if config.input_arg == 0 else shape.out_features
            if width is None:
                raise TargetError(f"a bottleneck on input 0 needs a site with a known input width, not a {shape.kind}")
            reads = writes = width
        else:
            source = shape.in_features if self.parallel else shape.out_features
            if source is None:
                raise TargetError(f"a parallel bottleneck needs a site with a known input width, not a {shape.kind}")
            reads, writes = source, shape.out_features
        size = config.size_for(writes)
        self.down = nn.Linear(reads, size)
        self.up = nn.Linear(size, writes)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.activation = config.activation
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout)

    @classmethod
    def default_targets(cls, config: Bottleneck, family: str) -> tuple[list, list] | None:
        """Pfeiffer: after the FFN output; Houlsby: after the attention output and the FFN output;
        parallel: beside the FFN block; conv nets: each residual block; recurrent nets: each LSTM/GRU."""
        if config.placement == "custom":
            return None
        if family in ("cnn", "recurrent"):
            return ([CNN_BLOCK] if family == "cnn" else ["LSTM", "GRU"]), []
        if family not in FFN_OUT:
            return None
        targets = {"pfeiffer": [FFN_OUT[family]], "houlsby": [ATTN_OUT[family], FFN_OUT[family]],
                   "parallel": [FFN_BLOCK[family]]}[config.placement]
        return targets, []

    @classmethod
    def check_config(cls, config: Bottleneck) -> None:
        if config.activation not in ACTIVATION_FUNCTIONS:
            raise AdapterConfigError(
                f"Bottleneck activation {config.activation!r} is unknown; use one of {sorted(ACTIVATION_FUNCTIONS)}"
            )

    @classmethod
    def build(cls, config: Bottleneck, shape: SiteShape, module: nn.Module,
              on_input: bool = False) -> BottleneckAdapter:
        return cls(config, shape, module)

    def delta(self, z: torch.Tensor) -> torch.Tensor:
        return self.scaling * self.up(self.dropout(ACTIVATION_FUNCTIONS[self.activation](self.down(z))))

    def _source(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """What the bottleneck reads, features last: h (serial) or x on h's grid (parallel)."""
        if self.parallel and self.shape.kind == "embedding":
            raise TargetError("a parallel bottleneck cannot read token ids; use a serial placement")
        return features_last(_on_output_grid(x, h, self.shape) if self.parallel else h, self.shape)[0]

    def reference(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """h' = h + s·up(act(down(z))), z = h (serial) or x (parallel); renorm: h' = LN(x + s·up(act(down(h))));
        on an input (x: the argument it reads; h unused): x' = x + s·up(act(down(x)))."""
        if self.side == "input":
            h = x
        else:
            h = site_output(h, type(self))
        if self.norm is not None:  # renorm
            return _renormed(self.norm, x, self.delta(h))
        h_last, restore = features_last(h, self.shape)
        return restore(h_last + self.delta(self._source(x, h)))

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
        if self.side == "input":  # the serial form on the argument; never in place: the caller holds it
            h, inplace = x, False
        else:
            h = site_output(h, type(self))
        if self.renorm:
            return self.reference(x, h)
        hidden = self.dropout(ACTIVATION_FUNCTIONS[self.activation](self.down(self._source(x, h))))
        h_last, restore = features_last(h, self.shape)
        return restore(kernels.add_product(h_last, hidden, self.up.weight, self.scaling, self.up.bias,
                                           inplace=inplace))

    def merge_into(self, module: nn.Module) -> None:
        raise NotImplementedError(
            "a bottleneck adapter has a nonlinearity between down and up, so it cannot be folded into "
            "the frozen weights; keep it unmerged (LoRA, IA³ and BitFit can merge)"
        )

    unmerge_from = merge_into

    @classmethod
    def combined_config(cls, configs: list[Bottleneck]) -> Bottleneck:
        """θ = Σ w_i θ_i: parameter averaging, an approximation (as in AdapterHub)."""
        shapes = {(c.bottleneck_size, c.reduction, c.is_parallel, c.activation, c.placement, c.renorm, c.input_arg)
                  for c in configs}
        if len(shapes) != 1:
            raise CompositionError("combining bottleneck adapters needs equal size, placement, renorm, input_arg "
                                   "and activation")
        return dataclasses.replace(configs[0], scaling=1.0)

    @torch.no_grad()
    def fill_combined(self, parts: list[tuple[BottleneckAdapter, float]]) -> None:
        for pname, param in self.named_parameters():
            param.copy_(sum_of(w * dict(p.named_parameters())[pname] * (p.scaling if "up." in pname else 1)
                               for p, w in parts))

    def route_group(self) -> tuple:
        return (self.parallel, self.activation, self.renorm, self.side)

    @classmethod
    def stack(cls, adapters: list[BottleneckAdapter]) -> BottleneckStack:
        """Stack N adapters (plus a zero slot for rows without one), padding bottleneck sizes."""
        size = max(a.down.out_features for a in adapters)
        first = adapters[0]
        down = [pad_to(a.down.weight, size, 0) for a in adapters]
        down_b = [pad_to(a.down.bias, size, 0) for a in adapters]
        up = [pad_to(a.up.weight * a.scaling, size, 1) for a in adapters]
        up_b = [a.up.bias * a.scaling for a in adapters]
        zeros = lambda t: torch.zeros_like(t[0])  # noqa: E731
        return BottleneckStack(
            down=torch.stack(down + [zeros(down)]), down_b=torch.stack(down_b + [zeros(down_b)]).unsqueeze(1),
            up=torch.stack(up + [zeros(up)]), up_b=torch.stack(up_b + [zeros(up_b)]).unsqueeze(1),
            parallel=first.parallel, on_input=first.side == "input", activation=first.activation, norm=first.norm,
        )

    @classmethod
    def write_slot(cls, stacked: BottleneckStack, slot: int, adapter: BottleneckAdapter) -> bool:
        size = stacked.down.shape[1]
        if adapter.down.out_features > size:
            return False
        stacked.down[slot].copy_(pad_to(adapter.down.weight, size, 0))
        stacked.down_b[slot, 0].copy_(pad_to(adapter.down.bias, size, 0))
        stacked.up[slot].copy_(pad_to(adapter.up.weight * adapter.scaling, size, 1))
        stacked.up_b[slot, 0].copy_(adapter.up.bias * adapter.scaling)
        return True

    @classmethod
    def route(cls, stacked: BottleneckStack, rows: torch.Tensor, x: torch.Tensor, h: torch.Tensor | None,
              shape: SiteShape, inplace: bool = False) -> torch.Tensor:
        if stacked.on_input:  # the serial form on the argument x, which the caller holds
            h, inplace = x, False
        else:
            h = site_output(h, cls)
        source = _on_output_grid(x, h, shape) if stacked.parallel else h
        z, _ = as_rows(source, shape)
        h_rows, restore = as_rows(h, shape)
        act = ACTIVATION_FUNCTIONS[stacked.activation]
        pick = lambda name: getattr(stacked, name).index_select(0, rows)  # noqa: E731
        hidden = act(torch.baddbmm(pick("down_b"), z, pick("down").transpose(1, 2)))
        if stacked.norm is not None:  # renorm: a zero slot gives LN(x) = h back
            x_rows, _ = as_rows(x, shape)
            return restore(_renormed(stacked.norm, x_rows, torch.baddbmm(pick("up_b"), hidden,
                                                                            pick("up").transpose(1, 2))))
        if not h_rows.is_contiguous():  # keep h's memory layout, as forward does
            return restore(h_rows + torch.baddbmm(pick("up_b"), hidden, pick("up").transpose(1, 2)))
        if inplace:
            out = h_rows.baddbmm_(hidden, pick("up").transpose(1, 2))
        else:
            out = torch.baddbmm(h_rows, hidden, pick("up").transpose(1, 2))
        return restore(out.add_(pick("up_b")))


def _check_argument(module: nn.Module | None, index: int) -> None:
    """The site's forward must take a positional argument number `index`."""
    if module is None:
        return
    names, var_args = positional_parameters(module)
    if index >= len(names) and not var_args:
        raise TargetError(f"input_arg={index}: {type(module).__name__}.forward takes {len(names)} positional "
                          f"argument(s) {list(names)}")


def _renormed(norm: nn.LayerNorm, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """LN(x + delta) with the frozen norm's parameters, called functionally so that its hooks
    (the site's own among them) do not run again."""
    return F.layer_norm(x + delta, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _on_output_grid(x: torch.Tensor, h: torch.Tensor, shape: SiteShape) -> torch.Tensor:
    """A parallel adapter beside a strided conv block reads its input on the output's grid,
    as a strided 1×1 convolution (ResNet's projection shortcut) does."""
    if shape.feature_dim != 1 or x.shape[2:] == h.shape[2:]:
        return x
    if x.dim() == h.dim():
        steps = [max(1, round(a / b)) for a, b in zip(x.shape[2:], h.shape[2:], strict=True)]
        index = (slice(None), slice(None), *(slice(None, None, s) for s in steps))
        x = x[index]
    if x.shape[2:] != h.shape[2:]:
        raise TargetError(
            f"a parallel bottleneck cannot map the input grid {tuple(x.shape[2:])} onto the output grid "
            f"{tuple(h.shape[2:])}; use a serial placement here"
        )
    return x
