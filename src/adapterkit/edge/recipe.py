"""What every on-device recipe is: a source model pre-trained here, and a different target to adapt to.

A recipe's source model is trained (seeded, in seconds on a CPU) on the source domain: some voices,
lab recordings, some users. Its target is a new user, site or machine, with a few labelled
examples to adapt on and a held-out test set from the same target.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError


class RecipeError(AdapterError):
    """A recipe asked for with settings it cannot run with."""


@dataclass
class Recipe:
    name: str
    make_source: Callable[[], nn.Module]  # a fresh copy of the pre-trained source model, in eval mode
    train: tuple[torch.Tensor, torch.Tensor]  # the target's few labelled examples
    test: tuple[torch.Tensor, torch.Tensor]
    num_labels: int  # of the target task (may add classes to the source's)
    adapter_targets: str | list[str]  # where adapters sit
    batch_size: int = 16
    epochs: int = 10
    lr: float = 3e-3
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train[0].shape[1:])


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, seed: int | None = 0,
            drop_last: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (inputs, labels) batches; shuffled with `seed` (None: in order)."""
    order = torch.arange(len(y)) if seed is None else torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    out = [(x[order[i:i + batch_size]], y[order[i:i + batch_size]]) for i in range(0, len(y), batch_size)]
    return [b for b in out if len(b[1]) == batch_size] if drop_last and len(out) > 1 else out


class EpochLoader:
    """Re-iterable batches, reshuffled every epoch (a seeded DataLoader without worker processes)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        self.x, self.y, self.batch_size, self.seed, self.epoch = x, y, batch_size, seed, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.epoch += 1
        return iter(batches(self.x, self.y, self.batch_size, seed=self.seed * 1000 + self.epoch, drop_last=True))

    def __len__(self) -> int:
        return max(1, len(self.y) // self.batch_size)


def pretrain(build: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float = 3e-3,
             batch_size: int = 32, seed: int = 0) -> nn.Module:
    """Build a model and train every weight on the source domain; return it in eval mode. The seed
    is set before `build`, so the initial weights are the same in every run."""
    torch.manual_seed(seed)
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * max(1, len(y) // batch_size))
    model.train()
    for epoch in range(epochs):
        for xb, yb in batches(x, y, batch_size, seed=seed + epoch, drop_last=True):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    was = model.training
    model.eval()
    correct = sum(int((model(xb).argmax(-1) == yb).sum()) for xb, yb in batches(x, y, batch_size, seed=None))
    model.train(was)
    return correct / len(y)


def frozen_copy(state: dict[str, torch.Tensor], build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A `make_source` that rebuilds the pre-trained model from a saved state dict."""
    saved = {k: v.clone() for k, v in state.items()}

    def make() -> nn.Module:
        model = build()
        model.load_state_dict(saved)
        return model.eval()

    return make
