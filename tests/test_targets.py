"""Sites on any nn.Module and how targets pick them: suffix, regex, type, "all-linear", defaults."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.methods.bottleneck import ACTIVATION_FUNCTIONS
from adapterkit.targets import model_family

from .conftest import make_cnn, make_gpt2, make_llama, make_lstm, randomize


def _capture(module: nn.Module, store: list):
    """A forward hook registered *before* the adapter's: it sees the frozen module's own output."""
    return module.register_forward_hook(lambda m, a, out: store.append(out[0] if isinstance(out, tuple) else out))


def _site(am, module_name):
    return am.sites[module_name.replace(".", "/")].adapters


# --- what a bottleneck computes at each kind of site ------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_bottleneck_on_linear_is_h_plus_delta(activation):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 6)
    am = ak.adapt(model, head=None)
    am.add("a", ak.Bottleneck(placement="custom", bottleneck_size=3, activation=activation, scaling=0.5, targets=["0"]))
    randomize(am, "a")
    ad = _site(am, "0")["a"]
    h = model[0](x)  # not active yet: the plain Linear
    expected = model[2](F.relu(h + 0.5 * ad.up(ACTIVATION_FUNCTIONS[activation](ad.down(h)))))
    am.activate("a")
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("dims", [1, 2])
def test_bottleneck_on_conv_works_over_channels_like_1x1_convs(dims):
    torch.manual_seed(0)
    conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(3, 8, 3, padding=1)
    model = nn.Sequential(conv).eval()
    x = torch.randn(2, 3, *([7] * dims))
    am = ak.adapt(model, head=None)
    am.add("a", ak.Bottleneck(placement="custom", bottleneck_size=2, targets=[type(conv)]))
    randomize(am, "a")
    ad = _site(am, "0")["a"]
    h = conv(x)
    conv_fn = F.conv1d if dims == 1 else F.conv2d
    k = (1,) * dims
    down = conv_fn(h, ad.down.weight.view(2, 8, *k), ad.down.bias)
    expected = h + conv_fn(F.relu(down), ad.up.weight.view(8, 2, *k), ad.up.bias)
    am.activate("a")
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("batch_first", [True, False])
def test_bottleneck_on_recurrent_output_sequence(cell, batch_first):
    torch.manual_seed(0)
    rnn = cell(5, 6, batch_first=batch_first).eval()
    model = nn.ModuleDict({"rnn": rnn})
    x = torch.randn(3, 4, 5)  # [B, T, F] or [T, B, F]
    am = ak.adapt(model, head=None)
    am.add("a", ak.Bottleneck(placement="custom", bottleneck_size=2, targets=["rnn"]))
    assert am.sites["rnn"].shape.batch_dim == (0 if batch_first else 1)
    randomize(am, "a")
    ad = _site(am, "rnn")["a"]
    out, state = rnn(x)
    am.activate("a")
    got, got_state = rnn(x)
    torch.testing.assert_close(got, out + ad.up(F.relu(ad.down(out))))
    # The final hidden state is passed through untouched, in its own structure.
    if cell is nn.LSTM:
        assert isinstance(got_state, tuple) and all(torch.equal(a, b) for a, b in zip(got_state, state, strict=True))
    else:
        assert torch.equal(got_state, state)


def test_bottleneck_on_a_bert_block(make_minilm, minilm_inputs):
    model = make_minilm()
    block = model.bert.encoder.layer[2]
    raw: list = []
    _capture(block, raw)
    am = ak.adapt(model)
    am.add("blk", ak.Bottleneck(placement="custom", bottleneck_size=8, targets=[r"re:encoder\.layer\.2$"]))
    assert am.site_names("blk") == {"bert.encoder.layer.2": "output"}
    randomize(am, "blk")
    adapted: list = []
    _capture(block, adapted)  # registered after the site's hook: sees the adapted output
    am.activate("blk")
    with torch.no_grad():
        model(**minilm_inputs)
    ad = _site(am, "bert.encoder.layer.2")["blk"]
    torch.testing.assert_close(adapted[-1], raw[-1] + ad.up(F.relu(ad.down(raw[-1]))))


@pytest.mark.parametrize(("make", "target"), [(make_gpt2, r"re:\.h\.\d+$"), (make_llama, r"re:layers\.\d+$")],
                         ids=["gpt2_block", "llama_layer"])
def test_bottleneck_and_ia3_on_transformer_blocks(make, target):
    model = make()
    am = ak.adapt(model)
    ids = torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        base = model(ids).logits
    am.add("blk", ak.Bottleneck(placement="custom", bottleneck_size=4, targets=[target]))
    am.add("scale", ak.IA3(targets=[target]))
    assert len(am.site_names("blk")) == 2
    assert all(s.shape.out_features == 32 and s.shape.kind == "other" for s in am.sites.values())
    for name in ("blk", "scale"):
        am.activate(name)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, base)
        randomize(am, name)
        with torch.no_grad():
            assert not torch.allclose(model(ids).logits, base, atol=1e-5)


def test_bottleneck_on_a_residual_block_works_over_channels():
    model = make_cnn()
    block = model.layer1[1]
    raw: list = []
    _capture(block, raw)
    am = ak.adapt(model)
    am.add("blk", ak.Bottleneck(placement="custom", bottleneck_size=2, targets=["layer1.1"]))
    shape = am.sites["layer1/1"].shape
    assert (shape.out_features, shape.feature_dim) == (8, 1)
    randomize(am, "blk")
    adapted: list = []
    _capture(block, adapted)
    am.activate("blk")
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    ad = _site(am, "layer1.1")["blk"]
    h = raw[-1].movedim(1, -1)
    torch.testing.assert_close(adapted[-1], (h + ad.up(F.relu(ad.down(h)))).movedim(-1, 1))


def test_parallel_bottleneck_on_a_strided_block_reads_input_on_output_grid():
    model = make_cnn()
    am = ak.adapt(model)
    am.add("p", ak.Bottleneck(placement="parallel", bottleneck_size=2))
    assert "layer2.0" in am.site_names("p")  # stride 2, 8 -> 16 channels
    randomize(am, "p")
    am.activate("p")
    x = torch.randn(2, 3, 16, 16)
    block = model.layer2[0]
    seen: list = []
    block.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        raw = block(model.layer1(model.relu(model.bn1(model.conv1(x)))))  # block output with adapter
        am.activate(None)
        plain = block(seen[-1])
    ad = _site(am, "layer2.0")["p"]
    z = seen[-1][:, :, ::2, ::2].movedim(1, -1)
    torch.testing.assert_close(raw, plain + ad.up(F.relu(ad.down(z))).movedim(-1, 1))


# --- matching ------------------------------------------------------------------------------


def test_target_by_suffix_regex_type_and_name(make_minilm):
    am = ak.adapt(make_minilm())
    am.add("suffix", ak.LoRA(r=2, targets=["query"]))
    assert sorted(am.site_names("suffix")) == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(6)]
    am.add("regex", ak.LoRA(r=2, targets=[r"re:layer\.[01]\.attention\.self\.(key|value)$"]))
    assert sorted(am.site_names("regex")) == sorted(
        f"bert.encoder.layer.{i}.attention.self.{k}" for i in (0, 1) for k in ("key", "value")
    )
    am.add("by_class", ak.LoRA(r=2, targets=[nn.Embedding]))
    assert sorted(am.site_names("by_class")) == sorted(
        f"bert.embeddings.{k}_embeddings" for k in ("word", "position", "token_type")
    )
    am.add("by_name", ak.IA3(targets=["LayerNorm"]))
    assert len(am.site_names("by_name")) == 13  # embeddings + 2 per layer
    am.add("dotted_suffix", ak.BitFit(targets="attention.output.dense"))
    assert len(am.site_names("dotted_suffix")) == 6


def test_all_linear_leaves_output_heads_alone(make_minilm):
    am = ak.adapt(make_minilm())
    am.add("all", ak.LoRA(r=2, targets="all-linear"))
    names = am.site_names("all")
    assert len(names) == 36  # q, k, v, attn-out, intermediate, output per layer
    assert not any(n.endswith(("classifier", "pooler.dense")) for n in names)

    gpt2 = ak.adapt(make_gpt2())
    gpt2.add("all", ak.LoRA(r=2, targets="all-linear"))
    assert len(gpt2.site_names("all")) == 8  # GPT-2's Conv1D counts as linear
    assert "lm_head" not in gpt2.site_names("all")


def test_exclude_and_nested_matches():
    am = ak.adapt(make_cnn())
    am.add("a", ak.LoRA(r=2, targets=["Conv2d"], exclude=[r"^layer2", r"downsample"]))
    assert sorted(am.site_names("a")) == ["conv1"] + [f"layer1.{b}.conv{c}" for b in (0, 1) for c in (1, 2)]
    # A block and the convs inside it: only the outermost match becomes a site.
    am.add("b", ak.Bottleneck(placement="custom", bottleneck_size=2, targets=[r"re:^layer1\.0$", "conv1"]))
    assert sorted(am.site_names("b")) == ["conv1", "layer1.0", "layer1.1.conv1", "layer2.0.conv1", "layer2.1.conv1"]


def test_base_model_keeps_its_structure_and_state_dict():
    model = make_cnn()
    keys = list(model.state_dict())
    modules = [n for n, _ in model.named_modules()]
    am = ak.adapt(model)
    am.add("a", ak.LoRA(r=2))
    am.add("b", ak.Bottleneck())
    assert list(model.state_dict()) == keys
    assert [n for n, _ in model.named_modules()] == modules
    assert all(not p.requires_grad for p in model.parameters())


# --- defaults per family ---------------------------------------------------------------------


def test_default_targets_bert_like(make_minilm):
    model = make_minilm()
    assert model_family(model) == "bert"
    am = ak.adapt(model)
    am.add("lora", ak.LoRA())
    assert {n.rsplit(".", 1)[1] for n in am.site_names("lora")} == {"query", "value"}
    assert len(am.site_names("lora")) == 12
    am.add("pf", ak.Bottleneck(placement="pfeiffer"))
    assert sorted(am.site_names("pf")) == [f"bert.encoder.layer.{i}.output.dense" for i in range(6)]
    am.add("ho", ak.Bottleneck(placement="houlsby"))
    assert len(am.site_names("ho")) == 12
    assert all(n.endswith(("attention.output.dense", ".output.dense")) for n in am.site_names("ho"))
    am.add("ia3", ak.IA3())
    sides = am.site_names("ia3")
    assert {n for n, s in sides.items() if s == "input"} == {f"bert.encoder.layer.{i}.output.dense" for i in range(6)}
    assert {n.rsplit(".", 1)[1] for n, s in sides.items() if s == "output"} == {"key", "value"}


def test_default_targets_gpt2_and_llama():
    gpt2 = ak.adapt(make_gpt2())
    assert model_family(gpt2.base) == "gpt2"
    gpt2.add("lora", ak.LoRA())
    assert sorted(gpt2.site_names("lora")) == [f"transformer.h.{i}.attn.c_attn" for i in (0, 1)]
    gpt2.add("par", ak.Bottleneck(placement="parallel"))
    assert sorted(gpt2.site_names("par")) == [f"transformer.h.{i}.mlp" for i in (0, 1)]
    assert gpt2.sites["transformer/h/0/mlp"].shape.out_features == 32

    llama = ak.adapt(make_llama())
    assert model_family(llama.base) == "llama"
    llama.add("lora", ak.LoRA())
    assert sorted(llama.site_names("lora")) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    )
    llama.add("ia3", ak.IA3())
    assert sum(s == "input" for s in llama.site_names("ia3").values()) == 2
    llama.add("bitfit", ak.BitFit())
    assert len(llama.site_names("bitfit")) == 14  # every Linear but lm_head, biases or not


def test_default_targets_cnn_and_lstm():
    cnn = ak.adapt(make_cnn())
    assert model_family(cnn.base) == "cnn" and cnn.head_path == "fc"
    cnn.add("blocks", ak.Bottleneck())
    assert sorted(cnn.site_names("blocks")) == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    cnn.add("lora", ak.LoRA(r=2))
    assert len(cnn.site_names("lora")) == 10 and all("conv" in n or "downsample" in n for n in cnn.site_names("lora"))

    for cell in (nn.LSTM, nn.GRU):
        rnn = ak.adapt(make_lstm(cell=cell))
        assert model_family(rnn.base) == "recurrent"
        rnn.add("b", ak.Bottleneck())
        assert rnn.site_names("b") == {"lstm": "output"}
        rnn.add("lora", ak.LoRA(r=2))
        assert rnn.site_names("lora") == {"proj": "output"}  # all-linear, the head left out


# --- errors ------------------------------------------------------------------------------------


def _no_hooks(am):
    """No site hooks left: only the model's own pre-hook and the head switch remain."""
    head = am.base.get_submodule(am.head_path) if am.head_path else None
    return all(
        not m._forward_hooks and not m._forward_pre_hooks
        for m in am.base.modules() if m is not am.base and m is not head
    )


