"""The app project on a real Flower deployment: a SuperLink and two SuperNodes started as processes on
loopback (each stopped by its PID), `flwr run` of `adapterkit federated new-app`'s project with a run
config override, and the outcome the ServerApp writes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr and flower-superexec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(path: Path, text: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return True
        time.sleep(0.5)
    return False


@pytest.fixture
def deployment(tmp_path):
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1"}
    port = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    processes: list[subprocess.Popen] = []

    def start(args: list[str], log: Path) -> subprocess.Popen:
        handle = open(log, "w")  # noqa: SIM115 - closed with the process below
        proc = subprocess.Popen(args, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        processes.append(proc)
        return proc

    # the app's dependencies are installed already: the SuperLink is told not to install them (uv)
    start([str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
           "--database", str(tmp_path / "state.db"), "--host", "127.0.0.1", "--port", str(port)],
          tmp_path / "superlink.log")
    assert wait_for(tmp_path / "superlink.log", "Uvicorn running", 60), (tmp_path / "superlink.log").read_text()
    nodes = []
    for i in range(2):
        log = tmp_path / f"node{i}.log"
        nodes.append(start([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                            "--node-config", f"partition-id={i} num-partitions=2", "--port", str(free_port())], log))
        assert wait_for(log, "SuperNode ID", 60), log.read_text()
    try:
        yield {"env": env, "nodes": nodes, "root": tmp_path}
    finally:
        for proc in processes:
            with_group = os.getpgid(proc.pid) if proc.poll() is None else None
            if with_group is not None:
                os.killpg(with_group, signal.SIGTERM)
        for proc in processes:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(os.getpgid(proc.pid), signal.SIGKILL)


def test_flwr_run_of_the_app_project_trains_on_two_supernodes_and_writes_its_outcome(deployment):
    root, env = deployment["root"], deployment["env"]
    made = subprocess.run([str(BIN / "adapterkit"), "federated", "new-app", str(root / "app"), "--task", "digits",
                           "--clients", "2", "--rounds", "2", "--min-available", "2"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    out = root / "out"
    run = subprocess.run([str(BIN / "flwr"), "run", ".", "local", "--stream", "--run-config",
                          f'output-dir="{out}" timeout=120.0 node-wait=60.0'],
                         cwd=root / "app", env=env, capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    outcome = json.loads((out / "outcome.json").read_text())
    assert outcome["stopped"] is None and outcome["settings"]["rounds"] == 2
    assert outcome["rounds"]["2"]["kept"] == 2 and outcome["rounds"]["2"]["aggregated"]
    assert outcome["accuracy"] > outcome["rounds"]["0"]["test_accuracy"]
    assert (out / "adapter" / "adapter.safetensors").exists()
