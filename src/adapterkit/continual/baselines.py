"""What per-task adapters are measured against, on the same stream and base:

* naive: one shared adapter (or the whole model: `full=True`) trained task after task;
* EWC (Kirkpatrick et al. 2017): the same, plus λ/2 Σ F_i (θ_i - θ*_i)² from the diagonal Fisher of
  every earlier task;
* replay: the same, with a fixed buffer of earlier examples (an equal share per task seen) mixed in;
* joint: one shared adapter trained on all tasks at once, the upper bound.

All share one head over every class of the stream. Trained with `task_heads=True` (the default),
each example's loss is taken over its own task's columns only (a multi-head model, as the
task-incremental literature trains its baselines: the shared body is what can forget); with
`task_heads=False` all classes compete in the loss too. With a task id the head's columns are
narrowed to the task's classes (task-incremental); without, all classes compete (class-incremental).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MethodConfig
from ..heads import find_head
from ..model import AdaptedModel
from ..train.step import TrainStep
from .data import ContinualError, Encoder, Inputs, Split, Task, TaskStream, tensor_encoder
from .learner import batches, logits_of, predict_logits, take


class SharedLearner:
    """One model for the whole stream: `kind` is "naive", "ewc", "replay" or "joint"."""

    def __init__(
        self, make_base: Callable[[], nn.Module], stream: TaskStream, method: MethodConfig | None, *,
        kind: str = "naive", encode: Encoder = tensor_encoder, epochs: int = 5, lr: float = 3e-3,
        batch_size: int = 32, seed: int = 0, ewc_lambda: float = 100.0, buffer_size: int = 200, head: str | None = "auto",
        task_heads: bool = True,
    ) -> None:
        if kind not in ("naive", "ewc", "replay", "joint"):
            raise ValueError(f"kind must be naive, ewc, replay or joint, not {kind!r}")
        self.stream, self.kind, self.encode = stream, kind, encode
        self.epochs, self.lr, self.batch_size, self.seed = epochs, lr, batch_size, seed
        self.ewc_lambda, self.buffer_size, self.task_heads = ewc_lambda, buffer_size, task_heads
        self.domain = stream.scenario == "domain"
        # each task's labels as columns of the one head: its own block of columns (class-incremental),
        # the same columns for every task (domain-incremental)
        self.columns = {t.name: torch.tensor([stream.classes.index(label) for label in t.labels]) for t in stream}
        n = len(stream.classes)
        # the task each head column belongs to (class-incremental)
        self.column_task = torch.tensor([next(i for i, t in enumerate(stream) if label in t.labels)
                                         for label in stream.classes])
        base = make_base()
        if method is None:  # full fine-tuning: every weight trains, the head widened to all classes
            self.am = None
            self.model = base
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                _widen_head(self.model, find_head(base) if head == "auto" else head, n)
            self.params = list(self.model.parameters())
        else:
            self.am = AdaptedModel(base, head=head)
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                self.am.add("shared", method, num_labels=n)
            self.params = self.am.train_adapter("shared")
            self.model = self.am
        self.anchors: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []  # EWC: (θ*, Fisher) per task
        self.buffer: list[tuple[Inputs, torch.Tensor]] = []

    def _global(self, task: Task, labels: torch.Tensor) -> torch.Tensor:
        return self.columns[task.name][labels]

    def _set_train(self) -> None:
        if self.am is None:
            self.model.train()
        else:  # the frozen base keeps its statistics, as in Learner
            self.am.train_adapter("shared")

    def learn(self, task: Task) -> None:
        self._fit([(task, task.train)])
        if self.kind == "ewc":
            self.anchors.append(([p.detach().clone() for p in self.params], self._fisher(task)))
        if self.kind == "replay":
            self._remember(task)

    def learn_jointly(self) -> None:
        self._fit([(t, t.train) for t in self.stream])

    def _fit(self, parts: list[tuple[Task, Split]]) -> None:
        inputs, labels = _concat([(s.inputs, self._global(t, s.labels)) for t, s in parts])
        # clipped as in Learner: without it the shared adapter's last Split-MNIST task drove every
        # ReLU after conv3 dead (constant logits), which is not forgetting
        step = TrainStep(self.params, torch.optim.AdamW(self.params, lr=self.lr), extra=[self._penalty])
        gen = torch.Generator().manual_seed(self.seed)
        replay = _concat(self.buffer) if self.buffer else None
        self._set_train()
        for _ in range(self.epochs):
            for idx in batches(len(labels), self.batch_size, gen):
                x, y = take(inputs, idx), labels[idx]
                if replay is not None:
                    bx, by = replay
                    pick = torch.randint(len(by), (min(len(by), len(idx)),), generator=gen)
                    x, y = _concat([(x, y), (take(bx, pick), by[pick])])
                args, kwargs = self.encode(x)
                step(lambda: self._loss(logits_of(self.model(*args, **kwargs)), y))  # noqa: B023
        self.model.eval()

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task_heads and not self.domain:  # each example competes only among its own task's columns
            own = self.column_task[None, :] == self.column_task[y][:, None]
            logits = logits.masked_fill(~own, float("-inf"))
        return F.cross_entropy(logits, y)

    def _penalty(self) -> torch.Tensor:
        """EWC's λ/2 · Σ F·(θ − θ*)² over the earlier tasks (zero before the second task)."""
        if not self.anchors:
            return torch.zeros(())
        total = sum(((f * (p - a) ** 2).sum() for anchor, fisher in self.anchors
                     for p, a, f in zip(self.params, anchor, fisher, strict=True)), torch.zeros(()))
        return self.ewc_lambda / 2 * total

    def _fisher(self, task: Task, samples: int = 200) -> list[torch.Tensor]:
        """Diagonal empirical Fisher: mean squared gradient of the log-likelihood, one example at a time."""
        fisher = [torch.zeros_like(p) for p in self.params]
        n = min(samples, len(task.train))
        self._set_train()
        for i in range(n):
            args, kwargs = self.encode(take(task.train.inputs, torch.tensor([i])))
            loss = self._loss(logits_of(self.model(*args, **kwargs)), self._global(task, task.train.labels[i : i + 1]))
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            for f, g in zip(fisher, grads, strict=True):
                if g is not None:
                    f += g.detach() ** 2 / n
        self.model.eval()
        return fisher

    def _remember(self, task: Task) -> None:
        """An equal share of the fixed buffer for every task seen so far."""
        seen = len(self.buffer) + 1
        share = self.buffer_size // seen
        gen = torch.Generator().manual_seed(self.seed + seen)
        kept = [(take(x, torch.arange(min(share, len(y)))), y[:share]) for x, y in self.buffer]
        pick = torch.randperm(len(task.train), generator=gen)[:share]
        kept.append((take(task.train.inputs, pick), self._global(task, task.train.labels[pick])))
        self.buffer = kept

    def logits(self, inputs: Inputs) -> torch.Tensor:
        return predict_logits(self.model, self.encode, inputs)

    def accuracy(self, task: Task, task_id: bool = True) -> float:
        logits = self.logits(task.test.inputs)
        truth = self._global(task, task.test.labels)
        if task_id:
            columns = self.columns[task.name]
            predicted = columns[logits[:, columns].argmax(-1)]
        else:
            predicted = logits.argmax(-1)
        return float((predicted == truth).float().mean())


def _widen_head(model: nn.Module, head_path: str | None, n: int) -> None:
    if head_path is None:
        raise ValueError("full fine-tuning needs the model's head (a Linear) to widen it to every class")
    parent, _, leaf = head_path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, leaf)
    setattr(owner, leaf, nn.Linear(old.in_features, n))


def _concat(parts: list[tuple[Inputs, torch.Tensor]]) -> tuple[Inputs, torch.Tensor]:
    xs = [x for x, _ in parts]
    tensors = [x for x in xs if isinstance(x, torch.Tensor)]
    texts = [x for x in xs if not isinstance(x, torch.Tensor)]
    if tensors and texts:
        raise ContinualError("cannot concatenate tensor inputs with text inputs")
    inputs: Inputs = torch.cat(tensors) if isinstance(xs[0], torch.Tensor) else [s for x in texts for s in x]
    return inputs, torch.cat([y for _, y in parts])
