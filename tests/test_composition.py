"""Stack, Fuse, Average and weighted combination, checked against the same computation by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak

from .conftest import make_cnn, randomize


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def _ad(am, site, name):
    return am.sites[site].adapters[name]


def _bn(ad, h):
    """A serial bottleneck by hand: h + s·up(act(down(h)))."""
    act = {"relu": F.relu, "tanh": torch.tanh}[ad.activation]
    return h + ad.scaling * F.linear(act(F.linear(h, ad.down.weight, ad.down.bias)), ad.up.weight, ad.up.bias)


def _lora(ad, x):
    return ad.scale * (x @ ad.lora_A.T @ ad.lora_B.T)


# --- Stack -----------------------------------------------------------------------------------


def test_stack_applies_adapters_in_order_by_hand():
    model = mlp()
    am = ak.adapt(model, head=None)
    am.add("a", ak.Bottleneck(placement="custom", bottleneck_size=3, targets=["0", "2"]))
    am.add("b", ak.Bottleneck(placement="custom", bottleneck_size=2, activation="tanh", scaling=2.0, targets=["0", "2"]))
    randomize(am, "a")
    randomize(am, "b")
    x = torch.randn(5, 6)
    lin = [model[0], model[2], model[4]]

    def by_hand(order):
        h = x
        for i, site in enumerate(["0", "2"]):
            h = F.linear(h, lin[i].weight, lin[i].bias)  # not lin[i](h): that would run the hooks
            for name in order:
                h = _bn(_ad(am, site, name), h)
            h = F.relu(h)
        return lin[2](h)

    with torch.no_grad():
        am.activate(ak.Stack("a", "b"))
        ab = model(x)
        am.activate(ak.Stack("b", "a"))
        ba = model(x)
    torch.testing.assert_close(ab, by_hand(["a", "b"]))
    torch.testing.assert_close(ba, by_hand(["b", "a"]))
    assert not torch.allclose(ab, ba)


def test_stack_of_lora_and_bottleneck_at_one_site():
    model = nn.Sequential(nn.Linear(6, 5)).eval()
    am = ak.adapt(model, head=None)
    am.add("lora", ak.LoRA(r=2, targets=["0"]))
    am.add("bn", ak.Bottleneck(placement="custom", bottleneck_size=2, targets=["0"]))
    am.add("ia3in", ak.IA3(targets=[], input_targets=["0"]))
    for n in am.adapters:
        randomize(am, n)
    x = torch.randn(4, 6)
    lora, bn, ia3 = _ad(am, "0", "lora"), _ad(am, "0", "bn"), _ad(am, "0", "ia3in")
    h = model[0](x)
    with torch.no_grad():
        am.activate(ak.Stack("lora", "bn"))
        torch.testing.assert_close(model(x), _bn(bn, h + _lora(lora, x)))
        am.activate(ak.Stack("bn", "lora"))
        torch.testing.assert_close(model(x), _bn(bn, h) + _lora(lora, x))
        am.activate(ak.Stack("ia3in", "lora"))  # the input side runs before the module
        xs = x * ia3.ia3_l
        torch.testing.assert_close(model(x), F.linear(xs, model[0].weight, model[0].bias) + _lora(lora, xs))


def test_stack_on_minilm_equals_adapters_applied_one_after_the_other(make_minilm, minilm_inputs):
    """Language + task adapters (MAD-X): a Stack over houlsby and pfeiffer sites."""
    model = make_minilm()
    am = ak.adapt(model)
    am.add("lang", ak.Bottleneck(placement="houlsby", reduction=32))
    am.add("task", ak.Bottleneck(placement="pfeiffer", reduction=32), labels=["a", "b"])
    randomize(am, "lang")
    randomize(am, "task")
    with torch.no_grad():
        am.activate(ak.Stack("lang", "task"))
        stacked = model(**minilm_inputs).logits
        # Where only one of them lives the Stack is that adapter; where both live, lang then task.
        am.activate("task")
        task_only = model(**minilm_inputs).logits
    assert stacked.shape == (4, 2)  # the task adapter's head answers
    assert not torch.allclose(stacked, task_only, atol=1e-5)


# --- Fuse ------------------------------------------------------------------------------------


def test_fuse_of_identity_adapters_is_identity(make_minilm, minilm_inputs):
    model = make_minilm()
    am = ak.adapt(model)
    for n in ("a", "b", "c"):
        am.add(n, ak.Bottleneck(reduction=32))
    with torch.no_grad():
        base = model(**minilm_inputs).logits
        am.activate(ak.Fuse("a", "b", "c"))
        torch.testing.assert_close(model(**minilm_inputs).logits, base, rtol=1e-5, atol=1e-5)


def test_fuse_by_hand_on_one_site():
    model = nn.Sequential(nn.Linear(6, 5)).eval()
    am = ak.adapt(model, head=None)
    for n in ("a", "b"):
        am.add(n, ak.Bottleneck(placement="custom", bottleneck_size=2, targets=["0"]))
        randomize(am, n)
    fuse = ak.Fuse("a", "b")
    am.activate(fuse)
    randomize(am, fuse)
    layer = am.sites["0"].fusions[fuse.key]
    x = torch.randn(3, 6)
    h = F.linear(x, model[0].weight, model[0].bias)
    outs = torch.stack([_bn(_ad(am, "0", "a"), h), _bn(_ad(am, "0", "b"), h)], dim=1)  # [B, 2, d]
    q = F.linear(h, layer.query.weight, layer.query.bias)
    k = F.linear(outs, layer.key.weight, layer.key.bias)
    alpha = ((k @ q.unsqueeze(-1)).squeeze(-1) / 5**0.5).softmax(-1)
    expected = (alpha.unsqueeze(-1) * F.linear(outs, layer.value.weight)).sum(1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_fuse_has_its_own_parameters_and_trains_alone(make_minilm, minilm_inputs):
    model = make_minilm()
    am = ak.adapt(model)
    am.add("a", ak.Bottleneck(reduction=32))
    am.add("b", ak.Bottleneck(reduction=32))
    randomize(am, "a")
    randomize(am, "b")
    before = {id(p) for p in am.parameters()}
    fuse = ak.Fuse("a", "b")
    params = am.train_adapter(fuse)
    d = 384
    assert len(params) == 6 * 5  # per pfeiffer site: query (w, b), key (w, b), value (w)
    assert sum(p.numel() for p in params) == 6 * (3 * d * d + 2 * d)
    assert {id(p) for p in params}.isdisjoint(before) and {id(p) for p in params} <= {id(p) for p in am.parameters()}
    assert {id(p) for p in am.parameters() if p.requires_grad} == {id(p) for p in params}

    model(**minilm_inputs).logits.sum().backward()
    assert {id(p) for p in am.parameters() if p.grad is not None} == {id(p) for p in params}
    assert all(p.grad is None for n in ("a", "b") for p in am.adapter_parameters(n))

    # Deleting a fused adapter removes the fusion built over it.
    am.delete("b")
    assert all(len(site.fusions) == 0 for site in am.sites.values())
    with pytest.raises(ak.AdapterNotFoundError):
        am.activate(fuse)


def test_fuse_refuses_input_side_adapters():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    am = ak.adapt(model, head=None)
    am.add("a", ak.IA3(targets=[], input_targets=["0"]))
    am.add("b", ak.IA3(targets=[], input_targets=["0"]))
    am.activate(ak.Fuse("a", "b"))
    with pytest.raises(ak.CompositionError, match="Fuse cannot combine input-side"):
        model(torch.randn(2, 4))


class _Residual(nn.Module):
    """A post-norm-style block f(x, r) = dense(x) + r: its residual r is its second argument."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(4, 6)

    def forward(self, x, r):
        return self.dense(x) + r


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = _Residual()

    def forward(self, x, r):
        return self.block(x, r)


