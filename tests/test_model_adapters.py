"""Many named adapters on one AdaptedModel: add, delete (memory freed), activate, train one, heads."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import adapterkit as ak

from .conftest import make_cnn, make_gpt2, randomize


def _param_ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


# --- add / delete --------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [ak.LoRA(r=4), ak.Bottleneck(placement="houlsby"), ak.IA3(), ak.BitFit()],
                         ids=lambda c: c.method)
def test_delete_frees_the_adapter(make_minilm, minilm_inputs, cfg):
    model = make_minilm()
    am = ak.adapt(model)
    with torch.no_grad():
        base = model(**minilm_inputs).logits
    before = _param_ids(am)
    am.add("keep", ak.LoRA(r=2))
    am.add("gone", cfg, labels=["x", "y"])
    randomize(am, "keep")
    randomize(am, "gone")
    gone = list(am.adapter_parameters("gone"))
    assert gone and _param_ids(am) >= {id(p) for p in gone}
    ref = weakref.ref(gone[0])
    gone_ids = {id(p) for p in gone}

    am.train_adapter("gone")  # grads and an autograd graph through the adapter, then let go of them
    out = model(**minilm_inputs).logits
    out.sum().backward()
    del out, gone
    am.eval()
    am.activate(ak.Stack("keep", "gone"))
    with torch.no_grad():
        model(**minilm_inputs)

    am.delete("gone")
    gc.collect()
    assert ref() is None, "a deleted adapter's parameter is still referenced"
    assert not gone_ids & _param_ids(am)
    assert am.adapters == ["keep"] and "gone" not in am.loaded and am.active is None
    assert all("gone" not in site.adapters for site in am.sites.values())

    am.delete("keep")
    assert _param_ids(am) == before and len(am.sites) == 0
    with torch.no_grad():
        assert torch.equal(model(**minilm_inputs).logits, base)


def test_deleted_sites_leave_no_hooks_and_names_can_be_reused():
    model = make_cnn()
    am = ak.adapt(model)
    counts = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}
    am.add("a", ak.Bottleneck())
    am.add("b", ak.LoRA(r=2))
    am.delete("a")
    am.delete("b")
    assert {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()} == counts
    am.add("a", ak.IA3())  # the name is free again
    assert am.adapters == ["a"]


def test_duplicate_unknown_and_bad_names():
    am = ak.adapt(make_cnn())
    am.add("a", ak.LoRA(r=2))
    with pytest.raises(ak.AdapterExistsError, match="'a'"):
        am.add("a", ak.BitFit())
    assert am.adapter("a").config.method == "lora"
    for verb in (am.delete, am.activate, am.merge, am.unmerge, am.adapter_info, am.adapter_state_dict):
        with pytest.raises(ak.AdapterNotFoundError, match="'nope'.*loaded: \\['a'\\]"):
            verb("nope")
    with pytest.raises(ak.AdapterNotFoundError):
        am.activate(ak.Stack("a", "nope"))
    with pytest.raises(ak.AdapterNotFoundError):
        am.combine("c", {"a": 1.0, "nope": 1.0})
    assert am.adapters == ["a"]
    for bad in ("", "a.b", "a b", "x/y", 3):
        with pytest.raises(ak.CompositionError):
            am.add(bad, ak.LoRA(r=2))
    assert isinstance(ak.AdapterNotFoundError("m"), KeyError) and str(ak.AdapterNotFoundError("m")) == "m"


# --- activate ---------------------------------------------------------------------------------


def test_activate_name_none_stack_fuse_average():
    am = ak.adapt(make_cnn())
    for n in ("a", "b"):
        am.add(n, ak.Bottleneck(bottleneck_size=2))
    for setup in ("a", ak.Stack("a", "b"), ak.Fuse("a", "b"), ak.Average({"a": 0.5, "b": 0.5}), None):
        am.activate(setup)
        assert am.active == setup
    with pytest.raises(ak.CompositionError):
        am.activate(3)
    with pytest.raises(ak.CompositionError):
        ak.Stack()
    with pytest.raises(ak.CompositionError):
        ak.Fuse("a")
    with pytest.raises(ak.CompositionError):
        ak.Fuse("a", "a")
    with pytest.raises(ak.CompositionError):
        ak.Average({})


def test_each_activation_gives_its_own_output():
    model = make_cnn()
    am = ak.adapt(model)
    x = torch.randn(2, 3, 16, 16)
    outs = {}
    with torch.no_grad():
        outs[None] = model(x)
        for n, cfg in (("a", ak.LoRA(r=2)), ("b", ak.Bottleneck()), ("c", ak.IA3())):
            am.add(n, cfg)
            randomize(am, n)
            am.activate(n)
            outs[n] = model(x)
        am.activate(None)
        assert torch.equal(model(x), outs[None])
        for n in ("a", "b", "c"):
            am.activate(n)
            assert torch.equal(model(x), outs[n])
    assert len({tuple(o.flatten().tolist()) for o in outs.values()}) == 4


def test_to_dtype_moves_base_and_adapters():
    model = make_cnn()
    am = ak.adapt(model)
    am.add("a", ak.LoRA(r=2))
    am.add("b", ak.Bottleneck())
    randomize(am, "a")
    am.activate(ak.Stack("a", "b"))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    am.double()
    assert all(p.dtype == torch.float64 for p in am.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x.double()), expected.double(), rtol=1e-5, atol=1e-5)


# --- train one --------------------------------------------------------------------------------


def test_train_adapter_trains_only_that_adapter_and_its_head(make_minilm, minilm_inputs):
    model = make_minilm()
    am = ak.adapt(model)
    am.add("a", ak.LoRA(r=4), labels=["neg", "pos"])
    am.add("b", ak.Bottleneck(), labels=["x", "y", "z", "w"])
    am.add("c", ak.IA3())
    randomize(am, "a")  # B = 0 at init gives A no gradient; move it so every tensor gets one
    randomize(am, "b")
    params = am.train_adapter("a")
    # the frozen base as inference has it (dropout off); only adapter "a"'s modules train
    assert am.active == "a" and not am.training and not model.training
    assert all(m.training for m in am.adapter("a").modules())
    assert not any(m.training for m in am.adapter("b").modules())
    assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.Dropout))
    own = {id(p) for p in params}
    assert own == {id(p) for p in am.adapter_parameters("a")}
    assert own >= {id(p) for p in am.adapter("a").head.parameters()}
    assert {id(p) for p in am.parameters() if p.requires_grad} == own

    logits = model(**minilm_inputs).logits
    assert logits.shape == (4, 2)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1])).backward()
    with_grad = {id(p) for p in am.parameters() if p.grad is not None}
    assert with_grad == own
    assert all(p.grad.abs().sum() > 0 for p in params if p.grad is not None and p.dim() > 1)

    am.zero_grad(set_to_none=True)
    params_b = am.train_adapter("b")
    assert {id(p) for p in am.parameters() if p.requires_grad} == {id(p) for p in params_b}
    model(**minilm_inputs).logits.sum().backward()
    assert {id(p) for p in am.parameters() if p.grad is not None} == {id(p) for p in params_b}
    am.train_adapter("b", base_in_train_mode=True)  # the old rule, asked for: every module trains
    assert all(m.training for m in am.modules())
    assert not any(p.requires_grad for p in model.parameters())


def test_training_steps_move_only_the_adapter():
    model = make_gpt2()
    am = ak.adapt(model)
    am.add("a", ak.LoRA(r=2))
    am.add("b", ak.LoRA(r=2))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    b_state = {k: v.clone() for k, v in am.adapter_state_dict("b").items()}
    a_state = {k: v.clone() for k, v in am.adapter_state_dict("a").items()}
    opt = torch.optim.SGD(am.train_adapter("a"), lr=0.1)
    ids = torch.randint(0, 100, (2, 8))
    for _ in range(2):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base_state.items())
    assert all(torch.equal(v, am.adapter_state_dict("b")[k]) for k, v in b_state.items())
    assert any(not torch.equal(v, am.adapter_state_dict("a")[k]) for k, v in a_state.items())


# --- heads ------------------------------------------------------------------------------------


def test_heads_belong_to_adapters_and_switch_with_activation(make_minilm, minilm_inputs):
    model = make_minilm()
    base_head = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    am = ak.adapt(model)
    assert am.head_path == "classifier"
    am.add("sent", ak.LoRA(r=2), labels=["neg", "pos"])
    am.add("topic", ak.BitFit(), labels=["a", "b", "c", "d", "e"])
    am.add("plain", ak.IA3())
    am.add("sized", ak.IA3(), num_labels=7)
    with pytest.raises(ak.CompositionError, match="2 labels but num_labels=3"):
        am.add("bad", ak.LoRA(), labels=["x", "y"], num_labels=3)
    assert "bad" not in am.adapters
    with torch.no_grad():
        widths = {}
        for setup in (None, "sent", "topic", "plain", "sized", ak.Stack("sent", "topic"), ak.Stack("topic", "plain")):
            am.activate(setup)
            widths[str(setup)] = model(**minilm_inputs).logits.shape[-1]
    assert widths == {"None": 3, "sent": 2, "topic": 5, "plain": 3, "sized": 7,
                      str(ak.Stack("sent", "topic")): 5, str(ak.Stack("topic", "plain")): 5}
    assert am.adapter_info("sent")["labels"] == ["neg", "pos"] and am.adapter_info("sent")["head"]
    assert am.adapter_info("plain")["head"] is False
    # The heads are copies: the base classifier is untouched and unshared.
    randomize(am, "sent")
    assert all(torch.equal(v, model.classifier.state_dict()[k]) for k, v in base_head.items())
    assert not _param_ids(am.adapter("sent").head) & _param_ids(model.classifier)


def test_custom_head_module_and_models_without_head():
    am = ak.adapt(make_cnn())
    head = nn.Sequential(nn.Linear(16, 4), nn.Tanh(), nn.Linear(4, 3))
    am.add("a", ak.LoRA(r=2), head=head)
    am.activate("a")
    assert am.base(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    bare = ak.adapt(nn.Sequential(nn.Linear(4, 4)), head=None)
    with pytest.raises(ak.TargetError, match="no head module"):
        bare.add("a", ak.LoRA(targets="all-linear"), labels=["x", "y"])
    assert bare.adapters == []


def test_info_and_summary():
    am = ak.adapt(make_cnn())
    am.add("a", ak.LoRA(r=2), labels=["p", "q"])
    info = am.adapter_info("a")
    assert info["params"] == sum(p.numel() for p in am.adapter_parameters("a"))
    assert info["bytes"] == 4 * info["params"] and info["sites"] == 10 and 0 < info["percent_of_base"] < 100
    text = am.summary()
    assert "a" in text and "lora" in text and f"{info['params']:,}" in text


def test_a_site_moves_with_to_like_any_module():
    """Site's own method names must not shadow nn.Module's (`_apply` is what `.to()` calls)."""
    import torch
    from torch import nn

    am = ak.adapt(nn.Sequential(nn.Linear(4, 4)), head=None)
    am.add("a", ak.LoRA(r=2, targets=["0"]))
    am.sites["0"].to(torch.float64)
    assert am.adapter("a").methods_by_path["0"].lora_A.dtype == torch.float64
