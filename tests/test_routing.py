"""Per-row routing: each row of one batch uses its own adapter (or none), and matches that row run alone.

Adapters are randomised first so that a router which ignores them (or mixes rows up) fails.
Rows have one length, so padding plays no part.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import adapterkit as ak

from .conftest import make_cnn, make_gpt2, make_llama, make_lstm, randomize


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


def _out(out):
    return out.logits if hasattr(out, "logits") else out


def _row(x, i):
    if isinstance(x, dict):
        return {k: v[i : i + 1] for k, v in x.items()}
    return x[i : i + 1]


def _call(model, x):
    return _out(model(**x) if isinstance(x, dict) else model(x))


def check_rows(am, x, route, atol=2e-5):
    """Run `route` as one batch and each row alone with its adapter active; compare."""
    model = am.base
    with torch.no_grad():
        with am.route(route):
            batched = _call(model, x)
        singles = []
        for i, name in enumerate(route):
            am.activate(name)
            singles.append(_call(model, _row(x, i)))
        am.activate(None)
        base = _call(model, x)
    for i, name in enumerate(route):
        single = singles[i]
        width = single.shape[-1]
        torch.testing.assert_close(batched[i : i + 1, ..., :width], single, rtol=1e-4, atol=atol,
                                   msg=lambda m, i=i, name=name: f"row {i} ({name}): {m}")
        if name is not None:
            width = min(width, base.shape[-1])
            assert not torch.allclose(batched[i : i + 1, ..., :width], base[i : i + 1, ..., :width], atol=1e-5), (
                f"row {i} ({name}) equals the base model: the adapter did nothing"
            )
    return batched


METHODS = {
    "lora": lambda: [ak.LoRA(r=2), ak.LoRA(r=4, alpha=2, rslora=True)],  # ranks differ: padding
    "bottleneck": lambda: [ak.Bottleneck(placement="houlsby", bottleneck_size=4),
                           ak.Bottleneck(placement="houlsby", bottleneck_size=6)],
    "parallel": lambda: [ak.Bottleneck(placement="parallel", bottleneck_size=4, activation="gelu")] * 2,
    "ia3": lambda: [ak.IA3(), ak.IA3()],
    "bitfit": lambda: [ak.BitFit(), ak.BitFit()],
}

ROUTE = ["a", None, "b", "a"]


def _adapted(model, method):
    am = ak.adapt(model)
    for name, cfg in zip(("a", "b"), METHODS[method](), strict=True):
        am.add(name, cfg)
        randomize(am, name, scale=0.2)
    return am


MODELS = {
    "gpt2": (make_gpt2, lambda: torch.randint(0, 100, (4, 6), generator=_gen())),
    "llama": (make_llama, lambda: torch.randint(0, 100, (4, 6), generator=_gen())),
    "cnn": (make_cnn, lambda: torch.randn(4, 3, 16, 16, generator=_gen())),
    "lstm": (make_lstm, lambda: torch.randint(0, 50, (4, 5), generator=_gen())),
    "gru_seq_first": (lambda: make_lstm(cell=nn.GRU, batch_first=False),
                      lambda: torch.randint(0, 50, (4, 5), generator=_gen())),
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", list(MODELS))
def test_routing_rows_match_single_adapter_runs(family, method):
    make_model, make_x = MODELS[family]
    am = _adapted(make_model(), method)
    check_rows(am, make_x(), ROUTE)
    check_rows(am, make_x(), ["b", "b", "a", "a"])


@pytest.mark.parametrize("family", list(MODELS))
def test_every_row_on_one_lora_runs_its_own_weights_and_matches_single_runs(family):
    """One adapter for the whole batch takes the path without per-row copies of A and B."""
    make_model, make_x = MODELS[family]
    am = _adapted(make_model(), "lora")
    check_rows(am, make_x(), ["b"] * 4)
    check_rows(am, make_x()[:1], ["a"])
    with torch.inference_mode():  # in place into the site's own output, as serving runs it
        x = make_x()
        with am.route(["a"] * 4):
            routed = _call(am.base, x)
        am.activate("a")
        active = _call(am.base, x)
        am.activate(None)
    torch.testing.assert_close(routed, active, rtol=1e-4, atol=2e-5)


def test_a_route_of_base_rows_only_is_still_checked_against_the_batch():
    am = _adapted(make_llama(), "lora")
    x = MODELS["llama"][1]()
    with torch.no_grad():
        with am.route([None] * 4):
            torch.testing.assert_close(_call(am.base, x), _call(am.base.eval(), x))
        with pytest.raises(ak.CompositionError, match="routing list has 3 entries"), am.route([None] * 3):
            _call(am.base, x)


@pytest.mark.parametrize("method", list(METHODS))
def test_routing_on_minilm(make_minilm, minilm_inputs, method):
    am = _adapted(make_minilm(), method)
    check_rows(am, minilm_inputs, ROUTE)


def test_routing_mixes_methods_in_one_batch(make_minilm, minilm_inputs):
    am = ak.adapt(make_minilm())
    for name, cfg in (("lora", ak.LoRA(r=2)), ("bn", ak.Bottleneck(placement="houlsby", reduction=32)),
                      ("ia3", ak.IA3()), ("bitfit", ak.BitFit()), ("par", ak.Bottleneck(placement="parallel"))):
        am.add(name, cfg)
        randomize(am, name, scale=0.2)
    check_rows(am, minilm_inputs, ["lora", "bn", "ia3", "bitfit"])
    check_rows(am, minilm_inputs, [None, "par", "lora", "ia3"])


def test_routing_mixes_methods_on_cnn_and_gpt2():
    cnn = ak.adapt(make_cnn())
    for name, cfg in (("lora", ak.LoRA(r=2)), ("bn", ak.Bottleneck(bottleneck_size=3)), ("ia3", ak.IA3())):
        cnn.add(name, cfg)
        randomize(cnn, name, scale=0.2)
    check_rows(cnn, torch.randn(4, 3, 16, 16, generator=_gen()), ["ia3", "lora", None, "bn"])

    gpt2 = ak.adapt(make_gpt2())
    for name, cfg in (("lora", ak.LoRA(r=2)), ("emb", ak.LoRA(r=3, targets=["wte"])), ("ia3", ak.IA3()),
                      ("bitfit", ak.BitFit()), ("par", ak.Bottleneck(placement="parallel", bottleneck_size=4))):
        gpt2.add(name, cfg)
        randomize(gpt2, name, scale=0.2)
    check_rows(gpt2, torch.randint(0, 100, (5, 6), generator=_gen()), ["emb", "lora", "ia3", "bitfit", "par"])


def test_routing_a_residual_input_adapter_beside_ordinary_ones_on_bert():
    """AdapterHub's par_bn form (a bottleneck on the block's second argument, the residual r) routes
    beside a bottleneck on the same blocks' first argument, input-side IA³ there and LoRA: the same
    class on two arguments of one module never shares a group, and each row equals itself run alone."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=32)).eval()
    am = ak.adapt(model)
    blocks = r"re:(^|\.)layer\.\d+\.(attention\.)?output$"
    for name, cfg in (("par", ak.Bottleneck(placement="custom", targets=[blocks], input_arg=1, reduction=4,
                                            scaling=4.0)),
                      ("first", ak.Bottleneck(placement="custom", targets=[r"re:layer\.\d+\.output$"], input_arg=0,
                                              bottleneck_size=3)),
                      ("ia3", ak.IA3(targets=[], input_targets=[r"re:layer\.\d+\.output$"])),
                      ("lora", ak.LoRA(r=2))):
        am.add(name, cfg)
        randomize(am, name, scale=0.3)
    site = next(s for s in am.sites.values() if s.module_name == "bert.encoder.layer.0.output")
    assert am.site_names("par")["bert.encoder.layer.0.output"] == "input"
    assert {arg: sorted(g.names for g in groups.values()) for arg, groups in site._layout().inputs.items()} == {
        0: [("first",), ("ia3",)], 1: [("par",)]}
    x = torch.randint(0, 100, (6, 7), generator=_gen())
    check_rows(am, x, ["par", "lora", None, "first", "par", "ia3"])
    check_rows(am, x, ["first", "par", "par", "first", "lora", None])