def test_input_side_adapters_on_two_arguments_compose_by_hand():
    """Stack, Average and Fuse on adapters reading argument 0 and argument 1 of one module."""
    model = _TwoInputs().eval()
    am = ak.adapt(model, head=None)
    for name, arg in (("p", 1), ("q", 1), ("z", 0)):
        am.add(name, ak.Bottleneck(placement="custom", bottleneck_size=2, targets=["block"], input_arg=arg))
        randomize(am, name, scale=0.5)
    x, r = torch.randn(3, 4), torch.randn(3, 6)
    f = lambda x, r: F.linear(x, model.block.dense.weight, model.block.dense.bias) + r  # noqa: E731
    p, q, z = (_ad(am, "block", n) for n in ("p", "q", "z"))
    with torch.no_grad():
        for setup, want in (("p", f(x, _bn(p, r))), ("z", f(_bn(z, x), r)),
                            (ak.Stack("z", "p"), f(_bn(z, x), _bn(p, r))),
                            (ak.Stack("p", "q"), f(x, _bn(q, _bn(p, r)))),
                            (ak.Average({"p": 0.5, "q": 0.25, "z": 2.0}),
                             f(x + 2.0 * (_bn(z, x) - x), r + 0.5 * (_bn(p, r) - r) + 0.25 * (_bn(q, r) - r)))):
            am.activate(setup)
            torch.testing.assert_close(model(x, r), want)
        am.activate(ak.Fuse("p", "q"))
        with pytest.raises(ak.CompositionError, match="Fuse cannot combine input-side"):
            model(x, r)
    am.activate(None)


# --- Average and combine ------------------------------------------------------------------------


def test_average_by_hand():
    model = nn.Sequential(nn.Linear(6, 5)).eval()
    am = ak.adapt(model, head=None)
    am.add("a", ak.Bottleneck(placement="custom", bottleneck_size=2, targets=["0"]))
    am.add("b", ak.Bottleneck(placement="custom", bottleneck_size=3, targets=["0"]))
    randomize(am, "a")
    randomize(am, "b")
    x = torch.randn(3, 6)
    h = F.linear(x, model[0].weight, model[0].bias)
    a, b = _bn(_ad(am, "0", "a"), h), _bn(_ad(am, "0", "b"), h)
    with torch.no_grad():
        am.activate(ak.Average({"a": 0.7, "b": 0.6}))  # weights need not sum to one
        torch.testing.assert_close(model(x), h + 0.7 * (a - h) + 0.6 * (b - h))


