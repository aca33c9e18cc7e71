"""The warm worker behind `adapterkit_relay`: one process per SuperNode and run that loads the real
ClientApp once (torch, adapterkit, the built task) and answers the relay's messages one at a time.

    python -m adapterkit.federated.worker --socket S --target pkg.trainer:app --app-path DIR \\
        --watch-pid PID --idle-seconds 300

It stops after `idle-seconds` without a message, or once `watch-pid` (the SuperNode's SuperExec) has
gone. A message the ClientApp fails on is answered with the failure, and the worker goes on.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import select
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=no-name-in-module
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module
from flwr.supercore.task_identity import TaskIdentity

from adapterkit_relay import FAILED, OK, receive_frame, send_frame


def load_target(target: str, app_path: str | Path) -> Any:
    """The ClientApp `target` names ("package.module:attribute"), imported from `app_path`."""
    module, _, attribute = target.partition(":")
    if str(app_path) not in sys.path:
        sys.path.insert(0, str(app_path))
    return getattr(importlib.import_module(module), attribute)


def answer(app: Any, conn: socket.socket) -> None:
    """Read one message and its context from `conn`, run `app` on it, send back the reply and the
    context (or the failure)."""
    header = json.loads(receive_frame(conn))
    msg = message_from_proto(ProtoMessage.FromString(receive_frame(conn)))
    context = context_from_proto(ProtoContext.FromString(receive_frame(conn)))
    # replies take their source and run from the task identity, as in the relay's own process
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (
        header["task_id"], header["run_id"], header["node_id"])
    try:
        reply = app(msg, context)
        answer_bytes = message_to_proto(reply).SerializeToString()
        context_bytes = context_to_proto(context).SerializeToString()
    except Exception as err:  # noqa: BLE001 - the relay turns it into the node's error reply
        send_frame(conn, FAILED)
        send_frame(conn, f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=4)}".encode())
        return
    send_frame(conn, OK)
    send_frame(conn, answer_bytes)
    send_frame(conn, context_bytes)


def serve(socket_path: Path, app: Any, *, watch_pid: int | None, idle_seconds: float) -> str:
    """Answer connections on `socket_path` until idle or orphaned; returns why it stopped."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(socket_path))
    os.chmod(socket_path, 0o600)
    own = os.stat(socket_path)
    server.listen(16)
    last = time.monotonic()
    try:
        while True:
            ready, _, _ = select.select([server], [], [], 1.0)
            if ready:
                _answer_one(app, server)
                last = time.monotonic()
                continue
            why = (f"process {watch_pid} is gone" if watch_pid is not None and not _alive(watch_pid) else
                   f"no message for {idle_seconds:g} s" if time.monotonic() - last > idle_seconds else None)
            if why is not None:
                _unlink_own(socket_path, own)  # no relay finds this worker any more ...
                while select.select([server], [], [], 0.0)[0]:  # ... and one that just connected is answered
                    _answer_one(app, server)
                return why
    finally:
        server.close()
        _unlink_own(socket_path, own)


def _answer_one(app: Any, server: socket.socket) -> None:
    conn, _ = server.accept()
    with conn:
        try:
            answer(app, conn)
        except Exception:  # noqa: BLE001 - a relay that went away mid-message: the next one is answered
            traceback.print_exc()


def _unlink_own(path: Path, own: os.stat_result) -> None:
    """Remove the socket file if it is still this worker's (a new worker may have bound the path since)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return
    if (now.st_dev, now.st_ino) == (own.st_dev, own.st_ino):
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process took the number: ours is gone
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--app-path", required=True)
    parser.add_argument("--watch-pid", type=int, default=None)
    parser.add_argument("--idle-seconds", type=float, default=300.0)
    args = parser.parse_args(argv)
    # stopped with its SuperNode's process group: the finally in serve() still removes the socket
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = load_target(args.target, args.app_path)
    print(f"worker {os.getpid()}: {args.target} is ready", flush=True)
    why = serve(Path(args.socket), app, watch_pid=args.watch_pid, idle_seconds=args.idle_seconds)
    print(f"worker {os.getpid()} stops: {why}", flush=True)


if __name__ == "__main__":
    main()
