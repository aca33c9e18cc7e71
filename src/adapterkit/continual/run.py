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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import LoRA, MethodConfig
from ..model import adapt
from .baselines import SharedLearner
from .data import ContinualError, Encoder, Split, Task, TaskStream, split_mnist, tensor_encoder, text_encoder
from .learner import Learner
from .metrics import plot_matrix, summarize
from .vision import DigitNet, pretrained_digitnet

if TYPE_CHECKING:
    from ..edge.vibration import Machine

BASELINES = ("naive", "ewc", "replay", "joint", "naive_full")


def weighted(accs: dict[str, float], stream: TaskStream) -> float:
    total = sum(len(t.test) for t in stream)
    return sum(accs[t.name] * len(t.test) for t in stream) / total


@dataclass
class StreamSetup:
    """A stream, the frozen base it runs on (a fresh copy per method) and how each method trains."""

    make_base: Callable[[], nn.Module]
    stream: TaskStream
    method: MethodConfig
    head: str
    encode: Encoder
    route_features: list[str] | None
    settings: dict[str, Any]  # epochs, lr, batch_size, seed
    full_lr: float  # naive full fine-tuning
    learner_options: dict[str, Any] = field(default_factory=dict)  # the adapters' Learner only


def run_adapters(setup: StreamSetup) -> dict:
    stream = setup.stream
    am = adapt(setup.make_base(), head=setup.head)
    learner = Learner(am, setup.method, encode=setup.encode, route_features=setup.route_features, **setup.settings,
                      scenario=stream.scenario, **setup.learner_options)
    matrix = []
    start = time.perf_counter()
    first, first_logits = stream[0], None
    for i, task in enumerate(stream):
        learner.learn(task)
        matrix.append([learner.accuracy(t.test, t) if j <= i else None for j, t in enumerate(stream)])
        if i == 0:
            first_logits = learner.task_logits(first.test.inputs, first.name)
    if first_logits is None:
        raise ContinualError(f"stream {stream.name!r} has no tasks")
    # bit for bit: the first task's logits after the whole stream equal those right after it was learned
    identical = bool(torch.equal(first_logits, learner.task_logits(first.test.inputs, first.name)))
    out = {"matrix": matrix, **summarize(matrix), "seconds": time.perf_counter() - start,
           "first_task_logits_identical": identical}
    for strategy in ("prototype", "entropy"):
        accs = {t.name: learner.accuracy(t.test, t, task_id=False, strategy=strategy) for t in stream}
        out[f"task_free_{strategy}"] = {"accuracy": weighted(accs, stream),
                                        "routing_accuracy": learner.routing_accuracy(stream, strategy)}
    return out


def run_shared(setup: StreamSetup, kind: str, full: bool = False, **extra: Any) -> dict:
    stream = setup.stream
    settings = {**setup.settings, "lr": setup.full_lr} if full else setup.settings
    learner = SharedLearner(setup.make_base, stream, None if full else setup.method, kind=kind, head=setup.head,
                            encode=setup.encode, **settings, **extra)
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


def vision_setup(quick: bool = False) -> StreamSetup:
    """Split-MNIST on a DigitNet pre-trained on scikit-learn's digits; LoRA on conv2 and conv3."""
    torch.manual_seed(0)
    base = pretrained_digitnet(epochs=3 if quick else 8)
    state = {k: v.clone() for k, v in base.state_dict().items()}

    def make_base() -> nn.Module:
        model = DigitNet()
        model.load_state_dict(state)
        return model.eval()

    return StreamSetup(make_base, split_mnist(per_task=200 if quick else None), LoRA(r=8, targets=["conv2", "conv3"]),
                       "head", tensor_encoder, ["act2", "act3"],
                       {"epochs": 2 if quick else 5, "lr": 3e-3, "batch_size": 32, "seed": 0}, full_lr=1e-3)


