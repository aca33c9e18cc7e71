"""Faulty clients on purpose, as a Flower client mod: for tests, drills and the CLI's `--faults`.

    drop:3@2      partition 3 fails (raises) in round 2 (no "@": every round)
    late:4        partition 4 answers after the server's timeout
    nan:5         partition 5 sends NaN tensors
    shape:6       partition 6 sends a tensor of the wrong shape
    foreign:7     partition 7 claims another base's fingerprint
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

KINDS = ("drop", "late", "nan", "shape", "foreign")


@dataclass(frozen=True)
class Fault:
    kind: str
    partition: int
    rounds: frozenset[int] | None = None  # None: every round


def parse_faults(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            kind, rest = item.split(":", 1)
            pid, _, when = rest.partition("@")
            rounds = frozenset(int(r) for r in when.split("+")) if when else None
            fault = Fault(kind, int(pid), rounds)
        except ValueError:
            raise ValueError(f"fault {item!r}: write kind:partition[@round+round...], e.g. drop:3@2") from None
        if kind not in KINDS:
            raise ValueError(f"fault {item!r}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
        faults.append(fault)
    return faults


class FaultsMod:
    """A ClientApp mod that misbehaves as `faults` say on train messages; `late_seconds` is how long
    a late client sleeps (longer than the server's round timeout). A run config's `faults` and
    `late-seconds` (`flwr run --run-config`) replace them for that run."""

    def __init__(self, faults: list[Fault], late_seconds: float = 5.0) -> None:
        self.faults, self.late_seconds = faults, late_seconds

    def _for(self, context: Context) -> tuple[list[Fault], float]:
        config = context.run_config or {}
        spec = config.get("faults")
        late = config.get("late-seconds", config.get("late_seconds", self.late_seconds))
        return (parse_faults(str(spec)) if spec is not None else self.faults), float(late)

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        faults, late_seconds = self._for(context)
        if msg.metadata.message_type != MessageType.TRAIN or not faults:
            return call_next(msg, context)
        pid = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"].get("server-round", 0))
        active = {f.kind for f in faults
                  if f.partition == pid and (f.rounds is None or server_round in f.rounds)}
        if "drop" in active:
            raise RuntimeError(f"partition {pid} dropped out in round {server_round}")
        if "late" in active:
            time.sleep(late_seconds)
        reply = call_next(msg, context)
        if reply.has_error() or not active & {"nan", "shape", "foreign"}:
            return reply
        arrays = reply.content["arrays"]
        first = next(iter(arrays.keys()))
        if "nan" in active:
            reply.content["arrays"] = ArrayRecord({k: Array(np.full(v.shape, np.nan, dtype=np.float32))
                                                   for k, v in arrays.items()})
        if "shape" in active:
            values = dict(arrays.items())
            values[first] = Array(np.zeros((3, 3), dtype=np.float32))
            reply.content["arrays"] = ArrayRecord(values)
        if "foreign" in active:
            meta = reply.content["meta"]
            reply.content["meta"] = ConfigRecord({**dict(meta.items()), "fingerprint": "another-base"})
        return reply
