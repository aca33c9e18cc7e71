"""Adapters that own trainable copies of base modules (`modules_to_save`), e.g. BERT's pooler."""

from __future__ import annotations

import copy

import pytest
import torch

import adapterkit as ak
from adapterkit.errors import CompositionError, TargetError

from .conftest import randomize

POOLER = "bert.pooler"


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _with_pooler_copy(make_minilm, name="p", **extra):
    model = make_minilm()
    am = ak.adapt(model)
    am.add(name, ak.Bottleneck(modules_to_save=[POOLER], **extra), labels=["neg", "neu", "pos"])
    return model, am


def test_copy_is_identity_at_init_then_answers_for_the_base_module(make_minilm, minilm_inputs):
    model, am = _with_pooler_copy(make_minilm)
    base_pooler = copy.deepcopy(model.bert.pooler.state_dict())
    am.activate(None)
    base = _logits(model, minilm_inputs)
    am.activate("p")
    am.adapter("p").head.load_state_dict(model.classifier.state_dict())  # same head, so only the pooler differs
    torch.testing.assert_close(_logits(model, minilm_inputs), base, rtol=0, atol=0)
    with torch.no_grad():
        am.adapter("p").copy_of(POOLER).dense.weight.mul_(0.5)
    changed = _logits(model, minilm_inputs)
    assert not torch.allclose(changed, base, atol=1e-4)
    for key, value in model.bert.pooler.state_dict().items():  # the base module is untouched
        assert torch.equal(value, base_pooler[key])
    am.activate(None)
    torch.testing.assert_close(_logits(model, minilm_inputs), base, rtol=0, atol=0)


def test_train_adapter_trains_the_copy_and_nothing_of_the_base(make_minilm, minilm_inputs):
    model, am = _with_pooler_copy(make_minilm)
    params = am.train_adapter("p")
    copy_params = set(map(id, am.adapter("p").copy_of(POOLER).parameters()))
    assert copy_params <= set(map(id, params))
    assert not any(p.requires_grad for p in model.parameters())
    before = {k: v.clone() for k, v in am.adapter("p").copy_of(POOLER).state_dict().items()}
    opt = torch.optim.SGD(params, lr=0.5)
    loss = torch.nn.functional.cross_entropy(model(**minilm_inputs).logits, torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    after = am.adapter("p").copy_of(POOLER).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    info = am.adapter_info("p")
    assert info["params"] == sum(p.numel() for p in params)
    assert info["params"] > sum(p.numel() for p in model.bert.pooler.parameters())


def test_routing_rows_use_their_own_copies(make_minilm, minilm_inputs):
    model, am = _with_pooler_copy(make_minilm)
    am.add("q", ak.LoRA(r=2, modules_to_save=[POOLER]), labels=["x", "y"])
    am.add("plain", ak.LoRA(r=2))
    for name in ("p", "q", "plain"):
        randomize(am, name)
    route = ["q", None, "p", "plain"]
    with torch.no_grad(), am.route(route):
        batched = model(**minilm_inputs).logits
    for i, name in enumerate(route):
        am.activate(name)
        row = {k: v[i : i + 1] for k, v in minilm_inputs.items()}
        single = _logits(model, row)
        torch.testing.assert_close(batched[i : i + 1, : single.shape[-1]], single, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("single_file", [False, True])
def test_save_and_load_carry_the_copy(make_minilm, minilm_inputs, tmp_path, single_file):
    model, am = _with_pooler_copy(make_minilm)
    randomize(am, "p")
    am.activate("p")
    expected = _logits(model, minilm_inputs)
    path = tmp_path / ("p.safetensors" if single_file else "p")
    am.save("p", path)
    fresh_model = make_minilm()
    fresh = ak.adapt(fresh_model)
    fresh.load(path, name="p2")
    assert fresh.adapter("p2").config.modules_to_save == [POOLER]
    fresh.activate("p2")
    torch.testing.assert_close(_logits(fresh_model, minilm_inputs), expected, rtol=0, atol=1e-6)


def test_bad_modules_to_save_leave_nothing_behind(make_minilm):
    model = make_minilm()
    am = ak.adapt(model)
    hooks = len(model.bert.pooler._forward_hooks)
    with pytest.raises(TargetError, match="not a module of this model.*bert.pooler"):
        am.add("a", ak.LoRA(modules_to_save=["bert.poolr"]))
    with pytest.raises(TargetError, match="task head"):
        am.add("a", ak.LoRA(modules_to_save=["classifier"]))
    with pytest.raises(TargetError, match="no weights"):
        am.add("a", ak.LoRA(modules_to_save=["bert.pooler.activation"]))
    with pytest.raises(TargetError, match="twice or inside"):
        am.add("a", ak.LoRA(modules_to_save=[POOLER, "bert.pooler.dense"]))
    assert am.adapters == [] and len(am.sites) == 0 and len(am.loaded) == 0
    assert len(model.bert.pooler._forward_hooks) == hooks


def test_delete_removes_the_copy_and_its_hook(make_minilm, minilm_inputs):
    model, am = _with_pooler_copy(make_minilm)
    am.add("q", ak.LoRA(r=2, modules_to_save=[POOLER]))
    am.delete("p")
    assert am.adapter("q").copied_paths == [POOLER] and len(model.bert.pooler._forward_hooks) == 1
    am.delete("q")
    assert am.adapters == [] and len(model.bert.pooler._forward_hooks) == 0


def test_no_site_goes_inside_a_copied_module(make_minilm):
    _, am = _with_pooler_copy(make_minilm, name="x")
    am.add("all", ak.LoRA(r=2, targets="all-linear", modules_to_save=POOLER))  # one name as a string
    assert not any(site.startswith(POOLER) for site in am.site_names("all"))
    assert any(site.startswith("bert.encoder") for site in am.site_names("all"))
    assert am.adapter("all").config.modules_to_save == [POOLER] and am.adapter("all").copied_paths == [POOLER]


def test_combine_refuses_adapters_with_copies(make_minilm):
    _, am = _with_pooler_copy(make_minilm)
    am.add("q", ak.Bottleneck(modules_to_save=[POOLER]))
    with pytest.raises(CompositionError, match="modules_to_save"):
        am.combine("pq", {"p": 0.5, "q": 0.5})
    assert "pq" not in am.adapters
