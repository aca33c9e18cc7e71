"""Saved activations in fewer bits (edge/compress.py): exact packing, unbiased rounding, gradients
close to the exact ones, what the meter counts, and training that still learns."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.edge.backbones import ds_cnn
from adapterkit.edge.compress import GROUP, ActivationCompressor, dequantize, quantize
from adapterkit.edge.fit import fit, measure_forward, plan
from adapterkit.edge.lean import lean
from adapterkit.edge.recipe import EpochLoader
from adapterkit.errors import AdapterError

BLOCKS = r"re:blocks\.\d+$"


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantize_stays_within_one_step_and_packs_its_codes(bits):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, 11, generator=gen) * torch.arange(1, 4).view(3, 1, 1, 1)
    packed = quantize(x, bits, gen)
    back = dequantize(packed)
    assert back.shape == x.shape and back.dtype == x.dtype
    groups = -(-x.numel() // GROUP)
    assert packed.codes.dtype == torch.uint8 and packed.codes.numel() == -(-groups * GROUP * bits // 8)
    step = packed.step.expand(-1, GROUP).flatten()[: x.numel()].view(x.shape)
    assert torch.all((back - x).abs() <= step * (1 + 1e-5) + 1e-7)
    if bits == 8:  # 255 levels over the range: within half a percent of it
        assert (back - x).abs().max() <= (x.max() - x.min()) / 255 + 1e-6


def test_stochastic_rounding_is_unbiased_and_constant_groups_are_exact():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4096, generator=gen)
    mean = torch.stack([dequantize(quantize(x, 2, gen)) for _ in range(400)]).mean(0)
    step = (x.max() - x.min()) / 3
    # the error of one draw is up to a step; the mean of 400 draws is within a few standard errors
    assert (mean - x).abs().max() < step * 0.15
    assert (mean - x).abs().mean() < step * 0.03
    constant = torch.full((2, 300), 3.25)
    assert torch.equal(dequantize(quantize(constant, 4, gen)), constant)


def _model() -> ak.AdaptedModel:
    torch.manual_seed(0)
    am = ak.adapt(ds_cnn(5, channels=16, blocks=2).eval())
    am.add("a", ak.LoRA(r=2, targets=[nn.Conv2d], exclude=[r"\.0\.0$", r"stem"]), num_labels=5)
    for p in am.adapter("a").parameters():
        nn.init.normal_(p, std=0.1)
    lean(am)
    return am


def _grads(am: ak.AdaptedModel, x: torch.Tensor, y: torch.Tensor, bits: int | None) -> list[torch.Tensor]:
    params = am.train_adapter("a")
    for p in params:
        p.grad = None
    compressor = ActivationCompressor(bits, am) if bits else None
    if compressor is None:
        loss = F.cross_entropy(am(x), y)
    else:
        with compressor.active():
            loss = F.cross_entropy(am(x), y)
    loss.backward()
    return [p.grad.clone() for p in params]


def test_gradients_from_compressed_activations_are_close_and_unbiased():
    am = _model()
    x, y = torch.randn(8, 1, 49, 10), torch.randint(0, 5, (8,))
    exact = torch.cat([g.flatten() for g in _grads(am, x, y, None)])
    at8 = torch.cat([g.flatten() for g in _grads(am, x, y, 8)])
    assert (at8 - exact).norm() / exact.norm() < 0.02
    at2 = [torch.cat([g.flatten() for g in _grads(am, x, y, 2)]) for _ in range(30)]
    one = (at2[0] - exact).norm() / exact.norm()
    averaged = (torch.stack(at2).mean(0) - exact).norm() / exact.norm()
    assert averaged < one / 3  # the error of 2-bit rounding averages away: it is noise, not bias


def test_meter_counts_the_compressed_bytes_and_parameters_stay_exact():
    am = _model()
    x, y = torch.randn(8, 1, 49, 10), torch.randint(0, 5, (8,))
    am.train_adapter("a")
    full = measure_forward(am, (x, y))
    saved = {bits: measure_forward(am, (x, y), activation_bits=bits).saved for bits in (8, 4, 2)}
    assert full.saved > saved[8] > saved[4] > saved[2]
    assert saved[8] < full.saved / 2.5  # mostly fp32 activations, now a byte each (masks stay as they were)
    assert measure_forward(am, (x, y), activation_bits=4).trainable == full.trainable
    compressor = ActivationCompressor(4, am)
    weight = am.adapter("a").parameters().__next__()
    assert compressor.pack(weight) is weight  # the model's own tensors are flash, never compressed
    assert compressor.pack(torch.randn(10)) is not None and not compressor.compressible(torch.randn(10))


def test_fit_with_compressed_activations_learns_and_reports_less_memory():
    torch.manual_seed(0)
    base = ds_cnn(3, channels=16, blocks=2).eval()
    for m in base.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.fill_(0.05)  # an untrained net's unit variances would all but silence its features
    y = torch.arange(48) % 3
    patterns = torch.randn(3, 1, 49, 10)
    x = torch.randn(48, 1, 49, 10) * 0.3 + patterns[y]
    reports = {}
    for bits in (None, 2):
        am = ak.adapt(copy.deepcopy(base))
        am.add("u", ak.Bottleneck(placement="custom", targets=BLOCKS, reduction=4), num_labels=3)
        lean(am)
        torch.manual_seed(1)
        reports[bits] = fit(am, "u", EpochLoader(x, y, 8), epochs=12, lr=3e-2, activation_bits=bits)
    assert reports[2].losses[-1] < 0.05 and reports[None].losses[-1] < 0.05  # both fit the training set
    assert reports[2].peak.saved < reports[None].peak.saved / 3
    assert reports[2].plan.report.saved == pytest.approx(reports[2].peak.saved, rel=0.05)


def test_plan_suggests_compressed_activations_and_bad_bits_are_refused():
    am = _model()
    x, y = torch.randn(16, 1, 49, 10), torch.randint(0, 5, (16,))
    over = plan(am, "a", (x, y))
    four = plan(am, "a", (x, y), activation_bits=4).report.writable
    limit = (over.report.writable + four) // 2
    result = plan(am, "a", (x, y), budget=limit)
    assert not result.fits
    assert any("saved activations in 4 bits" in what or "saved activations in 8 bits" in what
               for what, _ in result.alternatives), result.explain()
    for bad in (3, 0, 16, True, "8"):
        with pytest.raises(AdapterError, match="activation bits"):
            plan(am, "a", (x, y), activation_bits=bad)


def test_a_relu_backward_sees_its_exact_mask_and_views_of_one_tensor_are_compressed_once():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 256, generator=gen, requires_grad=True)
    weights = torch.randn(256, 1, generator=gen)  # below the compressed size: only the ReLU's output is
    exact = torch.autograd.grad((F.relu(x) @ weights).sum(), x)[0]
    for bits in (1, 2):
        with ActivationCompressor(bits, generator=gen).active():
            loss = (F.relu(x) @ weights).sum()
        got = torch.autograd.grad(loss, x)[0]
        torch.testing.assert_close(got, exact)  # the ReLU's mask is kept exactly: nothing rounds to 0
    shared = torch.randn(4, 32, 64)
    layers = [nn.Linear(64, 64), nn.Linear(64, 64)]
    compressor = ActivationCompressor(8, nn.ModuleList(layers))
    saved = []
    with compressor.forward_scope(), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(compressor.pack(t)) or saved[-1], compressor.unpack):
        inputs = shared.requires_grad_()
        sum(layer(inputs).sum() for layer in layers).backward()
    packed = [p for p in saved if not isinstance(p, torch.Tensor)]
    assert len(packed) == 2 and packed[0] is packed[1]  # two layers' reshaped views: one compressed copy


def test_non_finite_and_foreign_tensors_are_kept_as_they_are():
    compressor = ActivationCompressor(4)
    bad = torch.randn(2048)
    bad[7] = float("inf")
    assert compressor.pack(bad) is bad
    from adapterkit.edge.quant import quantize_int8

    pytest.importorskip("torchao")
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    quantize_int8(model, linear="torchao")
    ActivationCompressor(8, model)  # torchao's weights have no storage of their own: no error
