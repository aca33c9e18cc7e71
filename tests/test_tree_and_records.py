"""The setup tree (nested Stack / Fuse / Average, saved as dicts), fusion files, the one Adapter
record per name, and the one install path every source goes through."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.errors import AdapterFileError, CompositionError
from adapterkit.setups import fuses_in, setup_from_dict, setup_to_dict

from .conftest import randomize

SITES = ["0", "2"]


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def four_adapters(model: nn.Module) -> ak.AdaptedModel:
    am = ak.adapt(model, head=None)
    for i, name in enumerate("abcd"):
        am.add(name, ak.Bottleneck(placement="custom", bottleneck_size=2 + i % 2,
                                   activation="tanh" if i % 2 else "relu", targets=SITES))
        randomize(am, name)
    return am


def _bn(ad, h):
    """A serial bottleneck by hand: h + s·up(act(down(h)))."""
    act = {"relu": F.relu, "tanh": torch.tanh}[ad.activation]
    return h + ad.scaling * F.linear(act(F.linear(h, ad.down.weight, ad.down.bias)), ad.up.weight, ad.up.bias)


def _fusion(layer, h, outs):
    """AdapterFusion by hand: softmax over (K o_i)·(Q h)/sqrt(d), then Σ α_i V o_i."""
    o = torch.stack(outs, dim=1)
    q = F.linear(h, layer.query.weight, layer.query.bias)
    k = F.linear(o, layer.key.weight, layer.key.bias)
    alpha = ((k @ q.unsqueeze(-1)).squeeze(-1) / h.shape[-1] ** 0.5).softmax(-1)
    return (alpha.unsqueeze(-1) * F.linear(o, layer.value.weight)).sum(1)


def _by_hand(am, setup, site, h):
    """The setup tree at one site, written out in plain PyTorch."""
    if isinstance(setup, str):
        return _bn(am.adapter(setup).site_methods[site], h)
    if isinstance(setup, ak.Stack):
        for child in setup.children:
            h = _by_hand(am, child, site, h)
        return h
    if isinstance(setup, ak.Average):
        return h + sum(w * (_by_hand(am, c, site, h) - h) for c, w in setup.weights)
    layer = am.fusion(setup).layers[site]
    return _fusion(layer, h, [_by_hand(am, c, site, h) for c in setup.children])


def _model_by_hand(model, am, setup, x):
    h = x
    for i, site in enumerate(SITES):
        lin = model[2 * i]
        h = F.relu(_by_hand(am, setup, site, F.linear(h, lin.weight, lin.bias)))
    return F.linear(h, model[4].weight, model[4].bias)


NESTED = [
    ak.Stack("a", ak.Fuse("b", "c")),
    ak.Fuse(ak.Stack("a", "b"), "c"),
    ak.Fuse(ak.Stack("a", "b"), ak.Stack("c", "d")),
    ak.Stack("d", ak.Average({"a": 0.25, ak.Stack("b", "c"): 0.75})),
    ak.Average({ak.Stack("a", "b"): 0.5, "c": -0.5, "d": 1.0}),
    ak.Stack(ak.Fuse("a", "b"), ak.Fuse("c", "d")),
]


@pytest.mark.parametrize("setup", NESTED, ids=lambda s: s.label() if hasattr(s, "label") else str(s))
def test_nested_setups_match_plain_pytorch(setup):
    model = mlp()
    am = four_adapters(model)
    am.activate(setup)
    for fuse in fuses_in(setup):
        randomize(am, fuse, scale=0.3)
    x = torch.randn(5, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _model_by_hand(model, am, setup, x))
        assert not torch.allclose(model(x), _model_by_hand(model, am, "a", x))  # the tree mattered
    assert setup_from_dict(json.loads(json.dumps(setup_to_dict(setup)))) == setup


def test_the_tree_refuses_what_adapterhub_refuses():
    with pytest.raises(CompositionError, match="Fuse holds names, Stacks"):
        ak.Fuse("a", ak.Fuse("b", "c"))
    with pytest.raises(CompositionError, match="Stack holds"):
        ak.Stack("a", ak.Stack("b", "c"))
    with pytest.raises(CompositionError, match="Average holds"):
        ak.Average({ak.Fuse("a", "b"): 1.0})
    with pytest.raises(CompositionError, match="not a saved setup"):
        setup_from_dict({"parallel": ["a", "b"]})
    with pytest.raises(CompositionError, match="not a saved setup"):
        setup_from_dict({"average": [["a", "heavy"]]})
    for setup in [None, "a", *NESTED]:
        assert setup_from_dict(setup_to_dict(setup)) == setup


def test_prompt_adapters_stay_out_of_nested_fuse_and_average(make_minilm):
    am = ak.adapt(make_minilm())
    am.add("p", ak.PromptTuning(num_virtual_tokens=2))
    am.add("a", ak.Bottleneck(reduction=64))
    am.add("b", ak.Bottleneck(reduction=64))
    with pytest.raises(CompositionError, match=r"\['p'\].*not in Fuse or Average"):
        am.activate(ak.Stack("a", ak.Fuse(ak.Stack("p", "b"), "a")))
    am.activate(ak.Stack("p", ak.Fuse("a", "b")))  # a prompt beside a fusion is fine


# --- fusion files ----------------------------------------------------------------------------


def _trained_fusion(model, tmp_path):
    am = four_adapters(model)
    for name in "abc":
        am.save(name, tmp_path / name)
    fuse = ak.Fuse(ak.Stack("a", "b"), "c")
    params = am.train_adapter(fuse)
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(3):  # a few real steps, so the layers are not at their init
        opt.zero_grad()
        model(torch.randn(8, 6)).pow(2).mean().backward()
        opt.step()
    am.eval()
    return am, fuse


FRESH_PROCESS = textwrap.dedent("""
    import sys, torch
    from torch import nn
    import adapterkit as ak
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    am = ak.adapt(model, head=None)
    folder = sys.argv[1]
    for name in "abc":
        am.load(f"{folder}/{name}")
    setup = am.load(f"{folder}/fusion")
    am.activate(setup)
    x = torch.load(f"{folder}/x.pt", weights_only=True)
    with torch.no_grad():
        torch.save(model(x), f"{folder}/out.pt")
    print(repr(setup))
