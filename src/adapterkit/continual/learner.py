"""A learner that adds one adapter (with its own head) per task and freezes it once learned.

Earlier adapters never train again and the base is frozen (BatchNorm statistics included: the base
stays in eval mode while an adapter trains), so with a task id every earlier answer is the same bit
for bit: backward transfer is exactly zero. Without a task id, `route` picks an adapter per input:

* "prototype": the nearest class prototype on the frozen base's features (no adapter active), by
  Mahalanobis distance under one covariance shared by all classes (streaming LDA, as Deep SLDA and
  FeCAM do): one key per class, L2P-style key-query matching without trained keys. The features
  are what the head reads, or the outputs of `route_features` modules (each pooled to a 2x2 grid
  when it is a feature map), which separate tasks better on small CNNs;
* "entropy": every candidate adapter on every input, as one routed batch; the most confident wins;
* "perplexity": for causal-LM bases, the adapter under which the input is most likely (AdapterCL).

Memory: `max_adapter_bytes` bounds the learned adapters' parameters. A task that would go over it is
refused before training, with the earlier adapters untouched; `forget(name)` drops one from memory
(its file in `save_dir` stays).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MethodConfig
from ..model import AdaptedModel
from ..train.step import TrainStep
from .data import ContinualError, Encoder, Inputs, Split, Task, tensor_encoder

SITES_PREFIX = "sites."


def logits_of(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def batches(n: int, size: int, gen: torch.Generator | None = None) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    return list(order.split(size))


def take(inputs: Inputs, idx: torch.Tensor) -> Inputs:
    return inputs[idx] if isinstance(inputs, torch.Tensor) else [inputs[i] for i in idx.tolist()]


@torch.no_grad()
def predict_logits(model: torch.nn.Module, encode: Encoder, inputs: Inputs, batch_size: int = 128) -> torch.Tensor:
    """`model`'s logits on `inputs`, in batches, in eval mode."""
    model.eval()
    out = []
    for idx in batches(len(inputs), batch_size):
        args, kwargs = encode(take(inputs, idx))
        out.append(logits_of(model(*args, **kwargs)))
    return torch.cat(out)


