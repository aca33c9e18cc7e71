"""What else was tried against label skew on bench/federated.py's setup, each run recorded (issue 12).

    python bench/federated_ablations.py                 # every spec below, in process
    python bench/federated_ablations.py --only server_momentum_0.9,dirichlet_1.0

MiniLM, tweets, 10 clients, Dirichlet(0.3), 80 examples each, LoRA + class-means head, balanced
softmax, 3 local epochs, 5 rounds: adapter FedAvg there is `federated_accuracy` in
bench/results/federated.json. Each spec changes one thing. `dirichlet_1.0` also trains the
centralized baseline on its own union. Writes bench/results/federated_ablations.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from federated import centralized  # noqa: E402  (bench/federated.py, beside this file)

from adapterkit.federated import Settings, simulate  # noqa: E402
from adapterkit.federated.client import forget_local  # noqa: E402

BASE = dict(task="tweets", clients=10, rounds=5, partition="dirichlet:0.3", per_client=80, test_size=1000,
            timeout=3600.0, local_epochs=3, local_loss="balanced", head_init="class-means")
SPECS = {
    "server_momentum_0.9": {"server_momentum": 0.9},
    "server_lr_2": {"server_lr": 2.0},
    "fedprox_0.05": {"proximal_mu": 0.05},
    "fedprox_0.5": {"proximal_mu": 0.5},
    "local_lr_5e-3": {"lr": 5e-3},
    "one_epoch_15_rounds": {"local_epochs": 1, "rounds": 15},
    "dirichlet_1.0": {"partition": "dirichlet:1.0"},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="", help="comma-separated spec names (default: all)")
    parser.add_argument("--out", default="bench/results/federated_ablations.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    names = [n for n in args.only.split(",") if n] or list(SPECS)
    unknown = sorted(set(names) - set(SPECS))
    if unknown:
        raise SystemExit(f"unknown spec {unknown}; choose from {', '.join(SPECS)}")
    results = {}
    for name in names:
        forget_local()
        started = time.perf_counter()
        settings = Settings(**{**BASE, **SPECS[name]})
        outcome = simulate(settings, backend="inprocess")
        results[name] = {"change": SPECS[name], "accuracy": outcome.accuracy,
                         "accuracy_by_round": {r: e.get("test_accuracy") for r, e in outcome.rounds.items()},
                         "wall_seconds": time.perf_counter() - started}
        if settings.partition != BASE["partition"]:
            forget_local()
            results[name]["centralized_accuracy"] = centralized(Settings(**{**BASE, **SPECS[name]}))[0]
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "accuracy_by_round"}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"base": BASE, "specs": results}, indent=2))


if __name__ == "__main__":
    main()
