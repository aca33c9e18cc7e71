"""Every per-site method is exactly the identity at initialisation: outputs equal the base model's.

Each test also moves the adapter away from its initial values and checks that the output then
changes, so an adapter that is never applied cannot pass.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import adapterkit as ak

from .conftest import make_cnn, make_gpt2, make_llama, make_lstm, randomize


class One(nn.Module):
    """A model made of one module, named `m`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.m = module

    def forward(self, x):
        out = self.m(x)
        return out[0] if isinstance(out, tuple) else out


def _seeded(fn, seed=0):
    torch.manual_seed(seed)
    return fn()


#: kind -> (module factory, input factory)
MODULES = {
    "linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(3, 4, 6)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), lambda: torch.randn(2, 4, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1), lambda: torch.randn(2, 3, 8, 8)),
    "embedding": (lambda: nn.Embedding(20, 6, padding_idx=0), lambda: torch.randint(0, 20, (3, 5))),
    "gpt2_conv1d": (lambda: Conv1D(5, 6), lambda: torch.randn(3, 4, 6)),
    "lstm": (lambda: nn.LSTM(6, 5, batch_first=True), lambda: torch.randn(3, 4, 6)),
    "gru_seq_first": (lambda: nn.GRU(6, 5), lambda: torch.randn(4, 3, 6)),
}


def _check_identity_then_change(am, model, x, name, exact=True):
    am.activate(None)
    with torch.no_grad():
        base = model(x)
        am.activate(name)
        out = model(x)
    if exact:
        assert torch.equal(out, base), f"{name}: not the identity at init (max diff {(out - base).abs().max()})"
    else:
        torch.testing.assert_close(out, base, rtol=0, atol=1e-6)
    randomize(am, name)
    with torch.no_grad():
        moved = model(x)
    assert not torch.allclose(moved, base, atol=1e-6), f"{name}: randomised adapter does not change the output"
    am.activate(None)
    with torch.no_grad():
        assert torch.equal(model(x), base), "activate(None) must give the base model back"


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "embedding", "gpt2_conv1d"])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_identity_on_every_weight_kind(kind, rslora):
    make_module, make_x = MODULES[kind]
    model = One(_seeded(make_module)).eval()
    x = _seeded(make_x, 1)
    am = ak.adapt(model)
    am.add("a", ak.LoRA(r=3, alpha=6, rslora=rslora, targets=["m"]))
    _check_identity_then_change(am, model, x, "a")


def test_rslora_scale():
    assert ak.LoRA(r=4, alpha=8).scale == 2
    assert ak.LoRA(r=4, alpha=8, rslora=True).scale == 4


def test_lora_with_dropout_is_identity_in_training_mode():
    model = One(_seeded(lambda: nn.Linear(6, 5)))
    x = _seeded(lambda: torch.randn(3, 6), 1)
    am = ak.adapt(model)
    am.add("a", ak.LoRA(r=2, dropout=0.5, targets=["m"]))
    am.train()
    base = torch.nn.functional.linear(x, model.m.weight, model.m.bias)  # the frozen module, no hooks
    am.activate("a")
    assert torch.equal(model(x), base)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "gpt2_conv1d", "lstm", "gru_seq_first"])
@pytest.mark.parametrize("on_input", [False, True])
def test_ia3_identity_output_and_input_side(kind, on_input):
    make_module, make_x = MODULES[kind]
    model = One(_seeded(make_module)).eval()
    x = _seeded(make_x, 1)
    am = ak.adapt(model)
    cfg = ak.IA3(targets=[], input_targets=["m"]) if on_input else ak.IA3(targets=["m"])
    am.add("a", cfg)
    assert am.site_names("a") == {"m": "input" if on_input else "output"}
    _check_identity_then_change(am, model, x, "a", exact=kind not in ("lstm", "gru_seq_first"))


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "embedding", "gpt2_conv1d", "lstm", "gru_seq_first"])
def test_bitfit_identity(kind):
    make_module, make_x = MODULES[kind]
    model = One(_seeded(make_module)).eval()
    x = _seeded(make_x, 1)
    am = ak.adapt(model)
    am.add("a", ak.BitFit(targets=["m"]))
    _check_identity_then_change(am, model, x, "a", exact=kind not in ("lstm", "gru_seq_first"))


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "gpt2_conv1d", "lstm", "gru_seq_first"])
@pytest.mark.parametrize("parallel", [False, True])
def test_bottleneck_identity_on_module_kinds(kind, parallel):
    make_module, make_x = MODULES[kind]
    model = One(_seeded(make_module)).eval()
    x = _seeded(make_x, 1)
    am = ak.adapt(model)
    am.add("a", ak.Bottleneck(placement="custom", parallel=parallel, bottleneck_size=2, targets=["m"]))
    _check_identity_then_change(am, model, x, "a", exact=kind not in ("lstm", "gru_seq_first"))


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "gpt2_conv1d", "lstm", "gru_seq_first"])
def test_bottleneck_on_the_input_is_the_identity_at_init(kind):
    make_module, make_x = MODULES[kind]
    model = One(_seeded(make_module)).eval()
    x = _seeded(make_x, 1)
    am = ak.adapt(model)
    am.add("a", ak.Bottleneck(placement="custom", input_arg=0, bottleneck_size=2, targets=["m"]))
    assert am.site_names("a") == {"m": "input"}
    _check_identity_then_change(am, model, x, "a", exact=kind not in ("lstm", "gru_seq_first"))


