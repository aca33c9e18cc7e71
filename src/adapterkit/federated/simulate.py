"""Running it: the ServerApp, an in-process Grid, and Flower's Ray simulation engine.

`server_app(settings)` and `client_app(...)` are the apps `flwr run` deploys against a SuperLink and
SuperNodes. `simulate(settings)` runs both on this machine, on Flower's simulation engine
(`backend="ray"`, Ray bounded to this machine's cores and a small object store) or in this process
(`backend="inprocess"`: `LocalGrid` calls the ClientApp for each message, one at a time, and gives
up on a reply after the round's timeout, as the SuperLink does).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from logging import ERROR, WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log
from safetensors.torch import save_file

from ..config import MethodConfig
from ..io.storage import atomic_write
from ..model import AdaptedModel
from .aggregate import AGGREGATIONS
from .builtin import build_task, method_config
from .client import LOSSES, _local, client_app, evaluate, make_participant
from .faults import parse_faults
from .grid import BoundedGrid, TooFewNodes, exchange
from .head_init import HEAD_INITS, class_mean_head
from .records import ADAPTER, Participant
from .server import AdapterStrategy, Checkpoints, Guarded, dp_wrapped, parse_dp, server_options_problem
from .tasks import FederatedError, FederatedTask

if TYPE_CHECKING:
    from flwr.common.typing import Run


@dataclass
class Settings:
    task: str = "tweets"
    clients: int = 10
    rounds: int = 10
    partition: str = "dirichlet:0.3"
    method: str = "lora"
    aggregation: str = "fedavg"  # fedavg | ffa | svd (aggregate.py)
    full_model: bool = False  # the baseline: every weight trains and travels
    proximal_mu: float = 0.0  # FedProx
    server_lr: float = 1.0  # the server's step on the averaged update (server.py, FedAvgM)
    server_momentum: float = 0.0
    control: str = "none"  # none | scaffold (server.py: control variates against client drift)
    local_loss: str = "ce"  # ce | balanced (client.py: balanced softmax against label skew)
    head_init: str = "seeded"  # seeded | class-means (head_init.py: FedNCM, one query round first)
    local_epochs: int | None = None  # None: the task's
    lr: float | None = None
    fraction_train: float = 1.0
    evaluate_clients: bool = False  # also ask the clients to evaluate on their local data
    min_available: int = 2  # the fewest nodes (and good replies) a round needs
    timeout: float = 600.0  # seconds the server waits for a round's replies
    node_wait: float = 120.0  # seconds the server waits for min_available nodes to connect, then stops
    output_dir: str | None = None  # where the server writes outcome.json and the final adapter
    dp: str = "none"  # server:noise=σ,clip=C | client:noise=σ,clip=C
    faults: str = ""  # faults.py
    late_seconds: float = 5.0
    checkpoint_dir: str | None = None
    resume: bool = True
    seed: int = 0
    per_client: int = 200
    test_size: int = 1000
    num_cpus: int = 2

    def validate(self) -> None:
        dp = parse_dp(self.dp) is not None
        if self.aggregation not in AGGREGATIONS:
            raise FederatedError(f"aggregation {self.aggregation!r}: use one of {', '.join(AGGREGATIONS)}")
        if self.aggregation != "fedavg" and (self.full_model or self.method != "lora"):
            raise FederatedError(f"aggregation {self.aggregation!r} is for LoRA adapters (method lora)")
        if self.rounds < 1 or self.clients < 2:
            raise FederatedError(f"need rounds >= 1 and clients >= 2, got {self.rounds}, {self.clients}")
        if not 1 <= self.min_available <= self.clients:
            raise FederatedError(f"min_available={self.min_available} must be between 1 and clients={self.clients}")
        if not (math.isfinite(self.node_wait) and self.node_wait > 0):
            raise FederatedError(f"node_wait={self.node_wait} must be a number of seconds > 0")
        if self.local_loss not in LOSSES:
            raise FederatedError(f"local_loss {self.local_loss!r}: use one of {', '.join(LOSSES)}")
        if self.head_init not in HEAD_INITS:
            raise FederatedError(f"head_init {self.head_init!r}: use one of {', '.join(HEAD_INITS)}")
        if self.head_init == "class-means" and self.full_model:
            raise FederatedError("head_init 'class-means' initialises an adapter's head; full-model FedAvg "
                                 "trains the base's own head (use head_init 'seeded')")
        if self.head_init == "class-means" and dp:
            raise FederatedError("head_init 'class-means' sends per-class feature sums outside the DP "
                                 "clipping and noise; use head_init 'seeded' with dp")
        problem = server_options_problem(self.aggregation, self.server_lr, self.server_momentum, self.control, dp)
        if problem:
            raise FederatedError(problem)
        parse_faults(self.faults)

    @property
    def mode(self) -> str:
        return "full" if self.full_model else "ffa" if self.aggregation == "ffa" else "adapter"

    def factory(self) -> Callable[[], FederatedTask]:
        config: MethodConfig = method_config(self.task, self.method)
        return functools.partial(build_task, self.task, clients=self.clients, partition=self.partition, seed=self.seed,
                                 per_client=self.per_client, test_size=self.test_size, method=config)

    def key(self) -> str:
        return repr((self.task, self.clients, self.partition, self.method, self.seed, self.per_client, self.test_size))


@dataclass
class Outcome:
    settings: dict[str, Any]
    backend: str
    rounds: dict[str, Any]  # round -> sent/kept/dropped, train metrics, central accuracy, reply bytes
    dropped: list[dict[str, Any]]
    accuracy: float  # central test accuracy after the last round
    bytes_per_client_round: float  # what one client sends per round (ArrayRecord.count_bytes())
    seconds_per_round: float
    resumed_from: int = 0
    head_init: dict[str, Any] | None = None  # the class-means query: replies kept, dropped, unseen classes
    dp: dict[str, Any] | None = None
    arrays: ArrayRecord | None = field(default=None, repr=False)
    #: why the run stopped before its last round (too few nodes), or None
    stopped: str | None = None

    def to_json(self) -> dict[str, Any]:
        """What outcome.json holds: everything but the tensors."""
        # asdict deep-copies every field: the arrays (memoryviews) are dropped before, not after
        return {k: v for k, v in asdict(replace(self, arrays=None)).items() if k != "arrays"}


def run_server(grid: Grid, settings: Settings, factory: Callable[[], FederatedTask] | None = None) -> Outcome:
    """The ServerApp's body: build the server's participant, resume, run the strategy, report.
    `factory` builds a task of your own (default: the built-in `settings.task`)."""
    settings.validate()
    # its own copy, apart from any client's in this process (a late client may still be training)
    task, part = _local(factory or settings.factory(), "server:" + _key(settings, factory), settings.mode)
    # every wait for nodes is bounded: with fewer than min_available for node_wait seconds, the run stops
    grid = BoundedGrid(grid, settings.min_available, settings.node_wait)
    num_nodes = len(list(grid.get_node_ids()))
    inner = AdapterStrategy(
        "fedavg" if settings.aggregation == "ffa" else settings.aggregation,
        lr=settings.lr if settings.lr is not None else (task.full_lr if settings.full_model else task.lr),
        local_epochs=settings.local_epochs, proximal_mu=settings.proximal_mu, local_loss=settings.local_loss,
        server_lr=settings.server_lr, server_momentum=settings.server_momentum, control=settings.control,
        fraction_train=settings.fraction_train, fraction_evaluate=1.0 if settings.evaluate_clients else 0.0,
        min_train_nodes=settings.min_available, min_evaluate_nodes=settings.min_available if settings.evaluate_clients else 0,
        min_available_nodes=settings.min_available)
    sampled = max(int(num_nodes * settings.fraction_train), 2)
    strategy, dp = dp_wrapped(inner, settings.dp, sampled)
    checkpoints = Checkpoints(settings.checkpoint_dir, part) if settings.checkpoint_dir else None
    start, arrays, history = 0, part.arrays(), None
    if checkpoints is not None and settings.resume and (found := checkpoints.latest()) is not None:
        start, arrays, history = found
        if settings.control != "none" or settings.server_momentum:
            log(WARNING, "resuming after round %d: the checkpoint holds the adapter, not the server's "
                "momentum or SCAFFOLD's control variates; they start again from zero", start)
    head_report = None
    if settings.head_init == "class-means" and start == 0:
        head_report = class_mean_head(grid, part, timeout=settings.timeout, min_available=settings.min_available)
        arrays = part.arrays()
    guarded = Guarded(strategy, part, min_available=settings.min_available, checkpoints=checkpoints,
                      round_offset=start, history=history)

    def central(server_round: int, record: ArrayRecord) -> MetricRecord:
        part.load(record)
        loss, acc = evaluate(task, part.model, task.test)
        entry = guarded.history["rounds"].setdefault(str(server_round + start), {})
        entry.update({"test_accuracy": acc, "test_loss": loss})
        return MetricRecord({"accuracy": acc, "loss": loss})

    started = time.perf_counter()
    remaining = settings.rounds - start
    stopped = None
    if remaining > 0:
        try:
            result = guarded.start(grid, arrays, num_rounds=remaining, timeout=settings.timeout,
                                   train_config=ConfigRecord({"seed": settings.seed}), evaluate_fn=central)
            arrays = result.arrays if len(result.arrays) else arrays
        except TooFewNodes as err:
            stopped = str(err)
            done = [int(r) for r, e in guarded.history["rounds"].items() if e.get("aggregated")]
            log(ERROR, "the run stops: %s; kept: the adapter after round %s%s", err, max(done, default=start),
                f" (checkpoint in {settings.checkpoint_dir})" if settings.checkpoint_dir else "")
            arrays = part.arrays()
    else:
        central(0, arrays)
    seconds = (time.perf_counter() - started) / max(1, remaining)
    sent = part.arrays().count_bytes() * (2 if settings.control == "scaffold" else 1)  # SCAFFOLD: c_i as well
    last = guarded.history["rounds"].get(str(settings.rounds), {})
    outcome = Outcome(asdict(settings), "", guarded.history["rounds"], [d.__dict__ for d in guarded.dropped],
                      float(last.get("test_accuracy", float("nan"))), float(sent), seconds,
                      resumed_from=start, dp=dp, arrays=arrays, head_init=head_report, stopped=stopped)
    if settings.output_dir:
        write_outcome(outcome, part, Path(settings.output_dir))
    return outcome


def write_outcome(outcome: Outcome, part: Participant, folder: Path) -> None:
    """outcome.json (rounds, dropped replies and why, bytes, accuracy, why it stopped) and the final
    adapter as an adapter folder (`adapter/`; the full model's tensors for full-model FedAvg)."""
    folder.mkdir(parents=True, exist_ok=True)
    if outcome.arrays is not None:
        part.load(outcome.arrays)
    if isinstance(part.model, AdaptedModel):
        part.model.save(ADAPTER, str(folder / "adapter"))
    else:
        save_file({k: v.contiguous() for k, v in part.tensors().items()}, str(folder / "model.safetensors"))
    atomic_write(folder / "outcome.json", json.dumps(outcome.to_json(), indent=2, default=str).encode())


def _key(settings: Settings, factory: Callable[[], FederatedTask] | None) -> str:
    return settings.key() if factory is None else f"custom:{settings.task}:{settings.key()}"


#: Settings the clients build their side from (the task and its split; faults and late-seconds the
#: clients read from the run config themselves, and they clip whenever the server's DP asks):
#: a run config cannot change them on the server alone, so it may only repeat the app's values
CLIENT_SIDE = frozenset({"task", "clients", "partition", "method", "full_model", "seed", "per_client", "test_size",
                         "num_cpus"})


def with_run_config(settings: Settings, run_config: Mapping[str, Any]) -> Settings:
    """`settings` with the fields a Flower run config names (`[tool.flwr.app.config]`, `flwr run
    --run-config "rounds=5 min-available=3"`): "min-available" and "min_available" are the field
    min_available, each value converted to the field's type ("" or "none": None). Keys that name no
    field are the app's own and are left alone; a client-side field may only repeat its value."""
    names = {f.name: f for f in fields(Settings)}
    changes: dict[str, Any] = {}
    for key, value in run_config.items():
        name = str(key).replace("-", "_")
        if name not in names:
            continue
        current = getattr(settings, name)
        converted = _as_field(name, value, current, str(names[name].type))
        if converted == current:
            continue
        if name in CLIENT_SIDE:
            raise FederatedError(f"run config {key}={value!r}: {name} is set where the ClientApp is built too "
                                 f"(the app's Settings say {current!r}); change it in the app, for both sides")
        changes[name] = converted
    updated = dataclasses.replace(settings, **changes)
    updated.validate()
    return updated


def _as_field(name: str, value: Any, current: Any, annotation: str) -> Any:
    if isinstance(value, str) and value.strip().lower() in ("", "none") and "None" in annotation:
        return None
    try:
        if "bool" in annotation:
            if isinstance(value, str):
                if value.lower() not in ("true", "false"):
                    raise ValueError(value)
                return value.lower() == "true"
            return bool(value)
        if "int" in annotation and "float" not in annotation:
            return int(value)
        if "float" in annotation:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise FederatedError(f"run config {name}={value!r}: not a {annotation}") from None


def server_app(settings: Settings, outcome: list[Outcome] | None = None,
               factory: Callable[[], FederatedTask] | None = None) -> ServerApp:
    """The ServerApp; `outcome` (a list) receives the run's Outcome. The run config (`flwr run
    --run-config`) overrides the server's Settings (`with_run_config`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        done = run_server(grid, with_run_config(settings, context.run_config or {}), factory)
        if outcome is not None:
            outcome.append(done)

    return app


def make_client_app(settings: Settings, factory: Callable[[], FederatedTask] | None = None) -> ClientApp:
    """The ClientApp for `settings` (with its faults; it clips updates when the server runs client-side DP)."""
    return client_app(factory or settings.factory(), _key(settings, factory), mode=settings.mode, seed=settings.seed,
                      faults=settings.faults, late_seconds=settings.late_seconds)


class LocalGrid(Grid):
    """An in-process Grid: each message runs the ClientApp here, in a thread per node (their training
    takes turns on the one model); `send_and_receive` returns the replies that arrived before the
    timeout, as the SuperLink does, so a slow client holds up no one."""

    def __init__(self, app: ClientApp, num_nodes: int) -> None:
        self.app = app
        self.nodes = {1000 + i: i for i in range(num_nodes)}
        self.contexts = {nid: Context(run_id=0, node_id=nid, node_config={"partition-id": pid, "num-partitions": num_nodes},
                                      state=RecordDict(), run_config={}) for nid, pid in self.nodes.items()}
        self.worker = ThreadPoolExecutor(max_workers=num_nodes, thread_name_prefix="local-grid")
        self.pending: dict[str, Any] = {}
        self._run: Run | None = None

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run | None:  # None until set_run
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def _handle(self, msg: Message) -> Message:
        try:
            return self.app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as err:  # the client failed: the server sees an error reply, as from a SuperNode
            reason = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"
            return Message(Error(code=0, reason=reason), reply_to=msg)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.pending[msg.metadata.message_id] = self.worker.submit(self._handle, msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        done = [i for i in message_ids if i in self.pending and self.pending[i].done()]
        return [self.pending.pop(i).result() for i in done]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies, late = exchange(self, messages, timeout)
        for i in late:  # too late: its reply will be thrown away when it comes
            self.pending.pop(i, None)
        return replies

    def close(self) -> None:
        self.worker.shutdown(wait=True)


def _in_process_identity() -> None:
    """Messages take their run and source from the process's task identity, which a SuperLink (or
    Flower's simulation) sets; here the server is this process (as Flower's compat runner sets it)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, SUPERLINK_NODE_ID