def text_setup(quick: bool = False) -> StreamSetup:
    """Four text domains (continual/text.py) on the bundled all-MiniLM-L6-v2; LoRA on query and value."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    from ..train.job import default_base
    from .text import text_stream

    path = default_base()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def make_base() -> nn.Module:
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # the new classifier's "newly initialized" warning, once per method
        try:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
        finally:
            logging.set_verbosity(verbosity)

    stream = text_stream(per_class=30 if quick else 100, test_per_class=20 if quick else 50)
    return StreamSetup(make_base, stream, LoRA(r=8, targets=["query", "value"]), "classifier",
                       text_encoder(tokenizer, 64), None,
                       {"epochs": 1 if quick else 5, "lr": 2e-3, "batch_size": 32, "seed": 0}, full_lr=5e-5)


def drifting_machine(month: int) -> Machine:
    """The site's machine `month` months on: its mounting loosens (resonances fall, ring longer) and
    the surroundings get noisier. Month 0 is the lab."""
    from ..edge.vibration import Machine

    return Machine(speed_hz=(24, 36), resonances_hz=tuple(f * (1 - 0.07 * month) for f in (3_000.0, 4_500.0, 5_400.0)),
                   damping=0.05 + 0.012 * month, noise=0.15 + 0.06 * month, mount_gain_db=(0, -4, -8 - month))


def sensor_stream(per_class: int = 40, test_per_class: int = 40, months: int = 4, seed: int = 0) -> TaskStream:
    """A vibration sensor over time (continual/edge's bearing generator): each month is a task with
    the same four conditions, heard through the machine as it is then. Domain-incremental: the
    labels are the conditions in every month (a user asks what the bearing has, not which month
    it is); routing accuracy still says how often the month was told apart."""
    import numpy as np

    from ..edge.vibration import CLASSES, bearing_set

    rng = np.random.default_rng(seed + 1)
    tasks = []
    for month in range(1, months + 1):
        machine = drifting_machine(month)
        x, y = bearing_set(machine, per_class, rng)
        xe, ye = bearing_set(machine, test_per_class, rng)
        tasks.append(Task(f"month-{month}", list(CLASSES), Split(x, y), Split(xe, ye)))
    return TaskStream(tasks, name="sensor", scenario="domain")


def sensor_setup(quick: bool = False) -> StreamSetup:
    """A 1-D CNN pre-trained on lab bearings, then a site's machine drifting month by month; LoRA on
    every convolution."""
    import numpy as np

    from ..edge.backbones import cnn1d
    from ..edge.recipe import pretrain
    from ..edge.vibration import CLASSES, LAB, bearing_set

    rng = np.random.default_rng(0)
    xs, ys = bearing_set(LAB, 60 if quick else 250, rng)
    base = pretrain(lambda: cnn1d(len(CLASSES)), xs, ys, epochs=5 if quick else 15, lr=3e-3, seed=0)
    state = {k: v.clone() for k, v in base.state_dict().items()}

    def make_base() -> nn.Module:
        model = cnn1d(len(CLASSES))
        model.load_state_dict(state)
        return model.eval()

    stream = sensor_stream(per_class=15 if quick else 40, test_per_class=15 if quick else 40)
    return StreamSetup(make_base, stream, LoRA(r=4, alpha=8, targets=["Conv1d"]), "classifier", tensor_encoder,
                       ["blocks.0", "blocks.1", "blocks.2", "blocks.3"],
                       {"epochs": 3 if quick else 15, "lr": 3e-3, "batch_size": 16, "seed": 0}, full_lr=1e-3,
                       # a drifting machine: each month starts from the adapter of the month most like it
                       learner_options={"init_from_similar": True})


STREAMS: dict[str, Callable[[bool], StreamSetup]] = {"split-mnist": vision_setup, "text": text_setup,
                                                     "sensor": sensor_setup}


def run_stream(stream: str = "split-mnist", *, quick: bool = False, epochs: int | None = None,
               baselines: tuple[str, ...] = BASELINES, plots: str | Path | None = None,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    if stream not in STREAMS:
        raise ContinualError(f"unknown stream {stream!r}; known: {sorted(STREAMS)}")
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise ContinualError(f"unknown baselines {unknown}; known: {list(BASELINES)}")
    log = log or (lambda line: print(line, file=sys.stderr))
    setup = STREAMS[stream](quick)
    if epochs is not None:
        setup.settings["epochs"] = epochs
    tasks = setup.stream
    results: dict[str, Any] = {"stream": stream, "tasks": [t.name for t in tasks],
                               "train_examples": sum(len(t.train) for t in tasks)}
    results["adapters"] = run_adapters(setup)
    log(f"adapters: {json.dumps({k: results['adapters'][k] for k in ('average_accuracy', 'bwt')})}")
    extras: dict[str, dict[str, Any]] = {"ewc": {"ewc_lambda": 1000.0}, "replay": {"buffer_size": 200}}
    for kind in baselines:
        if kind == "naive_full":
            results[kind] = run_shared(setup, "naive", full=True)
        else:
            results[kind] = run_shared(setup, kind, **extras.get(kind, {}))
        shown = {k: v for k, v in results[kind].items() if k in ("average_accuracy", "accuracy", "bwt")}
        log(f"{kind}: {json.dumps(shown)}")
    if plots is not None:
        for name in ("adapters", *[k for k in baselines if k != "joint"]):
            plot_matrix(results[name]["matrix"], results["tasks"], Path(plots) / f"continual_{stream}_{name}.png",
                        title=f"{stream}, {name}: accuracy after each task (task id given)")
    return results
