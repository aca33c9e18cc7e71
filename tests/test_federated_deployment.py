"""The app project on a real Flower deployment (federated/local.py): a SuperLink and SuperNodes started
as processes on loopback, each stopped by its PID, `flwr run` of `adapterkit federated new-app`'s project.

  * TLS and SuperNode authentication: three registered nodes join, an unregistered one is refused;
    two rounds of digits, one node killed after its first reply: the run finishes with the other two
    and writes its outcome (the dropped node named) and the final adapter;
  * two nodes, one training on a file of its own (data-path), the other lost: the run ends within its
    timeouts, names the lost node and keeps the adapter it had.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")
pytestmark = pytest.mark.slow

from adapterkit.federated.builtin import digits_arrays  # noqa: E402
from adapterkit.federated.keys import make_keys  # noqa: E402
from adapterkit.federated.local import BIN, LocalDeployment, wait_for_text  # noqa: E402
from adapterkit.federated.tasks import FederatedError  # noqa: E402


def new_app(fleet: LocalDeployment, folder: Path, clients: int, rounds: int, min_available: int) -> Path:
    made = subprocess.run([str(BIN / "adapterkit"), "federated", "new-app", str(folder), "--task", "digits",
                           "--clients", str(clients), "--rounds", str(rounds), "--min-available", str(min_available)],
                          env=fleet.env, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    return folder


def kill_after_first_reply(fleet: LocalDeployment, node: int) -> threading.Thread:
    """Kill SuperNode `node` (and its ClientApp processes) once it has sent its first reply."""
    def watch() -> None:
        if wait_for_text(fleet.folder / f"node-{node}.log", ("Sent successfully",), 300, fleet.nodes[node]):
            fleet.kill(fleet.nodes[node])
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def run_killing(fleet: LocalDeployment, app: Path, node: int, out: Path, *, timeout: float, node_wait: float) -> dict:
    """`flwr run` of `app` with SuperNode `node` killed after its first reply; the outcome it wrote."""
    watcher = kill_after_first_reply(fleet, node)
    run = fleet.run(app, {"output-dir": str(out), "timeout": timeout, "node-wait": node_wait}, timeout=400)
    watcher.join(1)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads((out / "outcome.json").read_text())


def test_only_registered_nodes_join_over_tls_and_a_killed_node_leaves_the_run_to_the_others(tmp_path):
    keys = make_keys(tmp_path / "keys", nodes=4)
    with LocalDeployment(tmp_path / "fleet", keys=keys) as fleet:
        for node in range(3):
            fleet.register(node)
            fleet.add_node(node, 3, key=node)
        with pytest.raises(FederatedError, match="did not join"):  # key 3 was never registered
            fleet.add_node(0, 3, key=3)
        assert fleet.nodes[3].poll() not in (None, 0)  # it gave up and exited; it did not hang
        app = new_app(fleet, tmp_path / "app", clients=3, rounds=2, min_available=2)
        outcome = run_killing(fleet, app, 2, tmp_path / "out", timeout=25.0, node_wait=60.0)
        assert fleet.nodes[2].poll() is not None  # the killed node
    out = tmp_path / "out"
    assert outcome["stopped"] is None and outcome["settings"]["rounds"] == 2
    assert outcome["rounds"]["1"]["kept"] == 3 and outcome["rounds"]["2"]["kept"] == 2
    assert outcome["rounds"]["2"]["aggregated"]
    assert outcome["accuracy"] > outcome["rounds"]["0"]["test_accuracy"]
    assert (out / "adapter" / "adapter.safetensors").exists()


def test_a_two_node_run_that_loses_one_ends_within_its_timeouts_names_the_node_and_keeps_its_adapter(tmp_path):
    x, y = digits_arrays()  # node 0 trains on a file of its own (data-path), node 1 on partition 1
    np.savez(tmp_path / "site-0.npz", x=(x[-60:] / 16.0).astype(np.float32), y=y[-60:])
    with LocalDeployment(tmp_path / "fleet") as fleet:
        fleet.add_node(0, 2, node_config={"data-path": str(tmp_path / "site-0.npz")})
        fleet.add_node(1, 2)
        app = new_app(fleet, tmp_path / "app", clients=2, rounds=3, min_available=2)
        outcome = run_killing(fleet, app, 1, tmp_path / "out", timeout=12.0, node_wait=10.0)
    out = tmp_path / "out"
    # the SuperLink lists a dead node until its heartbeat runs out: each later round waits its timeout for
    # the lost node's reply, keeps the one it got and does not aggregate; once the link has let the node
    # go, the run stops because fewer nodes than a round needs are connected
    assert outcome["rounds"]["1"]["aggregated"] and outcome["rounds"]["1"]["kept"] == 2
    later = {int(r): entry for r, entry in outcome["rounds"].items() if int(r) > 1 and "sent" in entry}
    assert not any(entry["aggregated"] for entry in later.values())
    lost = [d for d in outcome["dropped"] if d["reason"] == "no reply before the round's timeout"]
    assert {d["partition_id"] for d in lost} <= {1} and len({d["node_id"] for d in lost}) <= 1
    if outcome["stopped"] is None:  # every round ran: each after the loss waited for the lost node
        assert sorted(later) == [2, 3] and {d["round"] for d in lost} == {2, 3}
    else:
        assert "fewer than the 2 a round needs" in outcome["stopped"]
    assert (out / "adapter" / "adapter.safetensors").exists()
