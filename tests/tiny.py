"""Tiny causal LMs saved like hub models, with word-level tokenizers: nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch


def word_tokenizer(words: list[str]):
    """A fast tokenizer over `words` (split on whitespace), with <unk> = 0 and <eos> = 1 (also the pad)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *dict.fromkeys(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def tiny_llama(folder: Path, words: list[str], hidden: int = 64, intermediate: int = 128, layers: int = 2) -> Path:
    """A Llama-like decoder with random weights (seed 0) and a tokenizer over `words`; widths should be
    multiples of 64, the block of bitsandbytes' 4-bit quantization."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer(words)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, eos_token_id=1, bos_token_id=1, pad_token_id=1,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
