"""Training on the device, per recipe: the adapter trained in ExecuTorch's runtime against the same
adapter trained by PyTorch (`edge.fit`, the same SGD with momentum, learning rate and batches), and the
memory ExecuTorch plans for the training program, the adapter's against full fine-tuning's.

    python bench/edge_device_training.py                  # kws and har
    python bench/edge_device_training.py --recipes kws --quick

Per recipe: device_accuracy (trained in the runtime), pytorch_sgd_accuracy, device_arena_bytes and
full_ft_arena_bytes (the planned arena of the training program at batch 1: activations kept for
backward, gradients, scratch), device_memory_ratio (full / adapter), flash bytes, the same at the
recipe's training batch. Merged into bench/results/edge.json under each recipe's key, and written
whole to bench/results/edge_device.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from adapterkit import edge
from adapterkit.edge.compare import adapted, methods_for
from adapterkit.edge.recipe import EpochLoader, accuracy

RESULTS = Path(__file__).parent / "results"
KWS_ARENA_TARGET = 256 * 1024


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def one_recipe(name: str, method: str, quick: bool, lr: float, momentum: float, folder: Path) -> dict:
    recipe = edge.recipe(name, quick=quick)
    config = methods_for(recipe)[method]
    x, y = recipe.train
    out: dict = {"method": method, "lr": lr, "momentum": momentum, "epochs": recipe.epochs,
                 "batch": recipe.batch_size, "train_examples": len(y)}

    # the same initial adapter and head for both: adapted() seeds nothing, so the device copy takes PyTorch's
    reference = adapted(recipe, "a", config)
    device = adapted(recipe, "a", config)
    device.load_state_dict(reference.state_dict())

    started = time.perf_counter()
    edge.fit(reference, "a", EpochLoader(x, y, recipe.batch_size, seed=0), epochs=recipe.epochs, lr=lr,
             optimizer="sgd_momentum", measure=False)
    out["pytorch_seconds"] = time.perf_counter() - started
    reference.activate("a")
    out["pytorch_sgd_accuracy"] = accuracy(reference, *recipe.test)

    info = edge.export_training(device, "a", folder / name, example=x[: recipe.batch_size])
    trainer = edge.DeviceTrainer(folder / name / info.file, lr=lr, momentum=momentum)
    started = time.perf_counter()
    out["device_losses"] = trainer.fit(EpochLoader(x, y, recipe.batch_size, seed=0), epochs=recipe.epochs)
    out["device_seconds"] = time.perf_counter() - started
    trainer.load_into(device, "a")
    device.activate("a")
    out["device_accuracy"] = accuracy(device, *recipe.test)
    out["device_minus_pytorch_points"] = 100 * (out["device_accuracy"] - out["pytorch_sgd_accuracy"])
    out["train_batch_arena_bytes"] = info.arena_bytes

    one = x[:1]
    small = edge.export_training(device, "a", folder / f"{name}-b1", example=one)
    full = edge.export_training(device, "a", folder / f"{name}-b1", example=one, full=True)
    out.update({"device_arena_bytes": small.arena_bytes, "full_ft_arena_bytes": full.arena_bytes,
                "device_memory_ratio": full.arena_bytes / small.arena_bytes,
                "device_trainable_bytes": small.trainable_bytes, "full_ft_trainable_bytes": full.trainable_bytes,
                "device_flash_bytes": small.flash_bytes, "full_ft_flash_bytes": full.flash_bytes})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="kws,har")
    parser.add_argument("--method", default="lite_residual")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="ak-device-") as tmp:
        for name in args.recipes.split(","):
            started = time.perf_counter()
            results[name] = one_recipe(name, args.method, args.quick, args.lr, args.momentum, Path(tmp))
            log(f"{name} ({time.perf_counter() - started:.0f} s): " + json.dumps(
                {k: v for k, v in results[name].items() if k != "device_losses"}))
    if "kws" in results:
        results["kws_arena_within_256KiB"] = results["kws"]["device_arena_bytes"] <= KWS_ARENA_TARGET
    results["command"] = " ".join(["python", *sys.argv])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "edge_device.json").write_text(json.dumps(results, indent=2))
    edge_json = RESULTS / "edge.json"
    merged = json.loads(edge_json.read_text()) if edge_json.exists() else {}
    for name, row in results.items():
        if isinstance(row, dict):
            merged.setdefault(name, {}).update({k: v for k, v in row.items() if k.startswith(("device_", "full_ft_arena"))})
    edge_json.write_text(json.dumps(merged, indent=2))
    print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "device_losses"} if isinstance(v, dict) else v)
                      for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
