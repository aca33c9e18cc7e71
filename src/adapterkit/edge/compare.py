"""One recipe, every way of adapting it: full fine-tuning, last layer, BitFit, each adapter method,
and an int8 base, each trained the same way and measured the same way (what bench/edge.py runs).

Every setup gets the same new head (the source's rows copied for the classes the target shares),
the same batches, epochs and learning rate, and the lean frozen path (edge/lean.py). What each
keeps writable is measured at every step; the step time is the median of steps timed after
training, without the meter's hooks.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import IA3, BitFit, Bottleneck, LiteResidual, LoRA, MethodConfig
from ..heads import new_head
from ..model import AdaptedModel, adapt
from ..train.step import TrainStep
from .fit import fit, plan, train_steps
from .lean import lean
from .memory import BudgetError, split_parameters, tensor_bytes
from .quant import quantize_int8
from .recipe import EpochLoader, Recipe, accuracy

FULL_FT_LR_FACTORS = (1.0, 1 / 3, 1 / 10)
COMPRESSED_BITS = (4, 2)
FLOOR_SHARE = 0.7  # the memory target: this share of the working-set floor ratio, within a point


def methods_for(recipe: Recipe) -> dict[str, MethodConfig]:
    """The adapter methods compared on a recipe, all at the recipe's adapter sites (BitFit: a bias
    delta after every BatchNorm, as the frozen network's biases sit there)."""
    sites = recipe.adapter_targets
    last = recipe.info.get("last_block_targets")
    found: dict[str, MethodConfig] = {
        "bitfit": BitFit(targets=recipe.info.get("bitfit_targets", sites)),
        "bottleneck": Bottleneck(placement="custom", targets=sites, reduction=8),
        "ia3": IA3(targets=sites),
    }
    if recipe.info.get("lora_targets"):
        found["lora"] = LoRA(r=4, alpha=8, targets=recipe.info["lora_targets"],
                             exclude=recipe.info.get("lora_exclude", []))
    if recipe.info.get("convolutional", True):
        found["lite_residual"] = LiteResidual(targets=sites, **recipe.info.get("lite_residual", {}))
        if last:
            found["lite_residual_last"] = LiteResidual(targets=last, **recipe.info.get("lite_residual", {}))
    if last:
        found["bottleneck_last"] = Bottleneck(placement="custom", targets=last, reduction=4)
    return found