def test_routing_with_heads_of_different_label_counts(make_minilm, minilm_inputs):
    model = make_minilm()
    am = ak.adapt(model)
    am.add("two", ak.LoRA(r=2), labels=["neg", "pos"])
    am.add("five", ak.BitFit(), labels=list("abcde"))
    am.add("nohead", ak.IA3())
    for n in am.adapters:
        randomize(am, n, scale=0.2)
    route = ["two", "five", None, "nohead"]
    batched = check_rows(am, minilm_inputs, route)
    assert batched.shape == (4, 5)
    # Narrower rows are zero-padded on the right.
    assert torch.equal(batched[0, 2:], torch.zeros(3)) and torch.equal(batched[2, 3:], torch.zeros(2))


def test_route_overrides_the_active_setup_and_is_restored():
    model = make_cnn()
    am = ak.adapt(model)
    am.add("a", ak.LoRA(r=2))
    randomize(am, "a")
    am.activate("a")
    x = torch.randn(2, 3, 16, 16, generator=_gen())
    with torch.no_grad():
        active = model(x)
        with am.route([None, None]):
            am_none = model(x)
        assert am.active == "a" and am.state.route is None
        torch.testing.assert_close(model(x), active)
        am.activate(None)
        torch.testing.assert_close(am_none, model(x))
        with pytest.raises(RuntimeError), am.route(["a", None]):
            raise RuntimeError("boom")
        assert am.state.route is None


