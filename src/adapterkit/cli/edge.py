"""`adapterkit edge`: plan, fit and export under a memory budget."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from .common import clear_errors, command_group, console

if TYPE_CHECKING:
    from ..edge.recipe import Recipe
    from ..model import AdaptedModel

edge_app = command_group("edge", "On-device adaptation: plan, fit and export under a memory budget.")
RecipeOpt = Annotated[str, typer.Option(help="kws | vision | har | har_lstm | vibration")]
MethodOpt = Annotated[str, typer.Option(help="lite_residual | bottleneck | lora | ia3 | bitfit | *_last")]


DataOpt = Annotated[str | None, typer.Option(help="Your own data: a folder with one folder per class (.wav, .npy, "
                                                  ".csv, .png, .jpg), in place of --recipe")]
BackboneOpt = Annotated[str | None, typer.Option(help="With --data: ds_cnn | tcn | cnn1d | lstm | mobilenet_v2")]
ModelOpt = Annotated[str | None, typer.Option(help="With --data: your pre-trained model as a torch.export program "
                                                   "(.pt2, exported with a dynamic batch), in place of --backbone")]
BitsOpt = Annotated[int | None, typer.Option(help="Keep what backward reads in 8, 4, 2 or 1 bits (less memory, "
                                                  "a little noise in the gradients)")]
WeightsOpt = Annotated[str | None, typer.Option(help="With --data: the backbone's pre-trained weights (.safetensors)")]
TargetsOpt = Annotated[list[str] | None, typer.Option(help="With --data: where adapters sit (default: each block)")]
SplitOpt = Annotated[float, typer.Option(help="With --data: the share of each class held out to score the adapter")]
SizeOpt = Annotated[int, typer.Option(help="With --data: images are resized to this square")]


def _edge_setup(recipe: str, method: str, quick: bool, data: str | None = None, backbone: str | None = None,
                weights: str | None = None, targets: list[str] | None = None, test_split: float = 0.25,
                image_size: int = 96, model: str | None = None) -> tuple[Recipe, AdaptedModel]:
    from ..edge import recipe as build_recipe
    from ..edge.compare import adapted, methods_for
    from ..edge.user_data import user_recipe

    if data is not None:
        if backbone is None and model is None:
            raise typer.BadParameter("--data needs your pre-trained model: --model file.pt2, or --backbone and --weights")
        built = user_recipe(data, backbone=backbone, weights=weights, model=model, targets=targets or None,
                            test_split=test_split, image_size=image_size)
    elif model is not None:
        raise typer.BadParameter("--model is your own model for your own --data")
    else:
        built = build_recipe(recipe, quick=quick)
    methods = methods_for(built)
    if method not in methods:
        raise typer.BadParameter(f"method {method!r} is not set up for recipe {recipe!r}; use one of {sorted(methods)}")
    return built, adapted(built, method, methods[method])


@edge_app.command("plan")
@clear_errors
def edge_plan(
    recipe: RecipeOpt = "kws", method: MethodOpt = "lite_residual",
    budget: Annotated[str | None, typer.Option(help="Writable memory budget, e.g. 256KiB")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per step (default: the recipe's)")] = None,
    quick: Annotated[bool, typer.Option(help="A smaller recipe (faster to build)")] = False,
    data: DataOpt = None, backbone: BackboneOpt = None, weights: WeightsOpt = None, targets: TargetsOpt = None,
    test_split: SplitOpt = 0.25, image_size: SizeOpt = 96, model: ModelOpt = None, activation_bits: BitsOpt = None,
) -> None:
    """Estimate the writable training memory of one setup from one forward; say what fits when it does not."""
    from ..edge import plan

    built, am = _edge_setup(recipe, method, quick, data, backbone, weights, targets, test_split, image_size, model)
    rows = batch_size or built.batch_size
    result = plan(am, method, (built.train[0][:rows], built.train[1][:rows]), budget=budget,
                  activation_bits=activation_bits)
    console.print(result.explain())
    if not result.fits:
        raise typer.Exit(1)


@edge_app.command("fit")
@clear_errors
def edge_fit(
    recipe: RecipeOpt = "kws", method: MethodOpt = "lite_residual",
    budget: Annotated[str | None, typer.Option(help="Writable memory budget, e.g. 256KiB")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per step (default: the recipe's)")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default: the recipe's)")] = None,
    out: Annotated[str, typer.Option(help="Folder for the adapter, the base weights and report.json")] = "runs/edge",
    quick: Annotated[bool, typer.Option(help="A smaller recipe (faster to build)")] = False,
    data: DataOpt = None, backbone: BackboneOpt = None, weights: WeightsOpt = None, targets: TargetsOpt = None,
    test_split: SplitOpt = 0.25, image_size: SizeOpt = 96, model: ModelOpt = None, activation_bits: BitsOpt = None,
) -> None:
    """Adapt the recipe's source model (or your --backbone and --weights, or --model) to its target (or your
    --data) within a budget; report the measured peak."""
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    from ..edge import fit
    from ..edge.recipe import EpochLoader, accuracy

    built, am = _edge_setup(recipe, method, quick, data, backbone, weights, targets, test_split, image_size, model)
    report = fit(am, method, EpochLoader(*built.train, batch_size or built.batch_size), budget=budget,
                 epochs=epochs or built.epochs, lr=built.lr, activation_bits=activation_bits)
    am.activate(method)
    acc = accuracy(am, *built.test)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    am.save(method, str(folder / "adapter"))
    save_file({k: v.contiguous() for k, v in am.base.state_dict().items()}, str(folder / "base.safetensors"))
    kept = folder / "model.pt2"
    if model is not None and not (kept.exists() and kept.samefile(model)):  # for `edge export` and `edge run`
        shutil.copyfile(model, kept)
    own = {"backbone": built.info["backbone"], "labels": built.info["labels"], "preprocess": built.info["preprocess"],
           "input_shape": list(built.input_shape)} if data is not None else None
    (folder / "report.json").write_text(json.dumps({"recipe": built.name, "method": method, "accuracy": acc,
                                                     "quick": quick, "user": own, **report.as_dict()}, indent=2))
    console.print(f"{built.name if data is None else data} / {method}: accuracy {acc:.3f} on the held-out examples")
    console.print(f"planned: {report.plan.report.describe()}")
    console.print(f"measured peak: {report.peak.describe()}")
    console.print(f"written to {folder}")


@edge_app.command("export")
@clear_errors
def edge_export(
    runs: Annotated[list[str], typer.Argument(help="Folders written by `adapterkit edge fit` (same recipe)")],
    out: Annotated[str, typer.Option(help="Folder for the program(s), the blobs and edge.json")] = "runs/edge-export",
    format: Annotated[str, typer.Option(help="onnx | pte (ExecuTorch)")] = "onnx",
    merged: Annotated[bool, typer.Option(help="One program per adapter, merged (LoRA, IA³, BitFit)")] = False,
    train: Annotated[bool, typer.Option(help="Also write ExecuTorch training programs: the device trains the "
                                              "adapter (and, for comparison, full fine-tuning)")] = False,
    batch: Annotated[int, typer.Option(help="The training programs' batch size (fixed in the program)")] = 8,
    budget: Annotated[str | None, typer.Option(help="With --train: refuse an adapter's training program whose "
                                                    "arena and parameters exceed this, e.g. 256KiB")] = None,
    activation_bits: Annotated[int | None, typer.Option(help="With --train: 8 keeps the activations the adapter's "
                                                             "convolutions read for their gradients as bytes")] = None,
) -> None:
    """Export one base program and one blob per adapter; check each against PyTorch. With --train, also a
    training program per adapter, with the memory ExecuTorch plans for it."""
    from pathlib import Path

    import numpy as np
    import torch
    from safetensors.torch import load_file

    from ..edge import EdgeProgram, export
    from ..edge import recipe as build_recipe
    from ..edge.recipe import RecipeError
    from ..model import adapt

    if activation_bits is not None and not train:
        raise typer.BadParameter("--activation-bits is for the training programs: add --train")
    reports = [json.loads((Path(r) / "report.json").read_text()) for r in runs]
    if len({r["recipe"] for r in reports}) != 1:
        raise RecipeError("export takes adapters of one recipe (one base model) at a time")
    own = reports[0].get("user")
    if own is not None:  # the user's model: rebuilt from the run's weights, inputs shaped as the run's
        from ..edge.user_data import load_backbone_from_state

        base = load_backbone_from_state(own["backbone"], load_file(str(Path(runs[0]) / "base.safetensors")),
                                        program=Path(runs[0]) / "model.pt2")
        examples = torch.zeros(max(batch, 1), *own["input_shape"])
    else:
        built = build_recipe(reports[0]["recipe"], quick=reports[0]["quick"])
        base = built.make_source()
        base.load_state_dict(load_file(str(Path(runs[0]) / "base.safetensors")))
        examples = built.test[0]
    am = adapt(base)
    names: list[str] = []
    for r in runs:
        loaded = am.load(str(Path(r) / "adapter"), name=f"{Path(r).name}")
        if not isinstance(loaded, str):
            raise RecipeError(f"{r}: holds an adapter fusion, not an adapter written by `adapterkit edge fit`")
        names.append(loaded)
    example = examples[:1]
    manifest = export(am, names, out, example=example, format=format, merged=merged)
    program = EdgeProgram(out)
    for name in names:
        am.activate(name)
        am.eval()
        with torch.no_grad():
            diff = float(np.abs(program.run(example, name) - am(example).numpy()).max())
        blob = manifest["adapters"][name]["blob_bytes"]
        console.print(f"{name}: blob {blob} bytes, max |{format} - PyTorch| = {diff:.2e}")
    if train:
        from ..edge import export_training
        from ..edge.memory import human

        x = examples[:batch]
        if len(x) < batch:
            raise RecipeError(f"--batch {batch}: the recipe's test set has only {len(x)} examples")
        full = export_training(am, names[0], out, example=x, full=True)
        console.print(f"full fine-tuning: {full.file}, arena {human(full.arena_bytes)}, "
                      f"trainable {human(full.trainable_bytes)}, flash {human(full.flash_bytes)}")
        for name in names:
            info = export_training(am, name, out, example=x, budget=budget, activation_bits=activation_bits)
            console.print(f"{name}: {info.file}, arena {human(info.arena_bytes)} "
                          f"({full.arena_bytes / info.arena_bytes:.1f}x less than full fine-tuning), trainable "
                          f"{human(info.trainable_bytes)}, flash {human(info.flash_bytes)}")
    console.print(f"written to {out}")


@edge_app.command("run")
@clear_errors
def edge_run(
    run: Annotated[str, typer.Argument(help="A folder written by `adapterkit edge fit --data ...`")],
    files: Annotated[list[str], typer.Argument(help="Files to label (.wav, .npy, .csv, .png, .jpg, as trained on)")],
) -> None:
    """Label files with a trained adapter on your model: one line per file, the label and its probability."""
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    from ..edge.recipe import RecipeError
    from ..edge.user_data import Preprocess, load_backbone_from_state
    from ..model import adapt

    report = json.loads((Path(run) / "report.json").read_text())
    own = report.get("user")
    if own is None:
        raise RecipeError(f"{run} was trained on the recipe {report['recipe']!r}, not on your --data: "
                          "`edge run` reads files the way a --data run did")
    am = adapt(load_backbone_from_state(own["backbone"], load_file(str(Path(run) / "base.safetensors")),
                                        program=Path(run) / "model.pt2"))
    name = am.load(str(Path(run) / "adapter"), name="run")
    am.activate(name)
    am.eval()
    paths = [Path(f) for f in files]
    for path in paths:
        if not path.is_file():
            raise RecipeError(f"{path}: no such file")
    x = Preprocess(**own["preprocess"]).read(paths)
    if list(x.shape[1:]) != own["input_shape"]:
        raise RecipeError(f"the files give inputs of shape {list(x.shape[1:])}; the adapter was trained on "
                          f"{own['input_shape']}")
    with torch.no_grad():
        probs = torch.softmax(am(x), dim=-1)
    for path, row in zip(paths, probs, strict=True):
        best = int(row.argmax())
        typer.echo(f"{path}\t{own['labels'][best]}\t{float(row[best]):.3f}")  # tab-separated, for scripts