class Learner:
    def __init__(
        self, am: AdaptedModel, method: MethodConfig, *, encode: Encoder = tensor_encoder, epochs: int = 5,
        lr: float = 3e-3, batch_size: int = 32, seed: int = 0, init_from_similar: bool = False,
        save_dir: str | Path | None = None, max_adapter_bytes: int | None = None,
        route_features: Sequence[str] | None = None, shrinkage: float = 1e-3, scenario: str = "class",
    ) -> None:
        if scenario not in ("class", "domain"):
            raise ContinualError(f"scenario {scenario!r}: use 'class' or 'domain' (see TaskStream)")
        if am.head_path is None:
            raise ContinualError("the learner gives each task its own head: adapt the model with its head (head=...)")
        self.am, self.method, self.encode = am, method, encode
        self.epochs, self.lr, self.batch_size, self.seed = epochs, lr, batch_size, seed
        self.init_from_similar, self.max_adapter_bytes = init_from_similar, max_adapter_bytes
        self.save_dir = Path(save_dir) if save_dir else None
        self.route_features, self.shrinkage = list(route_features or []), shrinkage
        self.scenario = scenario
        for name in self.route_features:
            am.base.get_submodule(name)  # a wrong name fails here, not after the first task
        self.tasks: dict[str, Task] = {}
        self.prototypes: dict[str, torch.Tensor] = {}  # task -> [classes, features]: class means
        self.scatter: dict[str, tuple[torch.Tensor, int]] = {}  # task -> (Σ centred outer products, count)
        self.class_owner: dict[str, str] = {}

    # --- learning ---------------------------------------------------------------------------

    def learn(self, task: Task) -> dict[str, Any]:
        """Train a new adapter on `task`; earlier adapters and the base do not change."""
        if task.name in self.tasks or task.name in self.am.adapters:
            raise ContinualError(f"a task named {task.name!r} was already learned; give the new one another name")
        if self.scenario == "domain":
            first = next(iter(self.tasks.values()), task)
            if task.labels != first.labels:
                raise ContinualError(f"task {task.name!r}: a domain-incremental learner keeps one label set, "
                                     f"{first.labels}; this task has {task.labels}")
        clash = [c for c in task.labels if c in self.class_owner and self.scenario == "class"]
        if clash:
            raise ContinualError(
                f"task {task.name!r}: labels {clash[:4]} already belong to task {self.class_owner[clash[0]]!r}; "
                "in one label space over all tasks each label has one meaning (rename them, e.g. 'task:label')"
            )
        features = self.features(task.train.inputs)
        start = time.perf_counter()
        with torch.random.fork_rng():  # the same adapter initialisation whatever ran before
            torch.manual_seed(self.seed + len(self.tasks))
            self.am.add(task.name, self.method, labels=list(task.labels))
        try:
            used = sum(self.am.adapter(n).parameter_bytes() for n in self.tasks) + self.am.adapter(task.name).parameter_bytes()
            if self.max_adapter_bytes is not None and used > self.max_adapter_bytes:
                raise ContinualError(
                    f"task {task.name!r}: the adapters would take {used} bytes, over max_adapter_bytes="
                    f"{self.max_adapter_bytes}; raise it, or forget(name) an earlier task (its file stays)"
                )
            similar = self._most_similar(features) if self.init_from_similar else None
            if similar is not None:
                self._copy_sites(similar, task.name)
            losses = self._train(task)
        except BaseException:
            self.am.delete(task.name, collect=False)
            self.am.activate(None)
            raise
        self.am.eval()
        for p in self.am.adapter_parameters(task.name):
            p.requires_grad_(False)
        self.am.activate(None)
        self.tasks[task.name] = task
        means = self._class_means(features, task.train.labels, len(task.labels))
        centred = features - means[task.train.labels]
        self.prototypes[task.name] = means
        self.scatter[task.name] = (centred.T @ centred, len(features))
        for c in task.labels:
            self.class_owner[c] = task.name
        if self.save_dir is not None:
            self.am.save(task.name, str(self.save_dir / task.name))
        return {"task": task.name, "seconds": time.perf_counter() - start, "final_loss": losses[-1] if losses else None,
                "initialised_from": similar, "adapter_bytes": self.am.adapter(task.name).parameter_bytes()}

    def forget(self, name: str) -> None:
        """Drop a learned task's adapter from memory (and from routing); its saved file is kept."""
        if name not in self.tasks:
            raise ContinualError(f"no learned task {name!r}")
        self.am.delete(name, collect=False)
        task = self.tasks.pop(name)
        self.prototypes.pop(name)
        self.scatter.pop(name)
        for c in task.labels:
            self.class_owner.pop(c, None)

    def _train(self, task: Task) -> list[float]:
        # the frozen base stays in eval mode: a BatchNorm updating its statistics would change the
        # earlier tasks' answers
        params = self.am.train_adapter(task.name)
        step = TrainStep(params, torch.optim.AdamW(params, lr=self.lr))
        gen = torch.Generator().manual_seed(self.seed)
        losses = []
        for _ in range(self.epochs):
            for idx in batches(len(task.train), self.batch_size, gen):
                args, kwargs = self.encode(take(task.train.inputs, idx))
                labels = task.train.labels[idx]
                loss = step(lambda: F.cross_entropy(logits_of(self.am(*args, **kwargs)), labels))  # noqa: B023
                losses.append(float(loss))
        return losses

    def _copy_sites(self, source: str, target: str) -> None:
        """Start `target` from `source`'s site tensors, and from its head when the labels mean the
        same classes (domain-incremental): the new task then starts where the similar one ended."""
        with torch.no_grad():
            src = self.am.adapter_state_dict(source)
            own = self.am.adapter_state_dict(target)
            for key, tensor in own.items():
                copied = key.startswith(SITES_PREFIX) or self.scenario == "domain"
                if copied and key in src and src[key].shape == tensor.shape:
                    tensor.copy_(src[key])

    def _most_similar(self, features: torch.Tensor) -> str | None:
        if not self.prototypes:
            return None
        mean = F.normalize(features.mean(0), dim=0)
        scores = {n: float(F.normalize(p.mean(0), dim=0) @ mean) for n, p in self.prototypes.items()}  # cosine
        return max(scores, key=lambda n: scores[n])

    # --- features and prediction --------------------------------------------------------------

    @torch.no_grad()
    def features(self, inputs: Inputs) -> torch.Tensor:
        """The frozen base's features of `inputs` (no adapter active): what its head reads, or the
        `route_features` modules' outputs, pooled and concatenated."""
        names = self._feature_modules()
        seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        if self.route_features:
            hooks = [self.am.base.get_submodule(n).register_forward_hook(
                lambda m, _a, out, n=n: seen[n].append(_pooled(logits_of(out), _over_time(m)))) for n in names]
        else:
            hooks = [self.am.base.get_submodule(names[0]).register_forward_pre_hook(
                lambda _m, args: seen[names[0]].append(_pooled(args[0])))]
        previous = self.am.active
        self.am.activate(None)
        try:
            predict_logits(self.am, self.encode, inputs)
        finally:
            for h in hooks:
                h.remove()
            self.am.activate(previous)
        return torch.cat([torch.cat(seen[n]) for n in names], 1)

    def _feature_modules(self) -> list[str]:
        """The modules whose outputs are the routing features, or the head (whose input is)."""
        if self.route_features:
            return self.route_features
        if self.am.head_path is None:
            raise ContinualError("the model has no head any more: the features are what its head reads")
        return [self.am.head_path]

    @staticmethod
    def _class_means(features: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
        return torch.stack([features[labels == c].mean(0) for c in range(n)])

    def _need_tasks(self) -> list[str]:
        if not self.tasks:
            raise ContinualError("no task has been learned yet: learn(task) first")
        return list(self.tasks)

    @torch.no_grad()
    def task_logits(self, inputs: Inputs, task: str) -> torch.Tensor:
        """Logits of `task`'s adapter and head (task-incremental: the task is given)."""
        if task not in self.tasks:
            raise ContinualError(f"no learned task {task!r} (learned: {list(self.tasks)})")
        self.am.activate(task)
        try:
            return predict_logits(self.am, self.encode, inputs)
        finally:
            self.am.activate(None)

    @torch.no_grad()
    def route(self, inputs: Inputs, strategy: str = "prototype", candidates: Sequence[str] | None = None) -> list[str]:
        """The task each input belongs to, without being told. `candidates` ("entropy" and
        "perplexity" only): adapter names to choose among, default every learned task."""
        names = self._need_tasks() if candidates is None else list(candidates)
        if not names:
            raise ContinualError("no candidate adapters to route to")
        if strategy == "prototype":
            if candidates is not None:
                raise ContinualError("prototype routing uses the learned tasks' prototypes; leave candidates out")
            feats = self.features(inputs)
            keys = torch.cat([self.prototypes[n] for n in names])
            owner = torch.tensor([i for i, n in enumerate(names) for _ in range(len(self.prototypes[n]))])
            precision = self._precision()
            # (x - μ)ᵀ P (x - μ) for every input and class, without an [inputs, classes, features] tensor
            dist = ((feats @ precision) * feats).sum(1, keepdim=True) - 2 * feats @ precision @ keys.T \
                + ((keys @ precision) * keys).sum(1)
            return [names[i] for i in owner[dist.argmin(1)].tolist()]
        if strategy in ("entropy", "perplexity"):
            score = self._entropy if strategy == "entropy" else self._perplexity
            chosen: list[str] = []
            per_batch = max(1, self.batch_size * 4 // len(names))
            for idx in batches(len(inputs), per_batch):
                chosen += [names[i] for i in score(take(inputs, idx), names).argmin(1).tolist()]
            return chosen
        raise ContinualError(f"routing strategy {strategy!r}: use 'prototype', 'entropy' or 'perplexity'")

    def _precision(self) -> torch.Tensor:
        # a 0-dim zero start keeps the sum a tensor (of the scatters' own dtype: 0 + s is s)
        scatter = sum((s for s, _ in self.scatter.values()), torch.zeros(()))
        count = sum(n for _, n in self.scatter.values())
        cov = scatter / max(1, count - 1)
        ridge = self.shrinkage * cov.diagonal().mean().clamp_min(1e-12)
        return torch.linalg.inv(cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype))

    def _routed_logits(self, inputs: Inputs, names: Sequence[str]) -> tuple[torch.Tensor, dict]:
        """Every input under every adapter as one routed batch: [inputs, adapters, ...]."""
        n, k = len(inputs), len(names)
        idx = torch.arange(n).repeat_interleave(k)
        args, kwargs = self.encode(take(inputs, idx))
        self.am.eval()
        with self.am.route([names[i % k] for i in range(n * k)]):
            out = logits_of(self.am(*args, **kwargs))
        return out.view(n, k, *out.shape[1:]), kwargs

    def _entropy(self, inputs: Inputs, names: Sequence[str]) -> torch.Tensor:
        logits, _ = self._routed_logits(inputs, names)
        if logits.dim() > 3:
            raise ContinualError("entropy routing needs one prediction per input; use 'perplexity' for language models")
        scores = []
        for j, name in enumerate(names):  # heads differ in width: each adapter's own columns only
            width = len(self.tasks[name].labels) if name in self.tasks else logits.shape[-1]
            p = logits[:, j, :width].softmax(-1)
            scores.append(-(p * p.clamp_min(1e-12).log()).sum(-1))
        return torch.stack(scores, 1)

    def _perplexity(self, inputs: Inputs, names: Sequence[str]) -> torch.Tensor:
        logits, kwargs = self._routed_logits(inputs, names)
        if logits.dim() != 4 or "input_ids" not in kwargs:
            raise ContinualError("perplexity routing needs a causal language model fed input_ids")
        n, k = logits.shape[:2]
        ids = kwargs["input_ids"].view(n, k, -1)[..., 1:]
        mask = kwargs.get("attention_mask", torch.ones_like(kwargs["input_ids"])).view(n, k, -1)[..., 1:].float()
        nll = F.cross_entropy(logits[..., :-1, :].flatten(0, 2), ids.flatten(), reduction="none").view_as(mask)
        return (nll * mask).sum(-1) / mask.sum(-1).clamp_min(1)

    @torch.no_grad()
    def predict(self, inputs: Inputs, task: str | None = None, strategy: str = "prototype") -> list[str]:
        """Label names: with `task` from that task's adapter; without, each input is routed first."""
        if task is not None:
            return [self.tasks[task].labels[i] for i in self.task_logits(inputs, task).argmax(-1).tolist()]
        routes = self.route(inputs, strategy)
        out: dict[int, str] = {}
        for name in dict.fromkeys(routes):
            rows = torch.tensor([i for i, r in enumerate(routes) if r == name])
            for i, label in zip(rows.tolist(), self.predict(take(inputs, rows), task=name), strict=True):
                out[i] = label
        return [out[i] for i in range(len(inputs))]  # every input was routed, so every row has a label

    def accuracy(self, split: Split, task: Task, task_id: bool = True, strategy: str = "prototype") -> float:
        """Task-incremental (`task_id=True`) or class-incremental accuracy of the learner on a split."""
        predicted = self.predict(split.inputs, task=task.name if task_id else None, strategy=strategy)
        truth = [task.labels[i] for i in split.labels.tolist()]
        return sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)

    def routing_accuracy(self, tasks: Iterable[Task], strategy: str = "prototype") -> float:
        right = total = 0
        for task in tasks:
            routes = self.route(task.test.inputs, strategy)
            right += sum(r == task.name for r in routes)
            total += len(routes)
        return right / max(1, total)


def _over_time(module: nn.Module) -> bool:
    """Whether a module's 3-d output is [rows, channels, time] (1-d convolutions), not [rows, tokens, features]."""
    return any(isinstance(m, nn.Conv1d | nn.BatchNorm1d) for m in module.modules())


def _pooled(t: torch.Tensor, over_time: bool = False) -> torch.Tensor:
    """One feature vector per row: feature maps pooled to a 2x2 grid, 1-d convolution outputs to two
    halves of their time axis, token sequences at their first position."""
    t = t.detach().float()
    if t.dim() == 4:
        return F.adaptive_avg_pool2d(t, 2).flatten(1)
    if t.dim() == 3:
        return F.adaptive_avg_pool1d(t, 2).flatten(1) if over_time else t[:, 0]
    return t.flatten(1)
