"""On-device adaptation, every recipe in one run: accuracy, writable training memory and step time of
full fine-tuning, the last layer, BitFit, each adapter method and an int8 base; the keyword recipe
under a 256 KiB budget; ONNX and ExecuTorch export checked against PyTorch.

    python bench/edge.py                      # all recipes (about 15 minutes on 2 cores)
    python bench/edge.py --recipes kws --quick

Writes bench/results/edge.json: per recipe key (kws, vision, har, har_lstm, vibration)
full_ft_accuracy, last_layer_accuracy, best_adapter_accuracy, best_adapter_method,
memory_ratio_vs_full_ft, adapter_bytes, int8_accuracy, working_set_floor_ratio; the compressed-activation
row: the adapters within 2 points of full fine-tuning trained again with saved activations in 4 and 2
bits (runs "<method>@<bits>bit"), the smallest within a point as compressed_method, compressed_bits,
compressed_accuracy, compressed_memory_ratio_vs_full_ft, against floor_target_ratio (0.7 x the floor
ratio) as meets_floor_target (and every run under "runs"); top level
kws_fits_256KiB, onnx_max_abs_diff, pte_max_abs_diff and the blob bytes per task; vision_tasks: a
defect adapter and a digit adapter on one MobileNetV2, scored through one exported ONNX program.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adapterkit import edge
from adapterkit.config import LiteResidual
from adapterkit.edge.camera import camera_tasks
from adapterkit.edge.compare import adapted, compare, methods_for
from adapterkit.edge.recipe import EpochLoader, accuracy

RESULTS = Path(__file__).parent / "results" / "edge.json"
BUDGET = "256KiB"


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def within_budget(recipe: edge.Recipe) -> dict:
    """The keyword recipe under 256 KiB: the first setup (from most to fewest adapted blocks, then
    smaller batches) whose plan fits, trained with fit(budget=...), which measures every step."""
    tried = []
    for targets in (recipe.adapter_targets, r"re:blocks\.[23]$", r"re:blocks\.3$"):
        config = LiteResidual(targets=targets, **recipe.info.get("lite_residual", {}))
        for batch in (recipe.batch_size, recipe.batch_size // 2, recipe.batch_size // 4, 1):
            am = adapted(recipe, "budget", config)
            x, y = recipe.train
            planned = edge.plan(am, "budget", (x[:batch], y[:batch]), budget=BUDGET)
            tried.append({"targets": targets, "batch_size": batch, "planned_bytes": planned.report.writable,
                          "fits": planned.fits})
            if planned.fits:
                report = edge.fit(am, "budget", EpochLoader(x, y, batch), budget=BUDGET, epochs=recipe.epochs,
                                  lr=recipe.lr)
                am.activate("budget")
                return {"fits": report.peak.writable <= edge.parse_budget(BUDGET), "targets": targets,
                        "batch_size": batch, "measured_peak_bytes": report.peak.writable,
                        "planned_bytes": planned.report.writable, "accuracy": accuracy(am, *recipe.test),
                        "peak": report.peak.as_dict(), "tried": tried}
    return {"fits": False, "tried": tried}


def export_check(recipe: edge.Recipe, method: str) -> dict:
    """Two adapters of the best method on one exported base; every test input through each runtime."""
    config = methods_for(recipe)[method]
    am = adapted(recipe, "site_a", config)
    am.add("site_b", config, num_labels=recipe.num_labels)
    for name, seed in (("site_a", 1), ("site_b", 2)):
        edge.fit(am, name, EpochLoader(*recipe.train, recipe.batch_size, seed=seed), epochs=2, lr=recipe.lr)
    x = recipe.test[0][:16]
    out: dict = {"method": method}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("onnx", "pte"):
            start = time.perf_counter()
            manifest = edge.export(am, ["site_a", "site_b"], Path(tmp) / fmt, example=x[:1], format=fmt)
            program = edge.EdgeProgram(Path(tmp) / fmt)
            worst = 0.0
            for name in ("site_a", "site_b"):
                am.activate(name)
                am.eval()
                for row in x.split(1):
                    with torch.no_grad():
                        ref = am(row).numpy()
                    worst = max(worst, float(np.abs(program.run(row, name) - ref).max()))
            out[fmt] = {"max_abs_diff": worst, "seconds": time.perf_counter() - start,
                        "program_bytes": sum(p["bytes"] for p in manifest["programs"].values()),
                        "blob_bytes": {n: a["blob_bytes"] for n, a in manifest["adapters"].items()}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipes", default=",".join(edge.RECIPES))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results: dict = {"quick": args.quick, "recipes": {}}
    for name in args.recipes.split(","):
        start = time.perf_counter()
        recipe = edge.recipe(name, quick=args.quick)
        log(f"{name}: recipe built in {time.perf_counter() - start:.0f} s")
        summary = compare(recipe, log=log)
        summary["seconds"] = time.perf_counter() - start
        results[name] = {k: v for k, v in summary.items() if k != "runs"}
        results["recipes"][name] = {"runs": summary["runs"], "info": {k: v for k, v in recipe.info.items()
                                                                     if isinstance(v, str | int | float | list)}}
        if name == "kws":
            budget = within_budget(recipe)
            results["kws_fits_256KiB"] = budget["fits"]
            results["kws_256KiB"] = budget
            log(f"kws within {BUDGET}: {json.dumps({k: v for k, v in budget.items() if k != 'tried'})}")
            check = export_check(recipe, summary["best_adapter_method"])
            results["export"] = check
            results["onnx_max_abs_diff"] = check["onnx"]["max_abs_diff"]
            results["pte_max_abs_diff"] = check["pte"]["max_abs_diff"]
            log(f"export: {json.dumps(check)}")
        if name == "vision":
            with tempfile.TemporaryDirectory() as tmp:
                results["vision_tasks"] = camera_tasks(tmp, quick=args.quick)
            log(f"vision tasks on one program: {json.dumps(results['vision_tasks'])}")
    RESULTS.parent.mkdir(exist_ok=True)
    # bench/edge_device_training.py's keys (device_*, full_ft_arena_*) in each recipe are its own: kept
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name, row in previous.items():
        if isinstance(row, dict) and isinstance(results.get(name), dict):
            results[name].update({k: v for k, v in row.items() if k.startswith(("device_", "full_ft_arena"))})
    ran = args.recipes.split(",")
    for name in edge.RECIPES:  # a run of some recipes keeps the others' last results
        if name not in ran and name in previous:
            results[name] = previous[name]
            results["recipes"][name] = previous.get("recipes", {}).get(name)
            if name == "kws":
                for key in ("kws_fits_256KiB", "kws_256KiB", "export", "onnx_max_abs_diff", "pte_max_abs_diff"):
                    if key in previous:
                        results[key] = previous[key]
            if name == "vision" and "vision_tasks" in previous:
                results["vision_tasks"] = previous["vision_tasks"]
    RESULTS.write_text(json.dumps(results, indent=2))
    shown = {k: {m: v.get(m) for m in ("full_ft_accuracy", "last_layer_accuracy", "best_adapter_accuracy",
                                       "best_adapter_method", "memory_ratio_vs_full_ft", "int8_accuracy",
                                       "compressed_method", "compressed_bits", "compressed_accuracy",
                                       "compressed_memory_ratio_vs_full_ft", "floor_target_ratio",
                                       "meets_floor_target")}
             for k, v in results.items() if isinstance(v, dict) and "full_ft_accuracy" in v}
    print(json.dumps(shown, indent=1))


if __name__ == "__main__":
    main()
