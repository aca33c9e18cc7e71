"""Federated adapters vs full-model FedAvg vs centralized training, in one run (issue 12).

    python bench/federated.py                    # MiniLM, tweets, 10 clients, Dirichlet 0.3
    python bench/federated.py --rounds 5 --per-client 100

Measures, on the same clients and test set:
- bytes one client sends per round (ArrayRecord.count_bytes()): LoRA adapter vs every weight;
- test accuracy after N rounds: adapter FedAvg (Flower's Ray simulation engine), the LoRA-exact
  `svd` aggregation, SCAFFOLD, adapter FedAvg on IID clients (the same examples dealt out evenly:
  the floor that shows what the label skew costs), full-model FedAvg, and centralized LoRA training
  on the union of the clients' data for the same number of epochs (N rounds × local epochs);
- wall time per round;
- the same for one on-device recipe (har: one new user per client, bottleneck adapters on a TCN).
The adapter runs start the head from the clients' class means (one query round, head_init.py) and
train with balanced softmax (client.py); full-model FedAvg trains with the same local loss.
Writes bench/results/federated.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from adapterkit.federated import Settings, build_task, evaluate, local_train, make_participant, simulate  # noqa: E402
from adapterkit.federated.builtin import method_config  # noqa: E402
from adapterkit.federated.client import forget_local  # noqa: E402
from adapterkit.federated.tasks import ClientData  # noqa: E402


def centralized(settings: Settings) -> tuple[float, float, dict[int, float]]:
    """The task's adapter (LoRA on the tweets) trained on the union of the clients' data, as many
    epochs as the federated run saw;
    also its test accuracy after every epoch (the curve its last value is read from)."""
    task = build_task(settings.task, clients=settings.clients, partition=settings.partition, seed=settings.seed,
                      per_client=settings.per_client, test_size=settings.test_size,
                      method=method_config(settings.task, settings.method))
    task.info["seed"] = settings.seed
    part = make_participant(task, "adapter")
    union = _union(task.clients)
    epochs = settings.rounds * (settings.local_epochs or task.local_epochs)
    curve, seconds = {}, 0.0
    for epoch in range(epochs):
        began = time.perf_counter()
        local_train(task, part, union, epochs=1, lr=task.lr, seed=settings.seed * 7 + epoch)
        seconds += time.perf_counter() - began
        curve[epoch + 1] = evaluate(task, part.model, task.test)[1]
    return curve[epochs], seconds, curve


def on_device(rounds: int, clients: int = 10, per_client: int = 40) -> dict:
    """The har recipe federated: each client one new user wearing the device turned (a natural
    split), bottleneck adapters on the pre-trained TCN; adapter FedAvg vs full-model FedAvg vs
    the same adapter trained on the union."""
    common = dict(task="har", clients=clients, rounds=rounds, partition="natural", method="bottleneck",
                  per_client=per_client, test_size=300, timeout=600.0)
    out = {"task": "har", "clients": clients, "partition": "natural (adapter_fedavg_iid: iid)",
           "per_client": per_client, "rounds": rounds}
    for name, extra in [("adapter_fedavg", {}), ("adapter_fedavg_iid", {"partition": "iid"}),
                        ("full_fedavg", {"full_model": True})]:
        forget_local()
        outcome = simulate(Settings(**{**common, **extra}), backend="inprocess")
        out[name] = {"accuracy": outcome.accuracy, "bytes_per_round": outcome.bytes_per_client_round,
                     "accuracy_by_round": {r: e.get("test_accuracy") for r, e in outcome.rounds.items()}}
    forget_local()
    settings = Settings(**common)
    out["centralized_accuracy"], _, out["centralized_by_epoch"] = centralized(settings)
    out["bytes_ratio"] = out["full_fedavg"]["bytes_per_round"] / out["adapter_fedavg"]["bytes_per_round"]
    out["federated_minus_centralized"] = out["adapter_fedavg"]["accuracy"] - out["centralized_accuracy"]
    print("on_device", json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}), flush=True)
    return out


def _union(clients: list[ClientData]) -> ClientData:
    first = clients[0]
    if isinstance(first.inputs, dict):
        inputs = {k: torch.cat([c.inputs[k] for c in clients]) for k in first.inputs}
    else:
        inputs = torch.cat([c.inputs for c in clients])
    return ClientData(inputs, torch.cat([c.labels for c in clients]), "union")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="tweets")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-client", type=int, default=150)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--partition", default="dirichlet:0.3")
    parser.add_argument("--local-epochs", type=int, default=3)
    parser.add_argument("--local-loss", default="balanced", help="ce | balanced (balanced softmax)")
    parser.add_argument("--head-init", default="class-means", help="seeded | class-means (FedNCM)")
    parser.add_argument("--skip-full", action="store_true", help="leave out full-model FedAvg (the slowest)")
    parser.add_argument("--on-device-rounds", type=int, default=10, help="rounds of the har recipe (0: skip it)")
    parser.add_argument("--out", default="bench/results/federated.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    common = dict(task=args.task, clients=args.clients, rounds=args.rounds, partition=args.partition,
                  per_client=args.per_client, test_size=args.test_size, timeout=3600.0,
                  local_epochs=args.local_epochs, local_loss=args.local_loss)
    adapter_only = {"head_init": args.head_init}
    runs = {}
    for name, extra, backend in [("adapter_fedavg", adapter_only, "ray"),
                                 ("adapter_svd", {"aggregation": "svd", **adapter_only}, "inprocess"),
                                 ("adapter_scaffold", {"control": "scaffold", **adapter_only}, "inprocess"),
                                 # the floor: the same clients' examples dealt out evenly
                                 ("adapter_fedavg_iid", {"partition": "iid", **adapter_only}, "inprocess"),
                                 ("full_fedavg", {"full_model": True}, "inprocess")]:
        if name == "full_fedavg" and args.skip_full:
            continue
        forget_local()
        started = time.perf_counter()
        outcome = simulate(Settings(**{**common, **extra}), backend=backend)
        runs[name] = {"accuracy": outcome.accuracy, "bytes_per_round": outcome.bytes_per_client_round,
                      "seconds_per_round": outcome.seconds_per_round, "backend": outcome.backend,
                      "wall_seconds": time.perf_counter() - started,
                      "accuracy_by_round": {r: e.get("test_accuracy") for r, e in outcome.rounds.items()},
                      "product_error_by_round": {r: e.get("metrics", {}).get("product_error")
                                                 for r, e in outcome.rounds.items() if "metrics" in e}}
        print(name, json.dumps({k: v for k, v in runs[name].items() if "by_round" not in k}), flush=True)
    forget_local()
    central_acc, central_seconds, central_curve = centralized(Settings(**common))  # plain cross-entropy
    print("centralized", central_acc, flush=True)
    full = runs.get("full_fedavg", {})
    adapter = runs["adapter_fedavg"]
    full_bytes = full.get("bytes_per_round") or float(sum(
        p.numel() * p.element_size() for p in build_task(args.task, clients=args.clients, per_client=args.per_client,
                                                         partition=args.partition).make_base().parameters()))
    result = {
        "task": args.task, "clients": args.clients, "partition": args.partition, "per_client": args.per_client,
        "rounds": args.rounds, "local_epochs": args.local_epochs, "local_loss": args.local_loss,
        "head_init": args.head_init, "ray_backend": adapter["backend"] == "ray",
        "adapter_bytes_per_round": adapter["bytes_per_round"], "full_bytes_per_round": full_bytes,
        "bytes_ratio": full_bytes / adapter["bytes_per_round"],
        "federated_accuracy": adapter["accuracy"], "svd_accuracy": runs["adapter_svd"]["accuracy"],
        "centralized_accuracy": central_acc, "centralized_best_accuracy": max(central_curve.values()),
        "centralized_by_epoch": central_curve, "full_model_fedavg_accuracy": full.get("accuracy"),
        "scaffold_accuracy": runs["adapter_scaffold"]["accuracy"], "iid_accuracy": runs["adapter_fedavg_iid"]["accuracy"],
        "federated_minus_centralized": adapter["accuracy"] - central_acc,
        "seconds_per_round": {k: v["seconds_per_round"] for k, v in runs.items()},
        "centralized_seconds": central_seconds, "runs": runs,
    }
    if args.on_device_rounds:
        result["on_device"] = on_device(args.on_device_rounds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    # bench/federated_deployment.py's keys in the same file are its own: kept as they are
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    result.update({k: v for k, v in previous.items() if k.startswith("deployment")})
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
