"""DoRA: identity at init, its equation, training, merge/unmerge, per-row routing and mixtures, files,
PEFT's DoRA both ways, torch.compile, and what it refuses."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import adapterkit as ak

from .conftest import make_gpt2, make_llama, randomize

IDS = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(4))


def dora_model(seed: int = 0, targets="all-linear") -> ak.AdaptedModel:
    am = ak.adapt(make_llama())
    am.add("d", ak.DoRA(r=4, alpha=8, targets=targets))
    randomize(am, "d", scale=0.2, seed=seed)
    return am.eval()


def test_a_new_dora_adapter_is_the_identity_and_its_magnitude_the_weight_norm():
    am = ak.adapt(make_llama())
    with torch.no_grad():
        base = am(IDS).logits
        am.add("d", ak.DoRA(r=4, targets="all-linear"))
        am.activate("d")
        torch.testing.assert_close(am(IDS).logits, base, rtol=0, atol=1e-6)
    site = am.sites["model/layers/0/self_attn/q_proj"]
    torch.testing.assert_close(site.adapters["d"].magnitude, site.frozen.weight.norm(dim=1))


@pytest.mark.parametrize("model", [make_llama, make_gpt2])
def test_forward_equals_its_equation_and_its_gradients_too(model):
    """forward (g ⊙ (h − b + s·BAx) + b) against reference (x W'ᵀ + b with W' built), on Linear and GPT-2
    Conv1D sites: outputs in eval and train mode, and the gradients of m, A and B."""
    am = ak.adapt(model())
    am.add("d", ak.DoRA(r=3, targets="all-linear" if model is make_llama else ["c_attn", "c_proj"]))
    randomize(am, "d", scale=0.2)
    for site in list(am.sites.values())[:4]:
        adapter = site.adapters["d"]
        weight = adapter._weight()
        x = torch.randn(2, 5, weight.shape[1])
        h = torch.nn.functional.linear(x, weight, site.frozen.bias)  # the frozen module, without its hooks
        with torch.no_grad():
            torch.testing.assert_close(adapter(x, h), adapter.reference(x, h), rtol=1e-5, atol=1e-6)
            # the paper's form: the rebuilt weight W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_c, applied to x
            direction = weight + adapter.lora_B @ adapter.lora_A * adapter.scale
            rebuilt = adapter.magnitude.unsqueeze(1) * direction / direction.norm(dim=1, keepdim=True)
            torch.testing.assert_close(adapter(x, h), torch.nn.functional.linear(x, rebuilt, site.frozen.bias),
                                       rtol=1e-5, atol=1e-5)
        grads = []
        for form in (adapter.forward, adapter.reference):
            for p in adapter.parameters():
                p.grad = None
            form(x, h).square().sum().backward()
            grads.append([p.grad.clone() for p in adapter.parameters()])
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_training_lowers_the_loss_and_moves_the_magnitude():
    am = ak.adapt(make_llama())
    am.add("d", ak.DoRA(r=4, targets="all-linear"))
    am.activate("d")
    params = am.train_adapter("d")
    start = am.adapter("d").site_methods[next(iter(am.adapter("d").site_methods))].magnitude.detach().clone()
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(30):
        loss = am(IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0]
    moved = am.adapter("d").site_methods[next(iter(am.adapter("d").site_methods))].magnitude
    assert not torch.equal(start, moved)


def test_merge_and_unmerge_keep_the_outputs_and_the_weights():
    am = dora_model()
    am.activate("d")
    weights = {n: p.detach().clone() for n, p in am.base.named_parameters()}
    with torch.no_grad():
        want = am(IDS).logits
        am.merge("d")
        torch.testing.assert_close(am(IDS).logits, want, rtol=1e-5, atol=1e-5)
        am.unmerge("d")
        torch.testing.assert_close(am(IDS).logits, want, rtol=1e-5, atol=1e-5)
        for n, p in am.base.named_parameters():
            torch.testing.assert_close(p, weights[n], rtol=1e-5, atol=1e-6)
        weights = {n: p.detach().clone() for n, p in am.base.named_parameters()}
        am.merge("d", keep_original=True)
        am.unmerge("d")
        assert all(torch.equal(p, weights[n]) for n, p in am.base.named_parameters())


def test_rows_route_to_their_own_dora_lora_or_none_and_mixtures_average():
    am = dora_model()
    am.add("e", ak.DoRA(r=2, targets=["q_proj", "v_proj"]))
    am.add("l", ak.LoRA(r=2, targets="all-linear"))
    randomize(am, "e", scale=0.2, seed=1)
    randomize(am, "l", scale=0.2, seed=2)
    route = ["d", "e", None, "l", {"d": 0.5, "e": 0.5}, {"d": 1.5, "l": -0.5}]
    ids = IDS[torch.tensor([0, 1, 2, 0, 1, 2])]
    with torch.no_grad():
        with am.route(route):
            batched = am(ids).logits
        for i, entry in enumerate(route):
            am.activate(ak.Average(entry) if isinstance(entry, dict) else entry)
            torch.testing.assert_close(batched[i : i + 1], am(ids[i : i + 1]).logits, rtol=1e-4, atol=2e-5)
    with pytest.raises(ak.CompositionError, match="cannot be combined"):
        am.combine("de", {"d": 0.5, "e": 0.5})


def test_a_saved_dora_adapter_loads_with_the_same_outputs(tmp_path):
    am = dora_model()
    am.save("d", str(tmp_path / "d"))
    again = ak.adapt(make_llama())
    assert again.load(str(tmp_path / "d")) == "d"
    am.activate("d")
    again.activate("d")
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, am(IDS).logits, rtol=0, atol=1e-6)


def test_peft_dora_files_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    from adapterkit.io import export_peft_lora, load_peft_lora

    base = make_llama()
    torch.manual_seed(2)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
        init_lora_weights=False)).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "peft"))
    am = ak.adapt(copy.deepcopy(base))
    assert load_peft_lora(am, tmp_path / "peft", "from_peft") == "from_peft"
    assert isinstance(am.adapter("from_peft").config, ak.DoRA)
    am.activate("from_peft")
    am.eval()
    with torch.no_grad():
        want = pm(IDS).logits
        assert not torch.allclose(want, base(IDS).logits, atol=1e-3)
        torch.testing.assert_close(am(IDS).logits, want, rtol=0, atol=1e-5)
    folder = export_peft_lora(am, "from_peft", tmp_path / "exported")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, want, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_compiled_dora_model_equals_eager_in_eval_and_in_a_training_step():
    am = dora_model()
    am.add("l", ak.LoRA(r=2, targets="all-linear"))
    randomize(am, "l", scale=0.2)
    am.activate("d")
    torch._dynamo.reset()
    compiled = torch.compile(am, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(IDS).logits, am(IDS).logits, rtol=1e-4, atol=1e-5)
        with am.route(["d", "l", None]):
            torch._dynamo.reset()
            torch.testing.assert_close(torch.compile(am, fullgraph=True)(IDS).logits, am(IDS).logits,
                                       rtol=1e-4, atol=1e-5)
    params = am.train_adapter("d")
    am.eval()
    grads = []
    for model in (am, torch.compile(am, fullgraph=True)):
        torch._dynamo.reset()
        for p in params:
            p.grad = None
        model(IDS, labels=IDS).loss.backward()
        grads.append([p.grad.clone() for p in params])
    for eager, compiled_grad in zip(*grads, strict=True):
        torch.testing.assert_close(compiled_grad, eager, rtol=1e-4, atol=1e-6)


def test_dora_refuses_what_it_cannot_do():
    am = ak.adapt(make_llama())
    with pytest.raises(ak.TargetError, match="DoRA needs a Linear"):
        am.add("d", ak.DoRA(r=2, targets=["embed_tokens"]))
    pytest.importorskip("torchao")
    quantized = ak.adapt(ak.quantize_base(make_llama(), "int8"))
    with pytest.raises(ak.TargetError, match="holds quantized"):
        quantized.add("d", ak.DoRA(r=2, targets=["q_proj"]))
    assert quantized.adapters == [] and isinstance(quantized.base.model.embed_tokens, nn.Embedding)
