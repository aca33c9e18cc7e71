"""A pre-trained model given as a `torch.export` program (`.pt2`), made a module adapters attach to.

    model, input_shape = load_program("kws.pt2")   # what torch.export.save wrote

`torch.export.unflatten` gives the program back its module hierarchy (one module per original
submodule, each running its part of the graph), so block-level adapters find their sites by the
original names. Its leaves run bare operators, though: a convolution is a module calling
`aten.conv2d` on its own `weight`. Those leaves that are one convolution, linear layer, BatchNorm or
ReLU are rebuilt as the PyTorch modules they came from (same tensors, same numbers), so that LoRA,
BitFit, the head and the lean frozen path see the types they work on. Anything else keeps running as
the program's own graph.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .recipe import RecipeError

aten = torch.ops.aten


def load_program(path: str | Path) -> tuple[nn.Module, list[int | None]]:
    """The program at `path` as an eval-mode module, and the input shape it was exported with (batch first;
    None where a dimension is dynamic)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"--model {path}: no such file")
    try:
        program = torch.export.load(str(path))
    except Exception as err:  # noqa: BLE001 - named with the file
        raise RecipeError(f"--model {path} is not a torch.export program (.pt2): {type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}") from None
    inputs = [s for s in program.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    if len(inputs) != 1:
        raise RecipeError(f"--model {path} takes {len(inputs)} inputs; an edge model takes one (a batch of examples)")
    value = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == inputs[0].arg.name).meta["val"]
    model = torch.export.unflatten(program)
    rebuild_leaves(model)
    # a dynamic dimension (the batch, exported with dynamic_shapes) is None: int() of it would specialise it
    return model.eval(), [d if isinstance(d, int) else None for d in value.shape]


def rebuild_leaves(model: nn.Module) -> int:
    """Replace each leaf that runs one known operator by the PyTorch module of that operator; the count."""
    count = 0
    for name, module in list(model.named_modules()):
        graph = getattr(module, "graph", None)
        if not name or list(module.children()) or not isinstance(graph, fx.Graph):
            continue
        calls = [n for n in graph.nodes if n.op == "call_function"]
        if len(calls) != 1 or calls[0].target not in _BUILDERS:
            continue
        built = _BUILDERS[calls[0].target](module, calls[0])
        if built is None:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, built.eval())
        count += 1
    return count


def _tensor(module: nn.Module, arg: Any) -> torch.Tensor | None:
    return getattr(module, str(arg.target)) if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


def _conv(dims: int) -> Callable[[nn.Module, fx.Node], nn.Module | None]:
    def build(module: nn.Module, call: fx.Node) -> nn.Module | None:
        args: list[Any] = list(call.args) + [None] * (7 - len(call.args))
        weight, bias = _tensor(module, args[1]), _tensor(module, args[2])
        if weight is None or isinstance(args[4], str):
            return None
        stride, padding, dilation = (args[i] if args[i] is not None else d for i, d in ((3, 1), (4, 0), (5, 1)))
        groups = int(args[6]) if args[6] is not None else 1
        kind: Any = nn.Conv1d if dims == 1 else nn.Conv2d
        conv = kind(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=stride,
                    padding=padding, dilation=dilation, groups=groups, bias=bias is not None)
        conv.weight = nn.Parameter(weight.detach(), requires_grad=False)
        if bias is not None:
            conv.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return conv
    return build


def _linear(module: nn.Module, call: fx.Node) -> nn.Module | None:
    weight = _tensor(module, call.args[1])
    bias = _tensor(module, call.args[2]) if len(call.args) > 2 else None
    if weight is None:
        return None
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return linear


def _batch_norm(module: nn.Module, call: fx.Node) -> nn.Module | None:
    args: list[Any] = list(call.args)
    weight, bias, mean, var = (_tensor(module, a) for a in args[1:5])
    if mean is None or var is None:
        return None
    eps = float(args[7]) if len(args) > 7 else 1e-5
    momentum = float(args[6]) if len(args) > 6 else 0.1
    input_dims = args[0].meta["val"].dim() if isinstance(args[0], fx.Node) else 4
    kind = {4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(input_dims, nn.BatchNorm1d)
    # a program exported in train mode normalised by batch statistics; a frozen base uses the running ones
    norm = kind(mean.shape[0], eps=eps, momentum=momentum, affine=weight is not None or bias is not None)
    with torch.no_grad():
        for own, given in ((norm.running_mean, mean), (norm.running_var, var), (norm.weight, weight),
                           (norm.bias, bias)):
            if own is not None and given is not None:
                own.copy_(given)
    return norm.to(mean.dtype)


def _hardtanh(module: nn.Module, call: fx.Node) -> nn.Module | None:
    args: list[Any] = list(call.args)
    low = args[1] if len(args) > 1 else -1.0
    high = args[2] if len(args) > 2 else 1.0
    return nn.ReLU6() if (float(low), float(high)) == (0.0, 6.0) else nn.Hardtanh(float(low), float(high))


_BUILDERS: dict[Any, Callable[[nn.Module, fx.Node], nn.Module | None]] = {
    aten.conv1d.default: _conv(1), aten.conv2d.default: _conv(2), aten.linear.default: _linear,
    aten.batch_norm.default: _batch_norm, aten.relu.default: lambda m, c: nn.ReLU(),
    aten.hardtanh.default: _hardtanh,
}
