"""The training loop: Accelerate underneath, optimizer state only for what trains, resumable.

A run is deterministic for a seed: each epoch's order comes from `seed + epoch`, and a checkpoint
holds the trained tensors, the optimizer state and the RNG states at a step boundary. A run that
is killed and started again from its checkpoint therefore ends with the same adapter.
"""

from __future__ import annotations

import json
import random
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import Dataset
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import get_linear_schedule_with_warmup

from ..hf_names import checkpointed_layers, enable_activation_checkpointing
from ..io.storage import atomic_folder
from ..task import Task
from .data import make_loader
from .metrics import accuracy, macro_f1
from .step import TrainStep, kept_modes, modes, set_modes


@dataclass
class TrainSettings:
    epochs: int = 3
    lr: float | None = None  # None: a job's per-method default (job.default_lr); a bare Trainer: 1e-3
    batch_size: int = 32
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    grad_accum: int = 1
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16", passed to Accelerate
    max_grad_norm: float | None = 1.0  # gradients clipped to this L2 norm; None: no clipping
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 50
    max_steps: int | None = None
    progress: bool = True


@dataclass
class History:
    train_step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_epoch: list[int] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)


class TrainingInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM: the last finished step is checkpointed, the run can resume."""


class Trainer:
    """Train the parameters of `model` that require grad (set them up first, e.g. `am.train_adapter`).

    Every module trains in the mode it has when the Trainer is made (`am.train_adapter` leaves the
    frozen base in eval mode and the adapter in train mode); evaluation switches to eval and back."""

    def __init__(
        self, model: nn.Module, train_data: Dataset, eval_data: Dataset | None, collate: Callable,
        settings: TrainSettings, task: str | Task = Task.CLASSIFY, checkpoint_dir: str | Path | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        task = Task.parse(task)
        if task not in (Task.CLASSIFY, Task.CAUSAL_LM):
            raise ValueError(f"task must be classify or causal-lm, not {task!r}")
        if len(train_data) == 0:
            raise ValueError("the training split is empty")
        self.model, self.train_data, self.eval_data = model, train_data, eval_data
        self.collate, self.s, self.task, self.on_step = collate, settings, task, on_step
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise ValueError("nothing to train: no parameter requires grad (call am.train_adapter(name) first)")
        self.accelerator = Accelerator(mixed_precision=settings.mixed_precision,
                                       gradient_accumulation_steps=settings.grad_accum)
        set_seed(settings.seed)
        base = getattr(model, "base", model)
        if settings.gradient_checkpointing:
            enable_activation_checkpointing(base)
            for layer in checkpointed_layers(base):  # they recompute only when their own flag is on
                layer.training = True
        self.training_modes = modes(model)
        self.optimizer = torch.optim.AdamW(self.trainable.values(), lr=1e-3 if settings.lr is None else settings.lr, weight_decay=settings.weight_decay)
        # with several processes each takes every n-th batch of the epoch
        batches = -(-len(train_data) // settings.batch_size)
        per_process = -(-batches // self.accelerator.num_processes)
        steps_per_epoch = max(1, per_process // settings.grad_accum)
        self.total_steps = steps_per_epoch * settings.epochs
        if settings.max_steps is not None:
            self.total_steps = min(self.total_steps, settings.max_steps)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, int(settings.warmup_ratio * self.total_steps), max(1, self.total_steps)
        )
        if self.accelerator.num_processes > 1:
            # Data parallel: DDP would broadcast the whole frozen base when it wraps the model and its
            # buffers before every forward; only the trained tensors must agree, so only they are synced
            # (and only their gradients are all-reduced, as DDP does for parameters that train).
            frozen = [n for n, _ in [*model.named_parameters(), *model.named_buffers()] if n not in self.trainable]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.train_step = TrainStep(list(self.trainable.values()), self.optimizer,
                                    max_grad_norm=settings.max_grad_norm, accelerator=self.accelerator)
        self.history = History()
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best_score: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self._stop_requested = False

    # --- the loop ----------------------------------------------------------------------------

    def fit(self, resume: bool = True) -> History:
        if resume and self.checkpoint_dir and (self.checkpoint_dir / "state.json").exists():
            self._restore()
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self._request_stop)
        try:
            with self._progress() as progress:
                task = progress.add_task("train", total=self.total_steps, completed=self.step, loss=float("nan"), rate=0.0)
                while self.step < self.total_steps and self.epoch < self.s.epochs:
                    self._run_epoch(progress, task)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.best_state is not None:
            self._load_trainable(self.best_state)
        return self.history

    def _run_epoch(self, progress: Progress, task: Any) -> None:
        set_modes(self.training_modes)
        loader = make_loader(self.train_data, self.collate, self.s.batch_size, shuffle=True, seed=self.s.seed + self.epoch)
        loader = self.accelerator.skip_first_batches(self.accelerator.prepare(loader), self.batch_in_epoch)
        epoch_started, rows_seen = time.perf_counter(), 0
        try:
            for batch in loader:
                started = time.perf_counter()
                with self.accelerator.accumulate(self.model):
                    loss = self.train_step(lambda: self.loss(batch))  # noqa: B023 (called at once)
                self.batch_in_epoch += 1
                if self.accelerator.sync_gradients:
                    self.scheduler.step()
                    self.step += 1
                    seconds = time.perf_counter() - started
                    self.history.train_step.append(self.step)
                    self.history.train_loss.append(float(loss.detach()))
                    self.history.step_seconds.append(seconds)
                    rows_seen += next(iter(batch.values())).shape[0]
                    rate = rows_seen / max(time.perf_counter() - epoch_started, 1e-9)
                    progress.update(task, advance=1, loss=float(loss.detach()), rate=rate)
                    if self.on_step is not None:
                        self.on_step(self.step)
                    if self.step >= self.total_steps:
                        break
                    if self._stop_requested:
                        if self.checkpoint_dir is None:
                            raise TrainingInterrupted(f"stopped at step {self.step}; no checkpoint folder, nothing saved")
                        self.save_checkpoint()
                        raise TrainingInterrupted(f"stopped at step {self.step}; run again to resume")
                    if self.checkpoint_dir and self.step % self.s.checkpoint_every == 0:
                        self.save_checkpoint()
        finally:
            # a loop left early (max steps, Ctrl-C) never reaches the loader's own `end()`; older
            # accelerate then keeps it as the active loader and later runs sync on every micro-batch
            if loader in self.accelerator.gradient_state.dataloader_references:
                loader.end()
        self.epoch += 1
        self.batch_in_epoch = 0
        self._end_of_epoch()

    def _end_of_epoch(self) -> None:
        if self.eval_data is not None and len(self.eval_data):
            result = self.evaluate(self.eval_data)
            self.history.val_epoch.append(self.epoch)
            self.history.val_loss.append(result["loss"])
            score = result.get("accuracy", -result["loss"])
            if "accuracy" in result:
                self.history.val_accuracy.append(result["accuracy"])
            if self.best_score is None or score > self.best_score:
                self.best_score = score
                self.best_state = {n: p.detach().clone() for n, p in self.trainable.items()}
        if self.checkpoint_dir:
            self.save_checkpoint()

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.task == Task.CAUSAL_LM:
            return self.model(**batch).loss
        batch = dict(batch)
        labels = batch.pop("labels")
        # The adapter's head may have another label count than the base config, so the loss is ours.
        return F.cross_entropy(self.model(**batch).logits, labels)

    @torch.no_grad()
    def evaluate(self, data: Dataset, batch_size: int | None = None) -> dict[str, Any]:
        with kept_modes(self.model):
            self.model.eval()
            return self._evaluate(data, batch_size)

    def _evaluate(self, data: Dataset, batch_size: int | None) -> dict[str, Any]:
        losses, predictions, truths = [], [], []
        for batch in make_loader(data, self.collate, batch_size or self.s.batch_size):
            batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
            if self.task == Task.CAUSAL_LM:
                losses.append(float(self.model(**batch).loss))
                continue
            labels = batch.pop("labels")
            logits = self.model(**batch).logits
            losses.append(float(F.cross_entropy(logits, labels)))
            predictions.extend(logits.argmax(-1).tolist())
            truths.extend(labels.tolist())
        result: dict[str, Any] = {"loss": float(np.mean(losses)) if losses else float("nan")}
        if self.task == "classify" and truths:
            num_labels = logits.shape[-1]
            result.update(accuracy=accuracy(truths, predictions),
                          macro_f1=macro_f1(truths, predictions, labels=range(num_labels)),
                          predictions=predictions, truths=truths)
        else:
            result["perplexity"] = float(np.exp(min(result["loss"], 50)))
        return result

    # --- checkpoints -------------------------------------------------------------------------

    def _request_stop(self, signum: int, frame: Any) -> None:
        if self._stop_requested:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self._stop_requested = True

    def _checkpoint_folder(self) -> Path:
        if self.checkpoint_dir is None:
            raise ValueError("this Trainer was made without a checkpoint_dir: there is no checkpoint to save or load")
        return self.checkpoint_dir

    def save_checkpoint(self) -> None:
        """Trained tensors, optimizer state and RNG states at a step boundary, written atomically (by
        the main process of a data-parallel run: the others hold the same tensors)."""
        folder = self._checkpoint_folder()
        if not self.accelerator.is_main_process:
            return
        tensors = {f"param.{n}": p.detach().contiguous().cpu() for n, p in self.trainable.items()}
        if self.best_state is not None:
            tensors.update({f"best.{n}": t.contiguous().cpu() for n, t in self.best_state.items()})
        opt = self.optimizer.state_dict()
        for idx, state in opt["state"].items():
            for key, value in state.items():
                tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value).contiguous().cpu()
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "best_score": self.best_score, "history": asdict(self.history),
            "param_groups": opt["param_groups"], "python_rng": _jsonable(random.getstate()),
            "numpy_rng": _jsonable(np.random.get_state()), "settings": asdict(self.s),
        }
        atomic_folder(folder, {"state.safetensors": save(tensors), "state.json": json.dumps(meta).encode()})

    def _restore(self) -> None:
        folder = self._checkpoint_folder()
        meta = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "state.safetensors"))
        self._load_trainable({n[len("param."):]: t for n, t in tensors.items() if n.startswith("param.")})
        best = {n[len("best."):]: t for n, t in tensors.items() if n.startswith("best.")}
        self.best_state = best or None
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.step, self.epoch, self.batch_in_epoch = meta["step"], meta["epoch"], meta["batch_in_epoch"]
        self.best_score = meta["best_score"]
        self.history = History(**meta["history"])
        with warnings.catch_warnings():  # replaying the schedule before any optimizer step is intended
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(self.step):
                self.scheduler.step()
        torch.set_rng_state(tensors["rng.torch"])
        random.setstate(_tuples(meta["python_rng"]))
        # numpy's legacy state: (name, keys as uint32, pos, has_gauss, cached_gaussian)
        name, keys, pos, has_gauss, cached_gaussian = meta["numpy_rng"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))

    @torch.no_grad()
    def _load_trainable(self, values: dict[str, torch.Tensor]) -> None:
        for name, param in self.trainable.items():
            param.copy_(values[name].to(param.dtype))

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.0f} ex/s"),
            TimeRemainingColumn(), disable=not self.s.progress, transient=False,
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