def _single_site(kind):
    torch.manual_seed(0)
    module = {"linear": lambda: nn.Linear(6, 5), "conv": lambda: nn.Conv2d(3, 4, 3, padding=1)}[kind]()
    x = torch.randn(2, 6) if kind == "linear" else torch.randn(2, 3, 5, 5)
    return nn.Sequential(module).eval(), x


COMBINABLE = {
    "lora": lambda i: ak.LoRA(r=2 + i, alpha=4 + 3 * i, rslora=bool(i), targets=["0"]),
    "ia3_out": lambda i: ak.IA3(targets=["0"]),
    "ia3_in": lambda i: ak.IA3(targets=[], input_targets=["0"]),
    "bitfit": lambda i: ak.BitFit(targets=["0"]),
}


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("method", list(COMBINABLE))
@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.8, -0.3)])
def test_combine_equals_average_of_deltas(kind, method, weights):
    model, x = _single_site(kind)
    am = ak.adapt(model, head=None)
    for i, n in enumerate(("a", "b")):
        am.add(n, COMBINABLE[method](i))
        randomize(am, n)
    w = {"a": weights[0], "b": weights[1]}
    am.combine("ab", w)
    assert am.adapter("ab").meta["combined_from"] == w
    with torch.no_grad():
        am.activate(ak.Average(w))
        expected = model(x)
        am.activate("ab")
        got = model(x)
        am.activate("a")
        only_a = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, only_a, atol=1e-5)


def test_combined_lora_has_summed_rank():
    model, _ = _single_site("linear")
    am = ak.adapt(model, head=None)
    am.add("a", ak.LoRA(r=2, targets=["0"]))
    am.add("b", ak.LoRA(r=3, targets=["0"]))
    am.combine("ab", {"a": 1.0, "b": 1.0})
    cfg = am.adapter("ab").config
    assert (cfg.r, cfg.scale) == (5, 1.0)
    assert _ad(am, "0", "ab").lora_A.shape == (5, 6)


@pytest.mark.parametrize("method", ["lora", "ia3", "bitfit"])
def test_combine_on_minilm_equals_average(make_minilm, minilm_inputs, method):
    model = make_minilm()
    am = ak.adapt(model)
    cfg = {"lora": ak.LoRA(r=2), "ia3": ak.IA3(), "bitfit": ak.BitFit()}[method]
    for n in ("a", "b"):
        am.add(n, cfg)
        randomize(am, n)
    am.combine("ab", {"a": 0.5, "b": 0.5})
    with torch.no_grad():
        am.activate(ak.Average({"a": 0.5, "b": 0.5}))
        expected = model(**minilm_inputs).logits
        am.activate("ab")
        got = model(**minilm_inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_combine_on_cnn_lora_equals_average():
    model = make_cnn()
    am = ak.adapt(model)
    am.add("a", ak.LoRA(r=2))
    am.add("b", ak.LoRA(r=4, alpha=2))
    randomize(am, "a")
    randomize(am, "b")
    am.combine("ab", {"a": 0.3, "b": 0.9})
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        am.activate(ak.Average({"a": 0.3, "b": 0.9}))
        expected = model(x)
        am.activate("ab")
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_combine_bottleneck_averages_parameters():
    model, x = _single_site("linear")
    am = ak.adapt(model, head=None)
    for n in ("a", "b"):
        am.add(n, ak.Bottleneck(placement="custom", bottleneck_size=2, scaling=0.5, targets=["0"]))
        randomize(am, n)
    am.combine("ab", {"a": 0.25, "b": 0.75})
    a, b, ab = (_ad(am, "0", n) for n in ("a", "b", "ab"))
    assert ab.scaling == 1.0
    torch.testing.assert_close(ab.down.weight, 0.25 * a.down.weight + 0.75 * b.down.weight)
    torch.testing.assert_close(ab.up.weight, 0.5 * (0.25 * a.up.weight + 0.75 * b.up.weight))


def test_combine_refuses_mixed_methods_and_targets_and_leaves_nothing():
    model, _ = _single_site("linear")
    am = ak.adapt(model, head=None)
    am.add("lora", ak.LoRA(r=2, targets=["0"]))
    am.add("ia3", ak.IA3(targets=["0"]))
    with pytest.raises(ak.CompositionError, match="one method"):
        am.combine("x", {"lora": 0.5, "ia3": 0.5})
    cnn = ak.adapt(make_cnn())
    cnn.add("a", ak.LoRA(r=2))
    cnn.add("b", ak.LoRA(r=2, targets=["Conv2d"]))
    with pytest.raises(ak.CompositionError, match="default targets"):
        cnn.combine("x", {"a": 0.5, "b": 0.5})
    with pytest.raises(ak.AdapterExistsError):
        cnn.combine("a", {"a": 0.5})
    assert am.adapters == ["lora", "ia3"] and cnn.adapters == ["a", "b"]