def ray_backend_config(num_cpus: int = 2, object_store_mb: int = 256) -> dict[str, Any]:
    """Flower's Ray backend, bounded: `num_cpus` workers of one core, a small object store, no dashboard."""
    return {"init_args": {"num_cpus": num_cpus, "num_gpus": 0, "object_store_memory": object_store_mb * 1024 ** 2,
                          "include_dashboard": False, "logging_level": "warning"},
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0}}


def simulate(settings: Settings, backend: str = "ray", factory: Callable[[], FederatedTask] | None = None
             ) -> Outcome:
    """Run one federated training on this machine and return what it measured. `factory` (picklable,
    light: Ray sends it with every call) builds a task of your own instead of `settings.task`."""
    settings.validate()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if backend == "inprocess":
        _in_process_identity()
        grid = LocalGrid(make_client_app(settings, factory), settings.clients)
        try:
            outcome = run_server(grid, settings, factory)
        finally:
            grid.close()
    elif backend == "ray":
        from flwr.simulation import run_simulation

        holder: list[Outcome] = []
        threads = torch.get_num_threads()
        run_simulation(server_app(settings, holder, factory), make_client_app(settings, factory),
                       num_supernodes=settings.clients,
                       backend_name="ray", backend_config=ray_backend_config(settings.num_cpus))
        torch.set_num_threads(threads)
        if not holder:
            raise FederatedError("the Ray simulation ended without a result; see Flower's log above")
        outcome = holder[0]
    else:
        raise FederatedError(f"unknown backend {backend!r}; use ray or inprocess")
    outcome.backend = backend
    return outcome


__all__ = ["LocalGrid", "Outcome", "Settings", "make_participant", "ray_backend_config", "run_server", "server_app",
           "simulate", "with_run_config"]