""")


def test_a_trained_fusion_is_saved_and_loaded_in_a_fresh_process(tmp_path):
    model = mlp()
    am, fuse = _trained_fusion(model, tmp_path)
    am.save(fuse, tmp_path / "fusion")
    manifest = json.loads((tmp_path / "fusion" / "adapter.json").read_text())
    assert manifest["kind"] == "fusion" and set(manifest["fused"]) == {"a", "b", "c"}
    x = torch.randn(4, 6)
    torch.save(x, tmp_path / "x.pt")
    am.activate(fuse)
    with torch.no_grad():
        want = model(x)
    run = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Fuse(children=(Stack(children=('a', 'b')), 'c'))" in run.stdout
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True), want)


def test_a_fusion_file_loads_only_onto_the_adapters_it_was_trained_on(tmp_path):
    model = mlp()
    am, fuse = _trained_fusion(model, tmp_path)
    am.save(fuse, tmp_path / "fusion.safetensors")
    other = ak.adapt(mlp(), head=None)
    with pytest.raises(AdapterFileError, match=r"load the fused adapters \['a', 'b', 'c'\] first"):
        other.load(tmp_path / "fusion.safetensors")
    for name in "abc":
        other.load(tmp_path / name)
    with torch.no_grad():
        other.adapter("b").site_methods["2"].up.bias.add_(0.1)  # "b" is not the one the fusion saw
    with pytest.raises(AdapterFileError, match=r"\['b'\] are not the ones this fusion was trained on"):
        other.load(tmp_path / "fusion.safetensors")
    assert len(other.fusions) == 0
    with pytest.raises(AdapterFileError, match="without name="):
        other.load(tmp_path / "fusion.safetensors", name="mine")
    other.delete("b")
    other.load(tmp_path / "b")
    assert other.load(tmp_path / "fusion.safetensors") == fuse
    for site in SITES:
        for key, t in am.fusion(fuse).layers[site].state_dict().items():
            assert torch.equal(other.fusion(fuse).layers[site].state_dict()[key], t)


# --- one record per adapter ------------------------------------------------------------------


def test_the_record_is_the_only_owner(make_minilm, minilm_inputs):
    model = make_minilm()
    am = ak.adapt(model)
    am.add("lora", ak.LoRA(r=2, modules_to_save=["bert.pooler"]), num_labels=2)
    am.add("bn", ak.Bottleneck(reduction=64))
    am.add("p", ak.PrefixTuning(num_virtual_tokens=2))
    am.activate(ak.Fuse("lora", "bn"))
    record = am.adapter("lora")
    assert [p for p, _ in record.parts()][-2:] == ["head", "copies.bert.pooler"]
    owned = {id(p) for name in am.adapters for p in am.adapter(name).parameters()}
    owned |= {id(p) for f in am.fusions.values() for p in f.parameters()}
    base = {id(p) for p in model.parameters()}
    assert {id(p) for p in am.parameters()} == owned | base
    keys = list(am.state_dict())
    assert len(keys) == len(set(keys)) and not any(k.startswith("sites") for k in keys)
    assert am.adapter_state_dict("lora").keys() == record.tensors().keys()
    am.to(torch.float64)  # one move reaches every module the sites and switches hold
    assert all(p.dtype == torch.float64 for s in am.sites.values() for p in s.adapters.parameters())
    assert all(p.dtype == torch.float64 for s in am.sites.values() for p in s.fusions.parameters())
    am.to(torch.float32)
    am.eval()
    am.add("late", ak.Bottleneck(reduction=64, dropout=0.5))
    assert not any(m.training for m in am.adapter("late").modules())  # new adapters follow the model's mode
    am.delete("lora")
    assert "lora" not in am.loaded and len(am.fusions) == 0
    with pytest.raises(ak.AdapterNotFoundError, match="no adapter named 'lora'"):
        am.adapter("lora")


def _no_trace(am, model, hooks_before):
    return am.adapters == [] and len(am.sites) == 0 and sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before


def test_every_source_installs_all_or_nothing_with_one_error_type(make_minilm, tmp_path):
    from safetensors.torch import load_file, save_file

    from adapterkit.io.peft import export_peft_lora
    from adapterkit.serve.cache import AdapterCache, AdapterKey
    from adapterkit.serve.errors import InvalidAdapter

    donor = ak.adapt(make_minilm())
    donor.add("x", ak.LoRA(r=2), num_labels=2)
    donor.save("x", tmp_path / "ours")
    export_peft_lora(donor, "x", tmp_path / "peft")
    for folder, weights in ((tmp_path / "ours", "adapter.safetensors"), (tmp_path / "peft", "adapter_model.safetensors")):
        tensors = load_file(folder / weights)
        key = next(k for k in tensors if "lora_B" in k and "layer.5" in k)
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
        save_file(tensors, folder / weights, metadata={"format": "pt"})

    model = make_minilm()
    am = ak.adapt(model)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    for folder in ("ours", "peft"):
        with pytest.raises(AdapterFileError, match="has shape"):
            am.load(tmp_path / folder)
        assert _no_trace(am, model, hooks)
    manifest = json.loads((tmp_path / "ours" / "adapter.json").read_text())
    tensors = load_file(tmp_path / "ours" / "adapter.safetensors")
    with pytest.raises(InvalidAdapter, match="has shape"):
        AdapterCache(am, 1 << 30).install(AdapterKey("t", "x", 1), manifest, tensors)
    assert _no_trace(am, model, hooks)


def test_io_uses_the_public_model_api_only():
    """No module above the model reaches into AdaptedModel's private attributes."""
    root = Path(ak.__file__).parent
    offenders = []
    for path in [*root.glob("io/*.py"), *root.glob("serve/*.py"), *root.glob("train/*.py"), *root.glob("cli/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in ("am", "model", "self.am")):
                offenders.append(f"{path.name}: {node.value.id}.{node.attr}")
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Attribute) and node.value.attr == "am"):
                offenders.append(f"{path.name}: .am.{node.attr}")
    assert offenders == []


def test_the_model_layer_does_not_import_io():
    code = "import sys, adapterkit.model; print([m for m in sys.modules if m.startswith('adapterkit.io')])"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
