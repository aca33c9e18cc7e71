"""One training step for every loop in adapterkit, and the one rule for train and eval modes.

    loss = forward() + Σ extra()          (extra: FedProx's proximal term, EWC's penalty, ...)
    loss.backward();  clip ‖∇θ‖₂ ≤ max_grad_norm;  before_step();  optimizer.step();  after()
    (before_step: edge.fit's gradient bytes; after: SCAFFOLD's correction of the parameters)

`train_adapter` (model.py) puts the frozen base in eval mode and the trained modules in train mode;
loops keep the modes they were handed (`kept_modes`) instead of calling `model.train()`, which would
let a frozen BatchNorm update its statistics and switch the base's dropout on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

MAX_GRAD_NORM = 1.0  # every loop's default: Learner's, edge.fit's and the baselines' clip, now shared


class TrainStep:
    """Forward, extra loss terms, backward, gradient clipping and the optimizer step, in that order.

    With an Accelerate `accelerator`, backward and clipping go through it and the clip and the
    hooks run only on the step where accumulated gradients are applied."""

    def __init__(self, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer, *,
                 max_grad_norm: float | None = MAX_GRAD_NORM,
                 extra: Sequence[Callable[[], torch.Tensor]] = (),
                 before_step: Sequence[Callable[[], None]] = (),
                 after: Sequence[Callable[[], None]] = (),
                 accelerator: Any = None) -> None:
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None (no clipping), not {max_grad_norm}")
        self.params, self.optimizer = list(params), optimizer
        self.max_grad_norm, self.extra = max_grad_norm, list(extra)
        self.before_step, self.after = list(before_step), list(after)
        self.accelerator = accelerator

    def __call__(self, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run one step; `forward()` returns the task loss. Returns the total loss, detached."""
        loss = forward()
        for term in self.extra:
            loss = loss + term()
        applied = self.accelerator is None or self.accelerator.sync_gradients
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)
        if applied and self.max_grad_norm is not None:
            if self.accelerator is None:
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            else:
                self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
        if applied:
            for hook in self.before_step:
                hook()
        # an accelerated optimizer skips its step (and zero_grad) while gradients accumulate
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if applied:
            for hook in self.after:
                hook()
        return loss.detach()


def modes(model: nn.Module) -> dict[nn.Module, bool]:
    """Each submodule's train/eval mode, to be put back with `set_modes`."""
    return {module: module.training for module in model.modules()}


def set_modes(saved: dict[nn.Module, bool]) -> None:
    for module, training in saved.items():
        module.training = training


@contextlib.contextmanager
def kept_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's mode on exit (an evaluation inside a training loop)."""
    saved = modes(model)
    try:
        yield
    finally:
        set_modes(saved)