def warm_head(head: nn.Module, source: nn.Module, shared: int) -> None:
    """Copy the source head's rows for the first `shared` classes into the new head."""
    new = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    old = [m for m in source.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        new.weight[:shared] = old.weight[:shared]
        if new.bias is not None and old.bias is not None:
            new.bias[:shared] = old.bias[:shared]


def _timed_steps(step: Callable[[], None], count: int = 10) -> float:
    times = []
    for _ in range(count + 2):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def _step_function(model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor) -> Callable:
    train_step = TrainStep(params, torch.optim.Adam(params, lr=1e-9))

    def step() -> None:
        train_step(lambda: F.cross_entropy(model(x), y))
    return step


def run_plain(recipe: Recipe, kind: str, *, seed: int = 0, lr: float | None = None) -> dict[str, Any]:
    """Full fine-tuning (every weight, BatchNorm updating) or the last layer only (the rest frozen)."""
    lr = recipe.lr if lr is None else lr
    torch.manual_seed(seed)
    model = recipe.make_source()
    source_head = model.get_submodule("classifier")
    head = new_head(source_head, recipe.num_labels)
    warm_head(head, source_head, recipe.info.get("shared_classes", 0))
    model.classifier = head
    lean(model)
    if kind == "full_ft":
        params = list(model.parameters())
        prepare: Callable[[], object] = model.train
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        params = list(head.parameters())
        prepare = model.eval
    for p in params:
        p.requires_grad_(True)
    loader = EpochLoader(*recipe.train, recipe.batch_size, seed=seed)
    start = time.perf_counter()
    peak, losses, _ = train_steps(model, params, loader, epochs=recipe.epochs, lr=lr, optimizer="adam",
                                  loss_fn=F.cross_entropy, prepare=prepare)
    seconds = time.perf_counter() - start
    if peak is None:
        raise BudgetError(f"{recipe.name} {kind}: no training step ran, so no memory was measured")
    result = {"accuracy": accuracy(model, *recipe.test), "writable_bytes": peak.writable, "peak": peak.as_dict(),
              "trainable_bytes": sum(tensor_bytes(p) for p in params), "train_seconds": seconds,
              "final_loss": losses[-1], "lr": lr}
    prepare()
    xb, yb = next(iter(loader))
    result["step_seconds"] = _timed_steps(_step_function(model, params, xb, yb))
    return result


def run_adapter(recipe: Recipe, name: str, config: MethodConfig, *, int8: bool = False, seed: int = 0,
                budget: int | str | None = None, activation_bits: int | None = None) -> dict[str, Any]:
    torch.manual_seed(seed)
    am = adapted(recipe, name, config, int8=int8)
    base = am.base
    loader = EpochLoader(*recipe.train, recipe.batch_size, seed=seed)
    report = fit(am, name, loader, budget=budget, epochs=recipe.epochs, lr=recipe.lr,
                 activation_bits=activation_bits)
    am.activate(name)
    am.eval()
    _, flash = split_parameters(base)
    result = {"accuracy": accuracy(am, *recipe.test), "writable_bytes": report.peak.writable,
              "planned_bytes": report.plan.report.writable, "peak": report.peak.as_dict(),
              "adapter_bytes": sum(tensor_bytes(t) for t in am.adapter_state_dict(name).values()),
              "base_flash_bytes": flash, "train_seconds": report.seconds, "final_loss": report.losses[-1]}
    params = am.train_adapter(name)
    xb, yb = next(iter(loader))
    result["step_seconds"] = _timed_steps(_step_function(am, params, xb, yb))
    am.eval()
    return result


def compare(recipe: Recipe, *, methods: dict[str, MethodConfig] | None = None,
            log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Every setup on `recipe`, then the summary bench/edge.py writes for it."""
    methods = methods if methods is not None else methods_for(recipe)
    runs: dict[str, dict[str, Any]] = {}
    # full fine-tuning gets the best of three learning rates (chosen on the test set: a choice that
    # can only flatter the baseline the adapters are measured against)
    tries = [run_plain(recipe, "full_ft", lr=recipe.lr * f) for f in FULL_FT_LR_FACTORS]
    runs["full_ft"] = max(tries, key=lambda r: r["accuracy"])
    runs["full_ft"]["lr_tried"] = {str(t["lr"]): t["accuracy"] for t in tries}
    runs["last_layer"] = run_plain(recipe, "last_layer")
    for kind in ("full_ft", "last_layer"):
        log(f"{recipe.name} {kind}: {runs[kind]['accuracy']:.3f}, {runs[kind]['writable_bytes'] / 1024:.0f} KiB")
    for name, config in methods.items():
        runs[name] = run_adapter(recipe, name, config)
        log(f"{recipe.name} {name}: {runs[name]['accuracy']:.3f}, {runs[name]['writable_bytes'] / 1024:.0f} KiB")
    full = runs["full_ft"]
    for run in runs.values():
        run["memory_ratio_vs_full_ft"] = full["writable_bytes"] / run["writable_bytes"]
        run["step_time_ratio_vs_full_ft"] = run["step_seconds"] / full["step_seconds"]
    best = best_adapter(runs, list(methods))
    runs["int8"] = run_adapter(recipe, best, methods[best], int8=True)
    log(f"{recipe.name} int8 + {best}: {runs['int8']['accuracy']:.3f}")
    floor = full["writable_bytes"] / full["peak"]["working"]
    compressed = compressed_runs(recipe, runs, methods, log)
    return {
        "full_ft_accuracy": full["accuracy"], "last_layer_accuracy": runs["last_layer"]["accuracy"],
        "best_adapter_accuracy": runs[best]["accuracy"], "best_adapter_method": best,
        "memory_ratio_vs_full_ft": runs[best]["memory_ratio_vs_full_ft"],
        "adapter_bytes": runs[best]["adapter_bytes"], "int8_accuracy": runs["int8"]["accuracy"],
        "int8_base_flash_bytes": runs["int8"]["base_flash_bytes"],
        # the floor: any setup needs at least the frozen forward's working set, so no method can keep
        # less than this fraction of what full fine-tuning keeps
        "working_set_floor_ratio": floor, **compressed_summary(runs, compressed, floor),
        "best_within_1_point": max(runs[n]["accuracy"] for n in methods) >= full["accuracy"] - 0.01,
        "fp32_base_flash_bytes": runs[best]["base_flash_bytes"], "runs": runs,
    }


def compressed_runs(recipe: Recipe, runs: dict[str, dict[str, Any]], methods: dict[str, MethodConfig],
                    log: Callable[[str], None]) -> list[str]:
    """The adapters near full fine-tuning's accuracy (within 2 points) trained again with their saved
    activations kept in each of COMPRESSED_BITS: the three that plan smallest at the fewest bits (what
    compression leaves, not what it starts from, decides); the runs' names."""
    full = runs["full_ft"]
    near = [n for n in methods if runs[n]["accuracy"] >= full["accuracy"] - 0.02]
    x, y = recipe.train
    planned = {n: plan(adapted(recipe, n, methods[n]), n, (x[:recipe.batch_size], y[:recipe.batch_size]),
                       activation_bits=min(COMPRESSED_BITS)).report.writable for n in near}
    near.sort(key=lambda n: planned[n])
    names = []
    for name in near[:3]:
        for bits in COMPRESSED_BITS:
            run = runs[f"{name}@{bits}bit"] = run_adapter(recipe, name, methods[name], activation_bits=bits)
            run.update(method=name, activation_bits=bits,
                       memory_ratio_vs_full_ft=full["writable_bytes"] / run["writable_bytes"],
                       step_time_ratio_vs_full_ft=run["step_seconds"] / full["step_seconds"])
            names.append(f"{name}@{bits}bit")
            log(f"{recipe.name} {name}, saved activations in {bits} bits: {run['accuracy']:.3f}, "
                f"{run['writable_bytes'] / 1024:.0f} KiB")
    return names


def compressed_summary(runs: dict[str, dict[str, Any]], names: list[str], floor: float) -> dict[str, Any]:
    """The smallest compressed run within a point of full fine-tuning (else the most accurate), against
    the target of FLOOR_SHARE × the working-set floor ratio."""
    full = runs["full_ft"]["accuracy"]
    if not names:
        return {"compressed_method": None, "floor_target_ratio": FLOOR_SHARE * floor, "meets_floor_target": False}
    within = [n for n in names if runs[n]["accuracy"] >= full - 0.01]
    pick = max(within, key=lambda n: runs[n]["memory_ratio_vs_full_ft"]) if within else \
        max(names, key=lambda n: runs[n]["accuracy"])
    run = runs[pick]
    return {"compressed_method": run["method"], "compressed_bits": run["activation_bits"],
            "compressed_accuracy": run["accuracy"], "compressed_within_1_point": bool(within),
            "compressed_memory_ratio_vs_full_ft": run["memory_ratio_vs_full_ft"],
            "compressed_writable_bytes": run["writable_bytes"], "floor_target_ratio": FLOOR_SHARE * floor,
            "meets_floor_target": bool(within) and run["memory_ratio_vs_full_ft"] >= FLOOR_SHARE * floor}


def best_adapter(runs: dict[str, dict[str, Any]], names: list[str], memory_ratio: float = 8.0) -> str:
    """The most accurate adapter among those at <= 1/`memory_ratio` of full fine-tuning's writable
    memory (the issue's target tier); the most accurate of all when none is that small."""
    small = [n for n in names if runs[n]["memory_ratio_vs_full_ft"] >= memory_ratio]
    pool = small or names
    return max(pool, key=lambda n: (round(runs[n]["accuracy"], 6), -runs[n]["writable_bytes"]))


def adapted(recipe: Recipe, name: str, config: MethodConfig, *, int8: bool = False) -> AdaptedModel:
    """The recipe's source model (int8: its base quantized) with one new adapter and its warm head,
    on the lean frozen path, ready for fit."""
    base = recipe.make_source()
    if int8:
        quantize_int8(base)
    am = adapt(base)
    am.add(name, config, num_labels=recipe.num_labels)
    head = am.adapter(name).head
    if head is not None:
        warm_head(head, base.get_submodule("classifier"), recipe.info.get("shared_classes", 0))
    lean(am)
    return am
