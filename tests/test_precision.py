"""Precision: bf16 / fp16 bases, quantized frozen Linears (nf4, int8, int4), adapters in fp32 beside
them, merging into quantized layers, and the errors for what cannot work."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit import precision
from adapterkit.hf_names import enable_activation_checkpointing
from adapterkit.precision import quantized_modules, weight_bytes

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")

SCHEMES = ["nf4", "int8", "int4"]
METHODS = {
    "lora": lambda: ak.LoRA(r=4, targets="all-linear"),
    "bottleneck": lambda: ak.Bottleneck(reduction=4),
    "ia3": lambda: ak.IA3(),
    "bitfit": lambda: ak.BitFit(),
    "prompt": lambda: ak.PromptTuning(num_virtual_tokens=3),
    "prefix": lambda: ak.PrefixTuning(num_virtual_tokens=3),
}


def llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # widths are multiples of 64: bitsandbytes' CPU kernel quantizes in blocks of 64 inputs
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def bert_classifier(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, num_labels=3, max_position_embeddings=64)
    return BertForSequenceClassification(config).eval()


def same_weights(model_fn, like: nn.Module) -> nn.Module:
    copy = model_fn()
    copy.load_state_dict(like.state_dict())
    return copy


IDS = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_base_takes_the_frozen_linears_only_and_keeps_the_identity(scheme):
    full = llama()
    model = same_weights(llama, full)
    fingerprint = ak.adapt(same_weights(llama, full)).fingerprint()
    ak.quantize_base(model, scheme)
    found = quantized_modules(model)
    linears = [n for n, m in full.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert sorted(found) == sorted(linears) and set(found.values()) == {scheme}
    assert "lm_head" not in found and type(model.model.embed_tokens) is nn.Embedding
    assert model.model.norm.weight.dtype == torch.float32
    assert ak.adapt(model).fingerprint() == fingerprint
    with torch.no_grad():
        error = (model(IDS).logits - full(IDS).logits).abs().max()
    assert 0 < error < 0.5  # quantized: close, not equal
    ratio = weight_bytes(full) / weight_bytes(model)
    assert ratio > 1.5
    assert precision.quantization_of(model)["scheme"] == scheme


def test_nf4_holds_linear_weights_in_about_half_a_byte():
    linear = nn.Sequential(nn.Linear(256, 512, bias=False))
    full = weight_bytes(linear)
    ak.quantize_base(linear, "nf4", head=None)
    assert full / weight_bytes(linear) > 6  # 4 bits plus a double-quantized scale per block of 64


def test_bf16_base_shares_the_fp32_fingerprint_and_adapters_stay_fp32():
    full = llama()
    half = same_weights(llama, full).to(torch.bfloat16)
    am = ak.adapt(half)
    assert am.fingerprint() == ak.adapt(full).fingerprint()
    am.add("a", ak.LoRA(r=4))
    assert {p.dtype for p in am.adapter_parameters("a")} == {torch.float32}
    am.activate("a")
    assert am(IDS).logits.dtype == torch.bfloat16
    assert ak.Precision(dtype="bf16").adapter_torch_dtype == torch.float32
    assert ak.Precision(dtype="bf16", adapter_dtype="base").adapter_torch_dtype == torch.bfloat16
    all_half = ak.adapt(same_weights(llama, full).to(torch.bfloat16), adapter_dtype=torch.bfloat16)
    all_half.add("a", ak.LoRA(r=4))
    assert {p.dtype for p in all_half.adapter_parameters("a")} == {torch.bfloat16}


def _trained_step(am, name, batch):
    am.activate(name)
    params = am.train_adapter(name)
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    out = am(**batch)
    out.loss.backward()
    grads = [p.grad for p in params]
    optimizer.step()
    optimizer.zero_grad()
    am.eval()
    return out.loss, grads, any(not torch.equal(b, p) for b, p in zip(before, params, strict=True))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_on_a_quantized_base(scheme, method):
    model = ak.quantize_base(llama().to(torch.bfloat16) if scheme == "nf4" else llama(), scheme)
    am = ak.adapt(model)
    am.add(method, METHODS[method]())
    loss, grads, moved = _trained_step(am, method, {"input_ids": IDS, "labels": IDS})
    assert torch.isfinite(loss) and moved
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)  # (a bottleneck's down gets none while its up is zero)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_gradient_checkpointing_on_a_quantized_base_gives_the_same_gradients(scheme):
    grads = []
    for checkpointing in (False, True):
        model = ak.quantize_base(llama(), scheme)
        if checkpointing:
            assert enable_activation_checkpointing(model)
        am = ak.adapt(model)
        torch.manual_seed(3)
        am.add("a", ak.LoRA(r=4, targets="all-linear"))
        am.activate("a")
        params = am.train_adapter("a")
        am(input_ids=IDS, labels=IDS).loss.backward()
        grads.append([p.grad.clone() for p in params])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_bf16_base_composes_and_routes_as_the_fp32_base_does():
    """Stack, Average, Fuse and per-row routing on a bf16 base, fp32 adapters: the fp32 base's outputs to
    within bf16's rounding, and each routed row equal to that row run alone."""
    full = llama()
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        am = ak.adapt(same_weights(llama, full).to(dtype))
        torch.manual_seed(5)
        for name, method in (("l", "lora"), ("b", "bottleneck"), ("i", "ia3")):
            am.add(name, METHODS[method]())
            for p in am.adapter_parameters(name):
                nn.init.normal_(p, std=0.05) if p.dim() > 1 else nn.init.normal_(p, mean=1.0, std=0.05)
        am.add_fusion(ak.Fuse("l", "b"))
        got = {}
        with torch.no_grad():
            for setup in ("l", ak.Stack("b", "i"), ak.Average({"l": 0.5, "i": 0.5}), ak.Fuse("l", "b")):
                am.activate(setup)
                got[str(setup)] = am(IDS).logits.float()
            am.activate(None)
            with am.route(["l", None, "b"]):
                got["route"] = am(IDS).logits.float()
            for i, name in enumerate(["l", None, "b"]):
                am.activate(name)
                alone = am(IDS[i : i + 1]).logits.float()
                torch.testing.assert_close(got["route"][i : i + 1], alone, rtol=0, atol=0.05 if dtype != torch.float32 else 1e-5)
        outs[dtype] = got
    for key, want in outs[torch.float32].items():
        size = float(want.abs().max())
        torch.testing.assert_close(outs[torch.bfloat16][key], want, rtol=0.05, atol=0.05 * size)


