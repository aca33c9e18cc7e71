"""adapterkit_relay: the ClientApp Flower starts per message hands it to one warm worker process, which
keeps the real ClientApp loaded; failures come back as the node's error; the worker stops when idle
or orphaned."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, MessageType, RecordDict  # noqa: E402

from adapterkit.federated import LocalGrid  # noqa: E402
from adapterkit.federated.simulate import _in_process_identity  # noqa: E402
from adapterkit_relay import relay_app  # noqa: E402

TRAINER = '''
import os
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()
calls = []


@app.train()
def train(msg, context):
    if msg.content["config"].get("fail"):
        raise ValueError("this node's data is broken")
    calls.append(1)
    context.state["seen"] = ConfigRecord({"calls": len(calls)})
    return Message(RecordDict({"config": ConfigRecord({"pid": os.getpid(), "calls": len(calls),
                                                       "node": context.node_config["partition-id"]})}),
                   reply_to=msg)


@app.query("version")
def version(msg, context):
    return Message(RecordDict({"config": ConfigRecord({"pid": os.getpid(), "action": "version"})}), reply_to=msg)
'''


@pytest.fixture
def trainer_package(tmp_path, monkeypatch):
    """A package `relaytarget_<n>` with a ClientApp that counts its calls, importable from tmp_path."""
    name = f"relaytarget_{os.getpid()}_{time.monotonic_ns()}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / name / "trainer.py").write_text(textwrap.dedent(TRAINER))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ADAPTERKIT_RELAY_IDLE", "30")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))  # the worker's imports
    return name


def send(grid: LocalGrid, node: int, fail: bool = False):  # noqa: ANN201
    msg = grid.create_message(RecordDict({"config": ConfigRecord({"fail": fail})}), MessageType.TRAIN, node, "1")
    (reply,) = grid.send_and_receive([msg], timeout=120)
    return reply


def test_messages_go_to_one_warm_worker_that_keeps_the_app_loaded(trainer_package):
    _in_process_identity()
    grid = LocalGrid(relay_app(f"{trainer_package}.trainer:app"), 2)
    first, second = grid.get_node_ids()
    workers: set[int] = set()
    try:
        replies = [send(grid, first), send(grid, first), send(grid, second)]
        assert not any(r.has_error() for r in replies), [r.error for r in replies if r.has_error()]
        a, b, other = (r.content["config"] for r in replies)
        workers |= {a["pid"], other["pid"]}
        assert a["pid"] == b["pid"] != os.getpid()  # the same worker process, not this one
        assert (a["calls"], b["calls"]) == (1, 2)  # loaded once: its state lived on between messages
        assert other["pid"] != a["pid"] and other["calls"] == 1 and other["node"] == 1  # a worker per node
        assert grid.contexts[first].state["seen"]["calls"] == 2  # the context's state came back

        failed = send(grid, first, fail=True)  # the app's failure is the node's error reply ...
        assert failed.has_error() and "this node's data is broken" in failed.error.reason
        after = send(grid, first)  # ... and the worker goes on
        assert after.content["config"]["pid"] == a["pid"] and after.content["config"]["calls"] == 3

        named = grid.create_message(RecordDict({"config": ConfigRecord({})}), "query.version", first, "1")
        (reply,) = grid.send_and_receive([named], timeout=120)  # a named action, dispatched by the worker's app
        assert not reply.has_error(), reply.error
        assert reply.content["config"]["action"] == "version" and reply.content["config"]["pid"] == a["pid"]

        os.kill(a["pid"], 9)  # a worker that died is replaced by the next message
        _wait_gone(a["pid"])
        again = send(grid, first)
        workers.add(again.content["config"]["pid"])
        assert not again.has_error() and again.content["config"]["pid"] != a["pid"]
        assert again.content["config"]["calls"] == 1
    finally:
        grid.close()
        for pid in workers:
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass


def test_relay_off_runs_the_app_in_this_process(trainer_package, monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_RELAY", "off")
    _in_process_identity()
    grid = LocalGrid(relay_app(f"{trainer_package}.trainer:app"), 1)
    try:
        reply = send(grid, next(iter(grid.get_node_ids())))
    finally:
        grid.close()
    assert reply.content["config"]["pid"] == os.getpid()


def test_a_worker_stops_when_idle_and_when_the_process_it_watches_is_gone(trainer_package, tmp_path):
    def worker(*extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "adapterkit.federated.worker", "--socket",
                                 str(tmp_path / f"w{len(extra)}.sock"), "--target", f"{trainer_package}.trainer:app",
                                 "--app-path", str(tmp_path), *extra], stdout=subprocess.PIPE, text=True)

    idle = worker("--idle-seconds", "1")
    watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    orphan = worker("--watch-pid", str(watched.pid), "--idle-seconds", "600")
    try:
        assert "stops: no message for 1 s" in idle.communicate(timeout=60)[0]
        watched.wait(10)
        assert f"stops: process {watched.pid} is gone" in orphan.communicate(timeout=60)[0]
    finally:
        for proc in (idle, watched, orphan):
            if proc.poll() is None:
                proc.kill()
    assert not list(tmp_path.glob("*.sock"))  # each removed its socket


def test_a_target_that_is_not_module_attribute_is_refused():
    with pytest.raises(ValueError, match="'package.module:attribute'"):
        relay_app("no_colon_here")


def _wait_gone(pid: int, seconds: float = 10) -> None:
    """Until `pid` has exited (a zombie counts: this test process started it and has not reaped it)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.05)
