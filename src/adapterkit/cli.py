"""`adapterkit` on the command line: train, eval, predict, info, merge, export, serve, continual, edge, federated."""

from __future__ import annotations

import functools
import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Adapter layers on a frozen model: train, inspect, merge, export and serve them.")
console = Console()
err_console = Console(stderr=True)

Data = Annotated[str | None, typer.Option(help="CSV/JSONL/Parquet path or hf:name[:split]; default: the bundled tweets")]
TextCol = Annotated[str | None, typer.Option(help="Column with the text (guessed when left out)")]
LabelCol = Annotated[str | None, typer.Option(help="Column with the label (guessed when left out)")]
Base = Annotated[str | None, typer.Option(help="Base model: a hub id or a local folder; default: the adapter's own base")]


@app.callback()
def quiet() -> None:
    """Adapter layers on a frozen model: train, inspect, merge, export and serve them."""
    from .train.job import environment_quiet

    environment_quiet()


def clear_errors(command):
    """Turn known failures into one red line and exit code 2, instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from .errors import AdapterError
        from .train.data import DataError
        from .train.trainer import TrainingInterrupted

        try:
            return command(*args, **kwargs)
        except TrainingInterrupted as err:
            err_console.print(f"[yellow]interrupted:[/] {err}")
            raise typer.Exit(130) from None
        except (AdapterError, DataError, ValueError, FileNotFoundError, OSError) as err:
            err_console.print(f"[red]error:[/] {str(err).splitlines()[0] if str(err) else type(err).__name__}")
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@clear_errors
def train(
    base: Annotated[str | None, typer.Option(help="Base model: hub id or local folder (default: bundled MiniLM)")] = None,
    data: Data = None, text_col: TextCol = None, label_col: LabelCol = None,
    task: Annotated[str, typer.Option(help="classify, or causal-lm (JSONL prompt/completion or text)")] = "classify",
    method: Annotated[str, typer.Option(help="bottleneck | lora | ia3 | bitfit | prompt | prefix")] = "bottleneck",
    reduction: Annotated[float, typer.Option(help="Bottleneck: features / bottleneck size")] = 4,
    placement: Annotated[str, typer.Option(help="Bottleneck: pfeiffer | houlsby | parallel | custom")] = "houlsby",
    r: Annotated[int, typer.Option("--r", help="LoRA rank")] = 8,
    alpha: Annotated[float, typer.Option(help="LoRA alpha (scale = alpha / r)")] = 16,
    dropout: Annotated[float, typer.Option(help="Adapter dropout")] = 0.0,
    targets: Annotated[list[str] | None, typer.Option(help="Module name suffix, re:regex, class name or all-linear; repeat")] = None,
    virtual_tokens: Annotated[int, typer.Option(help="Prompt/prefix tuning: number of virtual tokens")] = 20,
    modules_to_save: Annotated[list[str] | None, typer.Option(
        help="A base module the adapter trains its own copy of, e.g. bert.pooler; repeat")] = None,
    pooler_copy: Annotated[bool, typer.Option(
        help="Classification: the adapter also trains its own copy of the base's pooler, if it has one")] = True,
    epochs: Annotated[int, typer.Option(help="Passes over the training split")] = 3,
    lr: Annotated[float | None, typer.Option(
        help="Peak learning rate, linear warm-up and decay (default: 3e-3 bottleneck, 2e-3 LoRA, else 1e-3)")] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per step")] = 32,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps")] = 1,
    mixed_precision: Annotated[str, typer.Option(help="no | fp16 | bf16 (passed to Accelerate)")] = "no",
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations to save memory")] = False,
    max_length: Annotated[int, typer.Option(help="Tokens per example")] = 64,
    max_train: Annotated[int | None, typer.Option(
        help="Cap on training examples (0 = all; default: all of --data, 3000 of the bundled tweets)")] = None,
    max_eval: Annotated[int | None, typer.Option(
        help="Cap on validation examples (0 = all; default: all of --data, 1000 of the bundled tweets)")] = None,
    max_test: Annotated[int | None, typer.Option(help="Cap on test examples (0 = all; the default)")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the split, the order and the initialisation")] = 0,
    name: Annotated[str, typer.Option(help="Adapter name; the run folder is runs/<name>")] = "tweets-sentiment",
    out: Annotated[str | None, typer.Option(help="Run folder (default runs/<name>)")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between resumable checkpoints")] = 50,
    resume: Annotated[bool, typer.Option(help="Continue from the run folder's checkpoint if there is one")] = True,
    progress: Annotated[bool, typer.Option(help="Show the progress bar")] = True,
) -> None:
    """Train one adapter. With no options: a bottleneck adapter on the bundled MiniLM and tweets."""
    from .train.job import JobSpec, MethodOptions, default_base, report_lines, run_job
    from .train.trainer import TrainSettings

    spec = JobSpec(
        base=base or default_base(), data=data, text_col=text_col, label_col=label_col, task=task, name=name,
        out=out, max_length=max_length, max_train_examples=_cap(max_train), max_eval_examples=_cap(max_eval),
        max_test_examples=_cap(max_test),
        resume=resume,
        method=MethodOptions(method=method, reduction=reduction, placement=placement, r=r, alpha=alpha,
                             dropout=dropout, targets=targets, num_virtual_tokens=virtual_tokens,
                             modules_to_save=modules_to_save, pooler_copy=pooler_copy),
        train=TrainSettings(epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                            mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
                            seed=seed, checkpoint_every=checkpoint_every, progress=progress),
    )
    spec.method.config()  # fail on bad method options before loading anything
    metrics = run_job(spec)
    for line in report_lines(metrics):
        console.print(line)
    console.print(f"run folder: {spec.run_dir}  (adapter/, metrics.json, curves.png)")


def _cap(value: int | None) -> int | None | str:
    """A cap option: not given -> "auto" (the job decides), 0 -> no cap."""
    if value is None:
        return "auto"
    if value < 0:
        raise typer.BadParameter(f"a cap on examples must be >= 0 (0 = all), got {value}")
    return value or None


@app.command("eval")
@clear_errors
def evaluate(
    adapter: Annotated[str, typer.Argument(help="Adapter folder (or run folder)")],
    data: Data = None, text_col: TextCol = None, label_col: LabelCol = None, base: Base = None,
    max_length: Annotated[int, typer.Option(help="Tokens per example")] = 64,
    batch_size: Annotated[int, typer.Option(help="Rows per forward")] = 64,
    max_eval: Annotated[int | None, typer.Option(help="Cap on evaluated examples (0 = all)")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the split (the bundled tweets use its test split)")] = 0,
) -> None:
    """Accuracy and macro-F1 of a classification adapter on a dataset."""
    from .train.saved import evaluate_adapter

    result = evaluate_adapter(adapter, data, text_col, label_col, base, max_length, batch_size, max_eval or None, seed)
    console.print_json(json.dumps(result))


@app.command()
@clear_errors
def predict(
    adapter: Annotated[str, typer.Argument(help="Adapter folder (or run folder)")],
    texts: Annotated[list[str], typer.Argument(help="One or more texts")],
    base: Base = None,
) -> None:
    """Label and scores for each text."""
    from .train.saved import predict_texts

    table = Table("text", "label", "scores")
    for text, label, scores in predict_texts(adapter, texts, base):
        table.add_row(text[:60], label, " ".join(f"{k}={v:.3f}" for k, v in scores.items()))
    console.print(table)


@app.command()
@clear_errors
def info(adapter: Annotated[str, typer.Argument(help="Adapter folder, .safetensors file or run folder")]) -> None:
    """Method, parameters, base model, labels and size of a saved adapter (reads files only)."""
    from .train.saved import adapter_facts

    table = Table("field", "value", show_header=False)
    for key, value in adapter_facts(adapter).items():
        table.add_row(key, str(value))
    console.print(table)


@app.command()
@clear_errors
def merge(
    adapter: Annotated[str, typer.Argument(help="LoRA, IA³ or BitFit adapter folder")],
    out: Annotated[str, typer.Option(help="Folder for the standalone merged model")],
    base: Base = None,
) -> None:
    """Fold an adapter into the base weights and save a standalone transformers model folder."""
    from .train.saved import merge_to_folder

    path = merge_to_folder(adapter, out, base)
    console.print(f"merged model written to {path}")


@app.command()
@clear_errors
def export(
    adapter: Annotated[str, typer.Argument(help="Adapter folder")],
    out: Annotated[str, typer.Option(help="Output folder")],
    format: Annotated[str, typer.Option("--format", help="peft (Hugging Face PEFT LoRA layout)")] = "peft",
    base: Base = None,
) -> None:
    """Write an adapter in another tool's layout (PEFT: adapter_config.json + adapter_model.safetensors)."""
    from .train.saved import export_adapter

    path = export_adapter(adapter, out, format, base)
    console.print(f"exported to {path}")


