"""Prompt tuning (Lester et al. 2021): k learned vectors prepended to the input embeddings.

    embeds' = [P ; E(input_ids)],   attention_mask' = [1…1 ; attention_mask]

Works on any transformers model through `inputs_embeds`. Unlike the per-site methods this is not
the identity at initialisation: any extra token the model attends to changes its outputs.
Under generate() the prompt goes in at the first step only; later steps find it in the cache.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import PromptTuning
from ..errors import TargetError
from ..hf_names import given_cache
from .base import ModelMethod

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

#: attribute set on a transformers cache: how many of its entries are prefix-tuning keys/values, not tokens
VIRTUAL = "adapterkit_virtual_entries"


def bind_args(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Positional forward arguments as keywords, so that a method can edit them by name.

    GPT-2 takes its cache second and BERT `attention_mask`, so positions mean nothing alone.
    """
    if not args:
        return dict(kwargs)
    names = [
        n for n, p in inspect.signature(model.forward).parameters.items()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(args) > len(names):
        raise TargetError(f"{type(model).__name__}.forward takes {len(names)} positional arguments, got {len(args)}")
    return {**dict(zip(names, args, strict=False)), **kwargs}


def real_past(cache: Any) -> int:
    """Tokens already in a transformers cache, prefix entries left out: 0 on the first call of a sequence."""
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return cache.get_seq_length() - getattr(cache, VIRTUAL, 0)


class PromptTuningAdapter(ModelMethod):
    """Model-level method: changes the call to the base model instead of one module's output."""

    def __init__(self, config: PromptTuning, model: nn.Module) -> None:
        super().__init__()
        embeddings = _input_embeddings(model)
        vocab, width = embeddings.weight.shape
        with torch.no_grad():
            if config.init_text is not None and hasattr(model, "config"):
                ids = _tokenize(model_config(model, "prompt tuning"), config.init_text)
                ids = (ids * (config.num_virtual_tokens // len(ids) + 1))[: config.num_virtual_tokens]
                init = embeddings.weight[torch.tensor(ids)].clone()
            else:
                init = embeddings.weight[torch.randint(0, vocab, (config.num_virtual_tokens,))].clone()
        self.prompt = nn.Parameter(init.float())

    def prepare(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = bind_args(model, args, kwargs)
        k = self.prompt.shape[0]
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if real_past(given_cache(kwargs)[1]) > 0:
            # A later generation step: the prompt already sits in the cache, but the caller's mask and
            # position ids count only real tokens.
            if mask is not None:
                kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], k), mask], dim=1)
            if positions is not None:
                kwargs["position_ids"] = positions + k
            return (), kwargs
        input_ids = kwargs.pop("input_ids", None)
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            if input_ids is None:
                raise TargetError("prompt tuning needs input_ids or inputs_embeds")
            embeds = _input_embeddings(model)(input_ids)
        rows = embeds.shape[0]
        prompt = self.prompt.to(embeds.dtype).unsqueeze(0).expand(rows, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        kwargs["attention_mask"] = torch.cat([mask.new_ones(rows, k), mask], dim=1)
        for name, fill in (("token_type_ids", 0), ("labels", -100)):
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.dim() == 2:  # per-token tensors grow with the input
                kwargs[name] = torch.cat([value.new_full((rows, k), fill), value], dim=1)
        if positions is not None:  # e.g. from generate(): the prompt takes the first positions
            front = torch.arange(k, device=positions.device, dtype=positions.dtype).expand(positions.shape[0], -1)
            kwargs["position_ids"] = torch.cat([front, positions + k], dim=-1)
        return (), kwargs


def _input_embeddings(model: nn.Module) -> nn.Embedding:
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if get is not None else None
    if not isinstance(embeddings, nn.Embedding):
        raise TargetError(
            f"prompt and prefix tuning need a transformers model with input embeddings, not a {type(model).__name__}"
        )
    return embeddings


def model_config(model: nn.Module, method: str) -> PreTrainedConfig:
    """A transformers model's config."""
    config = getattr(model, "config", None)
    if config is None:
        raise TargetError(f"{method} needs a transformers model with a config, not a {type(model).__name__}")
    return config


def _tokenize(config: PreTrainedConfig, text: str) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config._name_or_path)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise TargetError(f"init_text {text!r} has no tokens")
    return ids
