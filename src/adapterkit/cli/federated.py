"""`adapterkit federated`: adapters trained on Flower."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from .common import clear_errors, command_group, console

federated_app = command_group("federated", "Federated adapters on Flower: only adapter tensors travel.")


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
    from ..federated import Settings, simulate

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
        from pathlib import Path

        Path(out).write_text(json.dumps(outcome.to_json(), indent=2, default=str))


@federated_app.command("new-app")
@clear_errors
def federated_new_app(
    folder: Annotated[str, typer.Argument(help="New folder for the Flower app project")],
    task: Annotated[str, typer.Option(help="tweets | newsgroups | har | digits")] = "tweets",
    clients: Annotated[int, typer.Option(help="Partitions: one per SuperNode (its node config's num-partitions)")] = 10,
    partition: Annotated[str, typer.Option(help="dirichlet:<alpha> | iid | natural (har)")] = "dirichlet:0.3",
    method: Annotated[str, typer.Option(help="lora | bottleneck | ia3 | bitfit")] = "lora",
    rounds: Annotated[int, typer.Option(help="Rounds of training")] = 20,
    min_available: Annotated[int, typer.Option(help="Fewest nodes (and good replies) a round needs")] = 2,
) -> None:
    """Write a Flower app project (pyproject.toml + a package) whose ServerApp and ClientApp are
    adapterkit's, for `flwr run` against a SuperLink and SuperNodes; every server Setting is in its run config."""
    from ..federated import Settings
    from ..federated.app_project import write_app

    path = write_app(folder, Settings(task=task, clients=clients, partition=partition, method=method, rounds=rounds,
                                      min_available=min_available))
    console.print(f"Flower app project written to {path}: run it with `flwr run {path}` "
                  "(override settings with --run-config \"rounds=5 min-available=3\")")


@federated_app.command("keys")
@clear_errors
def federated_keys(
    folder: Annotated[str, typer.Argument(help="New folder for the certificates and keys")],
    nodes: Annotated[int, typer.Option(help="SuperNode key pairs to make")] = 2,
    host: Annotated[list[str] | None, typer.Option(help="The SuperLink's address or DNS name (repeat for several)")] = None,
) -> None:
    """A CA, the SuperLink's TLS certificate and one key pair per SuperNode, for a fleet that lets only
    registered nodes in: `flwr supernode register node-<i>.pub`, then start SuperNode i with
    `--auth-supernode-private-key node-<i> --root-certificates ca.crt` (README: deploy)."""
    from ..federated.keys import make_keys

    keys = make_keys(folder, nodes, tuple(host) if host else ("127.0.0.1", "localhost"))
    console.print(f"written to {keys.folder}: ca.crt (give it to every SuperNode and to flwr), server.pem and "
                  f"server.key (the SuperLink's), node-0 .. node-{nodes - 1} and their .pub keys")
