"""The base model of a server: loading it by hub id or path, telling its task, padding rows."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..pooling import read_as_trained
from ..task import Task

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def load_base(base: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """A causal LM for decoder checkpoints, a sequence classifier otherwise (its head is the
    template that adapters' own heads are copies of), in `dtype`, and the checkpoint's tokenizer."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from transformers.utils import logging

    config = AutoConfig.from_pretrained(base)
    causal = any(a.endswith(CAUSAL_SUFFIXES) for a in (config.architectures or []))
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a new classifier head is expected: adapters bring their own
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the base's own (untrained) head, if new, is the same in every process
            factory = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
            model = factory.from_pretrained(base, dtype=dtype)
    finally:
        logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if not causal:
        read_as_trained(model, tokenizer, base)  # as training read it
    return model.eval(), tokenizer


def task_of(model: nn.Module, head_path: str | None) -> Task:
    """CAUSAL_LM (generate, embed), CLASSIFY (classify, embed) or ENCODE (embed only)."""
    if type(model).__name__.endswith(CAUSAL_SUFFIXES):
        return Task.CAUSAL_LM
    return Task.CLASSIFY if head_path is not None else Task.ENCODE


def pad(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of token rows padded to one length (on the left for generation)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def length_groups(lengths: list[int], overhead: int) -> list[list[int]]:
    """Row indices split into forwards of similar length: padding every row to the longest one in
    the batch wastes compute (one long text would make every short one pay for its length), while
    each extra forward costs a fixed overhead, counted here as `overhead` padded token positions.
    The split minimising sum(rows x longest) + overhead x forwards, over length-sorted rows."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    sizes = [lengths[i] for i in order]
    best = [0] * (len(sizes) + 1)  # best[j]: cost of the first j sorted rows
    cut = [0] * (len(sizes) + 1)
    for j in range(1, len(sizes) + 1):
        # the cheapest cut, the first one on a tie
        best[j], cut[j] = min((best[i] + (j - i) * sizes[j - 1] + overhead, i) for i in range(j))
    groups, j = [], len(sizes)
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def raw_encoder(tokenizer: Any) -> Any:
    """A private copy of a fast tokenizer's Rust core, without padding or truncation: it encodes
    a text in tens of microseconds, where the Python wrapper spends most of its time in Python."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_str(backend.to_str())
    encoder.no_truncation()
    encoder.no_padding()
    return encoder
