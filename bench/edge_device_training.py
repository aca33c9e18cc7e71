"""Training on the device, per recipe: the adapter trained in ExecuTorch's runtime against the same
adapter trained by PyTorch (`edge.fit`, the same SGD with momentum, learning rate and batches), and the
memory ExecuTorch plans for the training program, the adapter's against full fine-tuning's.

    python bench/edge_device_training.py                  # kws and har, lite residual, 3 seeds
    python bench/edge_device_training.py --recipes kws --method lora --program-bits 8 --out edge_device_lora8.json

Per recipe: device_accuracy (trained in the runtime), pytorch_sgd_accuracy, device_arena_bytes and
full_ft_arena_bytes (the planned arena of the training program at batch 1: activations kept for
backward, gradients, scratch), device_memory_ratio (full / adapter), flash bytes, the same at the
recipe's training batch; accuracies are means over --seeds initialisations and batch orders (per seed
under per_seed); device_arena_by_method: every method's program at batch 1, in full and keeping bytes
for weight gradients (--program-bits 8 trains that program). Merged into bench/results/edge.json
under each recipe's key, and written whole to bench/results/edge_device.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def one_recipe(name: str, method: str, quick: bool, lr: float, momentum: float, folder: Path, seeds: int,
               program_bits: int | None) -> dict:
    """The adapter trained by PyTorch (edge.fit, exact) and in the runtime from the same initial adapter and
    batches, for each seed (one trained network is a noisy reading on a few hundred test examples)."""
    recipe = edge.recipe(name, quick=quick)
    config = methods_for(recipe)[method]
    x, y = recipe.train
    out: dict = {"method": method, "program_activation_bits": program_bits, "lr": lr, "momentum": momentum,
                 "epochs": recipe.epochs, "batch": recipe.batch_size, "train_examples": len(y), "seeds": seeds}
    per_seed = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        reference = adapted(recipe, "a", config)
        device = adapted(recipe, "a", config)
        device.load_state_dict(reference.state_dict())
        started = time.perf_counter()
        edge.fit(reference, "a", EpochLoader(x, y, recipe.batch_size, seed=seed), epochs=recipe.epochs, lr=lr,
                 optimizer="sgd_momentum", measure=False)
        pytorch_seconds = time.perf_counter() - started
        reference.activate("a")
        info = edge.export_training(device, "a", folder / f"{name}-{seed}", example=x[: recipe.batch_size],
                                    activation_bits=program_bits)
        trainer = edge.DeviceTrainer(folder / f"{name}-{seed}" / info.file, lr=lr, momentum=momentum)
        started = time.perf_counter()
        losses = trainer.fit(EpochLoader(x, y, recipe.batch_size, seed=seed), epochs=recipe.epochs)
        device_seconds = time.perf_counter() - started
        trainer.load_into(device, "a")
        device.activate("a")
        per_seed.append({"pytorch_sgd_accuracy": accuracy(reference, *recipe.test),
                         "device_accuracy": accuracy(device, *recipe.test), "pytorch_seconds": pytorch_seconds,
                         "device_seconds": device_seconds, "device_losses": losses,
                         "train_batch_arena_bytes": info.arena_bytes})
        log(f"{name} seed {seed}: {json.dumps({k: v for k, v in per_seed[-1].items() if k != 'device_losses'})}")
    out["per_seed"] = per_seed
    for key in ("pytorch_sgd_accuracy", "device_accuracy", "pytorch_seconds", "device_seconds"):
        out[key] = statistics.mean(r[key] for r in per_seed)
    out["device_minus_pytorch_points"] = 100 * (out["device_accuracy"] - out["pytorch_sgd_accuracy"])
    out["train_batch_arena_bytes"] = per_seed[0]["train_batch_arena_bytes"]

    one = x[:1]
    device = adapted(recipe, "a", config)
    small = edge.export_training(device, "a", folder / f"{name}-b1", example=one, activation_bits=program_bits)
    full = edge.export_training(device, "a", folder / f"{name}-b1", example=one, full=True)
    out.update({"device_arena_bytes": small.arena_bytes, "full_ft_arena_bytes": full.arena_bytes,
                "device_memory_ratio": full.arena_bytes / small.arena_bytes,
                "device_trainable_bytes": small.trainable_bytes, "full_ft_trainable_bytes": full.trainable_bytes,
                "device_flash_bytes": small.flash_bytes, "full_ft_flash_bytes": full.flash_bytes})
    out["device_arena_by_method"] = arenas(recipe, folder / f"{name}-sweep", one)
    return out


def arenas(recipe: edge.Recipe, folder: Path, one: torch.Tensor) -> dict:
    """The planned arena at batch 1 of every adapter method's program, in full and keeping bytes."""
    found: dict = {}
    for method, config in methods_for(recipe).items():
        am = adapted(recipe, "a", config)
        found[method] = {}
        for bits in (None, 8):
            try:
                found[method]["int8" if bits else "fp32"] = edge.export_training(
                    am, "a", folder / method, example=one, activation_bits=bits).arena_bytes
            except edge.ExportError as err:
                found[method]["int8" if bits else "fp32"] = str(err)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="kws,har")
    parser.add_argument("--method", default="lite_residual")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--program-bits", type=int, default=None, help="8: the program keeps saved activations as bytes")
    parser.add_argument("--out", default="edge_device.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="ak-device-") as tmp:
        for name in args.recipes.split(","):
            started = time.perf_counter()
            results[name] = one_recipe(name, args.method, args.quick, args.lr, args.momentum, Path(tmp), args.seeds,
                                       args.program_bits)
            log(f"{name} ({time.perf_counter() - started:.0f} s): " + json.dumps(
                {k: v for k, v in results[name].items() if k != "per_seed"}))
    if "kws" in results:
        results["kws_arena_within_256KiB"] = results["kws"]["device_arena_bytes"] <= KWS_ARENA_TARGET
        smallest = min(((b, f"{m} {mode}") for m, row in results["kws"]["device_arena_by_method"].items()
                        for mode, b in row.items() if isinstance(b, int)), default=None)
        if smallest is not None:
            results["kws_smallest_arena_bytes"], results["kws_smallest_arena_program"] = smallest
            results["kws_smallest_arena_within_256KiB"] = smallest[0] <= KWS_ARENA_TARGET
    results["command"] = " ".join(["python", *sys.argv])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(results, indent=2))
    edge_json = RESULTS / "edge.json"
    if args.out == "edge_device.json":  # the default run is the one edge.json's table shows
        merged = json.loads(edge_json.read_text()) if edge_json.exists() else {}
        for name, row in results.items():
            if isinstance(row, dict):
                merged.setdefault(name, {}).update(
                    {k: v for k, v in row.items() if k.startswith(("device_", "full_ft_arena"))})
        edge_json.write_text(json.dumps(merged, indent=2))
    print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "per_seed"} if isinstance(v, dict) else v)
                      for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
