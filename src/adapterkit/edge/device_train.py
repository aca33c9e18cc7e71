"""Training on the device: an ExecuTorch program that runs forward, cross-entropy and backward for one
adapter's parameters (and its head), and a trainer that runs it in ExecuTorch's runtime.

    info = edge.export_training(am, "user7", "out/", example=x)   # out/train-user7.pte
    trainer = edge.DeviceTrainer("out/train-user7.pte", lr=0.05, momentum=0.9)
    trainer.fit(loader, epochs=5)              # every step in the runtime: forward_backward, then SGD
    trainer.load_into(am, "user7")             # the trained tensors back in the adapter (am.save, am.load)

The program is ExecuTorch's joint forward-backward graph (`torch.export` with
`_export_forward_backward`): it returns the loss, the gradients of the trainable parameters and the
parameters themselves. The frozen weights are constant data in the program; the trainable ones are
the only tensors the optimizer updates in place. SGD with momentum is ExecuTorch's runtime optimizer
(`get_sgd_optimizer`), the one a device links. The batch size is fixed when the program is written
(ExecuTorch plans every buffer ahead): the trainer drops a last, smaller batch.

Its memory is read from the program, not estimated: ExecuTorch's memory planning sizes one arena for
everything the method keeps at once (activations saved for backward, gradients, scratch), and the
constant data (frozen weights, the program) is what goes to flash. `full=True` writes the full
fine-tuning program of the same model, so that the two arenas can be compared.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..model import AdaptedModel
from ..train.step import MAX_GRAD_NORM
from .export import ExportError, head_output
from .fit import Batch, logits_of, split_batch
from .lean import unlean
from .memory import human, parse_budget
from .slim_joint import slim_joint


@dataclass
class TrainingProgramInfo:
    """What export_training wrote and what the program needs on the device."""

    file: str
    batch: int
    input_shape: list[int]
    classes: int
    #: the trainable parameters, by the adapter's own names, and their element counts
    parameters: dict[str, int]
    #: ExecuTorch's planned memory for the training method (activations kept for backward, gradients,
    #: scratch): the device's RAM for one step, beside the trainable parameters themselves
    arena_bytes: int
    trainable_bytes: int
    #: the program file: frozen weights as constant data, plus the instructions (flash)
    flash_bytes: int
    full: bool = False


class _WithLoss(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_of(self.model(x)), y)


def export_training(am: AdaptedModel, name: str, out: str | Path, *, example: torch.Tensor,
                    full: bool = False, budget: int | str | None = None,
                    activation_bits: int | None = None) -> TrainingProgramInfo:
    """Write `train-<name>.pte` (or `train-full.pte` with `full`: every weight of the base and the
    adapter's head trainable) for batches shaped like `example`; returns what was written.

    Refused, with nothing written: a program that needs an operator ExecuTorch's runtime has no kernel
    for (the operator and the module it trains through are named), and one whose planned arena plus its
    trainable parameters exceed `budget` (both numbers).

    `activation_bits=8`: what a trainable convolution keeps for its weight's gradient is kept as bytes
    in the program (edge/slim_joint.py); gradients then differ from PyTorch's by that rounding."""
    if activation_bits not in (None, 8):
        raise ExportError(f"activation bits {activation_bits!r}: a device program keeps saved activations in 8 bits "
                          "(or in full, None); fewer bits are for PyTorch training (edge.fit)")
    limit = parse_budget(budget) if budget is not None else None
    output = head_output(am, name)  # an unknown name fails here, before anything is written
    if output is None:
        raise ExportError(f"adapter {name!r} has no head of its own: the training program's loss needs its logits")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unlean(am)  # the lean path's own autograd functions are PyTorch's, not the device's
    previous_active, was_training = am.active, am.training
    trainable = {n: p.requires_grad for n, p in am.named_parameters()}
    example = example.contiguous()
    try:
        am.train_adapter(name)
        am.eval()  # frozen BatchNorm uses its running statistics; the adapters have no dropout here
        labels = torch.zeros(example.shape[0], dtype=torch.long)
        if full:
            _all_used_weights_trainable(am, _WithLoss(am), example, labels)
        with conv1d_as_conv2d():
            forward, program = _program(_WithLoss(am), example, labels, activation_bits)
        missing = missing_kernels(program)
        if missing:
            raise ExportError("ExecuTorch's runtime has no kernel for " + "; ".join(
                f"{op}, which training through {_module_of(forward, op) or 'the model'} needs" for op in missing)
                + ": keep the adapter after that module, or replace the module")
        params = {n: p for n, p in am.named_parameters() if p.requires_grad}
        arena = planned_arena(program)
        trainable_bytes = sum(p.numel() * p.element_size() for p in params.values())
        if limit is not None and arena + trainable_bytes > limit:
            raise ExportError(f"the training program needs {human(arena)} of arena plus {human(trainable_bytes)} "
                              f"of trainable parameters, {human(arena + trainable_bytes)} in all, over the budget of "
                              f"{human(limit)}")
        path = out / ("train-full.pte" if full else f"train-{name}.pte")
        path.write_bytes(program.buffer)
        info = TrainingProgramInfo(
            file=path.name, batch=int(example.shape[0]), input_shape=list(example.shape), classes=output[1],
            parameters={n: p.numel() for n, p in params.items()}, arena_bytes=arena, trainable_bytes=trainable_bytes,
            flash_bytes=len(program.buffer), full=full)
        path.with_suffix(".json").write_text(json.dumps(asdict(info), indent=2))
        return info
    finally:
        for n, p in am.named_parameters():
            p.requires_grad_(trainable[n])
        am.activate(previous_active)
        am.train(was_training)


@contextmanager
def conv1d_as_conv2d() -> Iterator[None]:
    """While the program is written, every 1-D convolution (nn.Conv1d's and the adapters' F.conv1d) runs
    as a 2-D one of height 1, the same numbers: ExecuTorch's convolution backward has only a 2-D kernel.
    It swaps torch.nn.functional.conv1d for the duration, in this process."""
    original = F.conv1d

    def as_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,  # noqa: A002
                  stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1) -> torch.Tensor:
        x = input
        if isinstance(padding, str):
            raise ExportError(f"a 1-D convolution with padding={padding!r} cannot be trained on the device; "
                              "give its padding as a number")
        batched = x.dim() == 3
        x = x if batched else x.unsqueeze(0)
        out = original_conv2d(x.unsqueeze(2), weight.unsqueeze(2), bias, (1, _single(stride)), (0, _single(padding)),
                              (1, _single(dilation)), groups).squeeze(2)
        return out if batched else out.squeeze(0)

    original_conv2d = F.conv2d
    F.conv1d = as_conv2d  # type: ignore[assignment]
    try:
        yield
    finally:
        F.conv1d = original


