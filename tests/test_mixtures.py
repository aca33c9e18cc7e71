"""Per-row mixtures: a row may use a weighted set of adapters, beside plain rows in the same batch.

A mixed row equals, run alone: `combine(...)` of its adapters (LoRA, IA³, BitFit: Σ w_i · delta_i)
or `Average` of them (bottlenecks: the weighted mean of their outputs). Plain rows equal themselves
alone. Checked over random batches (hypothesis), on several sites per layer, and compiled.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adapterkit as ak

from .conftest import make_llama, randomize

METHODS = {
    "lora": [ak.LoRA(r=4, targets="all-linear"), ak.LoRA(r=8, alpha=4, targets="all-linear"),
             ak.LoRA(r=2, targets=["q_proj", "v_proj"])],
    "ia3": [ak.IA3(), ak.IA3(), ak.IA3()],
    "bitfit": [ak.BitFit(), ak.BitFit(), ak.BitFit()],
    "bottleneck": [ak.Bottleneck(reduction=4), ak.Bottleneck(reduction=2), ak.Bottleneck(reduction=4)],
}
IDS = torch.randint(0, 64, (6, 7), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def am() -> ak.AdaptedModel:
    am = ak.adapt(make_llama())
    with torch.no_grad():
        for method, configs in METHODS.items():
            for i, config in enumerate(configs):
                name = f"{method}{i}"
                am.add(name, config)
                randomize(am, name, scale=0.2 if method != "ia3" else 0.3)
    return am.eval()


def alone(am: ak.AdaptedModel, entry, row: torch.Tensor) -> torch.Tensor:
    """One row run by itself: its adapter, or its mixture as combine (delta methods) or Average."""
    if not isinstance(entry, dict):
        am.activate(entry)
        return am(row).logits
    method = next(iter(entry)).rstrip("0123456789")
    if method == "bottleneck":
        am.activate(ak.Average(entry))
        return am(row).logits
    am.combine("mixed", entry)
    try:
        am.activate("mixed")
        return am(row).logits
    finally:
        am.activate(None)
        am.delete("mixed")


weights = st.floats(-1.5, 1.5, allow_nan=False).filter(lambda w: abs(w) > 0.05)


@st.composite
def rows(draw):
    entries = []
    for _ in range(IDS.shape[0]):
        kind = draw(st.sampled_from(["none", "one", "mix"]))
        method = draw(st.sampled_from(sorted(METHODS)))
        if kind == "none":
            entries.append(None)
        elif kind == "one":
            entries.append(f"{method}{draw(st.integers(0, 2))}")
        else:
            chosen = draw(st.lists(st.integers(0, 2), min_size=2, max_size=3, unique=True))
            entries.append({f"{method}{i}": draw(weights) for i in chosen})
    return entries


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=rows())
def test_each_mixed_row_equals_its_combination_alone_and_plain_rows_themselves(am, route):
    with torch.no_grad():
        with am.route(route):
            batched = am(IDS).logits
        for i, entry in enumerate(route):
            torch.testing.assert_close(batched[i : i + 1], alone(am, entry, IDS[i : i + 1]), rtol=1e-4, atol=2e-5,
                                       msg=lambda m, i=i, entry=entry: f"row {i} ({entry}): {m}")
        am.activate(None)


def test_a_mixture_is_not_its_parts_and_weight_one_is_the_adapter(am):
    with torch.no_grad():
        with am.route([{"lora0": 0.5, "lora1": 0.5}, {"lora0": 1.0}, "lora0", None]):
            out = am(IDS[:1].repeat(4, 1)).logits  # one input in every row
    assert not torch.allclose(out[0], out[2], atol=1e-4)
    torch.testing.assert_close(out[1], out[2])


def test_mixtures_train_every_adapter_they_name(am):
    """Gradients reach each adapter of a mixture in proportion to its share (a mixture trains too)."""
    with torch.enable_grad():
        params = {n: list(am.adapter_parameters(n)) for n in ("lora0", "lora1")}
        for ps in params.values():
            for p in ps:
                p.requires_grad_(True)
                p.grad = None
        with am.route([{"lora0": 0.25, "lora1": 0.75}, "lora0"]):
            am(IDS[:2]).logits.square().mean().backward()
        assert all(p.grad is not None for ps in params.values() for p in ps)
        for ps in params.values():
            for p in ps:
                p.requires_grad_(False)
                p.grad = None


@pytest.mark.slow
def test_a_compiled_model_routes_mixtures_as_eager():
    am = ak.adapt(make_llama())
    for i in range(2):
        am.add(f"l{i}", ak.LoRA(r=4, targets="all-linear"))
        am.add(f"b{i}", ak.Bottleneck(reduction=4))
        randomize(am, f"l{i}", scale=0.2)
        randomize(am, f"b{i}", scale=0.2)
    am.eval()
    route = [{"l0": 0.3, "l1": 0.7}, "b1", None, {"b0": 0.5, "b1": 0.5}, "l0", {"l1": -0.5, "l0": 1.5}]
    torch._dynamo.reset()
    compiled = torch.compile(am, fullgraph=True)
    with torch.no_grad(), am.route(route):
        torch.testing.assert_close(compiled(IDS).logits, am(IDS).logits, rtol=1e-4, atol=1e-5)


def test_heads_mix_when_they_share_a_label_set():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    am = ak.adapt(BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=2,
                                                           num_attention_heads=4, intermediate_size=64)).eval())
    for name, labels in (("x", ["a", "b"]), ("y", ["a", "b"]), ("z", ["a", "b", "c"])):
        am.add(name, ak.LoRA(r=2), labels=labels)
        randomize(am, name, scale=0.3)
    am.eval()
    ids = IDS[:3] % 30
    with torch.no_grad():
        singles = {}
        for name in ("x", "y"):
            am.activate(name)
            singles[name] = am(input_ids=ids).logits
        am.activate(None)
        am.combine("xy", {"x": 0.25, "y": 0.75})  # the body's combination; its head is the base's
        am.activate("xy")
        body = am.base.bert(input_ids=ids).pooler_output
        am.activate(None)
        am.delete("xy")
        with am.route([{"x": 0.25, "y": 0.75}, "x", "z"]):
            out = am(input_ids=ids).logits
        heads = {n: am.adapter(n).head for n in ("x", "y")}
        want = 0.25 * heads["x"](body[:1]) + 0.75 * heads["y"](body[:1])
        torch.testing.assert_close(out[0, :2], want[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[1, :2], singles["x"][1])
        with pytest.raises(ak.CompositionError, match="one label set"), am.route([{"x": 0.5, "z": 0.5}]):
            am(input_ids=ids[:1])


@pytest.mark.parametrize("entry, message", [
    ({}, "non-empty"), ({"lora0": float("nan")}, "finite number"), ({"lora0": "1"}, "finite number"),
    ({"nope": 1.0, "lora0": 0.5}, "nope"), (3, "adapter name, None or"),
])
def test_bad_mixtures_are_clear_errors(am, entry, message):
    with pytest.raises(ak.AdapterError, match=message), am.route(["lora0", entry]):
        am(IDS[:2])
