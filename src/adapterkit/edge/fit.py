"""Plan and train one adapter on a device under a writable-memory budget.

`plan` runs one forward (no backward, no step) with the saved-tensor hooks of edge/memory.py and
says whether the setup fits; when it does not, it plans the alternatives on the same batch and
names those that fit. `fit` plans first and refuses before any step, then trains with the frozen
base in eval mode (BatchNorm statistics never move) and reports the peak measured at every step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BitFit, LiteResidual, MethodConfig
from ..heads import head_width
from ..model import AdaptedModel
from ..train.step import TrainStep
from .compress import ActivationCompressor, check_bits
from .memory import (
    OPTIMIZER_STATE,
    BudgetError,
    MemoryReport,
    Meter,
    human,
    optimizer_bytes,
    parse_budget,
    split_parameters,
    tensor_bytes,
)

Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | Sequence[torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class HasLogits(Protocol):
    """A model output object carrying its logits (e.g. transformers' ModelOutput)."""

    logits: torch.Tensor


@dataclass
class Plan:
    """One setup's writable memory against a budget, and what would fit when it does not."""

    name: str
    report: MemoryReport
    budget: int | None
    alternatives: list[tuple[str, int]] = field(default_factory=list)  # (what to change, writable bytes)

    @property
    def fits(self) -> bool:
        return self.budget is None or self.report.writable <= self.budget

    def explain(self) -> str:
        head = f"adapter {self.name!r}: {self.report.describe()}"
        if self.budget is None:
            return head
        if self.fits:
            return f"{head}; fits the budget of {human(self.budget)}"
        costly = ", ".join(f"{layer} {human(n)}" for layer, n in list(self.report.by_layer.items())[:3])
        lines = [f"{head}; over the budget of {human(self.budget)} by {human(self.report.writable - self.budget)}",
                 f"most saved for backward by: {costly or 'nothing'}"]
        if self.alternatives:
            lines.append("what would fit: " + "; ".join(f"{what} ({human(n)})" for what, n in self.alternatives))
        else:
            lines.append("nothing tried fits: not a smaller batch, fewer adapted layers or BitFit only")
        return "\n".join(lines)


def split_batch(batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if len(batch) != 2:
        raise BudgetError(f"a batch is inputs or (inputs, labels), not {len(batch)} items")
    return batch[0], batch[1]


def logits_of(output: torch.Tensor | HasLogits) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def measure_forward(model: nn.Module, batch: Batch, *, loss_fn: LossFn = F.cross_entropy,
                    optimizer: str = "adam", activation_bits: int | None = None) -> MemoryReport:
    """Writable memory of training `model` as its parameters' requires_grad say, from one forward
    (`activation_bits`: saved activations kept in that many bits, edge/compress.py)."""
    if optimizer not in OPTIMIZER_STATE:
        raise BudgetError(f"optimizer {optimizer!r}: known are {sorted(OPTIMIZER_STATE)}")
    x, y = split_batch(batch)
    trainable, flash = split_parameters(model)
    meter = Meter(model, _compressor(model, activation_bits))
    with torch.enable_grad(), meter.watching():
        out = logits_of(model(x))
        if y is not None:
            loss_fn(out, y)
    size = sum(tensor_bytes(p) for p in trainable)
    return MemoryReport(batch_size=int(x.shape[0]), saved=meter.saved_bytes, trainable=size, gradients=size,
                        optimizer=OPTIMIZER_STATE[optimizer] * size, working=meter.working, flash=flash,
                        by_layer=meter.by_layer())


def _compressor(model: nn.Module, activation_bits: int | None) -> ActivationCompressor | None:
    return ActivationCompressor(bits, model) if (bits := check_bits(activation_bits)) is not None else None


def _prepare(am: AdaptedModel, name: str) -> None:
    am.train_adapter(name)  # the frozen base in eval mode: BatchNorm statistics never move


def plan(am: AdaptedModel, name: str, example_batch: Batch, *, budget: int | str | None = None,
         loss_fn: LossFn = F.cross_entropy, optimizer: str = "adam", activation_bits: int | None = None) -> Plan:
    """Estimate adapter `name`'s writable training memory from one forward on `example_batch`
    (`activation_bits`: saved activations kept in that many bits, edge/compress.py)."""
    limit = parse_budget(budget) if budget is not None else None
    check_bits(activation_bits)
    was_training = am.training
    _prepare(am, name)
    try:
        report = measure_forward(am, example_batch, loss_fn=loss_fn, optimizer=optimizer,
                                 activation_bits=activation_bits)
        result = Plan(name, report, limit)
        if limit is not None and not result.fits:  # a plan without a limit always fits
            result.alternatives = _alternatives(am, name, example_batch, limit, loss_fn, optimizer,
                                                activation_bits)
            _prepare(am, name)
    finally:
        am.train(was_training)
    return result


def _alternatives(am: AdaptedModel, name: str, batch: Batch, limit: int, loss_fn: LossFn,
                  optimizer: str, bits: int | None) -> list[tuple[str, int]]:
    """The changes that fit `limit`, each planned on the same batch (never guessed by scaling), each at
    the largest batch size (halving) that fits."""
    found: list[tuple[str, int]] = []

    def add(what: str, writable_at: Callable[[Batch], int]) -> None:
        fitting = _largest_fitting_batch(batch, writable_at, limit)
        if fitting is not None:
            size, writable = fitting
            found.append((what if size == full_size else f"{what} at batch size {size}", writable))

    full_size = int(split_batch(batch)[0].shape[0])
    add("the same adapter", lambda b: measure_forward(am, b, loss_fn=loss_fn, optimizer=optimizer,
                                                      activation_bits=bits).writable)
    for fewer in (8, 4):  # fewer bits only where 8 would not fit the whole batch
        if bits is None or fewer < bits:
            before = len(found)

            def compressed(b: Batch, fewer: int = fewer) -> int:
                return measure_forward(am, b, loss_fn=loss_fn, optimizer=optimizer, activation_bits=fewer).writable

            add(f"the same adapter with saved activations in {fewer} bits", compressed)
            if len(found) > before and "batch size" not in found[-1][0]:
                break
    record = am.adapter(name)
    sites = list(am.site_names(name).items())
    order = {n: i for i, (n, _) in enumerate(am.base.named_modules())}
    sites.sort(key=lambda kv: order.get(kv[0], 0))
    for keep in range(len(sites) - 1, 0, -1):
        kept: dict[str, str | None] = dict(sites[-keep:])
        before = len(found)

        def with_kept(b: Batch, kept: dict[str, str | None] = kept) -> int:
            return _plan_temporary(am, record.config, record.head, b, loss_fn, optimizer, bits, sites=kept)

        add(f"adapt only the last {keep} of {len(sites)} layers ({', '.join(kept)})", with_kept)
        if len(found) > before and "batch size" not in found[-1][0]:
            break
    if not isinstance(record.config, BitFit):
        add("BitFit only", lambda b: _plan_temporary(am, BitFit(), record.head, b, loss_fn, optimizer, bits))
    lite = LiteResidual()
    if not isinstance(record.config, LiteResidual):
        add(f"a lite residual branch ({lite})",
            lambda b: _plan_temporary(am, lite, record.head, b, loss_fn, optimizer, bits))
    return found


def _largest_fitting_batch(batch: Batch, writable_at: Callable[[Batch], int], limit: int) -> tuple[int, int] | None:
    x, y = split_batch(batch)
    size = int(x.shape[0])
    while size >= 1:
        part = (x[:size], y[:size]) if y is not None else x[:size]
        writable = writable_at(part)
        if writable <= limit:
            return size, writable
        size //= 2
    return None


def _plan_temporary(am: AdaptedModel, config: MethodConfig, head: nn.Module | None, batch: Batch,
                    loss_fn: LossFn, optimizer: str, bits: int | None,
                    sites: dict[str, str | None] | None = None) -> int:
    temp = "_edge_plan_alternative"
    num_labels = head_width(head) if head is not None else None
    try:
        am.add(temp, config, num_labels=num_labels, sites=sites)
    except Exception:  # a method that cannot sit on this model is not an alternative
        return 1 << 62
    try:
        _prepare(am, temp)
        return measure_forward(am, batch, loss_fn=loss_fn, optimizer=optimizer, activation_bits=bits).writable
    finally:
        am.delete(temp, collect=False)


@dataclass
class FitReport:
    """What `fit` did: the plan it checked, the peak it measured and the loss per epoch."""

    plan: Plan
    peak: MemoryReport
    losses: list[float]
    steps: int
    seconds: float

    def as_dict(self) -> dict:
        return {"planned": self.plan.report.as_dict(), "peak": self.peak.as_dict(), "losses": self.losses,
                "steps": self.steps, "seconds": self.seconds, "budget": self.plan.budget}


def make_optimizer(params: list[nn.Parameter], optimizer: str, lr: float) -> torch.optim.Optimizer:
    if optimizer in ("adam", "adamw"):
        return (torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam)(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9 if optimizer == "sgd_momentum" else 0.0)


def train_steps(model: nn.Module, params: list[nn.Parameter], loader: Iterable[Batch], *, epochs: int,
                lr: float, optimizer: str, loss_fn: LossFn, measure: bool = True,
                prepare: Callable[[], object] = lambda: None, limit: int | None = None,
                activation_bits: int | None = None) -> tuple[MemoryReport | None, list[float], int]:
    """The training loop every edge setup shares; the peak writable memory of any step when `measure`.
    A step measured over `limit` stops training with a BudgetError (the steps before it are kept).
    `activation_bits`: saved activations kept in that many bits (edge/compress.py)."""
    opt = make_optimizer(params, optimizer, lr)
    compressor = _compressor(model, activation_bits)
    grads = 0

    def count_gradients() -> None:
        nonlocal grads
        grads = sum(tensor_bytes(p.grad) for p in params if p.grad is not None)

    step_once = TrainStep(params, opt, before_step=[count_gradients])
    _, flash = split_parameters(model)
    size = sum(tensor_bytes(p) for p in params)
    peak: MemoryReport | None = None
    losses, steps = [], 0
    for _ in range(epochs):
        prepare()
        total, count = 0.0, 0
        for batch in loader:
            x, y = split_batch(batch)
            if y is None:
                raise BudgetError("training needs batches of (inputs, labels), not inputs alone")
            meter = Meter(model, compressor)

            def forward(x: torch.Tensor = x, y: torch.Tensor = y, meter: Meter = meter) -> torch.Tensor:
                quiet = compressor.active() if compressor is not None else contextlib.nullcontext()
                with meter.watching() if measure else quiet:
                    return loss_fn(logits_of(model(x)), y)

            loss = step_once(forward)
            steps += 1
            total, count = total + float(loss.detach()) * len(y), count + len(y)
            if measure:
                step = MemoryReport(int(x.shape[0]), meter.saved_bytes, size, grads, optimizer_bytes(opt),
                                    meter.working, flash, meter.by_layer(), measured=True)
                if peak is None or step.writable > peak.writable:
                    peak = step
                if limit is not None and step.writable > limit:
                    raise BudgetError(f"step {steps} measured {step.describe()}, over the budget of {human(limit)}; "
                                      f"this batch has {x.shape[0]} rows; was it larger than the planned one?")
        losses.append(total / max(count, 1))
    return peak, losses, steps


def fit(am: AdaptedModel, name: str, loader: Iterable[Batch], *, budget: int | str | None = None,
        epochs: int = 1, lr: float = 1e-3, optimizer: str = "adam", loss_fn: LossFn = F.cross_entropy,
        measure: bool = True, activation_bits: int | None = None) -> FitReport:
    """Train adapter `name` within `budget` of writable memory; refuse before any step if it cannot fit.
    `activation_bits` (8, 4, 2 or 1): keep what backward reads in that many bits (edge/compress.py)."""
    first = next(iter(loader), None)
    if first is None:
        raise BudgetError(f"adapter {name!r}: the loader yields no batches")
    checked = plan(am, name, first, budget=budget, loss_fn=loss_fn, optimizer=optimizer,
                   activation_bits=activation_bits)
    if not checked.fits:
        raise BudgetError(checked.explain())
    start = time.perf_counter()
    params = am.train_adapter(name)
    try:
        peak, losses, steps = train_steps(am, params, loader, epochs=epochs, lr=lr, optimizer=optimizer,
                                          loss_fn=loss_fn, measure=measure, prepare=lambda: _prepare(am, name),
                                          limit=checked.budget, activation_bits=activation_bits)
    finally:
        am.eval()
    return FitReport(checked, peak or checked.report, losses, steps, time.perf_counter() - start)
