"""LoRA (Hu et al. 2021): a low-rank update beside a frozen weight.

    h' = f(x) + s · B(A(dropout(x))),   s = alpha / r   (rsLoRA: alpha / √r)
    merged: W' = W + s · B A

A and B use PEFT's shapes (A: [r, in, *kernel], B: [out, r, 1...]) so that files convert by
renaming keys. B starts at zero (for embeddings A does, as in PEFT), so a new adapter is the identity.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoRA
from ..errors import TargetError
from . import kernels
from .base import RouteStack, SiteMethod, SiteShape, as_rows, pad_to, site_output

#: the modules a LoRA config that names none attaches to, by model family (targets.model_family)
DEFAULT_TARGETS = {"bert": ["query", "value"], "vit": ["query", "value"], "gpt2": ["c_attn"],
                   "llama": ["q_proj", "v_proj"], "cnn": ["Conv2d", "Conv1d"], "recurrent": ["all-linear"]}

#: a frozen convolution's stride, padding and dilation, passed on to F.conv1d/2d/3d as keywords
ConvArgs = dict[str, tuple[int, ...] | str]


@dataclass
class LoRAStack(RouteStack):
    """A: [N+1, r, in(, *kernel)], B: [N+1, out, r] (scale folded in), ranks zero-padded to `rank`.
    Conv and embedding sites also keep every A concatenated (`A_all`), computed at once."""

    A: torch.Tensor
    B: torch.Tensor
    rank: int
    A_all: torch.Tensor | None = None
    conv: ConvArgs | None = None
    padding_idx: int | None = None
    #: the slots of the last batch's rows, each row's A and (s·B)ᵀ (`per_row`); a slot write drops it
    gathered: tuple[tuple[int, ...], torch.Tensor, torch.Tensor] | None = None

    def concatenated(self) -> torch.Tensor:
        """`A_all`, which `stack` sets for the conv and embedding sites that read it."""
        if self.A_all is None:
            raise TargetError("this LoRA stack was built for a linear site: it has no concatenated A")
        return self.A_all

    def conv_args(self) -> ConvArgs:
        """The frozen convolution's settings, which `stack` sets for conv sites."""
        if self.conv is None:
            raise TargetError("this LoRA stack was not built for a conv site: it has no convolution settings")
        return self.conv


