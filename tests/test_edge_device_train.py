"""Training on the device (edge/device_train.py): ExecuTorch's training program against PyTorch on the
same weights, for every adapter method on every recipe backbone; SGD steps in the runtime against
PyTorch's; the memory the program plans; what it refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.edge import DeviceTrainer, ExportError, export_training
from adapterkit.edge.backbones import InvertedResidual, cnn1d, ds_cnn, lstm, tcn

pytest.importorskip("executorch")


class MobileBlocks(nn.Module):
    """MobileNetV2's inverted residual blocks (one with a residual, one strided) on a small stem."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(8, 8, 1, 6), InvertedResidual(8, 16, 2, 6))
        self.classifier = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


BLOCKS = r"re:blocks\.\d+$"
#: backbone -> (build, input shape, LoRA's targets, the BatchNorm type BitFit follows)
BACKBONES = {
    "ds_cnn": (lambda: ds_cnn(12, channels=16, blocks=2), (4, 1, 49, 10), [r"re:blocks\.\d+\.1\.0$"], "BatchNorm2d"),
    "mobilenet_v2_blocks": (MobileBlocks, (2, 3, 32, 32), [r"re:blocks\.\d+\.conv\.2$"], "BatchNorm2d"),
    "tcn": (lambda: tcn(6, 5, channels=16, levels=2), (4, 6, 64), [r"re:blocks\.\d+\.net\.[03]$"], "BatchNorm1d"),
    "cnn1d": (lambda: cnn1d(4), (4, 1, 256), [r"re:blocks\.\d+\.0$"], "BatchNorm1d"),
}
METHODS = ("lite_residual", "bottleneck", "ia3", "bitfit", "lora")


def method(name: str, lora_targets: list[str], norm: str) -> ak.config.MethodConfig:
    return {"lite_residual": lambda: ak.LiteResidual(targets=BLOCKS),
            "bottleneck": lambda: ak.Bottleneck(placement="custom", targets=BLOCKS, reduction=4),
            "ia3": lambda: ak.IA3(targets=BLOCKS),
            "bitfit": lambda: ak.BitFit(targets=[norm]),
            "lora": lambda: ak.LoRA(r=2, alpha=4, targets=lora_targets)}[name]()


def adapted(build, config) -> ak.AdaptedModel:  # noqa: ANN001
    torch.manual_seed(0)
    base = build().eval()
    for m in base.modules():  # statistics that are not the identity, so that a wrong backward shows
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    am = ak.adapt(base)
    am.add("a", config, num_labels=7)
    with torch.no_grad():
        for p in am.adapter("a").parameters():  # no zero-initialised branch: every gradient is non-trivial
            p.normal_(0, 0.1)
    return am


def pytorch_gradients(am: ak.AdaptedModel, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    am.train_adapter("a")
    am.eval()
    am.activate("a")
    am.zero_grad()
    F.cross_entropy(am(x), y).backward()
    return {n: p.grad.clone() for n, p in am.named_parameters() if p.requires_grad}


@pytest.mark.slow
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("method_name", METHODS)
def test_one_step_of_the_device_program_has_pytorchs_gradients(tmp_path, backbone, method_name):
    build, shape, lora_targets, norm = BACKBONES[backbone]
    am = adapted(build, method(method_name, lora_targets, norm))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(shape, generator=gen), torch.randint(0, 7, (shape[0],), generator=gen)
    info = export_training(am, "a", tmp_path, example=x)
    expected = pytorch_gradients(am, x, y)
    trainer = DeviceTrainer(tmp_path / info.file)
    loss = trainer.module.forward_backward("forward", (x, y))[0]
    got = {k.removeprefix("model."): g for k, g in trainer.module.named_gradients().items()}
    assert set(got) == set(expected) == set(info.parameters)
    for key, want in expected.items():
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=key)
    torch.testing.assert_close(float(loss), float(F.cross_entropy(am(x), y)), rtol=1e-5, atol=1e-6)
    assert info.arena_bytes > 0 and info.flash_bytes > 0


