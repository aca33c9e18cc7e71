"""Merging LoRA / IA³ / BitFit into the frozen weights and taking them back out."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import adapterkit as ak

from .conftest import make_cnn, make_gpt2, make_llama, randomize


class One(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.m = module

    def forward(self, x):
        return self.m(x)


def _module(kind):
    torch.manual_seed(0)
    module, x = {
        "linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(3, 4, 6)),
        "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1, stride=2), lambda: torch.randn(2, 4, 9)),
        "conv2d": (lambda: nn.Conv2d(3, 6, 3, padding=1, dilation=2), lambda: torch.randn(2, 3, 8, 8)),
        "embedding": (lambda: nn.Embedding(20, 6, padding_idx=0), lambda: torch.randint(0, 20, (3, 5))),
        "gpt2_conv1d": (lambda: Conv1D(5, 6), lambda: torch.randn(3, 4, 6)),
    }[kind]
    m = module()
    with torch.no_grad():
        if getattr(m, "bias", None) is not None:
            m.bias.normal_()  # GPT-2's Conv1D starts with zero biases; IA³ must scale them
    return One(m).eval(), x()


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_weights(model, saved, exact=False):
    for k, v in model.state_dict().items():
        if exact:
            assert torch.equal(v, saved[k]), k
        else:
            torch.testing.assert_close(v, saved[k], rtol=1e-5, atol=1e-6, msg=k)


def check_merge_round_trip(am, name, x, call=lambda m, x: m(x)):
    model = am.base
    saved = _weights(model)
    with torch.no_grad():
        am.activate(None)
        base = call(model, x)
        am.activate(name)
        unmerged = call(model, x)
        assert not torch.allclose(unmerged, base, atol=1e-5), "the adapter must change the output"
        am.merge(name)
        assert am.adapter_info(name)["merged"]
        assert any(not torch.equal(v, saved[k]) for k, v in model.state_dict().items())
        merged = call(model, x)  # active and merged: applied once, through the weights
        torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
        am.activate(None)  # merged weights answer for the base model too
        torch.testing.assert_close(call(model, x), unmerged, rtol=1e-4, atol=1e-5)
        am.unmerge(name)
        _assert_same_weights(model, saved)
        torch.testing.assert_close(call(model, x), base, rtol=1e-5, atol=1e-5)
        am.activate(name)
        torch.testing.assert_close(call(model, x), unmerged, rtol=1e-5, atol=1e-5)


CASES = [
    ("lora", "linear"), ("lora", "conv1d"), ("lora", "conv2d"), ("lora", "embedding"), ("lora", "gpt2_conv1d"),
    ("ia3", "linear"), ("ia3", "conv1d"), ("ia3", "conv2d"), ("ia3", "gpt2_conv1d"),
    ("ia3_in", "linear"), ("ia3_in", "conv2d"), ("ia3_in", "gpt2_conv1d"),
    ("bitfit", "linear"), ("bitfit", "conv2d"), ("bitfit", "gpt2_conv1d"),
]


@pytest.mark.parametrize(("method", "kind"), CASES)
def test_merge_unmerge_on_module_kinds(method, kind):
    model, x = _module(kind)
    am = ak.adapt(model, head=None)
    cfg = {
        "lora": ak.LoRA(r=3, alpha=5, rslora=True, targets=["m"]),
        "ia3": ak.IA3(targets=["m"]),
        "ia3_in": ak.IA3(targets=[], input_targets=["m"]),
        "bitfit": ak.BitFit(targets=["m"]),
    }[method]
    am.add("a", cfg)
    randomize(am, "a", scale=0.3)
    check_merge_round_trip(am, "a", x)


def _logits(m, x):
    return m(x).logits


@pytest.mark.parametrize("method", ["lora", "ia3", "bitfit", "lora_all"])
def test_merge_on_gpt2(method):
    am = ak.adapt(make_gpt2())
    cfg = {"lora": ak.LoRA(r=2), "ia3": ak.IA3(), "bitfit": ak.BitFit(),
           "lora_all": ak.LoRA(r=2, targets=["all-linear", "wpe"])}[method]
    am.add("a", cfg)
    randomize(am, "a", scale=0.3)
    check_merge_round_trip(am, "a", torch.randint(0, 100, (2, 6)), _logits)


def test_lora_on_tied_embedding_refuses_to_merge():
    """GPT-2 ties wte to lm_head: merging into wte would also change the output layer."""
    model = make_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    am = ak.adapt(model)
    am.add("emb", ak.LoRA(r=2, targets=["wte", "c_attn"]))
    randomize(am, "emb")
    saved = _weights(model)
    with pytest.raises(ak.CompositionError, match=r"'emb' cannot be merged: 'transformer.wte' shares.*lm_head"):
        am.merge("emb")
    _assert_same_weights(model, saved, exact=True)
    assert not am.state.merged

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    untied = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=100, n_positions=64,
                                        tie_word_embeddings=False)).eval()
    am = ak.adapt(untied)
    am.add("emb", ak.LoRA(r=2, targets=["wte"]))
    randomize(am, "emb")
    check_merge_round_trip(am, "emb", torch.randint(0, 100, (2, 6)), _logits)


def test_merge_on_minilm_llama_and_cnn(make_minilm, minilm_inputs):
    am = ak.adapt(make_minilm())
    am.add("a", ak.LoRA(r=4))
    am.add("b", ak.IA3())
    randomize(am, "a")
    randomize(am, "b")
    check_merge_round_trip(am, "a", minilm_inputs, lambda m, x: m(**x).logits)
    check_merge_round_trip(am, "b", minilm_inputs, lambda m, x: m(**x).logits)

    llama = ak.adapt(make_llama())
    llama.add("a", ak.LoRA(r=2, targets="all-linear"))
    llama.add("b", ak.IA3())
    randomize(llama, "a")
    randomize(llama, "b", scale=0.3)
    for n in ("a", "b"):
        check_merge_round_trip(llama, n, torch.randint(0, 100, (2, 6)), _logits)

    cnn = ak.adapt(make_cnn())
    cnn.add("a", ak.LoRA(r=2))
    cnn.add("b", ak.IA3())
    randomize(cnn, "a", scale=0.3)
    randomize(cnn, "b", scale=0.3)
    for n in ("a", "b"):
        check_merge_round_trip(cnn, n, torch.randn(2, 3, 16, 16))


def test_two_merged_adapters_stack_in_the_weights():
    model, x = _module("linear")
    am = ak.adapt(model, head=None)
    am.add("a", ak.LoRA(r=2, targets=["m"]))
    am.add("b", ak.BitFit(targets=["m"]))
    randomize(am, "a")
    randomize(am, "b")
    saved = _weights(model)
    with torch.no_grad():
        am.activate(ak.Stack("a", "b"))
        both = model(x)
        am.merge("a")
        am.merge("b")
        am.activate(None)
        torch.testing.assert_close(model(x), both)
        am.unmerge("a")
        am.unmerge("b")
    _assert_same_weights(model, saved)


def test_bottleneck_cannot_merge_and_nothing_changes():
    model = make_cnn()
    am = ak.adapt(model)
    am.add("bn", ak.Bottleneck())
    randomize(am, "bn")
    saved = _weights(model)
    with pytest.raises(ak.CompositionError, match=r"'bn' \(bottleneck\) cannot be merged.*nonlinearity"):
        am.merge("bn")
    _assert_same_weights(model, saved, exact=True)
    assert not am.state.merged and not am.adapter_info("bn")["merged"]


def test_bitfit_merge_into_biasless_linear_fails_cleanly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3, bias=False)).eval()
    am = ak.adapt(model, head=None)
    am.add("b", ak.BitFit(targets="all-linear"))  # the first site has a bias, the second has none
    randomize(am, "b")
    saved = _weights(model)
    x = torch.randn(2, 4)
    am.activate("b")
    with torch.no_grad():
        before = model(x)
    with pytest.raises(ak.AdapterError, match=r"'b'.*BitFit cannot merge into '2', which has no bias"):
        am.merge("b")
    _assert_same_weights(model, saved, exact=True)
    assert not am.state.merged
    with torch.no_grad():
        assert torch.equal(model(x), before)  # still applied, once, unmerged


def test_bitfit_merge_on_llama_without_biases_fails_cleanly():
    am = ak.adapt(make_llama())
    am.add("b", ak.BitFit())
    randomize(am, "b")
    saved = _weights(am.base)
    with pytest.raises(ak.AdapterError, match="no bias"):
        am.merge("b")
    _assert_same_weights(am.base, saved, exact=True)


def test_ia3_on_recurrent_and_embedding_cannot_merge():
    torch.manual_seed(0)
    model = nn.ModuleDict({"rnn": nn.LSTM(4, 4), "emb": nn.Embedding(5, 4)})
    am = ak.adapt(model, head=None)
    am.add("a", ak.IA3(targets=["rnn", "emb"]))
    saved = _weights(model)
    with pytest.raises(ak.AdapterError, match="IA³ cannot merge"):
        am.merge("a")
    _assert_same_weights(model, saved, exact=True)
    assert not am.state.merged


def test_merge_state_errors_and_delete_unmerges():
    model, x = _module("linear")
    am = ak.adapt(model, head=None)
    am.add("a", ak.LoRA(r=2, targets=["m"]))
    randomize(am, "a")
    saved = _weights(model)
    with pytest.raises(ak.CompositionError, match="not merged"):
        am.unmerge("a")
    am.merge("a")
    with pytest.raises(ak.CompositionError, match="already merged"):
        am.merge("a")
    am.delete("a")
    _assert_same_weights(model, saved)
    assert not am.state.merged


def test_failed_unmerge_leaves_the_adapter_merged():
    """An IA³ scale of exactly zero cannot be divided back out; no site may be left half unmerged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).eval()
    am = ak.adapt(model, head=None)
    am.add("a", ak.IA3(targets="all-linear"))
    randomize(am, "a", scale=0.3)
    with torch.no_grad():
        am.sites["2"].adapters["a"].ia3_l[0] = 0.0
    x = torch.randn(2, 4)
    am.activate("a")
    with torch.no_grad():
        expected = model(x)
    am.merge("a")
    merged_weights = _weights(model)
    with pytest.raises(ak.AdapterError, match="zero scale"):
        am.unmerge("a")
    assert am.adapter_info("a")["merged"]
    _assert_same_weights(model, merged_weights)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
