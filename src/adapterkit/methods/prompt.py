"""Prompt tuning (Lester et al. 2021): k learned vectors prepended to the input embeddings.

    embeds' = [P ; E(input_ids)],   attention_mask' = [1…1 ; attention_mask]

Works on any transformers model through `inputs_embeds`. Unlike the per-site methods this is not
the identity at initialisation: any extra token the model attends to changes its outputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import PromptTuning
from ..errors import TargetError


def take(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    """A forward argument given by keyword or by position."""
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


class PromptTuningAdapter(nn.Module):
    """Model-level method: changes the call to the base model instead of one module's output."""

    def __init__(self, config: PromptTuning, model: nn.Module) -> None:
        super().__init__()
        embeddings = _input_embeddings(model)
        vocab, width = embeddings.weight.shape
        with torch.no_grad():
            if config.init_text is not None and hasattr(model, "config"):
                ids = _tokenize(model, config.init_text)
                ids = (ids * (config.num_virtual_tokens // len(ids) + 1))[: config.num_virtual_tokens]
                init = embeddings.weight[torch.tensor(ids)].clone()
            else:
                init = embeddings.weight[torch.randint(0, vocab, (config.num_virtual_tokens,))].clone()
        self.prompt = nn.Parameter(init.float())

    def prepare(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        input_ids = take(args, kwargs, "input_ids", 0)
        kwargs.pop("input_ids", None)
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            if input_ids is None:
                raise TargetError("prompt tuning needs input_ids or inputs_embeds")
            embeds = _input_embeddings(model)(input_ids)
        rows, k = embeds.shape[0], self.prompt.shape[0]
        prompt = self.prompt.to(embeds.dtype).unsqueeze(0).expand(rows, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        mask = take(args, kwargs, "attention_mask", 1)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        kwargs["attention_mask"] = torch.cat([mask.new_ones(rows, k), mask], dim=1)
        for name, fill in (("token_type_ids", 0), ("labels", -100)):
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.dim() == 2:  # per-token tensors grow with the input
                kwargs[name] = torch.cat([value.new_full((rows, k), fill), value], dim=1)
        if kwargs.get("position_ids") is not None:
            raise TargetError("prompt tuning cannot shift explicit position_ids; leave them out")
        return (), kwargs


def _input_embeddings(model: nn.Module) -> nn.Embedding:
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if get is not None else None
    if not isinstance(embeddings, nn.Embedding):
        raise TargetError(
            f"prompt and prefix tuning need a transformers model with input embeddings, not a {type(model).__name__}"
        )
    return embeddings


def _tokenize(model: nn.Module, text: str) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.config._name_or_path)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise TargetError(f"init_text {text!r} has no tokens")
    return ids
