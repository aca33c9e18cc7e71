"""Seconds per round on a Flower deployment against the same run in one process (issue 31, item 5).

    python bench/federated_deployment.py                 # digits and tweets, about 4 minutes
    python bench/federated_deployment.py --tasks digits --rounds 3

For each task, on 2 clients:
  * inprocess: `simulate(settings, backend="inprocess")`, the ServerApp and ClientApp in this process;
  * deployment: `adapterkit federated new-app`'s project under `flwr run` on a SuperLink and two
    SuperNodes started on loopback (federated/local.py), seconds per round from its outcome.json;
  * floor: the same deployment running an app that does nothing: its ClientApp imports neither
    torch nor adapterkit and sends back the arrays it got (as many bytes as the task's adapter), its
    ServerApp sends one message per node per round through the same grid. What a round costs in
    Flower's runtime itself: the SuperNode's poll for messages (it sleeps 3 s when it finds none),
    SuperExec's poll for tasks, and a new `flwr-clientapp` process for every message.
Prints each and the ratios; merges `deployment_vs_inprocess_seconds` (and the rest, under
`deployment`) into bench/results/federated.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from adapterkit.federated import Settings, simulate  # noqa: E402
from adapterkit.federated.app_project import PYPROJECT  # noqa: E402
from adapterkit.federated.client import forget_local  # noqa: E402
from adapterkit.federated.local import BIN, LocalDeployment  # noqa: E402

#: the floor's project: new-app's pyproject (components floor.server_app:app, floor.client_app:app)
FLOOR_PYPROJECT = PYPROJECT.format(name="floor", package="floor", task="an app that does nothing",
                                   config='rounds = 3\nnodes = 2\nbytes = 10000\nout = ""')

FLOOR_CLIENT = '''"""Sends back what it got: no torch, no adapterkit."""
from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg, context):
    return Message(RecordDict({"arrays": msg.content["arrays"]}), reply_to=msg)
'''

FLOOR_SERVER = '''"""One message per node per round through adapterkit's grid; writes the seconds per round."""
import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, RecordDict
from flwr.serverapp import ServerApp

from adapterkit.federated.grid import BoundedGrid

app = ServerApp()


@app.main()
def main(grid, context):
    cfg = context.run_config
    grid = BoundedGrid(grid, int(cfg["nodes"]), 120.0)
    arrays = ArrayRecord({"w": Array(np.zeros(int(cfg["bytes"]) // 4, dtype=np.float32))})
    while len(list(grid.get_node_ids())) < int(cfg["nodes"]):
        time.sleep(0.1)
    started = time.perf_counter()
    for server_round in range(1, int(cfg["rounds"]) + 1):
        messages = [grid.create_message(RecordDict({"arrays": arrays, "config": ConfigRecord({"r": server_round})}),
                                        MessageType.TRAIN, node, str(server_round))
                    for node in grid.get_node_ids()]
        replies = list(grid.send_and_receive(messages, timeout=120.0))
        assert len(replies) == len(messages) and all(r.has_content() for r in replies), replies
    with open(cfg["out"], "w") as handle:
        json.dump({"seconds_per_round": (time.perf_counter() - started) / int(cfg["rounds"])}, handle)
'''


def deployment_seconds(root: Path, settings: Settings, floor: bool) -> float:
    with LocalDeployment(root / "fleet") as fleet:
        for i in range(settings.clients):
            fleet.add_node(i, settings.clients)
        app, out = root / "app", root / "out"
        if floor:
            (app / "floor").mkdir(parents=True)
            (app / "pyproject.toml").write_text(FLOOR_PYPROJECT)
            (app / "floor" / "__init__.py").write_text("")
            (app / "floor" / "client_app.py").write_text(FLOOR_CLIENT)
            (app / "floor" / "server_app.py").write_text(FLOOR_SERVER)
            done = fleet.run(app, {"rounds": settings.rounds, "nodes": settings.clients, "out": str(root / "floor.json")},
                             timeout=900)
            check(done)
            return float(json.loads((root / "floor.json").read_text())["seconds_per_round"])
        made = subprocess.run([str(BIN / "adapterkit"), "federated", "new-app", str(app), "--task", settings.task,
                               "--clients", str(settings.clients), "--rounds", str(settings.rounds),
                               "--min-available", str(settings.clients)],
                              env=fleet.env, capture_output=True, text=True, timeout=300)
        if made.returncode != 0:
            raise SystemExit(made.stderr)
        check(fleet.run(app, {"output-dir": str(out), "timeout": 300.0}, timeout=1800))
        outcome = json.loads((out / "outcome.json").read_text())
        if outcome["stopped"]:
            raise SystemExit(f"the deployment run stopped: {outcome['stopped']}")
        return float(outcome["seconds_per_round"])


def check(done: subprocess.CompletedProcess) -> None:
    if done.returncode != 0:
        raise SystemExit(f"flwr run failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="digits,tweets")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench/results/federated.json")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="ak-deploy-") as tmp:
        floor = deployment_seconds(Path(tmp) / "floor", Settings(task="digits", clients=2, rounds=args.rounds), True)
        print("floor (an app that does nothing)", f"{floor:.2f} s per round", flush=True)
        for task in args.tasks.split(","):
            settings = Settings(task=task, clients=2, rounds=args.rounds, min_available=2)
            forget_local()
            inprocess = simulate(settings, backend="inprocess").seconds_per_round
            deployed = deployment_seconds(Path(tmp) / task, settings, False)
            results[task] = {"inprocess_seconds_per_round": inprocess, "deployment_seconds_per_round": deployed,
                             "floor_seconds_per_round": floor, "deployment_vs_inprocess_seconds": deployed / inprocess,
                             "floor_vs_inprocess_seconds": floor / inprocess,
                             "deployment_minus_floor_seconds": deployed - floor}
            print(task, json.dumps(results[task]), flush=True)
    path = Path(args.out)
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged["deployment_vs_inprocess_seconds"] = {t: r["deployment_vs_inprocess_seconds"] for t, r in results.items()}
    merged["deployment"] = {"rounds": args.rounds, "clients": 2, "flwr": _version("flwr"),
                            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "tasks": results,
                            "command": " ".join([Path(sys.executable).name, *sys.argv])}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2))
    print(json.dumps(merged["deployment_vs_inprocess_seconds"], indent=2))


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"{time.perf_counter() - started:.0f} s")