@app.command()
@clear_errors
def serve(
    store: Annotated[str, typer.Option(help="Folder of adapters")],
    base: Annotated[str | None, typer.Option(help="Base model (default: bundled MiniLM)")] = None,
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    host: Annotated[str, typer.Option(help="Bind address (loopback unless --keys is given)")] = "127.0.0.1",
    max_batch: Annotated[int, typer.Option(help="Rows per batched forward")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="How long the batcher waits to fill a batch")] = 5.0,
    cache_bytes: Annotated[int, typer.Option(help="Byte budget of resident adapters")] = 512 << 20,
    keys: Annotated[str | None, typer.Option(help="keys.json mapping API keys to tenants")] = None,
    scheduling: Annotated[str, typer.Option(help="generation: continuous (rows join and leave at every step) | static")] = "continuous",
    served_model_name: Annotated[str | None, typer.Option(help="The base model's name in the OpenAI API")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="The most tokens one generation may ask for")] = 256,
    merge_after: Annotated[int, typer.Option(help="Forwards in a row for one mergeable adapter before it is served merged (0: never)")] = 8,
    quantize: Annotated[str | None, typer.Option(help="int8: int8 weight-only Linear layers in the base (torchao)")] = None,
) -> None:
    """Serve many adapters on one base model over HTTP (FastAPI), with an OpenAI-compatible API."""
    from .serve import serve_command
    from .train.job import default_base

    serve_command(base=base or default_base(), store=store, port=port, host=host, max_batch=max_batch,
                  max_wait_ms=max_wait_ms, cache_bytes=cache_bytes, keys=keys, scheduling=scheduling,
                  served_name=served_model_name, max_new_tokens=max_new_tokens, merge_after=merge_after,
                  quantize=quantize)


