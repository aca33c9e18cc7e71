"""The server: strategies that check every reply, aggregate adapters, and checkpoint each round.

    Guarded(strategy)       drops a reply that errs, comes from another base (fingerprint), has
                            other tensor names or shapes, non-finite values or no positive example
                            count, naming the client and why; skips a round with fewer than
                            `min_available` good replies; saves the aggregate every round and
                            resumes from the last one.
    AdapterStrategy(FedProx)  FedAvg, FedProx, FedAvgM and SCAFFOLD in one strategy: FedAvg
                            weighted by examples (FedProx's μ goes to the clients), or a
                            LoRA-exact rule (aggregate.py: "ffa", "svd"), then optionally a server
                            step with momentum (FedAvgM, Hsu et al. 2019):
                                Δ = x − avg;  v ← β·v + Δ;  x ← x − η·v
                            Averaging skewed clients' updates shrinks them (they point apart);
                            η > 1 or β > 0 is meant to restore the step they agree on.
                            `control="scaffold"` (Karimireddy et al. 2020, option II, in step
                            units so that it holds for AdamW): each reply carries c_i, the mean
                            step the client took on its own, (y_i − x)/K − (c − c_i); the server
                            keeps the latest per node and sends node i c − c_i (c = Σ w_i c_i),
                            added to its parameters after every local step, so a client's own
                            drift is swapped for everyone's. Clients keep no state. (Not in
                            gradient units: AdamW normalises such a correction into full-size steps.)

Differential privacy wraps AdapterStrategy in Flower's fixed-clipping wrappers, inside Guarded, so a
malformed reply never reaches the clipping.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedProx, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore import log
from safetensors.torch import load_file, save_file

from ..model import AdaptedModel
from .aggregate import aggregate, fedavg
from .records import ADAPTER, Participant, check_arrays

CONTROLS = ("none", "scaffold")


def server_options_problem(rule: str, server_lr: float, server_momentum: float, control: str,
                           dp: bool = False) -> str | None:
    """Why the server step and control variates cannot run with `rule` (and DP), or None."""
    if not (math.isfinite(server_lr) and server_lr > 0 and 0 <= server_momentum < 1):
        return f"server_lr={server_lr} must be a finite number > 0 and server_momentum={server_momentum} in [0, 1)"
    stepped = server_lr != 1 or server_momentum
    if control not in CONTROLS:
        return f"control {control!r}: use one of {', '.join(CONTROLS)}"
    if rule == "svd" and (stepped or control != "none"):
        return ("a server step or control 'scaffold' needs aggregation 'fedavg' or 'ffa': 'svd' re-factors B·A "
                "in a new basis each round, so steps taken in its factors mean nothing")
    if dp and stepped:
        return ("a server step goes before the DP noise: η > 1 scales each client's share past the clipping, "
                "and momentum re-releases past rounds; use server_lr 1 and server_momentum 0 with dp")
    if dp and control != "none":
        return "control 'scaffold' sends each client's mean step outside the DP clipping and noise; use control 'none'"
    return None


class AdapterStrategy(FedProx):
    """FedAvg/FedProx whose aggregation is `rule` over the replies' travelling tensors."""

    def __init__(self, rule: str = "fedavg", *, lr: float | None = None, local_epochs: int | None = None,
                 local_loss: str = "ce", server_lr: float = 1.0, server_momentum: float = 0.0,
                 control: str = "none", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        problem = server_options_problem(rule, server_lr, server_momentum, control)
        if problem:
            raise ValueError(problem)
        self.rule, self.lr, self.local_epochs, self.local_loss = rule, lr, local_epochs, local_loss
        self.control = control
        #: node id -> (its last c_i, its example count)
        self._controls: dict[int, tuple[dict[str, torch.Tensor], float]] = {}
        self.server_lr, self.server_momentum = server_lr, server_momentum
        self.last_stats: dict[str, float] = {}
        self._current: dict[str, torch.Tensor] = {}
        self._velocity: dict[str, torch.Tensor] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        if self.lr is not None:
            config["lr"] = self.lr
        if self.local_epochs is not None:
            config["local-epochs"] = self.local_epochs
        config["local-objective"] = self.local_loss
        if self.control != "none":
            config["control"] = self.control
        self._current = arrays.to_torch_state_dict()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.control == "none" or not self._controls:
            return messages
        mean = self.global_control()
        out = []
        for msg in messages:  # FedAvg gives every message one shared RecordDict: each gets its own
            own = self._controls.get(msg.metadata.dst_node_id)
            content = RecordDict({"arrays": msg.content["arrays"], "config": msg.content["config"]})
            if own is not None:  # a client not heard from yet trains uncorrected
                content["correction"] = ArrayRecord({k: Array((mean[k] - own[0][k]).numpy()) for k in mean})
            out.append(Message(content=content, message_type=msg.metadata.message_type,
                               dst_node_id=msg.metadata.dst_node_id))
        return out

    def global_control(self) -> dict[str, torch.Tensor]:
        """c = Σ_i w_i c_i over every client's latest control variate, weighted by examples."""
        controls = list(self._controls.values())
        return fedavg([c for c, _ in controls], [w for _, w in controls])

    def server_step(self, average: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """x − η·v with v ← β·v + (x − average); the plain average when η = 1 and β = 0."""
        if self.server_lr == 1 and not self.server_momentum or not self._current:
            return average
        out = {}
        for name, avg in average.items():
            delta = self._current[name] - avg
            if self.server_momentum:
                delta = self._velocity[name] * self.server_momentum + delta if name in self._velocity else delta
                self._velocity[name] = delta
            out[name] = self._current[name] - self.server_lr * delta
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [m for m in replies if not m.has_error()]
        if not replies:
            return None, None
        contents = [m.content for m in replies]
        weights = [float(c["metrics"][self.weighted_by_key]) for c in contents]
        tensors = [c["arrays"].to_torch_state_dict() for c in contents]
        if self.control != "none":
            for msg, content, weight in zip(replies, contents, weights, strict=True):
                if "control" in content.array_records:
                    self._controls[msg.metadata.src_node_id] = (content["control"].to_torch_state_dict(), weight)
                else:  # its old c_i no longer describes it: it trains uncorrected until it sends one
                    self._controls.pop(msg.metadata.src_node_id, None)
        out, stats = aggregate(self.rule, tensors, weights)
        out = self.server_step(out)
        self.last_stats = stats
        metrics = aggregate_metricrecords(contents, self.weighted_by_key)
        for key, value in stats.items():
            metrics[key] = value
        return ArrayRecord({k: Array(v.numpy()) for k, v in out.items()}), metrics


@dataclass
class Dropped:
    round: int
    node_id: int
    partition_id: int | None
    reason: str


class Checkpoints:
    """`round-NNNN.safetensors` (an adapter file, or the full model's tensors) plus `state.json`."""

    def __init__(self, folder: str | Path, part: Participant) -> None:
        self.folder, self.part = Path(folder), part

    def save(self, server_round: int, arrays: ArrayRecord, history: dict[str, Any]) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.part.load(arrays)
        path = self.folder / f"round-{server_round:04d}.safetensors"
        if isinstance(self.part.model, AdaptedModel):
            self.part.model.adapter(ADAPTER).meta["federated_round"] = server_round
            self.part.model.save(ADAPTER, str(path))
        else:
            save_file({k: v.contiguous() for k, v in self.part.tensors().items()}, str(path))
        state = {"round": server_round, "file": path.name, "fingerprint": self.part.fingerprint, "history": history}
        tmp = self.folder / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.folder / "state.json")  # the pointer moves only once the file is whole
        return path

    def latest(self) -> tuple[int, ArrayRecord, dict[str, Any]] | None:
        """(round, arrays, history) of the last checkpoint, or None when there is none."""
        state_path = self.folder / "state.json"
        if not state_path.exists():
            return None
        state = json.loads(state_path.read_text())
        if state.get("fingerprint") != self.part.fingerprint:
            raise ValueError(f"{state_path}: checkpoint made for fingerprint {state.get('fingerprint')!r}, "
                             f"this model is {self.part.fingerprint!r}; refusing to resume from it")
        path = self.folder / state["file"]
        if isinstance(self.part.model, AdaptedModel):
            from ..io.files import read_adapter

            _, tensors = read_adapter(path)
            tensors = {k: v for k, v in tensors.items() if k in self.part.params}
        else:
            tensors = load_file(str(path))
        record = ArrayRecord({k: Array(v.numpy()) for k, v in tensors.items()})
        problem = check_arrays(record, self.part.template())
        if problem:
            raise ValueError(f"{path}: {problem}")
        return int(state["round"]), record, state.get("history", {})


class Guarded(Strategy):
    """Checks every reply against the server's own participant before `inner` sees it."""

    def __init__(self, inner: Strategy, part: Participant, *, min_available: int = 2,
                 checkpoints: Checkpoints | None = None, round_offset: int = 0,
                 history: dict[str, Any] | None = None) -> None:
        self.inner, self.part, self.min_available = inner, part, min_available
        self.checkpoints, self.offset = checkpoints, round_offset
        self.template = part.template()
        self.dropped: list[Dropped] = []
        self.history: dict[str, Any] = history or {"rounds": {}}
        # the messages of the round in flight, and each node's partition as its good replies said:
        # a SuperNode's error reply comes from the SuperLink (its src_node_id is the link's own), so
        # the node it stands for is read from the message it answers
        self._sent_messages: list[Message] = []
        self._partitions: dict[int, int] = {}

    def summary(self) -> None:
        self.inner.summary()
        log(INFO, "\t└──> Guarded: min_available=%d, checkpoints=%s", self.min_available,
            self.checkpoints.folder if self.checkpoints else None)

    def check(self, msg: Message, is_train: bool = True) -> str | None:
        if msg.has_error():
            return f"the client failed: {msg.error.reason}"
        content = msg.content
        meta = content.config_records.get("meta")
        if meta is None or meta.get("fingerprint") != self.part.fingerprint:
            found = None if meta is None else meta.get("fingerprint")
            return f"base fingerprint {found!r} is not this server's {self.part.fingerprint!r}"
        metrics = content.metric_records.get("metrics")
        weight = None if metrics is None else metrics.get("num-examples")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
            return f"num-examples is {weight!r}, not a positive number"
        if not is_train:
            return None
        arrays = content.array_records.get("arrays")
        if arrays is None or not set(content.array_records) <= {"arrays", "control"}:
            return f"expected the ArrayRecord 'arrays' (and SCAFFOLD's 'control'), got {sorted(content.array_records)}"
        problem = check_arrays(arrays, self.template)
        if problem is None and "control" in content.array_records:
            problem = check_arrays(content["control"], self.template)
            problem = problem and f"control: {problem}"
        return problem

    def _node_of(self, reply: Message) -> int:
        """The node a reply answers for: the destination of the message it replies to."""
        answered = reply.metadata.reply_to_message_id
        for sent in self._sent_messages:
            if answered and sent.metadata.message_id == answered:
                return int(sent.metadata.dst_node_id)
        return int(reply.metadata.src_node_id)

    def _filter(self, server_round: int, replies: Iterable[Message], is_train: bool) -> list[Message]:
        kept, replies = [], list(replies)
        for msg in replies:
            reason = self.check(msg, is_train)
            node = self._node_of(msg)
            meta = None if msg.has_error() else msg.content.config_records.get("meta")
            pid = meta.get("partition-id") if meta is not None else None
            if reason is None:
                if isinstance(pid, int):
                    self._partitions[node] = pid
                kept.append(msg)
                continue
            self._drop(server_round, node, pid if isinstance(pid, int) else None, reason)
        answered = {msg.metadata.reply_to_message_id for msg in replies}
        for sent in self._sent_messages:  # a node that died or hung: nothing came back before the timeout
            if sent.metadata.message_id not in answered:
                self._drop(server_round, int(sent.metadata.dst_node_id), None, "no reply before the round's timeout")
        return kept

    def _drop(self, server_round: int, node: int, pid: int | None, reason: str) -> None:
        pid = pid if pid is not None else self._partitions.get(node)
        drop = Dropped(server_round, node, pid, reason)
        self.dropped.append(drop)
        log(WARNING, "round %d: dropped the reply of node %d (partition %s): %s", server_round,
            drop.node_id, drop.partition_id, reason)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        self._sent_messages = list(self.inner.configure_train(server_round + self.offset, arrays, config, grid))
        self._sent = len(self._sent_messages)
        return self._sent_messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        absolute = server_round + self.offset
        replies = list(replies)
        kept = self._filter(absolute, replies, is_train=True)
        entry = {"sent": self._sent, "replied": len(replies), "kept": len(kept),
                 "dropped": [d.__dict__ for d in self.dropped if d.round == absolute]}
        self.history["rounds"][str(absolute)] = entry
        if len(kept) < self.min_available:
            log(WARNING, "round %d: %d good replies, fewer than min_available=%d; the adapter stays as it was",
                absolute, len(kept), self.min_available)
            entry["aggregated"] = False
            return None, None
        arrays, metrics = self.inner.aggregate_train(absolute, kept)
        entry["aggregated"] = arrays is not None
        if metrics is not None:
            entry["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        if arrays is not None and self.checkpoints is not None:
            self.checkpoints.save(absolute, arrays, self.history)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        self._sent_messages = list(self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid))
        return self._sent_messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        kept = self._filter(server_round + self.offset, replies, is_train=False)
        if not kept:
            return None
        return aggregate_metricrecords([m.content for m in kept], "num-examples")


def parse_dp(spec: str) -> tuple[str, float, float] | None:
    """"server:noise=1.0,clip=0.5" -> ("server", 1.0, 0.5); "none" -> None."""
    if spec in ("", "none"):
        return None
    match = re.fullmatch(r"(server|client):noise=([0-9.eE+-]+),clip=([0-9.eE+-]+)", spec)
    if not match:
        raise ValueError(f"dp {spec!r}: write server:noise=<σ>,clip=<C> or client:noise=<σ>,clip=<C> (or none)")
    return match.group(1), float(match.group(2)), float(match.group(3))


def dp_wrapped(strategy: Strategy, spec: str, num_sampled_clients: int) -> tuple[Strategy, dict[str, Any] | None]:
    """`strategy` inside Flower's fixed-clipping DP wrapper named by `spec`, and what it adds:
    the clipping norm, the noise multiplier and the Gaussian noise's standard deviation."""
    parsed = parse_dp(spec)
    if parsed is None:
        return strategy, None
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyServerSideFixedClipping,
    )

    side, noise, clip = parsed
    wrapper = DifferentialPrivacyServerSideFixedClipping if side == "server" else DifferentialPrivacyClientSideFixedClipping
    wrapped = wrapper(strategy, noise_multiplier=noise, clipping_norm=clip, num_sampled_clients=num_sampled_clients)
    return wrapped, {"clipping": side, "noise_multiplier": noise, "clipping_norm": clip,
                     "noise_stdev": noise * clip / num_sampled_clients}

