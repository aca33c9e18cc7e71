"""Prefix tuning (Li & Liang 2021): k learned key/value vectors in front of every attention layer.

    K_l' = [P_l^K ; K_l],   V_l' = [P_l^V ; V_l],   P = MLP(E) (projection) or a free table P

The prefix reaches the attention layers through the model's own cache argument (`cache`, called
`past_key_values` before transformers 5.24; a `transformers.DynamicCache`), so no model code is
copied or patched: every transformers model that writes its keys/values into that cache takes a prefix. Real tokens keep the positions they
would have without the prefix (0..T-1 on a fresh call), so the frozen position embeddings (learned,
or RoPE) see what they saw in pre-training. PEFT instead lets the model number them k..k+T-1.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import PrefixTuning
from ..errors import TargetError
from ..hf_names import cache_keyword, checkpointing_active, given_cache, with_cache
from .base import ModelMethod
from .prompt import VIRTUAL, _input_embeddings, bind_args, model_config, real_past

if TYPE_CHECKING:
    from transformers import DynamicCache


class PrefixTuningAdapter(ModelMethod):
    """Model-level method: fills the cache with the prefix before the base model runs."""

    def __init__(self, config: PrefixTuning, model: nn.Module) -> None:
        super().__init__()
        _input_embeddings(model)  # rejects models that are not transformers models first
        self.layers, self.kv_heads, self.head_dim, hidden = _attention_shape(model)
        self.num_virtual_tokens = k = config.num_virtual_tokens
        params = inspect.signature(model.forward).parameters
        if cache_keyword(model) is None:
            raise TargetError(
                f"prefix tuning passes the prefix in the model's key/value cache, which {type(model).__name__}.forward "
                "does not accept (nor forward to its backbone); use prompt tuning or LoRA"
            )
        # RoPE and learned absolute positions both want 0..T-1; RoBERTa-style embeddings count from
        # padding_idx + 1, which only the model itself knows how to do, so they keep its numbering.
        self.sets_positions = "position_ids" in params and not _offset_positions(model)
        width = self.layers * 2 * self.kv_heads * self.head_dim
        # Same layout as PEFT's PrefixEncoder (per token: layer, key/value, head, head_dim), so weights
        # can be copied across whenever PEFT's token_dim equals the hidden size.
        if config.projection:
            # Li & Liang: optimising the prefix directly is unstable; an MLP over a smaller table is not.
            self.embedding = nn.Embedding(k, hidden)
            self.transform: nn.Module | None = nn.Sequential(
                nn.Linear(hidden, config.projection_hidden), nn.Tanh(), nn.Linear(config.projection_hidden, width)
            )
        else:
            self.embedding = nn.Embedding(k, width)
            self.transform = None

    def prefix(self) -> torch.Tensor:
        """The prefix keys/values, [layers, 2, kv_heads, k, head_dim] (index 0 keys, 1 values)."""
        p = self.embedding.weight
        if self.transform is not None:
            p = self.transform(p)
        p = p.view(self.num_virtual_tokens, self.layers, 2, self.kv_heads, self.head_dim)
        return p.permute(1, 2, 3, 0, 4)

    def prepare(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        from transformers import DynamicCache

        kwargs = bind_args(model, args, kwargs)
        if torch.is_grad_enabled() and checkpointing_active(model):
            raise TargetError(
                "prefix tuning: transformers drops the key/value cache under gradient checkpointing, and with "
                "them the prefix; turn activation checkpointing off"
            )
        x = kwargs.get("input_ids")
        x = kwargs.get("inputs_embeds") if x is None else x
        if x is None:
            raise TargetError("prefix tuning needs input_ids or inputs_embeds")
        rows, length = x.shape[0], x.shape[1]
        cache = given_cache(kwargs)[1]
        if cache is None:
            cache = DynamicCache(config=model_config(model, "prefix tuning"))
        elif not isinstance(cache, DynamicCache):
            raise TargetError(f"prefix tuning extends a DynamicCache, not a {type(cache).__name__}")
        start = real_past(cache)
        if start == 0:
            # First call of a sequence (a forward, or generate's prefill). Later generation steps find
            # the prefix already in the cache that generate() carries from step to step.
            self._fill(cache, rows, _input_embeddings(model).weight.dtype)
        kwargs = with_cache(model, kwargs, cache)
        if self.sets_positions and kwargs.get("position_ids") is None:
            positions = torch.arange(start, start + length, device=x.device)
            kwargs["position_ids"] = positions.unsqueeze(0).expand(rows, -1)
        # The caller's mask covers real tokens only (generate() grows it by one per step), never the
        # prefix, so the prefix's k entries are always missing from it.
        total = cache.get_seq_length() + length
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(rows, total - self.num_virtual_tokens, dtype=torch.long, device=x.device)
        elif mask.dim() != 2:
            raise TargetError("prefix tuning needs a 2-D attention_mask [batch, tokens] (or none)")
        mask = torch.cat([mask.new_ones(rows, self.num_virtual_tokens), mask], dim=1)
        if mask.shape[1] > total:
            raise TargetError(
                f"prefix tuning: attention_mask has {mask.shape[1] - self.num_virtual_tokens} columns, more than "
                f"the {total - getattr(cache, VIRTUAL, 0)} tokens in the cache and the input; leave the prefix out of it"
            )
        kwargs["attention_mask"] = mask
        return (), kwargs

    def _fill(self, cache: DynamicCache, rows: int, dtype: torch.dtype) -> None:
        prefix = self.prefix().to(dtype)
        for layer in range(self.layers):
            keys, values = (t.unsqueeze(0).expand(rows, -1, -1, -1) for t in prefix[layer])
            cache.update(keys, values, layer)
        # Marks these entries as not being tokens: position ids and a stacked prompt adapter count past them.
        setattr(cache, VIRTUAL, getattr(cache, VIRTUAL, 0) + self.num_virtual_tokens)


def _attention_shape(model: nn.Module) -> tuple[int, int, int, int]:
    """(layers, key/value heads, head_dim, hidden size) from a transformers config, whatever its names."""
    config = model_config(model, "prefix tuning")
    if getattr(config, "is_encoder_decoder", False):
        raise TargetError(
            "prefix tuning supports decoder-only and encoder-only models; an encoder-decoder model would "
            "need separate encoder, decoder and cross-attention prefixes"
        )
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)

    def first(*names: str) -> int | None:
        values = [getattr(config, n, None) for n in names]
        return next((v for v in values if isinstance(v, int) and v > 0), None)

    layers = first("num_hidden_layers", "n_layer", "num_layers")
    heads = first("num_attention_heads", "n_head")
    hidden = first("hidden_size", "n_embd", "d_model")
    if layers is None or heads is None or hidden is None:
        raise TargetError(
            f"prefix tuning: cannot read layer count, attention heads and hidden size from {type(config).__name__}"
        )
    kv_heads = first("num_key_value_heads") or heads
    head_dim = first("head_dim") or hidden // heads
    return layers, kv_heads, head_dim, hidden


def _offset_positions(model: nn.Module) -> bool:
    return any(
        name.endswith("position_embeddings") and isinstance(m, nn.Embedding) and m.padding_idx is not None
        for name, m in model.named_modules()
    )