continual_app = typer.Typer(no_args_is_help=True, help="Continual learning: one frozen adapter per task.")
app.add_typer(continual_app, name="continual")


@continual_app.command("run")
@clear_errors
def continual_run(
    tasks: Annotated[str, typer.Option(help="Task stream: split-mnist | text (four domains on MiniLM) | sensor (a drifting vibration sensor)")] = "split-mnist",
    out: Annotated[str, typer.Option(help="Folder for results.json and the heat maps of R")] = "runs/continual",
    epochs: Annotated[int | None, typer.Option(help="Epochs per task (default 5; --quick 2)")] = None,
    baselines: Annotated[list[str] | None, typer.Option(
        help="naive | ewc | replay | joint | naive_full; repeat (default: all)")] = None,
    quick: Annotated[bool, typer.Option(help="Fewer examples and epochs: a smoke run")] = False,
) -> None:
    """Learn a stream task by task with per-task adapters and the baselines; write R, the metrics and plots."""
    from pathlib import Path

    from .continual.run import BASELINES, run_stream

    folder = Path(out)
    results = run_stream(tasks, quick=quick, epochs=epochs, baselines=tuple(baselines or BASELINES), plots=folder,
                         log=lambda line: err_console.print(line))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    table = Table("method", "accuracy (task id)", "BWT", "forgetting")
    for name in ("adapters", *[b for b in (baselines or BASELINES) if b != "joint"]):
        r = results[name]
        table.add_row(name, f"{r['average_accuracy']:.3f}", f"{r['bwt']:+.3f}", f"{r['forgetting']:.3f}")
    if "joint" in results:
        table.add_row("joint (upper bound)", f"{results['joint']['accuracy']:.3f}", "", "")
    console.print(table)
    free = results["adapters"]["task_free_prototype"]
    console.print(f"adapters without a task id: accuracy {free['accuracy']:.3f}, routing {free['routing_accuracy']:.3f}")
    console.print(f"written to {folder}")