def test_routing_errors():
    model = make_cnn()
    am = ak.adapt(model)
    am.add("a", ak.LoRA(r=2))
    am.add("b", ak.BitFit())
    x = torch.randn(3, 3, 16, 16)
    with pytest.raises(ak.CompositionError, match="routing list has 2 entries but the batch .* has 3 rows"):
        with am.route(["a", "b"]):
            model(x)
    with pytest.raises(ak.AdapterNotFoundError, match="'zzz'"):
        with am.route(["a", "zzz", None]):
            pass
    for bad in ([], "a", None, ("a", 3)):
        with pytest.raises((ak.CompositionError, ak.AdapterNotFoundError)):
            with am.route(bad):
                pass
    am.merge("a")
    with pytest.raises(ak.CompositionError, match="unmerge"):
        with am.route(["a", None, "b"]):
            pass
    am.unmerge("a")
    assert am.state.route is None
    with am.route(["a", None, "b"]):
        with pytest.raises(ak.CompositionError, match="inside a route"):
            am.merge("a")
    assert not am.state.merged


def test_routing_sees_parameter_updates_and_deletes():
    model = make_cnn()
    am = ak.adapt(model)
    am.add("a", ak.LoRA(r=2))
    am.add("b", ak.Bottleneck())
    randomize(am, "a")
    randomize(am, "b")
    x = torch.randn(4, 3, 16, 16, generator=_gen())
    check_rows(am, x, ["a", "b", "a", None])  # builds the cached stacks
    randomize(am, "a", seed=5)  # an optimizer-like in-place step
    check_rows(am, x, ["a", "b", "a", None])
    am.load_adapter_state_dict("b", {k: v * 1.5 for k, v in am.adapter_state_dict("b").items()})
    check_rows(am, x, ["a", "b", "b", None])
    am.delete("a")
    am.add("a", ak.IA3())
    randomize(am, "a")
    check_rows(am, x, ["a", "b", None, "a"])


def test_routing_sees_changes_to_adapters_the_previous_batch_did_not_use():
    am = ak.adapt(make_cnn())
    for name in ("a", "b", "c"):
        am.add(name, ak.LoRA(r=2))
        randomize(am, name, seed=ord(name))
    x = torch.randn(3, 3, 16, 16, generator=_gen())
    check_rows(am, x, ["a", "b", "c"])  # builds the cached stacks
    randomize(am, "c", seed=11)  # changed while no batch uses it
    check_rows(am, x, ["a", "b", None])
    check_rows(am, x, ["c", "b", "c"])
    am.delete("b")
    am.add("b", ak.LoRA(r=2))  # same name, same kind, a new module
    randomize(am, "b", seed=12)
    check_rows(am, x, ["a", "b", "c"])


