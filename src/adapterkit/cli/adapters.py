"""Commands on one adapter: train, eval, predict, info, merge, export."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from .common import Base, Data, DType, LabelCol, Quantize, TextCol, app, clear_errors, console


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
        help="Classification: the adapter also trains its own copy of the base's pooler, if it has one (a "
             "sentence-transformers base has none: it is read through its own pooling)")] = True,
    head_init: Annotated[str, typer.Option(
        help="Classification: probe (the head starts as logistic regression on the frozen features, "
             "then trains with the adapter) | seeded (a random head)")] = "probe",
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
    name: Annotated[str | None, typer.Option(
        help="Adapter name; the run folder is runs/<name> (default: the data file's name, my.csv -> my; "
             "tweets-sentiment for the bundled tweets)")] = None,
    out: Annotated[str | None, typer.Option(help="Run folder (default runs/<name>)")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between resumable checkpoints")] = 50,
    resume: Annotated[bool, typer.Option(help="Continue from the run folder's checkpoint if there is one")] = True,
    progress: Annotated[bool, typer.Option(help="Show the progress bar")] = True,
    baseline: Annotated[bool, typer.Option(
        help="Also report the majority class and frozen embeddings + logistic regression on the same split")] = True,
    dtype: Annotated[str, typer.Option(help="fp32 | bf16 | fp16: the dtype the base is loaded in")] = "fp32",
    quantize: Annotated[str | None, typer.Option(
        help="nf4 (bitsandbytes, QLoRA) | int8 | int4 (torchao): quantize the base's frozen Linear layers")] = None,
    adapter_dtype: Annotated[str, typer.Option(
        help="fp32 (a master copy beside a bf16 or quantized base) | base (the base's dtype)")] = "fp32",
) -> None:
    """Train one adapter. With no options: a bottleneck adapter on the bundled MiniLM and tweets.

    A classifier reads a sentence-transformers base (a folder with modules.json) through its own
    pooling (MiniLM: the normalised mean of its tokens), a plain encoder through its pooler, a
    decoder through its last real token. The head starts as logistic regression on those frozen
    features (--head-init probe), so training begins at the frozen baseline and improves on it."""
    from ..quantize import Precision
    from ..train.job import (
        JobSpec,
        MethodOptions,
        default_base,
        default_name,
        parse_task,
        report_lines,
        run_job,
    )
    from ..train.trainer import TrainSettings

    caps = _cap(max_train), _cap(max_eval), _cap(max_test)  # bad caps are reported before a bad task
    spec = JobSpec(
        base=base or default_base(), data=data, text_col=text_col, label_col=label_col, task=parse_task(task),
        name=name or default_name(data), out=out, max_length=max_length, max_train_examples=caps[0], max_eval_examples=caps[1],
        max_test_examples=caps[2],
        resume=resume, baseline=baseline,
        precision=Precision(dtype=dtype, quantize=None if quantize in (None, "none") else quantize,
                            adapter_dtype=adapter_dtype),
        method=MethodOptions(method=method, reduction=reduction, placement=placement, r=r, alpha=alpha,
                             dropout=dropout, targets=targets, num_virtual_tokens=virtual_tokens,
                             modules_to_save=modules_to_save, pooler_copy=pooler_copy,
                             head_init=head_init),
        train=TrainSettings(epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                            mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
                            seed=seed, checkpoint_every=checkpoint_every, progress=progress),
    )
    spec.method.config()  # fail on bad method options before loading anything
    metrics = run_job(spec)
    if not metrics["main_process"]:  # accelerate launch: the main process reports
        return
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
    dtype: DType = None, quantize: Quantize = None,
) -> None:
    """Accuracy and macro-F1 of a classification adapter on a dataset."""
    from ..train.saved import as_trained, evaluate_adapter

    result = evaluate_adapter(adapter, data, text_col, label_col, base, max_length, batch_size, max_eval or None, seed,
                              precision=as_trained(adapter, dtype, quantize))
    console.print_json(json.dumps(result))


@app.command()
@clear_errors
def predict(
    adapter: Annotated[str, typer.Argument(help="Adapter folder (or run folder)")],
    texts: Annotated[list[str] | None, typer.Argument(help="One or more texts (or --data)")] = None,
    data: Annotated[str | None, typer.Option(
        help="CSV/JSONL/Parquet file of texts; the predictions go to --out")] = None,
    text_col: TextCol = None,
    out: Annotated[str | None, typer.Option(
        help="Predictions file (JSONL) for --data; default: <data name>-predictions.jsonl here")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of {text, label, scores}")] = False,
    base: Base = None, dtype: DType = None, quantize: Quantize = None,
) -> None:
    """Label and scores for each text, given on the command line or read from a file."""
    from pathlib import Path

    from ..train.job import default_name
    from ..train.saved import as_trained, predict_texts, texts_from_file

    if bool(texts) == bool(data):
        raise typer.BadParameter("give texts on the command line or --data FILE, not both or neither")
    inputs = list(texts) if texts else texts_from_file(adapter, str(data), text_col)
    answers = predict_texts(adapter, inputs, base, precision=as_trained(adapter, dtype, quantize))
    rows = [{"text": t, "label": label, "scores": scores} for t, label, scores in answers]
    if data:
        target = Path(out) if out else Path(f"{default_name(data)}-predictions.jsonl")
        target.write_text("".join(json.dumps(row) + "\n" for row in rows))
    if as_json:
        print(json.dumps(rows))
        return
    if data:
        console.print(f"{len(rows)} predictions written to {target}")
        return
    table = Table("text", "label", "scores")
    for text, label, scores in answers:
        table.add_row(text[:60], label, " ".join(f"{k}={v:.3f}" for k, v in scores.items()))
    console.print(table)


@app.command()
@clear_errors
def info(adapter: Annotated[str, typer.Argument(help="Adapter folder, .safetensors file or run folder")]) -> None:
    """Method, parameters, base model, labels and size of a saved adapter (reads files only)."""
    from ..train.saved import adapter_facts

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
    dtype: Annotated[str | None, typer.Option(
        help="fp32 | bf16 | fp16: the dtype of the merged weights; default: the dtype the adapter was trained in")] = None,
    quantized: Annotated[str, typer.Option(
        help="For an adapter trained on a quantized base: dequantize (merge into the weights it trained "
             "against, write them in --dtype) | requantize (also measure what quantizing the merged "
             "weights again adds, for a server that does)")] = "dequantize",
) -> None:
    """Fold an adapter into the base weights and save a standalone transformers model folder, with a
    report of how far the merged outputs are from the adapter's (merge_report.json)."""
    from ..train.saved import as_trained, merge_to_folder

    path, report = merge_to_folder(adapter, out, base, as_trained(adapter, dtype), quantized)
    console.print(f"merged model written to {path}")
    console.print(f"largest score difference from the unmerged adapter: {report['max_abs_score_difference']:.2e} "
                  f"(argmax agreement {report['argmax_agreement']:.2f}, {report['how']})")


@app.command()
@clear_errors
def export(
    adapter: Annotated[str, typer.Argument(help="Adapter folder")],
    out: Annotated[str, typer.Option(help="Output folder")],
    format: Annotated[str, typer.Option("--format", help="peft (Hugging Face PEFT LoRA layout)")] = "peft",
    base: Base = None,
) -> None:
    """Write an adapter in another tool's layout (PEFT: adapter_config.json + adapter_model.safetensors)."""
    from ..train.saved import export_adapter

    path = export_adapter(adapter, out, format, base)
    console.print(f"exported to {path}")