edge_app = typer.Typer(no_args_is_help=True, help="On-device adaptation: plan, fit and export under a memory budget.")
app.add_typer(edge_app, name="edge")
RecipeOpt = Annotated[str, typer.Option(help="kws | vision | har | har_lstm | vibration")]
MethodOpt = Annotated[str, typer.Option(help="lite_residual | bottleneck | lora | ia3 | bitfit | *_last")]


def _edge_setup(recipe: str, method: str, quick: bool):
    from .edge import recipe as build_recipe
    from .edge.compare import adapted, methods_for

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
) -> None:
    """Estimate the writable training memory of one setup from one forward; say what fits when it does not."""
    from .edge import plan

    built, am = _edge_setup(recipe, method, quick)
    rows = batch_size or built.batch_size
    result = plan(am, method, (built.train[0][:rows], built.train[1][:rows]), budget=budget)
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
) -> None:
    """Adapt the recipe's source model to its target within a budget; report the measured peak."""
    from pathlib import Path

    from safetensors.torch import save_file

    from .edge import fit
    from .edge.recipe import EpochLoader, accuracy

    built, am = _edge_setup(recipe, method, quick)
    report = fit(am, method, EpochLoader(*built.train, batch_size or built.batch_size), budget=budget,
                 epochs=epochs or built.epochs, lr=built.lr)
    am.activate(method)
    acc = accuracy(am, *built.test)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    am.save(method, str(folder / "adapter"))
    save_file({k: v.contiguous() for k, v in am.base.state_dict().items()}, str(folder / "base.safetensors"))
    (folder / "report.json").write_text(json.dumps({"recipe": recipe, "method": method, "accuracy": acc,
                                                     "quick": quick, **report.as_dict()}, indent=2))
    console.print(f"{recipe} / {method}: accuracy {acc:.3f} on the target's test set")
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
) -> None:
    """Export one base program and one blob per adapter; check each against PyTorch."""
    from pathlib import Path

    import numpy as np
    import torch
    from safetensors.torch import load_file

    from .edge import EdgeProgram, export
    from .edge import recipe as build_recipe
    from .edge.recipe import RecipeError
    from .model import adapt

    reports = [json.loads((Path(r) / "report.json").read_text()) for r in runs]
    if len({r["recipe"] for r in reports}) != 1:
        raise RecipeError("export takes adapters of one recipe (one base model) at a time")
    built = build_recipe(reports[0]["recipe"], quick=reports[0]["quick"])
    base = built.make_source()
    base.load_state_dict(load_file(str(Path(runs[0]) / "base.safetensors")))
    am = adapt(base)
    names = [am.load(str(Path(r) / "adapter"), name=f"{Path(r).name}") for r in runs]
    example = built.test[0][:1]
    manifest = export(am, names, out, example=example, format=format, merged=merged)
    program = EdgeProgram(out)
    for name in names:
        am.activate(name)
        am.eval()
        with torch.no_grad():
            diff = float(np.abs(program.run(example, name) - am(example).numpy()).max())
        blob = manifest["adapters"][name]["blob_bytes"]
        console.print(f"{name}: blob {blob} bytes, max |{format} - PyTorch| = {diff:.2e}")
    console.print(f"written to {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()


federated_app = typer.Typer(no_args_is_help=True, help="Federated adapters on Flower: only adapter tensors travel.")
app.add_typer(federated_app, name="federated")


@federated_app.command("simulate")
@clear_errors
def federated_simulate(
    task: Annotated[str, typer.Option(help="tweets | newsgroups (MiniLM) | har (one user per client) | digits")] = "tweets",
    clients: int = 10, rounds: int = 20,
    partition: Annotated[str, typer.Option(help="dirichlet:<alpha> | iid | natural (har)")] = "dirichlet:0.3",
    method: Annotated[str, typer.Option(help="lora | bottleneck | ia3 | bitfit")] = "lora",
    aggregation: Annotated[str, typer.Option(help="fedavg | ffa (LoRA A frozen) | svd (mean of B·A, re-factored)")] = "fedavg",
    proximal_mu: Annotated[float, typer.Option(help="FedProx's μ (0: FedAvg)")] = 0.0,
    server_lr: Annotated[float, typer.Option(help="The server's step on the averaged update (FedAvgM's η)")] = 1.0,
    server_momentum: Annotated[float, typer.Option(help="FedAvgM's β (0: no momentum)")] = 0.0,
    control: Annotated[str, typer.Option(help="none | scaffold (control variates against client drift)")] = "none",
    local_loss: Annotated[str, typer.Option(help="ce | balanced (balanced softmax against label skew)")] = "ce",
    head_init: Annotated[str, typer.Option(help="seeded | class-means (FedNCM: one query round first)")] = "seeded",
    local_epochs: Annotated[int | None, typer.Option(help="Local epochs per round (default: the task's)")] = None,
    dp: Annotated[str, typer.Option(help="none | server:noise=σ,clip=C | client:noise=σ,clip=C")] = "none",
    faults: Annotated[str, typer.Option(help="e.g. drop:3@2,late:4,nan:5 (see adapterkit.federated.faults)")] = "",
    min_available: Annotated[int, typer.Option(help="Fewest good replies a round aggregates")] = 2,
    timeout: Annotated[float, typer.Option(help="Seconds a round waits for replies")] = 600.0,
    per_client: Annotated[int, typer.Option(help="Examples per client (about)")] = 200,
    checkpoint_dir: Annotated[str | None, typer.Option(help="Save the adapter each round; resume from the last")] = None,
    backend: Annotated[str, typer.Option(help="ray (Flower's simulation engine) | inprocess")] = "ray",
    out: Annotated[str | None, typer.Option(help="Write the outcome as JSON here")] = None,
) -> None:
    """Train one shared adapter across simulated clients with Flower; print accuracy per round."""
    from .federated import Settings, simulate

    settings = Settings(task=task, clients=clients, rounds=rounds, partition=partition, method=method,
                        aggregation=aggregation, proximal_mu=proximal_mu, server_lr=server_lr,
                        server_momentum=server_momentum, control=control, local_loss=local_loss,
                        head_init=head_init, local_epochs=local_epochs, dp=dp, faults=faults,
                        min_available=min_available, timeout=timeout, per_client=per_client,
                        checkpoint_dir=checkpoint_dir)
    outcome = simulate(settings, backend=backend)
    table = Table("round", "kept / sent", "dropped", "train loss", "test accuracy")
    for key, entry in sorted(outcome.rounds.items(), key=lambda kv: int(kv[0])):
        loss = entry.get("metrics", {}).get("train-loss")
        table.add_row(key, f"{entry.get('kept', '')} / {entry.get('sent', '')}" if "sent" in entry else "",
                      "; ".join(f"{d['partition_id']}: {d['reason'][:40]}" for d in entry.get("dropped", [])),
                      "" if loss is None else f"{loss:.3f}", f"{entry.get('test_accuracy', float('nan')):.3f}")
    console.print(table)
    console.print(f"{outcome.bytes_per_client_round / 1024:.0f} KiB sent per client per round; "
                  f"{outcome.seconds_per_round:.1f} s per round ({outcome.backend})")
    if outcome.dp:
        console.print(f"differential privacy: {outcome.dp}")
    if outcome.head_init:
        console.print(f"head from class means: {outcome.head_init}")
    if out:
        from dataclasses import asdict
        from pathlib import Path

        record = {k: v for k, v in asdict(outcome).items() if k != "arrays"}
        Path(out).write_text(json.dumps(record, indent=2, default=str))
