"""The client: Flower's ClientApp around one participant, its local data and a local training loop.

The ClientApp holds only a task *factory* and a key; Ray pickles it into every call, so the task
(model and data) is built once per worker process and kept (`_local`). Each call loads the global
arrays first, so one cached model serves every client a worker runs, one after another.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from ..model import adapt
from ..train.step import MAX_GRAD_NORM, TrainStep
from .faults import FaultsMod, parse_faults
from .head_init import head_input_sums, sums_reply
from .records import ADAPTER, Participant, adapter_participant, check_arrays, full_participant
from .tasks import ClientData, FederatedTask

MODES = ("adapter", "ffa", "full")
_LOCAL: dict[tuple[str, str], tuple[FederatedTask, Participant]] = {}
#: one model serves every client of a process: their calls take turns on it
_TURNS: dict[tuple[str, str], threading.Lock] = {}


def make_participant(task: FederatedTask, mode: str) -> Participant:
    """The model every participant holds in `mode` ("adapter", "ffa": LoRA A frozen, "full": every
    weight), built the same way everywhere (the adapter's initial tensors seeded)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    base = task.make_base()
    if mode == "full":
        return full_participant(base)
    am = adapt(base)
    torch.manual_seed(int(task.info.get("seed", 0)))
    am.add(ADAPTER, task.method, num_labels=len(task.labels))
    head = am.adapter(ADAPTER).head
    if head is not None and task.info.get("shared_head"):
        _warm(head, base)
    return adapter_participant(am, freeze_lora_a=mode == "ffa")


@torch.no_grad()
def _warm(head: torch.nn.Module, source: torch.nn.Module) -> None:
    """The new head starts from the source head's rows for the classes both know."""
    new = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
    old = [m for m in source.modules() if isinstance(m, torch.nn.Linear)][-1]
    classes = min(new.out_features, old.out_features)
    new.weight[:classes] = old.weight[:classes]
    if new.bias is not None and old.bias is not None:
        new.bias[:classes] = old.bias[:classes]


LOSSES = ("ce", "balanced")


def label_shift(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """log p_i(c), the client's own label frequencies, added to the logits in `balanced` training;
    a class the client never sees is masked (-1e4) so its row is not pushed down."""
    counts = torch.bincount(labels, minlength=classes).double()
    return torch.where(counts > 0, (counts / counts.sum()).log(), torch.tensor(-1e4, dtype=torch.float64)).float()


def local_train(task: FederatedTask, part: Participant, data: ClientData, *, epochs: int, lr: float,
                proximal_mu: float = 0.0, seed: int = 0, loss: str = "ce",
                correction: dict[str, torch.Tensor] | None = None,
                max_grad_norm: float | None = MAX_GRAD_NORM) -> tuple[float, int]:
    """AdamW over the travelling parameters on the client's data (train/step.py's step, gradients
    clipped like every loop's); FedProx adds μ/2·‖w − w_global‖² to the loss. SCAFFOLD's
    `correction` (c − c_i, server.py) is added to the parameters after every step.

    `loss="balanced"` is balanced softmax (Ren et al. 2020; FedLC's calibration, FedRS's masking):
    cross-entropy of logits + log p_i(y), so what the client learns is p(x | y), not its own skewed
    p(y), and the averaged model is not dragged to the clients' majority classes. Evaluation uses
    the plain logits. Returns the mean loss and the number of steps."""
    if loss not in LOSSES:
        raise ValueError(f"unknown local loss {loss!r}; use one of {', '.join(LOSSES)}")
    shift = label_shift(data.labels, len(task.labels)) if loss == "balanced" else None
    anchor = part.tensors() if proximal_mu > 0 else None
    params = list(part.params.values())
    step = TrainStep(params, torch.optim.AdamW(params, lr=lr, weight_decay=0.0), max_grad_norm=max_grad_norm,
                     extra=[_proximal(part, anchor, proximal_mu)] if anchor is not None else [],
                     after=[_corrected(part, correction)] if correction is not None else [])
    gen = torch.Generator().manual_seed(seed)
    part.model.eval()  # the frozen base keeps its BatchNorm statistics; no dropout anywhere
    total, steps = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        for start in range(0, len(data), task.batch_size):
            idx = order[start: start + task.batch_size]

            def task_loss(idx: torch.Tensor = idx) -> torch.Tensor:
                logits = task.logits(part.model, data.take(idx))
                return F.cross_entropy(logits if shift is None else logits + shift, data.labels[idx])

            total, steps = total + float(step(task_loss)), steps + 1
    return total / max(1, steps), steps


def _proximal(part: Participant, anchor: dict[str, torch.Tensor], mu: float) -> Callable[[], torch.Tensor]:
    """FedProx's term μ/2·‖w − anchor‖², over the travelling parameters."""
    def proximal() -> torch.Tensor:
        return mu / 2 * sum(((p - anchor[k]).pow(2).sum() for k, p in part.params.items()), torch.zeros(()))
    return proximal


def _corrected(part: Participant, correction: dict[str, torch.Tensor]) -> Callable[[], None]:
    """SCAFFOLD's step: add the control variate correction to each travelling parameter."""
    @torch.no_grad()
    def corrected() -> None:
        for key, p in part.params.items():
            p.add_(correction[key])
    return corrected


@torch.no_grad()
def evaluate(task: FederatedTask, model: torch.nn.Module, data: ClientData, batch_size: int = 128
             ) -> tuple[float, float]:
    """(mean loss, accuracy) of `model` on `data`."""
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(len(data), start + batch_size))
        logits = task.logits(model, data.take(idx))
        loss += float(F.cross_entropy(logits, data.labels[idx], reduction="sum"))
        correct += int((logits.argmax(-1) == data.labels[idx]).sum())
    return loss / len(data), correct / len(data)


def _local(factory: Callable[[], FederatedTask], key: str, mode: str) -> tuple[FederatedTask, Participant]:
    with _BUILDING:
        if (key, mode) not in _LOCAL:
            task = factory()
            _LOCAL[(key, mode)] = (task, make_participant(task, mode))
            _TURNS[(key, mode)] = threading.Lock()
    return _LOCAL[(key, mode)]


_BUILDING = threading.Lock()


def _turn(factory: Callable[[], FederatedTask], key: str, mode: str) -> threading.Lock:
    _local(factory, key, mode)
    return _TURNS[(key, mode)]


def forget_local() -> None:
    """Drop this process's cached tasks (tests build many)."""
    _LOCAL.clear()
    _TURNS.clear()


def client_app(factory: Callable[[], FederatedTask], key: str, *, mode: str = "adapter",
               seed: int = 0, faults: str = "", late_seconds: float = 5.0, mods: list[Any] | None = None) -> ClientApp:
    """A ClientApp that trains the travelling tensors on partition `partition-id` of the task (or on the
    node's own examples, its node config's `data-path`: FederatedTask.local_data).

    The server's config sets the round's `lr`, `local-epochs`, `proximal-mu`, `local-objective` (the loss)
    and `control` ("scaffold": step with the server's `correction`, reply with this client's c_i too); a
    `query` message asks for the class sums that initialise the head (head_init.py). An update is clipped
    when the server asks for it (client-side DP: `DifferentialPrivacyClientSideFixedClipping` sends the
    clipping norm). `faults` (faults.py) makes partitions misbehave on purpose, for drills; a run
    config's `faults` and `late-seconds` replace them for that run."""
    app = ClientApp(mods=[*(mods or []), FaultsMod(parse_faults(faults), late_seconds), clip_when_asked])

    def setup(msg: Message, context: Context) -> tuple[FederatedTask, Participant, int, ClientData]:
        task, part, pid, data = own_data(context)
        part.load(msg.content["arrays"])
        return task, part, pid, data

    def own_data(context: Context) -> tuple[FederatedTask, Participant, int, ClientData]:
        """This node's examples: its own file (node config `data-path`; `partition-id`, if given, only
        names it in reports), or partition `partition-id` of the task's built-in split."""
        task, part = _local(factory, key, mode)
        path = context.node_config.get("data-path")
        if path:
            return task, part, int(context.node_config.get("partition-id", -1)), task.local_data(str(path))
        if "partition-id" not in context.node_config:
            raise ValueError("this node's config has neither partition-id (with num-partitions) nor data-path")
        pid = int(context.node_config["partition-id"])
        partitions = context.node_config.get("num-partitions")
        if partitions is not None and int(partitions) != len(task.clients):
            raise ValueError(f"this node's config says num-partitions={partitions}, but the app's task is split "
                             f"into {len(task.clients)} clients: set Settings.clients to {partitions} in the app")
        if not 0 <= pid < len(task.clients):
            raise ValueError(f"partition-id {pid} is not one of the task's {len(task.clients)} clients")
        return task, part, pid, task.clients[pid]

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        with _turn(factory, key, mode):
            return _train(msg, context)

    def _train(msg: Message, context: Context) -> Message:
        started = time.perf_counter()
        task, part, pid, data = setup(msg, context)
        config = msg.content["config"]
        server_round = int(config.get("server-round", 0))
        lr = float(config.get("lr", task.full_lr if mode == "full" else task.lr))
        objective = str(config.get("local-objective", "ce"))
        scaffold = config.get("control") == "scaffold"
        received = part.tensors() if scaffold else None
        correction = None
        if scaffold and "correction" in msg.content.array_records:
            record = msg.content["correction"]
            problem = check_arrays(record, part.template())
            if problem:
                raise ValueError(f"the server's correction does not fit this participant: {problem}")
            correction = {k: v.to(part.params[k].dtype) for k, v in record.to_torch_state_dict().items()}
        loss, steps = local_train(task, part, data, epochs=int(config.get("local-epochs", task.local_epochs)),
                                  lr=lr, proximal_mu=float(config.get("proximal-mu", 0.0)),
                                  seed=seed * 100_003 + server_round * 1009 + pid,
                                  loss=objective, correction=correction)
        metrics = {"num-examples": len(data), "train-loss": loss if math.isfinite(loss) else -1.0,
                   "steps": steps, "seconds": time.perf_counter() - started}
        reply = _reply(part, pid, metrics)
        if received is not None:  # c_i: the mean step this client took on its own, (y − x)/K − (c − c_i)
            control = {k: (p.detach() - received[k]) / max(1, steps) - (correction[k] if correction else 0)
                       for k, p in part.params.items()}
            reply["control"] = ArrayRecord({k: Array(v.cpu().numpy()) for k, v in control.items()})
        return Message(reply, reply_to=msg)

    @app.evaluate()
    def local_evaluate(msg: Message, context: Context) -> Message:
        with _turn(factory, key, mode):
            task, part, pid, data = setup(msg, context)
            loss, acc = evaluate(task, part.model, data)
        content = RecordDict({"metrics": MetricRecord({"num-examples": len(data), "local-loss": loss,
                                                       "local-accuracy": acc}),
                              "meta": ConfigRecord({"fingerprint": part.fingerprint, "partition-id": pid})})
        return Message(content, reply_to=msg)

    @app.query()
    def class_sums(msg: Message, context: Context) -> Message:
        with _turn(factory, key, mode):
            task, part, pid, data = own_data(context)
            sums, counts = head_input_sums(task, part, data)
        return Message(sums_reply(part, pid, sums, counts), reply_to=msg)

    return app


def _reply(part: Participant, pid: int, metrics: dict[str, float]) -> RecordDict:
    return RecordDict({"arrays": part.arrays(), "metrics": MetricRecord(metrics),
                       "meta": ConfigRecord({"fingerprint": part.fingerprint, "partition-id": pid})})


def clip_when_asked(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's `fixedclipping_mod` on a train message that carries a clipping norm (the server runs
    client-side DP); any other message passes untouched."""
    config = msg.content.config_records.get("config") if msg.metadata.message_type == MessageType.TRAIN else None
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