def test_an_lstm_trains_on_the_device_too(tmp_path):
    am = adapted(lambda: lstm(6, 5, hidden=16, layers=1), ak.Bottleneck(placement="custom", targets=BLOCKS,
                                                                        reduction=4))
    x, y = torch.randn(4, 32, 6), torch.randint(0, 7, (4,))
    info = export_training(am, "a", tmp_path, example=x)
    expected = pytorch_gradients(am, x, y)
    trainer = DeviceTrainer(tmp_path / info.file)
    trainer.module.forward_backward("forward", (x, y))
    for key, got in trainer.module.named_gradients().items():
        want = expected[key.removeprefix("model.")]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_sgd_steps_in_the_runtime_follow_pytorchs_and_the_result_loads_back(tmp_path):
    am = adapted(lambda: ds_cnn(12, channels=16, blocks=2), ak.LiteResidual(targets=BLOCKS))
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 1, 49, 10, generator=gen), torch.randint(0, 7, (4,), generator=gen)) for _ in range(5)]
    batches.append((torch.randn(3, 1, 49, 10), torch.randint(0, 7, (3,))))  # smaller: skipped, as documented
    info = export_training(am, "a", tmp_path, example=batches[0][0])
    trainer = DeviceTrainer(tmp_path / info.file, lr=0.05, momentum=0.9)
    device_losses = trainer.fit(batches, epochs=2)

    params = am.train_adapter("a")
    am.eval()
    am.activate("a")
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    losses = []
    for _ in range(2):
        epoch = []
        for x, y in batches[:5]:
            opt.zero_grad()
            loss = F.cross_entropy(am(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)  # as the trainer clips by default
            opt.step()
            epoch.append(float(loss))
        losses.append(sum(epoch) / len(epoch))
    assert trainer.steps == 10 and device_losses[1] < device_losses[0]
    torch.testing.assert_close(torch.tensor(device_losses), torch.tensor(losses), rtol=1e-4, atol=1e-5)
    trained = trainer.parameters()
    for name, value in dict(am.named_parameters()).items():
        if name in trained:
            torch.testing.assert_close(trained[name], value.detach(), rtol=1e-4, atol=1e-5)

    fresh = adapted(lambda: ds_cnn(12, channels=16, blocks=2), ak.LiteResidual(targets=BLOCKS))
    trainer.load_into(fresh, "a")
    fresh.save("a", tmp_path / "trained")
    again = adapted(lambda: ds_cnn(12, channels=16, blocks=2), ak.LiteResidual(targets=BLOCKS))
    again.load(tmp_path / "trained", name="b")
    again.activate("b")
    am.activate("a")
    with torch.no_grad():
        torch.testing.assert_close(again(batches[0][0]), am(batches[0][0]), rtol=1e-4, atol=1e-5)


def test_the_full_fine_tuning_program_plans_more_memory_than_the_adapters(tmp_path):
    am = adapted(lambda: ds_cnn(12, channels=16, blocks=2), ak.IA3(targets=BLOCKS))
    x = torch.randn(1, 1, 49, 10)
    adapter = export_training(am, "a", tmp_path, example=x)
    full = export_training(am, "a", tmp_path, example=x, full=True)
    assert full.file == "train-full.pte" and adapter.file == "train-a.pte"
    assert sum(full.parameters.values()) > 10 * sum(adapter.parameters.values())
    assert full.arena_bytes > adapter.arena_bytes and full.trainable_bytes > adapter.trainable_bytes
    assert not any(p.requires_grad for p in am.base.parameters())  # the model is as it was


def test_what_the_device_trainer_refuses(tmp_path):
    am = adapted(lambda: ds_cnn(12, channels=16, blocks=2), ak.IA3(targets=BLOCKS))
    x = torch.randn(2, 1, 49, 10)
    info = export_training(am, "a", tmp_path, example=x)
    trainer = DeviceTrainer(tmp_path / info.file)
    with pytest.raises(ExportError, match=r"batches of shape \[2, 1, 49, 10\], not \[2, 1, 40, 10\]"):
        trainer.step(torch.randn(2, 1, 40, 10), torch.zeros(2))
    with pytest.raises(ExportError, match="needs labelled batches"):
        trainer.fit([x])
    with pytest.raises(ExportError, match="not a one-pass iterator"):
        trainer.fit(iter([(x, torch.zeros(2))]), epochs=2)
    with pytest.raises(ExportError, match="no training program"):
        DeviceTrainer(tmp_path / "missing.pte")
    with pytest.raises(KeyError):
        export_training(am, "nope", tmp_path, example=x)
    other = ak.adapt(ds_cnn(12, channels=16, blocks=2))
    other.add("b", ak.IA3(targets=BLOCKS), num_labels=7)
    with pytest.raises(ExportError, match="not in this model"):
        trainer.load_into(other, "b")


class PooledNet(nn.Module):
    """An average pool between two convolutions: ExecuTorch's runtime has no avg_pool2d backward."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.AvgPool2d(2), nn.Conv2d(8, 8, 3, padding=1))
        self.classifier = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.blocks(x).mean((2, 3)))


def test_a_program_the_runtime_cannot_run_or_that_is_over_budget_is_refused_before_any_step(tmp_path):
    am = ak.adapt(PooledNet().eval())
    am.add("a", ak.LoRA(r=2, targets=[r"re:blocks\.0$"]), num_labels=3)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ExportError, match=r"no kernel for aten::avg_pool2d_backward\.grad_input, which training "
                                          r"through blocks\.1 \(AvgPool2d\) needs"):
        export_training(am, "a", tmp_path, example=x)
    after = ak.adapt(PooledNet().eval())  # an adapter after the pool: nothing flows back through it
    after.add("a", ak.LoRA(r=2, targets=[r"re:blocks\.2$"]), num_labels=3)
    info = export_training(after, "a", tmp_path, example=x)
    assert info.arena_bytes > 0
    with pytest.raises(ExportError, match=r"of arena plus .* of trainable parameters, .* in all, over the budget "
                                          r"of 1\.0 KiB"):
        export_training(after, "a", tmp_path / "small", example=x, budget="1KiB")
    assert not (tmp_path / "small" / "train-a.pte").exists()


@pytest.mark.slow
def test_the_slimmed_joint_graph_keeps_masks_not_activations_and_plans_a_smaller_arena(tmp_path, monkeypatch):
    import adapterkit.edge.device_train as device_train
    from adapterkit.edge import slim_joint as slim

    am = adapted(lambda: ds_cnn(12, channels=16, blocks=2), ak.LiteResidual(targets=BLOCKS))
    x = torch.randn(1, 1, 49, 10)
    counts: list[dict[str, int]] = []
    monkeypatch.setattr(device_train, "slim_joint", lambda joint, bits: counts.append(slim.slim_joint(joint, bits)))
    slimmed = export_training(am, "a", tmp_path / "slim", example=x)
    monkeypatch.setattr(device_train, "slim_joint", lambda joint, bits: None)
    plain = export_training(am, "a", tmp_path / "plain", example=x)
    rewrites = counts[0]
    assert rewrites["aliases"] > 0 and rewrites["shape_only_inputs"] > 0 and rewrites["masks_moved_forward"] > 0
    assert slimmed.arena_bytes < 0.75 * plain.arena_bytes
    y = torch.randint(0, 7, (1,))
    losses = [DeviceTrainer(tmp_path / d / "train-a.pte", lr=0.0).step(x, y) for d in ("slim", "plain")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


@pytest.mark.slow
def test_a_program_keeping_bytes_for_weight_gradients_plans_less_and_stays_close(tmp_path):
    build, shape, lora_targets, _ = BACKBONES["ds_cnn"]
    am = adapted(build, ak.LoRA(r=2, alpha=4, targets=lora_targets))
    x, y = torch.randn(*shape), torch.randint(0, 7, (shape[0],))
    exact = pytorch_gradients(am, x, y)
    full = export_training(am, "a", tmp_path / "fp32", example=x)
    small = export_training(am, "a", tmp_path / "int8", example=x, activation_bits=8)
    assert small.arena_bytes < full.arena_bytes
    trainer = DeviceTrainer(tmp_path / "int8" / small.file, lr=0.0, max_grad_norm=None)
    trainer.step(x, y)
    got = {k.removeprefix("model."): v for k, v in trainer.module.named_gradients().items()}
    for name, grad in exact.items():
        error = (got[name] - grad).norm() / grad.norm()
        assert error < 0.02, (name, float(error))  # a byte per number: well within 2% of the gradient
    lora_grads = [n for n in exact if "lora" in n.lower() or ".A" in n or ".B" in n]
    assert any(not torch.equal(got[n], exact[n]) for n in lora_grads)  # the rounding is really there
    with pytest.raises(ExportError, match="8 bits"):
        export_training(am, "a", tmp_path / "int4", example=x, activation_bits=4)