def test_routed_forward_never_walks_all_attached_adapters():
    """Once the caches are built, a routed forward reads only the adapters its rows name: none of
    the per-forward bookkeeping iterates the (maybe thousands of) adapters attached to a site."""

    class NoWalk(dict):
        def walked(self, *args):
            raise AssertionError("a forward iterated every attached adapter")

        __iter__ = keys = values = items = walked

    am = ak.adapt(make_cnn())
    for i in range(40):
        am.add(f"a{i}", ak.LoRA(r=2) if i % 2 else ak.Bottleneck())
        randomize(am, f"a{i}", seed=i)
    x = torch.randn(3, 3, 16, 16, generator=_gen())
    check_rows(am, x, ["a1", "a2", None])  # builds the groups and the stacks

    for site in am.sites.values():  # the plain dict every ModuleDict keeps its modules in
        site.adapters._modules = NoWalk(site.adapters._modules)
    with torch.no_grad(), am.route(["a7", "a30", "a1"]):  # other adapters, a new route
        out = am(x)
    for site in am.sites.values():
        site.adapters._modules = dict(dict.items(site.adapters._modules))
    check_rows(am, x, ["a7", "a30", "a1"])
    versions = {key: site.adapters.version for key, site in am.sites.items()}
    am.add("late", ak.LoRA(r=2))  # attaching bumps the version, which rebuilds the caches
    bumped = {key for key, site in am.sites.items() if site.adapters.version > versions.get(key, -1)}
    assert bumped == {key for key, site in am.sites.items() if "late" in site.adapters._modules}
    randomize(am, "late")
    check_rows(am, x, ["late", "a7", None])
    assert out.shape[0] == 3


def test_routing_after_changing_dtype():
    am = ak.adapt(make_cnn())
    am.add("a", ak.LoRA(r=2))
    am.add("b", ak.Bottleneck())
    randomize(am, "a")
    randomize(am, "b")
    x = torch.randn(3, 3, 16, 16, generator=_gen())
    check_rows(am, x, ["a", "b", None])  # caches float32 stacks
    am.double()
    out = check_rows(am, x.double(), ["a", "b", None], atol=1e-10)
    assert out.dtype == torch.float64


def test_routing_with_grad_trains_only_the_routed_adapters():
    model = make_gpt2()
    am = ak.adapt(model)
    for n in ("a", "b", "c"):
        am.add(n, ak.LoRA(r=2))
        randomize(am, n)
    for p in am.parameters():
        p.requires_grad_(False)
    for n in ("a", "b", "c"):
        for p in am.adapter_parameters(n):
            p.requires_grad_(True)
    x = torch.randint(0, 100, (3, 6), generator=_gen())
    with am.route(["a", None, "b"]):
        out = model(x).logits
    with torch.no_grad():
        with am.route(["a", None, "b"]):
            torch.testing.assert_close(out, model(x).logits)
    out.sum().backward()
    for n, used in (("a", True), ("b", True), ("c", False)):
        grads = [p.grad for p in am.adapter_parameters(n)]
        assert all((g is not None and g.abs().sum() > 0) for g in grads) == used, n


# --- property test ------------------------------------------------------------------------------


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.mix = nn.Conv2d(4, 4, 1)
        self.proj = nn.Linear(4 * 4 * 4, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.mix(torch.relu(self.conv(x)))
        return self.out(torch.tanh(self.proj(h.flatten(1))))


NAMES = ["lora2", "lora3", "bn", "bn_par", "ia3", "ia3_in", "bitfit"]
_CACHE: dict = {}


def _small():
    """One small model with seven adapters over Linear and Conv sites, and each row's single-run result."""
    if not _CACHE:
        torch.manual_seed(0)
        model = Small().eval()
        am = ak.adapt(model, head=None)
        am.add("lora2", ak.LoRA(r=2, targets=["Conv2d", "Linear"]))
        am.add("lora3", ak.LoRA(r=3, alpha=1, targets=["conv", "proj"]))
        am.add("bn", ak.Bottleneck(placement="custom", bottleneck_size=2, targets=["conv", "proj"]))
        am.add("bn_par", ak.Bottleneck(placement="custom", parallel=True, bottleneck_size=3, targets=["mix", "out"]))
        am.add("ia3", ak.IA3(targets=["Conv2d", "proj"]))
        am.add("ia3_in", ak.IA3(targets=[], input_targets=["mix", "out"]))
        am.add("bitfit", ak.BitFit(targets=["conv", "proj"]))
        for n in NAMES:
            randomize(am, n, scale=0.3)
        x = torch.randn(8, 2, 4, 4, generator=_gen())
        _CACHE.update(am=am, x=x, singles=_singles(am, x, [*NAMES, None]))
    return _CACHE["am"], _CACHE["x"], _CACHE["singles"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from([*NAMES, None]), min_size=1, max_size=8))
