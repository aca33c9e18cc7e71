"""One continual-learning run on a stream: per-task adapters and the baselines on the same base.

What `adapterkit continual run` and bench/continual.py call. Each method's accuracy matrix R, its
summary (continual/metrics.py) and, for the adapters, task-free accuracy and routing accuracy per
strategy; heat maps of R when `plots` is a folder.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import LoRA, MethodConfig
from ..model import adapt
from .baselines import SharedLearner
from .data import ContinualError, TaskStream, split_mnist
from .learner import Learner
from .metrics import plot_matrix, summarize
from .vision import DigitNet, pretrained_digitnet

BASELINES = ("naive", "ewc", "replay", "joint", "naive_full")


def weighted(accs: dict[str, float], stream: TaskStream) -> float:
    total = sum(len(t.test) for t in stream)
    return sum(accs[t.name] * len(t.test) for t in stream) / total


def run_adapters(make_base, stream, method, settings, route_features) -> dict:
    am = adapt(make_base(), head="head")
    learner = Learner(am, method, route_features=route_features, **settings)
    matrix = []
    start = time.perf_counter()
    first, first_logits = stream[0], None
    for i, task in enumerate(stream):
        learner.learn(task)
        matrix.append([learner.accuracy(t.test, t) if j <= i else None for j, t in enumerate(stream)])
        if i == 0:
            first_logits = learner.task_logits(first.test.inputs, first.name)
    # bit for bit: the first task's logits after the whole stream equal those right after it was learned
    identical = bool(torch.equal(first_logits, learner.task_logits(first.test.inputs, first.name)))
    out = {"matrix": matrix, **summarize(matrix), "seconds": time.perf_counter() - start,
           "first_task_logits_identical": identical}
    for strategy in ("prototype", "entropy"):
        accs = {t.name: learner.accuracy(t.test, t, task_id=False, strategy=strategy) for t in stream}
        out[f"task_free_{strategy}"] = {"accuracy": weighted(accs, stream),
                                        "routing_accuracy": learner.routing_accuracy(stream, strategy)}
    return out


def run_shared(make_base, stream, method, kind, settings, **extra) -> dict:
    learner = SharedLearner(make_base, stream, method, kind=kind, head="head", **settings, **extra)
    start = time.perf_counter()
    if kind == "joint":
        learner.learn_jointly()
        task_id = {t.name: learner.accuracy(t) for t in stream}
        return {"accuracy": weighted(task_id, stream), "per_task": task_id, "seconds": time.perf_counter() - start,
                "class_incremental_accuracy": weighted({t.name: learner.accuracy(t, task_id=False) for t in stream}, stream)}
    matrix, class_inc = [], []
    for i, task in enumerate(stream):
        learner.learn(task)
        matrix.append([learner.accuracy(t) for t in stream])
        class_inc.append([learner.accuracy(t, task_id=False) if j <= i else None for j, t in enumerate(stream)])
    untrained = [1.0 / len(t.labels) for t in stream]  # chance: the head had never seen the task
    return {"matrix": matrix, **summarize(matrix, untrained), "seconds": time.perf_counter() - start,
            "class_incremental": summarize(class_inc)}


def vision_setup(quick: bool = False) -> tuple[Callable[[], nn.Module], TaskStream, MethodConfig, list[str]]:
    """Split-MNIST on a DigitNet pre-trained on scikit-learn's digits; LoRA on conv2 and conv3."""
    torch.manual_seed(0)
    base = pretrained_digitnet(epochs=3 if quick else 8)
    state = {k: v.clone() for k, v in base.state_dict().items()}

    def make_base() -> nn.Module:
        model = DigitNet()
        model.load_state_dict(state)
        return model.eval()

    stream = split_mnist(per_task=200 if quick else None)
    return make_base, stream, LoRA(r=8, targets=["conv2", "conv3"]), ["act2", "act3"]


STREAMS = {"split-mnist": vision_setup}


def run_stream(stream: str = "split-mnist", *, quick: bool = False, epochs: int | None = None,
               baselines: tuple[str, ...] = BASELINES, plots: str | Path | None = None,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    if stream not in STREAMS:
        raise ContinualError(f"unknown stream {stream!r}; known: {sorted(STREAMS)}")
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise ContinualError(f"unknown baselines {unknown}; known: {list(BASELINES)}")
    log = log or (lambda line: print(line, file=sys.stderr))
    make_base, tasks, method, route_features = STREAMS[stream](quick)
    settings = {"epochs": epochs or (2 if quick else 5), "lr": 3e-3, "batch_size": 32, "seed": 0}
    results: dict[str, Any] = {"stream": stream, "tasks": [t.name for t in tasks],
                               "train_examples": sum(len(t.train) for t in tasks)}
    results["adapters"] = run_adapters(make_base, tasks, method, settings, route_features)
    log(f"adapters: {json.dumps({k: results['adapters'][k] for k in ('average_accuracy', 'bwt')})}")
    extras = {"ewc": {"ewc_lambda": 1000.0}, "replay": {"buffer_size": 200}}
    for kind in baselines:
        if kind == "naive_full":
            results[kind] = run_shared(make_base, tasks, None, "naive", {**settings, "lr": 1e-3})
        else:
            results[kind] = run_shared(make_base, tasks, method, kind, settings, **extras.get(kind, {}))
        shown = {k: v for k, v in results[kind].items() if k in ("average_accuracy", "accuracy", "bwt")}
        log(f"{kind}: {json.dumps(shown)}")
    if plots is not None:
        for name in ("adapters", *[k for k in baselines if k != "joint"]):
            plot_matrix(results[name]["matrix"], results["tasks"], Path(plots) / f"continual_{stream}_{name}.png",
                        title=f"{stream}, {name}: accuracy after each task (task id given)")
    return results