class _Hidden(nn.Module):
    """A tiny BERT whose forward returns its last hidden state (a tensor, as the checks want)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        self.bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=32))

    def forward(self, ids):
        return self.bert(ids).last_hidden_state


def test_bottleneck_on_a_blocks_residual_input_is_the_identity_at_init():
    """input_arg=1 at BERT's output blocks (AdapterHub's par_bn): LN(d + r + f(r)) with f = 0 at init."""
    model = _seeded(_Hidden).eval()
    am = ak.adapt(model)
    am.add("a", ak.Bottleneck(placement="custom", targets=[r"re:layer\.\d+\.(attention\.)?output$"], input_arg=1,
                              reduction=4, scaling=4.0))
    assert set(am.site_names("a").values()) == {"input"} and len(am.site_names("a")) == 4
    _check_identity_then_change(am, model, _ids(), "a")


def test_bottleneck_input_arg_is_validated_and_written():
    assert ak.Bottleneck().to_dict()["input_arg"] is None
    assert ak.Bottleneck(input_arg=1).to_dict()["input_arg"] == 1
    for bad in (-1, True, 1.0, "1"):
        with pytest.raises(ak.AdapterConfigError, match="input_arg"):
            ak.Bottleneck(input_arg=bad).validate()
    for clash in ({"renorm": True}, {"placement": "parallel"}, {"parallel": True}):
        with pytest.raises(ak.AdapterConfigError, match="input_arg"):
            ak.Bottleneck(input_arg=0, **clash).validate()
    am = ak.adapt(One(nn.Linear(6, 5)))
    with pytest.raises(ak.TargetError, match=r"input_arg=1: Linear.forward takes 1 positional"):
        am.add("a", ak.Bottleneck(placement="custom", targets=["m"], input_arg=1))


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby", "parallel"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_bottleneck_identity_on_minilm(make_minilm, minilm_inputs, placement, activation):
    model = make_minilm()
    am = ak.adapt(model)
    am.add("a", ak.Bottleneck(placement=placement, activation=activation, reduction=32))
    expected_sites = {"pfeiffer": 6, "houlsby": 12, "parallel": 6}[placement]
    assert len(am.site_names("a")) == expected_sites
    am.activate(None)
    with torch.no_grad():
        base = model(**minilm_inputs).logits
        am.activate("a")
        out = model(**minilm_inputs).logits
    assert torch.equal(out, base)
    randomize(am, "a")
    with torch.no_grad():
        assert not torch.allclose(model(**minilm_inputs).logits, base, atol=1e-6)


def _ids(vocab=100, shape=(2, 7), seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


CONFIGS = {
    "lora": lambda: ak.LoRA(r=4),
    "lora_rs": lambda: ak.LoRA(r=4, rslora=True),
    "pfeiffer": lambda: ak.Bottleneck(placement="pfeiffer", bottleneck_size=4),
    "houlsby": lambda: ak.Bottleneck(placement="houlsby", bottleneck_size=4, activation="gelu"),
    "parallel": lambda: ak.Bottleneck(placement="parallel", bottleneck_size=4, activation="silu"),
    "ia3": lambda: ak.IA3(),
    "bitfit": lambda: ak.BitFit(),
}

FAMILIES = {
    "gpt2": (make_gpt2, lambda: _ids()),
    "llama": (make_llama, lambda: _ids()),
    "cnn": (make_cnn, lambda: torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))),
    "lstm": (make_lstm, lambda: _ids(50)),
    "gru_seq_first": (lambda: make_lstm(cell=nn.GRU, batch_first=False), lambda: _ids(50)),
}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", list(CONFIGS))
def test_default_targets_identity_on_model_families(family, method):
    make_model, make_x = FAMILIES[family]
    model, x = make_model(), make_x()
    am = ak.adapt(model)
    am.add("a", CONFIGS[method]())
    am.activate(None)
    with torch.no_grad():
        base = _logits(model(x))
        am.activate("a")
        out = _logits(model(x))
    torch.testing.assert_close(out, base, rtol=0, atol=0 if family in ("gpt2", "llama", "cnn") else 1e-6)
    randomize(am, "a")
    with torch.no_grad():
        assert not torch.allclose(_logits(model(x)), base, atol=1e-6)


def test_identity_on_minilm_for_lora_ia3_bitfit(make_minilm, minilm_inputs):
    model = make_minilm()
    am = ak.adapt(model)
    for name, cfg in [("l", ak.LoRA()), ("i", ak.IA3()), ("b", ak.BitFit()), ("r", ak.LoRA(rslora=True))]:
        am.add(name, cfg)
    am.activate(None)
    with torch.no_grad():
        base = model(**minilm_inputs).logits
        for name in ["l", "i", "b", "r"]:
            am.activate(name)
            assert torch.equal(model(**minilm_inputs).logits, base), name
        am.activate(ak.Stack("l", "i", "b", "r"))
        assert torch.equal(model(**minilm_inputs).logits, base)


@pytest.mark.parametrize("shape", [(7, 6), (4096, 384), (300, 1536)])
def test_lora_down_projection_matches_f_linear_with_and_without_onednn(shape):
    from adapterkit.methods.kernels import down_project

    x = _seeded(lambda: torch.randn(*shape))
    a = _seeded(lambda: torch.randn(8, shape[1]), 1)
    expected = torch.nn.functional.linear(x, a)
    with torch.no_grad():
        torch.testing.assert_close(down_project(x, a), expected, rtol=1e-5, atol=1e-4)
        with torch.backends.mkldnn.flags(enabled=False):
            assert torch.equal(down_project(x, a), expected)
        x64, a64 = x.double(), a.double()
        assert torch.equal(down_project(x64, a64), torch.nn.functional.linear(x64, a64))
    assert torch.equal(down_project(x, a), expected)  # autograd on: the differentiable path
