"""A label-skew-proof start for the adapter's head: class means gathered over Flower, once.

Under Dirichlet label skew a seeded head is what FedAvg breaks first: each client pulls it to its
own classes and the average predicts the majority class round after round. The frozen base often
already separates the classes well (README: the nearest class mean on the tweets), so the head
starts as that classifier (FedNCM, Legate et al. 2023):

    logits_c(x) = τ · (2 m_cᵀ x − ‖m_c‖²)      m_c = Σ_i s_ic / Σ_i n_ic

where client i sends, in one `query` message before round 1, the sum s_ic of the head's inputs over
its examples of class c and their count n_ic (C × H numbers: the size of the head itself). The
server checks every reply like a training reply (fingerprint, shapes, finite, counts ≥ 0) and drops
a bad one. τ = 10 makes the softmax sharp enough that the first steps refine the head rather than
flatten it.
"""

from __future__ import annotations

from logging import WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.supercore import log
from torch import nn

from ..model import AdaptedModel
from .records import ADAPTER, Participant, check_arrays
from .tasks import ClientData, FederatedError, FederatedTask

HEAD_INITS = ("seeded", "class-means")
SHARPNESS = 10.0


def head_linear(part: Participant) -> nn.Linear:
    """The last Linear of the travelling adapter's head (what class means initialise)."""
    record = part.model.adapter(ADAPTER) if isinstance(part.model, AdaptedModel) else None
    head = None if record is None else record.head
    linears = [] if head is None else [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise FederatedError("head_init='class-means' needs an adapter with a Linear head (num_labels); "
                             "this participant has none (full-model FedAvg keeps the base's own head)")
    return linears[-1]


@torch.no_grad()
def head_input_sums(task: FederatedTask, part: Participant, data: ClientData, batch_size: int = 128
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums [C, H] of the head's inputs per class, counts [C]) over the client's examples."""
    last = head_linear(part)
    seen: list[torch.Tensor] = []
    handle = last.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        part.model.eval()
        for start in range(0, len(data), batch_size):
            task.logits(part.model, data.take(torch.arange(start, min(len(data), start + batch_size))))
    finally:
        handle.remove()
    features = torch.cat(seen).double()
    if features.shape != (len(data), last.in_features):
        raise FederatedError(f"the head saw inputs of shape {tuple(features.shape)}, expected "
                             f"({len(data)}, {last.in_features}): one feature row per example")
    classes = last.out_features
    sums = torch.zeros(classes, last.in_features, dtype=torch.float64).index_add_(0, data.labels, features)
    return sums, torch.bincount(data.labels, minlength=classes).double()


def sums_reply(part: Participant, pid: int, sums: torch.Tensor, counts: torch.Tensor) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({"sums": Array(sums.numpy()), "counts": Array(counts.numpy())}),
                       "metrics": MetricRecord({"num-examples": float(counts.sum())}),
                       "meta": ConfigRecord({"fingerprint": part.fingerprint, "partition-id": pid})})


def check_sums(msg: Message, fingerprint: str, shape: tuple[int, int]) -> str | None:
    """None for a well-formed reply to the class-means query, else why not."""
    if msg.has_error():
        return f"the client failed: {msg.error.reason}"
    meta = msg.content.config_records.get("meta")
    if meta is None or meta.get("fingerprint") != fingerprint:
        return f"base fingerprint {None if meta is None else meta.get('fingerprint')!r} is not this server's"
    arrays = msg.content.array_records.get("arrays")
    if arrays is None:
        return "expected arrays 'sums' and 'counts'"
    problem = check_arrays(arrays, {"sums": (shape, "float64"), "counts": (shape[:1], "float64")})
    if problem:
        return problem
    if (arrays["counts"].numpy() < 0).any():
        return "negative counts"
    return None


@torch.no_grad()
def class_mean_head(grid: Grid, part: Participant, *, timeout: float, min_available: int) -> dict[str, object]:
    """Ask every node for its class sums, set the head to the nearest-class-mean classifier, and
    return what happened (replies kept and dropped, classes no client had)."""
    last = head_linear(part)
    shape = (last.out_features, last.in_features)
    nodes = list(grid.get_node_ids())
    messages = [Message(content=RecordDict({"config": ConfigRecord({"query": "class-sums"})}),
                        message_type=MessageType.QUERY, dst_node_id=node) for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    sums = torch.zeros(shape, dtype=torch.float64)
    counts = torch.zeros(shape[0], dtype=torch.float64)
    kept, dropped = 0, []
    for msg in replies:
        reason = check_sums(msg, part.fingerprint, shape)
        if reason is not None:
            dropped.append({"node_id": int(msg.metadata.src_node_id), "reason": reason})
            log(WARNING, "class means: dropped the reply of node %d: %s", msg.metadata.src_node_id, reason)
            continue
        arrays = msg.content.array_records["arrays"]
        sums += torch.from_numpy(np.asarray(arrays["sums"].numpy(), dtype=np.float64))
        counts += torch.from_numpy(np.asarray(arrays["counts"].numpy(), dtype=np.float64))
        kept += 1
    if kept < min_available:
        raise FederatedError(f"class means: {kept} good replies of {len(nodes)} nodes, fewer than "
                             f"min_available={min_available}; the head cannot be initialised")
    missing = [c for c in range(shape[0]) if counts[c] == 0]
    means = sums / counts.clamp(min=1)[:, None]
    weight = 2 * SHARPNESS * means
    bias = -SHARPNESS * means.pow(2).sum(1)
    if missing:  # no client has them: a zero row, scored below every class seen
        weight[missing] = 0.0
        bias[missing] = float(bias[counts > 0].min()) - SHARPNESS if len(missing) < shape[0] else 0.0
    last.weight.copy_(weight.to(last.weight.dtype))
    if last.bias is not None:
        last.bias.copy_(bias.to(last.bias.dtype))
    return {"replied": len(replies), "kept": kept, "dropped": dropped, "classes_unseen": missing,
            "examples": float(counts.sum())}