def test_property_random_routes_match_single_adapter_runs(route):
    am, x, singles = _small()
    rows = x[: len(route)]
    with torch.no_grad(), am.route(route):
        batched = am(rows)
    expected = torch.stack([singles[name][i] for i, name in enumerate(route)])
    torch.testing.assert_close(batched, expected, rtol=1e-4, atol=1e-5)


def test_property_model_adapters_are_not_identity():
    am, x, singles = _small()
    for name in NAMES:
        assert not torch.allclose(singles[name], singles[None], atol=1e-4), name


def test_a_large_rank_routes_apart_and_is_counted_with_its_padding():
    """One tenant's rank-384 LoRA must not pad the routing stacks of everyone else's rank-8 ones."""
    from adapterkit.serve.cache import _resident_bytes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512)).eval()
    am = ak.adapt(model, head=None)
    for name, r in (("a", 8), ("b", 4), ("big", 384)):
        am.add(name, ak.LoRA(r=r, targets=["0"]))
        randomize(am, name)
    x = torch.randn(3, 512)
    with torch.no_grad():
        with am.route(["a", "b", "a"]):
            routed = model(x)
        stacks = am.sites["0"]._stacks
        assert [c.stacked.rank for c in stacks.values()] == [8]  # "big" is not in there
        with am.route(["a", "big", None]):
            mixed = model(x)
        for i, name in enumerate(["a", "big", None]):
            am.activate(name)
            torch.testing.assert_close(mixed[i], model(x[i : i + 1])[0])
        for i, name in enumerate(["a", "b", "a"]):
            am.activate(name)
            torch.testing.assert_close(routed[i], model(x[i : i + 1])[0])
    own = am.adapter("big").parameter_bytes()
    assert _resident_bytes(am.adapter("big")) == own + own * 512 // 384
    assert _resident_bytes(am.adapter("b")) == 3 * am.adapter("b").parameter_bytes()


_LORA_MIX: dict = {}


@torch.no_grad()
def _singles(am, x, names):
    """Each row of x run alone under each of `names`: name -> [rows, ...]."""
    out = {}
    for name in names:
        am.activate(name)
        out[name] = torch.cat([am.base(x[i : i + 1]) for i in range(len(x))])
    am.activate(None)
    return out


def _lora_mix():
    """Small and large ranks on one site: the large ones run per adapter, the others skip foreign rows."""
    if not _LORA_MIX:
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(24, 24), nn.GELU(), nn.Linear(24, 24)).eval()
        am = ak.adapt(model, head=None)
        for name, r in (("s1", 2), ("s2", 8), ("l1", 64), ("l2", 96)):
            am.add(name, ak.LoRA(r=r, targets=["0", "2"]))
            randomize(am, name, scale=0.3)
        x = torch.randn(8, 5, 24, generator=_gen(4))  # [rows, tokens, features]
        _LORA_MIX.update(am=am, x=x, singles=_singles(am, x, ["s1", "s2", "l1", "l2", None]))
    return _LORA_MIX["am"], _LORA_MIX["x"], _LORA_MIX["singles"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(["s1", "s2", "l1", "l2", None]), min_size=1, max_size=8))
def test_property_lora_rank_groups_match_single_adapter_runs(route):
    am, x, singles = _lora_mix()
    with torch.no_grad(), am.route(route):
        batched = am(x[: len(route)])
    expected = torch.stack([singles[name][i] for i, name in enumerate(route)])
    torch.testing.assert_close(batched, expected, rtol=1e-4, atol=1e-5)
    for name in ("l1", "l2"):
        assert not torch.allclose(singles[name], singles[None], atol=1e-3)