def test_nothing_matched_lists_candidates_and_changes_nothing():
    model = make_cnn()
    am = ak.adapt(model, head=None)
    with pytest.raises(ak.TargetError) as err:
        am.add("a", ak.LoRA(targets=["query"]))
    msg = str(err.value)
    assert "'a'" in msg and "query" in msg
    assert "layer1.N.conv1 (Conv2d)" in msg and "fc (Linear)" in msg
    assert am.adapters == [] and len(am.sites) == 0 and _no_hooks(am)


def test_no_default_targets_for_unknown_model():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    am = ak.adapt(model)
    with pytest.raises(ak.TargetError, match=r"pass targets=.*Candidate modules: N \(Linear\)"):
        am.add("a", ak.LoRA())
    am.add("a", ak.LoRA(targets="all-linear"))
    assert sorted(am.site_names("a")) == ["0", "2"]


def test_wrong_module_kind_names_adapter_and_module_and_leaves_no_trace():
    model = make_lstm()
    am = ak.adapt(model)
    with pytest.raises(ak.TargetError, match=r"adapter 'a' at module 'lstm'.*LoRA needs"):
        am.add("a", ak.LoRA(targets=["proj", "lstm"]))  # proj would work; lstm cannot
    assert am.adapters == [] and len(am.sites) == 0 and _no_hooks(am)
    with pytest.raises(ak.TargetError, match="cannot tell its output width"):
        ak.adapt(nn.Sequential(nn.Sequential(nn.ReLU()))).add("b", ak.Bottleneck(targets=["0"]))


def test_bad_configs_are_refused():
    am = ak.adapt(make_cnn())
    for cfg in (ak.Bottleneck(placement="middle"), ak.Bottleneck(activation="swish"), ak.LoRA(r=0),
                ak.Bottleneck(reduction=None), ak.LoRA(dropout=1.0)):
        with pytest.raises(ak.AdapterConfigError):
            am.add("a", cfg)
    with pytest.raises(ak.TargetError, match="method config"):
        am.add("a", {"method": "lora"})
    assert am.adapters == []
