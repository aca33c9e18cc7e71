"""The ClientApp a SuperNode starts for every message, handing it to a warm worker process.

A Flower 1.42 SuperNode runs each message in a new `flwr-clientapp` process. A ClientApp that trains
adapters would import torch and adapterkit and build its task (the base model, the data) again for
every message of every round, seconds each time. This package imports only Flower and the standard
library. Its ClientApp passes the message to a worker process (`adapterkit.federated.worker`) that
loads the real ClientApp once, per SuperNode and run, and keeps it for the next message:

    from adapterkit_relay import relay_app
    app = relay_app("my_fleet.trainer:app")      # the real ClientApp, run in the worker

The worker listens on a Unix socket in a folder only this user can open. It is started by the first
message that finds none; a crashed worker is replaced by the next message, which starts another. It
stops after `ADAPTERKIT_RELAY_IDLE` seconds without a message (300 by default), or once the process
that started the relay (the SuperNode's SuperExec) has gone. `ADAPTERKIT_RELAY=off` runs the real
ClientApp in the relay's own process, as if there were no relay.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=no-name-in-module
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module
from flwr.supercore.task_identity import TaskIdentity

#: frames on the socket: a 4-byte big-endian length, then that many bytes
_LENGTH = struct.Struct(">I")
OK, FAILED = b"\x00", b"\x01"


class RelayError(RuntimeError):
    """The worker could not be started or reached, or it failed on the message."""


class WorkerGone(RelayError):
    """The worker closed the connection before it answered."""


class RelayApp(ClientApp):
    """A ClientApp that hands every message, whatever its type and action, to `target` in a warm
    worker: the worker's ClientApp does the dispatch (and its mods), as Flower would have here."""

    def __init__(self, target: str, start_seconds: float = 300.0) -> None:
        module, _, attribute = target.partition(":")
        if not module or not attribute:
            raise ValueError(f"relay target {target!r}: give it as 'package.module:attribute'")
        super().__init__()
        self.target, self.start_seconds = target, start_seconds
        self._module, self._attribute = module, attribute

    def __call__(self, message: Message, context: Context) -> Message:
        if os.environ.get("ADAPTERKIT_RELAY", "on").lower() in ("off", "0", "false"):
            real = getattr(importlib.import_module(self._module), self._attribute)
            return real(message, context)
        return Relay(self.target, context, self.start_seconds).call(message, context)


def relay_app(target: str, *, start_seconds: float = 300.0) -> ClientApp:
    """A ClientApp that runs `target` ("package.module:attribute", a ClientApp) in a warm worker."""
    return RelayApp(target, start_seconds)


class Relay:
    """The connection from one relay process to the worker for (node, run, target)."""

    def __init__(self, target: str, context: Context, start_seconds: float) -> None:
        self.target, self.start_seconds = target, start_seconds
        self.app_path = _app_path(target)
        key = json.dumps([context.node_id, context.run_id, target, str(self.app_path)])
        folder = Path(tempfile.gettempdir()) / f"adapterkit-relay-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        if folder.stat().st_uid != os.getuid() or folder.stat().st_mode & 0o077:
            raise RelayError(f"{folder} must belong to this user and be closed to others")
        self.socket_path = folder / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.sock"

    def call(self, msg: Message, context: Context) -> Message:
        try:
            return self._call(msg, context)
        except WorkerGone:  # it stopped as this message came: once more, with a new worker
            return self._call(msg, context)

    def _call(self, msg: Message, context: Context) -> Message:
        header = json.dumps({"task_id": TaskIdentity.task_id, "run_id": TaskIdentity.run_id,
                             "node_id": TaskIdentity.node_id}).encode()
        with self._connect() as conn:
            try:
                for part in (header, message_to_proto(msg).SerializeToString(),
                             context_to_proto(context).SerializeToString()):
                    send_frame(conn, part)
                status = receive_frame(conn)
            except (RelayError, OSError) as err:
                raise WorkerGone(str(err)) from err
            if status != OK:
                raise RelayError(f"the worker ({self.target}) failed on this message: "
                                 f"{receive_frame(conn).decode(errors='replace')}")
            reply = message_from_proto(ProtoMessage.FromString(receive_frame(conn)))
            after = context_from_proto(ProtoContext.FromString(receive_frame(conn)))
        context.state = after.state  # what the real ClientApp kept in its context
        return reply

    def _connect(self) -> socket.socket:
        conn = self._try_connect()
        if conn is not None:
            return conn
        with open(self.socket_path.with_suffix(".lock"), "w") as lock:  # one relay starts the worker
            fcntl.flock(lock, fcntl.LOCK_EX)
            conn = self._try_connect()
            if conn is not None:
                return conn
            worker = self._start()
            deadline = time.monotonic() + self.start_seconds
            while time.monotonic() < deadline:
                conn = self._try_connect()
                if conn is not None:
                    return conn
                if worker.poll() is not None:
                    break
                time.sleep(0.05)
            log = self.socket_path.with_suffix(".log")
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            with contextlib.suppress(ProcessLookupError):
                worker.kill()
            raise RelayError(f"the worker for {self.target} did not start within {self.start_seconds:g} s "
                             f"(exit code {worker.poll()}): {tail}")

    def _try_connect(self) -> socket.socket | None:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(str(self.socket_path))
            return conn
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
            return None

    def _start(self) -> subprocess.Popen:
        self.socket_path.unlink(missing_ok=True)  # a crashed worker's
        args = [sys.executable, "-m", "adapterkit.federated.worker", "--socket", str(self.socket_path),
                "--target", self.target, "--app-path", str(self.app_path), "--watch-pid", str(os.getppid()),
                "--idle-seconds", os.environ.get("ADAPTERKIT_RELAY_IDLE", "300")]
        with open(self.socket_path.with_suffix(".log"), "ab") as log:
            # in the SuperNode's process group: stopping the SuperNode's group stops the worker
            return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    close_fds=True)


def _app_path(target: str) -> Path:
    """The folder the target's top-level package is imported from (the installed app), found without
    importing it."""
    top = target.partition(":")[0].split(".")[0]
    spec = importlib.util.find_spec(top)
    if spec is None:
        raise RelayError(f"relay target {target!r}: no package {top!r} on this node")
    origin = list(spec.submodule_search_locations or []) or [spec.origin or ""]
    return Path(origin[0]).resolve().parent


def send_frame(conn: socket.socket, data: bytes) -> None:
    conn.sendall(_LENGTH.pack(len(data)) + data)


def receive_frame(conn: socket.socket) -> bytes:
    (length,) = _LENGTH.unpack(_receive_exactly(conn, _LENGTH.size))
    return _receive_exactly(conn, length)


def _receive_exactly(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise RelayError("the worker closed the connection mid-message (it crashed or was stopped)")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


__all__ = ["Relay", "RelayApp", "RelayError", "WorkerGone", "receive_frame", "relay_app", "send_frame"]

