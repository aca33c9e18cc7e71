"""torch.compile over an adapted model: every method, every composition and a routed batch.

`fullgraph=True` makes a graph break an error, so a case cannot pass by silently running eager code.
"""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

CONFIGS = {
    "pfeiffer": ak.Bottleneck(placement="pfeiffer", reduction=4),
    "houlsby": ak.Bottleneck(placement="houlsby", reduction=4),
    "parallel": ak.Bottleneck(placement="parallel", reduction=4),
    "lora": ak.LoRA(r=4, targets="all-linear"),
    "ia3": ak.IA3(),
    "bitfit": ak.BitFit(),
    "prompt": ak.PromptTuning(num_virtual_tokens=3),
    "prefix": ak.PrefixTuning(num_virtual_tokens=3),
}


@pytest.fixture(scope="module")
def am() -> ak.AdaptedModel:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100, num_labels=3)
    am = ak.adapt(transformers.BertForSequenceClassification(config).eval())
    for name, method in CONFIGS.items():
        am.add(name, method)
        with torch.no_grad():  # away from the identity, so that a dropped delta shows
            for p in am.adapter_parameters(name):
                p.add_(torch.randn_like(p) * 0.1)
    return am


def compiled_matches_eager(am: ak.AdaptedModel, **inputs) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(am, fullgraph=True)
    with torch.no_grad():
        eager = am(**inputs).logits
        got = compiled(**inputs).logits
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-5)


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[-1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_method_compiles(am, name):
    am.activate(name)
    compiled_matches_eager(am, **batch())


@pytest.mark.parametrize("setup", [ak.Stack("pfeiffer", "lora"), ak.Stack("prompt", "ia3"),
                                   ak.Fuse("pfeiffer", "houlsby"), ak.Average({"lora": 0.3, "bitfit": 0.7})],
                         ids=str)
def test_compositions_compile(am, setup):
    am.activate(setup)
    compiled_matches_eager(am, **batch())


def test_routed_batch_compiles(am):
    with am.route(["lora", "pfeiffer", None, "ia3"]):
        compiled_matches_eager(am, **batch())


def test_compiled_training_step_matches_eager(am):
    """Gradients through a compiled LoRA forward equal eager gradients."""
    params = am.train_adapter("lora")
    am.eval()  # no dropout: eager and compiled would draw different masks
    inputs, labels = batch(), torch.tensor([0, 1, 2, 1])
    grads = []
    for model in (am, torch.compile(am, fullgraph=True)):
        torch._dynamo.reset()
        for p in params:
            p.grad = None
        torch.nn.functional.cross_entropy(model(**inputs).logits, labels).backward()
        grads.append([p.grad.clone() for p in params])
    am.activate(None)
    for eager, compiled in zip(*grads, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


def test_a_bf16_base_with_fp32_adapters_compiles_alone_composed_and_routed():
    """The sites' casts into the adapters' fp32 and back compile into the graph (no break)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100, num_labels=3)
    half = ak.adapt(transformers.BertForSequenceClassification(config).eval().to(torch.bfloat16))
    for name in ("lora", "pfeiffer", "ia3"):
        half.add(name, CONFIGS[name], labels=["a", "b", "c"])
        with torch.no_grad():
            for p in half.adapter_parameters(name):
                p.add_(torch.randn_like(p) * 0.1)
        assert {p.dtype for p in half.adapter_parameters(name)} == {torch.float32}
    for setup in ("lora", ak.Stack("pfeiffer", "ia3")):
        half.activate(setup)
        torch._dynamo.reset()
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(half, fullgraph=True)(**batch()).logits,
                                       half(**batch()).logits, rtol=0.02, atol=0.02)
    half.activate(None)
    with half.route(["lora", "pfeiffer", None, "ia3"]):
        torch._dynamo.reset()
        with torch.no_grad():
            got = torch.compile(half, fullgraph=True)(**batch()).logits
            want = half(**batch()).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)
