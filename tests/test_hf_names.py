"""The cache argument under both of its names: `cache` (transformers ≥ 5.24) and `past_key_values`.

`AliasGone` is today's GPT-2 with the deprecated `past_key_values` alias removed, as transformers
5.40 will ship it: a call that still used the old name would fail here instead of being mapped.
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.hf_names import (
    CACHE_NAMES,
    cache_keyword,
    given_cache,
    last_logits_only,
    output_cache,
    with_cache,
)
from adapterkit.serve.generate import GenerationRow, generate_batch

from .test_prompt_prefix import K, _recompute, batch, hand_built_cache, make

transformers = pytest.importorskip("transformers")
NEW_NAME = "cache" in inspect.signature(transformers.GPT2LMHeadModel.forward).parameters


class AliasGone(transformers.GPT2LMHeadModel):
    @functools.wraps(transformers.GPT2LMHeadModel.forward)
    def forward(self, *args, **kwargs):
        if "past_key_values" in kwargs:
            raise TypeError("forward() got an unexpected keyword argument 'past_key_values'")
        return super().forward(*args, **kwargs)


def alias_gone() -> nn.Module:
    torch.manual_seed(0)
    model = AliasGone(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64))
    torch.manual_seed(0)
    return model.eval()


def test_keyword_is_what_the_forward_declares() -> None:
    gpt2 = make("gpt2")
    declared = [n for n in CACHE_NAMES if n in inspect.signature(gpt2.forward).parameters]
    assert cache_keyword(gpt2) == declared[0]
    # BERT's task model takes **kwargs only and hands them to its backbone.
    assert cache_keyword(make("minilm")) in CACHE_NAMES
    assert cache_keyword(nn.Linear(2, 2)) is None
    assert last_logits_only(gpt2) in ({"logits_to_keep": 1}, {"num_logits_to_keep": 1})
    assert last_logits_only(nn.Linear(2, 2)) == {}


def test_given_cache_reads_either_name_and_refuses_both() -> None:
    assert given_cache({"past_key_values": 1}) == ("past_key_values", 1)
    assert given_cache({"cache": 2, "past_key_values": None}) == ("cache", 2)
    assert given_cache({"input_ids": 3}) == (None, None)
    with pytest.raises(ak.TargetError, match="twice"):
        given_cache({"cache": 1, "past_key_values": 2})
    moved = with_cache(make("gpt2"), {"past_key_values": None, "x": 1}, "c")
    assert moved == {"x": 1, cache_keyword(make("gpt2")): "c"}
    assert output_cache({"past_key_values": 5}) == 5 and output_cache({"cache": 6}) == 6
    with pytest.raises(ak.TargetError, match="takes no key/value cache"):
        with_cache(nn.Linear(2, 2), {}, "c")


@pytest.mark.skipif(not NEW_NAME, reason="this transformers release still names the cache past_key_values")
def test_prefix_and_prompt_without_the_deprecated_alias() -> None:
    am = ak.adapt(alias_gone())
    am.add("prefix", ak.PrefixTuning(num_virtual_tokens=K))
    am.add("prompt", ak.PromptTuning(num_virtual_tokens=3))
    inputs = batch("gpt2")
    rows, length = inputs["input_ids"].shape
    with torch.no_grad():
        am.activate("prefix")
        ours = am(**inputs).logits
        mask = torch.cat([torch.ones(rows, K, dtype=torch.long), inputs["attention_mask"]], dim=1)
        am.activate(None)
        reference = am.base(input_ids=inputs["input_ids"], attention_mask=mask,
                            cache=hand_built_cache(am.adapter("prefix").model_method, am.base, rows),
                            position_ids=torch.arange(length).expand(rows, -1)).logits
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
        am.activate(ak.Stack("prompt", "prefix"))
        ids = inputs["input_ids"]
        out = am.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                          pad_token_id=0, return_dict_in_generate=True, output_logits=True)
        for got, want in zip(out.logits, _recompute(am, ids, 3), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not NEW_NAME, reason="this transformers release still names the cache past_key_values")
def test_serving_decode_loop_without_the_deprecated_alias() -> None:
    am = ak.adapt(alias_gone())
    am.add("lora", ak.LoRA(r=4, targets="all-linear"))
    with torch.no_grad():
        for p in am.adapter_parameters("lora"):
            p.normal_(0, 0.2)
    prompts = [[5, 6, 7, 8], [9, 10]]
    together = generate_batch(am, [GenerationRow(p, 5) for p in prompts], ["lora", None], pad_id=0, eos_id=None)
    for prompt, name, got in zip(prompts, ["lora", None], together, strict=True):
        alone = generate_batch(am, [GenerationRow(prompt, 5)], [name], pad_id=0, eos_id=None)[0]
        assert got.tokens == alone.tokens