def _single(value: Any) -> int:
    return int(value[0]) if isinstance(value, tuple | list) else int(value)


def _all_used_weights_trainable(am: AdaptedModel, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Full fine-tuning: every weight the loss depends on trains (the base's own head, which the adapter's
    head replaces, does not: a parameter without a gradient cannot be in the program)."""
    for param in am.base.parameters():
        param.requires_grad_(True)
        param.grad = None
    module(x, y).backward()
    for param in am.parameters():
        if param.requires_grad and param.grad is None:
            param.requires_grad_(False)
        param.grad = None


def _program(module: nn.Module, x: torch.Tensor, y: torch.Tensor,
             activation_bits: int | None = None) -> tuple[Any, Any]:
    """(the exported forward, which knows each op's module; the ExecuTorch training program)."""
    from executorch.exir import EdgeCompileConfig, to_edge
    from torch.export import export
    from torch.export.experimental import _export_forward_backward

    try:
        forward = export(module, (x, y), strict=False)
        joint = _export_forward_backward(forward)
        slim_joint(joint, activation_bits)
        # the joint graph keeps no module stacks: `forward` is what names a module
        return forward, to_edge(joint, compile_config=EdgeCompileConfig(_check_ir_validity=False)).to_executorch()
    except Exception as err:  # noqa: BLE001 - torch.export's and ExecuTorch's failures, as one error
        raise ExportError(f"ExecuTorch cannot write a training program for this model: {_first_line(err)}") from err


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def missing_kernels(program: Any) -> list[str]:
    """The operators the training program calls that this ExecuTorch runtime has no kernel for."""
    from executorch.extension.pybindings import portable_lib

    have = set(portable_lib._get_operator_names())
    need = {f"{op.name}.{op.overload}" if op.overload else op.name
            for plan in program.executorch_program.execution_plan for op in plan.operators}
    return sorted(need - have)


def _module_of(forward: Any, op: str) -> str | None:
    """The module whose forward the (backward) operator `op` differentiates, read from the exported
    forward's module stacks."""
    name = op.split("::")[-1].split(".")[0].removesuffix("_backward")
    for node in forward.graph.nodes:
        target, stack = str(node.target), node.meta.get("nn_module_stack")
        if name in target.split(".") and stack:
            path, kind = list(stack.values())[-1]
            kind_name = kind.__name__ if isinstance(kind, type) else str(kind).rsplit(".", 1)[-1]
            return f"{path.removeprefix('model.').removeprefix('base.')} ({kind_name})"
    return None


def planned_arena(program: Any) -> int:
    """Bytes of the memory ExecuTorch planned for the training method: every buffer its instructions
    use, laid out ahead of time (the arena the device gives it)."""
    for plan in program.executorch_program.execution_plan:
        if plan.name == "forward":
            return int(sum(plan.non_const_buffer_sizes))
    raise ExportError("the training program has no 'forward' method")


class DeviceTrainer:
    """Trains with a training program in ExecuTorch's runtime: forward_backward for each batch, the
    gradients clipped to `max_grad_norm` as every training loop of ours clips them (None: not at all),
    then the runtime's SGD (momentum, weight decay, Nesterov) on the parameters the program holds."""

    def __init__(self, program: str | Path, *, lr: float = 0.01, momentum: float = 0.9,
                 weight_decay: float = 0.0, nesterov: bool = False, max_grad_norm: float | None = MAX_GRAD_NORM
                 ) -> None:
        from executorch.extension.training import _load_for_executorch_for_training, get_sgd_optimizer

        path = Path(program)
        if not path.exists():
            raise ExportError(f"no training program at {path}")
        info_path = path.with_suffix(".json")
        self.info = TrainingProgramInfo(**json.loads(info_path.read_text())) if info_path.exists() else None
        self.module = _load_for_executorch_for_training(str(path))
        self._optimizer_args = (lr, momentum, 0.0, weight_decay, nesterov)
        self._get_sgd_optimizer = get_sgd_optimizer
        self._optimizer: Any = None
        self.max_grad_norm = max_grad_norm
        self.steps = 0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One forward, backward and SGD step on a batch; returns its loss."""
        if self.info is not None and list(x.shape) != self.info.input_shape:
            raise ExportError(f"the program was written for batches of shape {self.info.input_shape}, "
                              f"not {list(x.shape)}")
        loss = self.module.forward_backward("forward", (x.contiguous(), y.long().contiguous()))[0]
        if self._optimizer is None:  # the parameters exist once the program has run
            self._optimizer = self._get_sgd_optimizer(self.module.named_parameters(), *self._optimizer_args)
        gradients = self.module.named_gradients()
        if self.max_grad_norm is not None:  # as torch.nn.utils.clip_grad_norm_ (and every loop of ours) clips
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gradients.values()]))
            scale = self.max_grad_norm / (float(total) + 1e-6)
            if scale < 1:
                for g in gradients.values():
                    g.mul_(scale)
        self._optimizer.step(gradients)
        self.steps += 1
        return float(loss)

    def fit(self, loader: Iterable[Batch], epochs: int = 1) -> list[float]:
        """Whole epochs from `loader` ((x, y) batches; a batch of another size than the program's is
        skipped); returns the mean loss of each epoch."""
        if iter(loader) is loader:  # a generator is spent after one epoch: refused before any step
            raise ExportError("fit needs a loader it can iterate once per epoch (a list, an EpochLoader, a "
                              "DataLoader), not a one-pass iterator")
        means = []
        for _ in range(epochs):
            losses = []
            for batch in loader:
                x, y = split_batch(batch)
                if y is None:
                    raise ExportError("training on the device needs labelled batches (x, y)")
                if self.info is not None and x.shape[0] != self.info.batch:
                    continue
                losses.append(self.step(x, y))
            if not losses:
                raise ExportError(f"no batch of {self.info.batch if self.info else '?'} examples in the loader")
            means.append(sum(losses) / len(losses))
        return means

    def parameters(self) -> dict[str, torch.Tensor]:
        """The trained tensors, by the adapted model's own parameter names."""
        if self.steps == 0:
            self.module.forward_backward("forward", self._example())
        return {k.removeprefix("model."): v.clone() for k, v in self.module.named_parameters().items()}

    def load_into(self, am: AdaptedModel, name: str) -> None:
        """Copy the trained tensors into adapter `name` of `am` (the model the program was written from)."""
        own = dict(am.named_parameters())
        trained = self.parameters()
        missing = [k for k in trained if k not in own]
        if missing:
            raise ExportError(f"the program's parameters {missing[:3]} are not in this model: was it written from "
                              f"another model or adapter than {name!r}?")
        with torch.no_grad():
            for key, value in trained.items():
                own[key].copy_(value)

    def _example(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.info is None:
            raise ExportError("the program's .json (its input shape) is missing")
        return torch.zeros(self.info.input_shape), torch.zeros(self.info.batch, dtype=torch.long)
