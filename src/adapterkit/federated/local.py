"""A Flower deployment on this machine: one SuperLink and SuperNodes as processes on loopback, for
trying an app project before the fleet runs it, for the deployment tests and for the cost bench.

    with LocalDeployment(folder, keys=make_keys(folder / "keys", nodes=2)) as fleet:
        fleet.add_node(0, 2)
        fleet.add_node(1, 2)
        done = fleet.run(app_folder, {"output-dir": str(folder / "out")}, timeout=300)

Each process is started in its own session and stopped by its PID (its group: the SuperNode's
SuperExec and ClientApp processes with it). With `keys` (keys.py) the SuperLink serves TLS with their
certificate and admits only SuperNodes whose public key was registered (`flwr supernode register`);
without, everything is plain text, as Flower's `--insecure`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from .app_project import toml_value
from .keys import Keys
from .tasks import FederatedError

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr, flower-superexec
#: nothing leaves the machine; each SuperNode's SuperExec looks for new ClientApp tasks every 0.1 s
#: (Flower's default is 1 s, which every message of every round waited out)
ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
       "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_text(path: Path, texts: tuple[str, ...], seconds: float, proc: subprocess.Popen | None = None
                  ) -> str | None:
    """The first of `texts` to appear in the file at `path` within `seconds`, or None (also when `proc`
    exits first)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            log = path.read_text(errors="replace")
            for text in texts:
                if text in log:
                    return text
        if proc is not None and proc.poll() is not None:
            return None
        time.sleep(0.2)
    return None


class LocalDeployment:
    """A SuperLink in `folder` (its database, logs and the `flwr` configuration under `flwr-home/`)."""

    def __init__(self, folder: str | Path, *, keys: Keys | None = None, env: Mapping[str, str] | None = None,
                 start_seconds: float = 60.0) -> None:
        self.folder, self.keys, self.start_seconds = Path(folder), keys, start_seconds
        self.folder.mkdir(parents=True, exist_ok=True)
        self.home = self.folder / "flwr-home"
        self.env = {**os.environ, **ENV, **(env or {}), "FLWR_HOME": str(self.home),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.superlink: subprocess.Popen | None = None
        self.nodes: list[subprocess.Popen] = []
        self._processes: list[tuple[subprocess.Popen, IO[Any]]] = []

    # --- processes ---------------------------------------------------------------------------------

    def start(self) -> LocalDeployment:
        """Start the SuperLink and write the `flwr` connection ("local") to it."""
        self.home.mkdir(exist_ok=True)
        secure = (f'root-certificates = "{self.keys.ca}"\n' if self.keys is not None else "insecure = true\n")
        (self.home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                               f'address = "{self.address}"\n{secure}')
        args = [str(BIN / "flower-superlink"), *self._tls_args(),
                # the app's dependencies are this environment's: no `uv sync` per run
                "--disable-runtime-dependency-installation",
                "--database", str(self.folder / "state.db"), "--host", "127.0.0.1", "--port", str(self.port)]
        if self.keys is not None:
            args.append("--enable-supernode-auth")
        self.superlink = self._spawn(args, self.folder / "superlink.log")
        if wait_for_text(self.folder / "superlink.log", ("Uvicorn running",), self.start_seconds,
                         self.superlink) is None:
            self.stop()
            raise FederatedError(f"the SuperLink did not start: {self._tail(self.folder / 'superlink.log')}")
        return self

    def register(self, node: int) -> None:
        """Register SuperNode `node`'s public key with the SuperLink (`flwr supernode register`)."""
        if self.keys is None:
            raise FederatedError("this deployment has no keys: SuperNodes are not authenticated")
        done = self.flwr(["supernode", "register", str(self.keys.node_public_key(node)), "local"], timeout=60)
        if done.returncode != 0:
            raise FederatedError(f"registering node {node} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def add_node(self, partition_id: int, num_partitions: int, *, key: int | None = None,
                 node_config: Mapping[str, Any] | None = None, wait: bool = True) -> subprocess.Popen:
        """Start a SuperNode for partition `partition_id` of `num_partitions` (signing with node key `key`
        when the deployment has keys; `register` it first). With `wait`, returns once it has joined."""
        config = {"partition-id": partition_id, "num-partitions": num_partitions, **(node_config or {})}
        args = [str(BIN / "flower-supernode"), "--superlink", self.address, "--port", str(free_port()),
                "--node-config", " ".join(f"{k}={toml_value(v)}" for k, v in config.items())]
        if self.keys is None:
            args.append("--insecure")
        else:
            args += ["--root-certificates", str(self.keys.ca)]
            if key is not None:
                args += ["--auth-supernode-private-key", str(self.keys.node_key(key))]
        log = self.folder / f"node-{len(self.nodes)}.log"
        proc = self._spawn(args, log)
        self.nodes.append(proc)
        if wait and wait_for_text(log, ("SuperNode ID",), self.start_seconds, proc) is None:
            raise FederatedError(f"SuperNode {len(self.nodes) - 1} did not join: {self._tail(log)}")
        return proc

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Stop `proc` and every process it started: its group, whose id is its PID (its own session),
        also when `proc` itself has already exited and its children have not."""
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(20)

    def stop(self) -> None:
        """Stop every process this deployment started, SuperNodes first."""
        while self._processes:
            proc, handle = self._processes.pop()
            try:
                self.kill(proc, signal.SIGTERM)
            finally:
                handle.close()

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- runs ------------------------------------------------------------------------------------------

    def flwr(self, args: list[str], cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """`flwr ARGS` against this deployment's SuperLink."""
        return subprocess.run([str(BIN / "flwr"), *args], cwd=cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def run(self, app: str | Path, run_config: Mapping[str, Any] | None = None, timeout: float = 600
            ) -> subprocess.CompletedProcess:
        """`flwr run APP local --stream --run-config ...`: returns once the run has ended."""
        args = ["run", str(Path(app).resolve()), "local", "--stream"]
        if run_config:
            args += ["--run-config", " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())]
        return self.flwr(args, cwd=Path(app), timeout=timeout)

    def _tls_args(self) -> list[str]:
        if self.keys is None:
            return ["--insecure"]
        return ["--ssl-ca-certfile", str(self.keys.ca), "--ssl-certfile", str(self.keys.server_cert),
                "--ssl-keyfile", str(self.keys.server_key)]

    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen:
        handle = open(log, "w")  # noqa: SIM115 - closed in stop(), after the process
        proc = subprocess.Popen(args, env=self.env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        self._processes.append((proc, handle))
        return proc

    @staticmethod
    def _tail(log: Path) -> str:
        return log.read_text(errors="replace")[-3000:] if log.exists() else f"{log} was not written"

