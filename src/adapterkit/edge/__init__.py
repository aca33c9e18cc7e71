"""On-device adaptation: small backbones, a writable-memory budget, int8 bases and edge export.

    from adapterkit import edge
    model = edge.backbones.ds_cnn(num_classes=12)
    am = ak.adapt(model)
    am.add("user7", ak.LiteResidual(targets=r"re:blocks\\.\\d+$"), num_labels=13)
    edge.lean(am)                                             # frozen layers keep only what backward needs
    plan = edge.plan(am, "user7", example_batch, budget="256KiB")   # fits or not, and why
    edge.fit(am, "user7", loader, budget="256KiB", epochs=5)        # refuses before any step if over
    edge.export(am, ["user7", "user8"], "out/", example=x, format="onnx")   # one program, a blob each
    edge.export_training(am, "user7", "out/", example=x)     # the device trains it: edge.DeviceTrainer

Recipes (a pre-trained source model and a different target): `kws_recipe`, `camera_recipe`,
`har_recipe` / `basic_motions_recipe`, `vibration_recipe`; `compare` runs every way of adapting one.
"""

from . import backbones
from .device_train import DeviceTrainer, TrainingProgramInfo, export_training
from .export import EdgeProgram, ExportError, export
from .fit import FitReport, Plan, fit, plan
from .lean import lean, unlean
from .memory import BudgetError, MemoryReport, parse_budget
from .quant import quantize_int8
from .recipe import Recipe, RecipeError

RECIPES = {"kws": "adapterkit.edge.kws:kws_recipe", "vision": "adapterkit.edge.camera:camera_recipe",
           "har": "adapterkit.edge.har:har_recipe", "har_lstm": "adapterkit.edge.har:basic_motions_recipe",
           "vibration": "adapterkit.edge.vibration:vibration_recipe"}


def recipe(name: str, **options: object) -> Recipe:
    """Build a recipe by name (its data generated or read from a wheel, its source model trained)."""
    import importlib

    if name not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    module, func = RECIPES[name].split(":")
    return getattr(importlib.import_module(module), func)(**options)


__all__ = ["BudgetError", "DeviceTrainer", "EdgeProgram", "ExportError", "FitReport", "MemoryReport", "Plan", "RECIPES", "Recipe",
           "RecipeError", "TrainingProgramInfo", "backbones", "export", "export_training", "fit", "lean", "parse_budget", "plan", "quantize_int8", "recipe",
           "unlean"]