def test_an_fp32_head_answers_for_a_bf16_classifier_alone_and_routed():
    model = bert_classifier().to(torch.bfloat16)
    am = ak.adapt(model)
    am.add("x", ak.LoRA(r=4), labels=["a", "b", "c"])
    am.add("y", ak.Bottleneck(), labels=["p", "q"])
    assert am.adapter("x").head is not None and next(am.adapter("x").head.parameters()).dtype == torch.float32
    with torch.no_grad():
        am.activate("x")
        alone = am(input_ids=IDS).logits
        with am.route(["y", "x", "x"]):
            routed = am(input_ids=IDS).logits
    assert alone.dtype == routed.dtype == torch.bfloat16
    torch.testing.assert_close(routed[1:, :3], alone[1:], rtol=0, atol=0.02)


def lora_on(scheme: str) -> ak.AdaptedModel:
    """A LoRA adapter "a", away from the identity, active on a tiny Llama quantized with `scheme`."""
    am = ak.adapt(ak.quantize_base(llama(), scheme))
    am.add("a", ak.LoRA(r=4, targets="all-linear"))
    for p in am.adapter_parameters("a"):
        nn.init.normal_(p, std=0.05)
    am.activate("a")
    return am


@pytest.mark.parametrize("scheme", SCHEMES)
def test_merge_into_a_quantized_base_must_say_how_and_then_keeps_the_outputs(scheme):
    am = lora_on(scheme)
    with torch.no_grad():
        unmerged = am(IDS).logits
        with pytest.raises(ak.PrecisionError, match="say how"):
            am.merge("a")
        assert len(quantized_modules(am.base)) == 14  # nothing changed
        with pytest.raises(ak.PrecisionError, match="keep_original"):
            am.merge("a", keep_original=True, quantized="dequantize")
        am.merge("a", quantized="dequantize")
        assert not quantized_modules(am.base)
        torch.testing.assert_close(am(IDS).logits, unmerged, rtol=1e-4, atol=1e-4)
        am.unmerge("a")
        torch.testing.assert_close(am(IDS).logits, unmerged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_requantized_merge_adds_only_rounding_and_cannot_be_unmerged(scheme):
    am = lora_on(scheme)
    with torch.no_grad():
        unmerged = am(IDS).logits
        am.merge("a", quantized="requantize")
        assert set(quantized_modules(am.base).values()) == {scheme}
        merged = am(IDS).logits
        error = (merged - unmerged).abs().max()
        assert 0 < error < 0.5
        with pytest.raises(ak.PrecisionError, match="cannot be taken out exactly"):
            am.unmerge("a")


def test_an_adapter_trained_on_a_quantized_base_loads_on_the_full_base_and_back(tmp_path):
    full = llama()
    quantized = ak.adapt(ak.quantize_base(same_weights(llama, full), "nf4"))
    quantized.add("a", ak.LoRA(r=4, targets="all-linear"))
    for p in quantized.adapter_parameters("a"):
        nn.init.normal_(p, std=0.05)
    quantized.save("a", str(tmp_path / "a"))
    plain = ak.adapt(same_weights(llama, full))
    assert plain.load(str(tmp_path / "a")) == "a"
    for (k, v), (k2, v2) in zip(sorted(plain.adapter_state_dict("a").items()),
                                sorted(quantized.adapter_state_dict("a").items()), strict=True):
        assert k == k2 and torch.equal(v, v2)
    plain.save("a", str(tmp_path / "b"))
    again = ak.adapt(ak.quantize_base(same_weights(llama, full), "int8"))
    assert again.load(str(tmp_path / "b")) == "a"


def test_bad_precision_inputs_are_clear_errors(monkeypatch):
    with pytest.raises(ak.PrecisionError, match="use one of fp32, bf16, fp16"):
        ak.Precision(dtype="fp8")
    with pytest.raises(ak.PrecisionError, match="use one of nf4, int8, int4"):
        ak.quantize_base(llama(), "int3")
    if not torch.cuda.is_available():
        with pytest.raises(ak.PrecisionError, match="no CUDA device"):
            ak.Precision(device="cuda")
    model = llama()
    am = ak.adapt(model)
    with pytest.raises(ak.PrecisionError, match="before ak.adapt"):
        ak.quantize_base(model, "int8")
    assert not quantized_modules(model)
    del am

    real = importlib.metadata.version

    def missing(name):
        if name == "bitsandbytes":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    model = llama()
    with pytest.raises(ak.PrecisionError, match=r"pip install 'adapterkit\[quant\]'"):
        ak.quantize_base(model, "nf4")
    assert not quantized_modules(model)


def test_a_method_that_reads_the_frozen_weight_is_refused_on_a_quantized_layer():
    from dataclasses import dataclass
    from typing import ClassVar

    from adapterkit.methods import register
    from adapterkit.methods.lora import LoRAAdapter

    @dataclass
    class WeightReading(ak.LoRA):  # a stand-in for a method such as DoRA, which needs ||W + BA||
        method: ClassVar[str] = "test-weight-reading"

    class WeightReadingAdapter(LoRAAdapter):
        on_quantized = False

    register(WeightReading, WeightReadingAdapter)
    model = ak.quantize_base(llama(), "int8", skip=("model.layers.1.self_attn.q_proj",))
    am = ak.adapt(model)
    with pytest.raises(ak.TargetError, match=r"'model.layers.0.self_attn.q_proj'.*holds quantized \(int8\)"):
        am.add("w", WeightReading(r=2, targets=["q_proj"]))
    assert not am.adapters and not am.sites
    am.add("w", WeightReading(r=2), sites={"model.layers.1.self_attn.q_proj": None})  # kept in full precision
    assert am.adapters == ["w"]


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_mixed_precision_training_through_accelerate_keeps_fp32_adapters(base_dtype):
    """Accelerate's bf16 autocast on top of an fp32 or bf16 base: the loss falls, the adapter stays fp32."""
    from datasets import Dataset

    from adapterkit.train.trainer import Trainer, TrainSettings

    rows = [[1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1]] * 8
    data = Dataset.from_dict({"input_ids": rows})

    def collate(batch):
        ids = torch.tensor([r["input_ids"] for r in batch])
        return {"input_ids": ids, "labels": ids}

    from accelerate.state import AcceleratorState

    runs = {}
    for mixed in ("no", "bf16"):
        # one process holds one Accelerator setting (a command line makes one); a test makes two
        AcceleratorState._reset_state(True)
        am = ak.adapt(llama().to(base_dtype))
        torch.manual_seed(0)
        am.add("a", ak.LoRA(r=4, targets="all-linear"))
        am.activate("a")
        am.train_adapter("a")
        trainer = Trainer(am, data, None, collate, TrainSettings(epochs=6, batch_size=4, lr=3e-2, progress=False,
                                                                 mixed_precision=mixed), task="causal-lm")
        try:
            runs[mixed] = trainer.fit(resume=False).train_loss
        finally:
            AcceleratorState._reset_state(True)
        assert {p.dtype for p in am.adapter_parameters("a")} == {torch.float32}
    losses = runs["bf16"]
    assert all(loss == loss for loss in losses) and sum(losses[-4:]) < 0.95 * sum(losses[:4])
    # the same training, to bf16's rounding: step for step at first; at this learning rate the rounding
    # compounds later by an amount that depends on the CPU's bf16 kernels (0.16 apart at the end, AVX2)
    assert max(abs(a - b) for a, b in zip(losses[:4], runs["no"][:4], strict=True)) < 0.05