class LoRAAdapter(SiteMethod[LoRAStack]):
    mergeable = True
    adds_in_place = True
    #: set on conv sites only: the frozen convolution's settings
    conv: ConvArgs
    #: set on embedding sites only: the frozen embedding's padding row and output scale
    padding_idx: int | None
    embed_scale: float

    def __init__(self, config: LoRA, shape: SiteShape, module: nn.Module) -> None:
        super().__init__(shape)
        if shape.kind not in ("linear", "hf_conv1d", "conv", "embedding"):
            raise TargetError(f"LoRA needs a Linear, Conv1d/2d, Embedding or GPT-2 Conv1D site, not a {shape.kind}")
        self.r, self.scale = config.r, config.scale
        self.dropout = nn.Dropout(config.dropout)
        if shape.kind == "conv":
            if not isinstance(module, nn.modules.conv._ConvNd):
                raise TargetError(f"a LoRA conv site needs a convolution, not a {type(module).__name__}")
            if module.groups != 1:
                raise TargetError("LoRA on a grouped convolution is not supported")
            self.conv = {"stride": module.stride, "padding": module.padding, "dilation": module.dilation}
            kernel = tuple(module.kernel_size)
            a_shape = (config.r, _input_width(shape), *kernel)
            b_shape = (shape.out_features, config.r, *([1] * len(kernel)))
        elif shape.kind == "embedding":
            if not isinstance(module, nn.Embedding):
                raise TargetError(f"a LoRA embedding site needs an Embedding, not a {type(module).__name__}")
            a_shape, b_shape = (config.r, module.num_embeddings), (shape.out_features, config.r)
            self.padding_idx = module.padding_idx
            # Scaled embeddings (Gemma's `embed_scale`) multiply their lookup inside forward, so the
            # delta must be scaled too: that keeps merge exact (the scale applies to W + ΔW) and matches PEFT.
            self.embed_scale = float(getattr(module, "embed_scale", 1.0))
        else:
            a_shape, b_shape = (config.r, _input_width(shape)), (shape.out_features, config.r)
        self.lora_A = nn.Parameter(torch.empty(a_shape))
        self.lora_B = nn.Parameter(torch.zeros(b_shape))
        if shape.kind == "embedding":
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @classmethod
    def default_targets(cls, config: LoRA, family: str) -> tuple[list, list] | None:
        targets = DEFAULT_TARGETS.get(family)
        return (list(targets), []) if targets is not None else None

    @classmethod
    def build(cls, config: LoRA, shape: SiteShape, module: nn.Module, on_input: bool = False) -> LoRAAdapter:
        return cls(config, shape, module)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.shape.kind == "embedding":
            low = F.embedding(x, self.lora_A.T, padding_idx=self.padding_idx)
            return low @ self.lora_B.T * (self.scale * self.embed_scale)
        x = self._dropout(x)
        if self.shape.kind == "conv":
            conv = _conv(self.lora_A.dim() - 2)
            return conv(conv(x, self.lora_A, **self.conv), self.lora_B) * self.scale
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x) if self.dropout.p > 0 else x

    def reference(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """h' = h + s·B(A(dropout(x))), written as the equation."""
        return h + self.delta(x)

    def forward(self, x: torch.Tensor, h: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        if self.shape.kind not in ("linear", "hf_conv1d"):
            return self.reference(x, h)
        x_2d = self._dropout(x).reshape(-1, x.shape[-1])
        return kernels.add_product(h, kernels.down_project(x_2d, self.lora_A), self.lora_B, self.scale,
                                   inplace=inplace)

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.shape.kind not in ("linear", "hf_conv1d") or (self.dropout.p > 0 and self.training):
            return None
        return self.lora_A, self.lora_B * self.scale

    def delta_weight(self) -> torch.Tensor:
        """s·BA in the layout of the frozen module's weight."""
        delta = (self.lora_B.flatten(1) @ self.lora_A.flatten(1)) * self.scale
        if self.shape.kind == "conv":
            return delta.view(self.lora_B.shape[0], *self.lora_A.shape[1:])
        if self.shape.kind in ("hf_conv1d", "embedding"):
            return delta.T
        return delta

    def check_merge(self, module: nn.Module, module_name: str) -> None:
        if module.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TargetError(f"cannot merge into quantised weights of {module_name!r}; keep it unmerged")

    @torch.no_grad()
    def merge_into(self, module: nn.Module) -> None:
        weight = _weight_of(module)
        weight += self.delta_weight().to(weight.dtype)
        module.weight = weight  # as `module.weight += ...`: a parametrized weight takes it through its setter

    @torch.no_grad()
    def unmerge_from(self, module: nn.Module) -> None:
        weight = _weight_of(module)
        weight -= self.delta_weight().to(weight.dtype)
        module.weight = weight

    @classmethod
    def combined_config(cls, configs: list[LoRA]) -> LoRA:
        """Σ w_i s_i B_i A_i = [w_1 s_1 B_1 … w_n s_n B_n] · [A_1; …; A_n]: exact, at rank Σ r_i."""
        rank = sum(c.r for c in configs)
        return dataclasses.replace(configs[0], r=rank, alpha=rank, rslora=False, dropout=0.0)

    @torch.no_grad()
    def fill_combined(self, parts: list[tuple[LoRAAdapter, float]]) -> None:
        a = torch.cat([p.lora_A for p, _ in parts])
        b = torch.cat([p.lora_B * (w * p.scale / self.scale) for p, w in parts], dim=1)
        self.lora_A.copy_(pad_to(a, self.lora_A.shape[0], 0))
        self.lora_B.copy_(pad_to(b, self.lora_B.shape[1], 1))

    def route_group(self) -> tuple:
        # Ranks route in power-of-two buckets: the stacks pad every rank to the largest in the group,
        # so without buckets one adapter of rank 384 would make every routed batch pay rank 384.
        return (self.shape.kind, rank_bucket(self.r))

    def routed_bytes(self) -> int:
        """What this adapter's slot in the routing stacks can take: its parameters padded to its bucket."""
        own = sum(p.numel() * p.element_size() for p in self.parameters())
        return own * rank_bucket(self.r) // self.r

    @classmethod
    def stack(cls, adapters: list[LoRAAdapter]) -> LoRAStack:
        """A and s·B of N adapters plus a zero slot, ranks zero-padded to the largest."""
        rank = max(a.r for a in adapters)
        a_list = [pad_to(a.lora_A, rank, 0) for a in adapters]
        b_list = [pad_to(a.lora_B * a.routed_scale(), rank, 1) for a in adapters]
        a_list.append(torch.zeros_like(a_list[0]))
        b_list.append(torch.zeros_like(b_list[0]))
        first = adapters[0]
        stacked = LoRAStack(A=torch.stack(a_list), B=torch.stack(b_list).flatten(2), rank=rank)
        if first.shape.kind in ("conv", "embedding"):
            # These sites compute every adapter's A at once and pick each row's slice afterwards:
            # a per-row gather of a conv kernel or an embedding table would copy far more.
            stacked.A_all = torch.cat(a_list)
            stacked.conv = first.conv if first.shape.kind == "conv" else None
            stacked.padding_idx = first.padding_idx if first.shape.kind == "embedding" else None
        return stacked

    def routed_scale(self) -> float:
        """The factor folded into B in the routing stacks (an embedding's own scale too)."""
        return self.scale * (self.embed_scale if self.shape.kind == "embedding" else 1.0)

    @classmethod
    def write_slot(cls, stacked: LoRAStack, slot: int, adapter: LoRAAdapter) -> bool:
        if adapter.r > stacked.rank or stacked.A_all is not None:  # A_all: every slot's A, concatenated
            return False
        stacked.A[slot].copy_(pad_to(adapter.lora_A, stacked.rank, 0))
        stacked.B[slot].copy_(pad_to(adapter.lora_B * adapter.routed_scale(), stacked.rank, 1).flatten(1))
        stacked.gathered = None
        return True

    @classmethod
    def route(cls, stacked: LoRAStack, rows: torch.Tensor, x: torch.Tensor, h: torch.Tensor | None,
              shape: SiteShape, inplace: bool = False) -> torch.Tensor:
        h = site_output(h, cls)
        rank, n_rows = stacked.rank, rows.shape[0]
        if shape.kind == "embedding":
            b_sel = b_sel_of(stacked, rows)
            low = F.embedding(x, stacked.concatenated().T, padding_idx=stacked.padding_idx)
            low = low.view(n_rows, -1, low.shape[-1] // rank, rank)
            low = low[torch.arange(n_rows, device=rows.device), :, rows]  # [rows, T, r]
            h_rows, restore = as_rows(h, shape)
            return restore(h_rows + torch.bmm(low, b_sel.transpose(1, 2)))
        if shape.kind == "conv":
            b_sel = b_sel_of(stacked, rows)
            conv = _conv(x.dim() - 2)
            low = conv(x, stacked.concatenated(), **stacked.conv_args())  # [rows, (N+1)·r, *spatial]
            low = low.view(n_rows, -1, rank, low[0, 0].numel())
            low = low[torch.arange(n_rows, device=rows.device), rows]  # [rows, r, L]
            return h + torch.bmm(b_sel, low).view(h.shape)
        z, _ = as_rows(x, shape)
        h_rows, restore = as_rows(h, shape)
        slots: list[int]
        mine: Sequence[int]
        if torch.compiler.is_compiling():  # a compiled graph cannot branch on the rows' values
            slots, mine, by_adapter = [], range(n_rows), False
        else:
            slots = rows.tolist()
            zero = stacked.A.shape[0] - 1
            mine = [i for i, s in enumerate(slots) if s != zero]
            distinct = len(set(slots))
            if distinct == 1 and mine:
                # Every row has the same adapter (one stream, or one tenant's batch): its own A and B,
                # no per-row copies of them, as a plain down- and up-projection.
                a, b = stacked.A[slots[0]], stacked.B[slots[0]]
                low = kernels.down_project(z.reshape(-1, z.shape[-1]), a).view(*z.shape[:-1], rank)
                return restore(kernels.add_product(h_rows, low, b, 1.0, inplace=inplace))
            by_adapter = rank >= 64 and distinct < len(slots)
        if len(mine) == n_rows and not by_adapter:
            a_sel, b_rows = per_row(stacked, rows, slots)
            if z.shape[1] == 1:  # one token a row (a decode step): x Aᵀ is the faster order here
                low = torch.bmm(z, a_sel.transpose(1, 2))
            else:  # (A xᵀ)ᵀ: the same numbers, about 1.5x faster for a prompt's tokens (bench/overhead.py)
                low = torch.bmm(a_sel, z.transpose(1, 2)).transpose(1, 2)
            if inplace:
                return restore(h_rows.baddbmm_(low, b_rows))
            return restore(torch.baddbmm(h_rows, low, b_rows))
        # Rows of other groups (or of the base) are left out rather than run through the zero slot,
        # so a tenant's rank-384 adapter costs nothing to the rows beside it in the batch. A large
        # rank shared by several rows runs once per adapter: gathering its A and B per row would copy
        # them row by row (bench/serve_hostile.py, rank_384_traffic).
        if not mine:
            return h
        out = h_rows if inplace else h_rows.clone()
        if by_adapter:
            groups: dict[int, list[int]] = {}
            for i in mine:
                groups.setdefault(slots[i], []).append(i)
            for slot, idx in groups.items():
                a, b = stacked.A[slot], stacked.B[slot]
                if len(idx) == n_rows:
                    out.add_(torch.matmul(torch.matmul(z, a.T), b.T))
                    continue
                sel = torch.tensor(idx, device=rows.device)
                out.index_add_(0, sel, torch.matmul(torch.matmul(z.index_select(0, sel), a.T), b.T))
            return restore(out)
        sel = torch.tensor(mine, device=rows.device)
        mine_rows = rows.index_select(0, sel)
        low = torch.bmm(stacked.A.index_select(0, mine_rows), z.index_select(0, sel).transpose(1, 2)).transpose(1, 2)
        out.index_add_(0, sel, torch.bmm(low, b_sel_of(stacked, mine_rows).transpose(1, 2)))
        return restore(out)


#: most rows x rank whose gathered A and B a stack keeps for the next forward (16 rows at rank 8 on
#: the 156M model of bench/decode_floor.py: 8 MB a layer)
KEPT_ROWS_X_RANK = 512


def per_row(stacked: LoRAStack, rows: torch.Tensor, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's A [rows, r, in] and (s·B)ᵀ [rows, r, out], contiguous (as a transposed view, B
    makes the batched up-projection about 3x slower). A decode step names the same rows as the one
    before until a row joins or leaves, so a small batch's gathered copies are kept on the stack and
    the next forward with the same slots reads them instead of gathering again: the copy is most of
    a mixed batch's LoRA cost (writing as many bytes as the product then reads)."""
    key = tuple(slots)
    kept = stacked.gathered
    if kept is not None and kept[0] == key and key:
        return kept[1], kept[2]
    a_sel, b_rows = stacked.A.index_select(0, rows), b_sel_of(stacked, rows).transpose(1, 2).contiguous()
    if key and not torch.is_grad_enabled() and len(key) * stacked.rank <= KEPT_ROWS_X_RANK:
        stacked.gathered = (key, a_sel, b_rows)
    return a_sel, b_rows


def b_sel_of(stacked: LoRAStack, rows: torch.Tensor) -> torch.Tensor:
    # index_select, not stacked.B[rows]: the same gather, several times faster on CPU
    return stacked.B.index_select(0, rows)  # [rows, out, r]


def _input_width(shape: SiteShape) -> int:
    if shape.in_features is None:
        raise TargetError(f"LoRA needs a site with a known input width, not a {shape.kind}")
    return shape.in_features


def _weight_of(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TargetError(f"LoRA merges into a weight tensor, which {type(module).__name__}.weight is not")
    return weight


def _conv(dims: int) -> Callable[..., torch.Tensor]:
    """F.conv1d/2d/3d by spatial dims (one signature; their overloads only differ in padding's type),
    looked up at each call, as nn.Conv1d does: edge/device_train.py swaps F.conv1d while it exports."""
    return {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]


def rank_bucket(r: int) -> int:
    """8 for ranks up to 8, else the next power of two."""
    return 8 if r <= 8 else 1 << (r - 1).bit_length()
