"""Keep less alive between the forward and backward halves of a training program (the device's
version of edge/lean.py), by rewriting the joint graph before ExecuTorch plans its memory.

ExecuTorch plans one buffer per value for as long as any instruction still reads it, so what the
backward half reads decides the arena. Three things in the joint graph keep more than backward needs:

* `aten.alias` of a saved activation becomes a real copy on the device (alias_copy): the alias is
  replaced by the value itself.
* a frozen convolution's backward (`convolution_backward` asked only for the input's gradient)
  reads its input for the input's *shape* alone: it is given an uninitialised tensor of that shape,
  made right before it, so the activation can die in the forward half.
* a ReLU's backward is `where(relu_out <= 0, 0, grad)`: the comparison is moved into the forward half,
  right after the ReLU, so backward keeps a 1-byte mask instead of a 4-byte activation.
* a mean's backward is `expand(grad) / n`, two buffers of the input's size: where element-wise ops
  that broadcast (where, add, mul, sub) read it, the division is made on the small gradient and the
  expansion is left to their broadcasting, so neither buffer is made.

Each rewrite gives the same numbers; tests/test_edge_device_train.py checks the gradients still equal
PyTorch's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

aten = torch.ops.aten
_BROADCASTING = {aten.where.self, aten.add.Tensor, aten.mul.Tensor, aten.sub.Tensor}
_MASKS = {aten.le.Scalar, aten.lt.Scalar, aten.ge.Scalar, aten.gt.Scalar, aten.eq.Scalar, aten.ne.Scalar}


def slim_joint(program: Any) -> dict[str, int]:
    """Rewrite the joint forward-backward ExportedProgram in place; how many of each rewrite were made."""
    graph: fx.Graph = program.graph_module.graph
    done = {"aliases": _drop_aliases(graph), "shape_only_inputs": _shape_only_inputs(graph),
            "masks_moved_forward": _masks_forward(graph), "divided_before_expand": _divide_before_expand(graph),
            "expands_broadcast": _broadcast_expands(graph)}
    graph.lint()
    program.graph_module.recompile()
    return done


def _drop_aliases(graph: fx.Graph) -> int:
    count = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            count += 1
    return count


def _shape_only_inputs(graph: fx.Graph) -> int:
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.convolution_backward.default:
            continue
        source, mask = node.args[1], node.args[-1]
        if mask[1] or not isinstance(source, fx.Node) or source.op == "placeholder":
            continue  # the weight's gradient reads the input's values; a graph input is alive anyway
        value = source.meta["val"]
        with graph.inserting_before(node):
            blank = graph.call_function(aten.empty.memory_format, (list(value.shape),),
                                        {"dtype": value.dtype, "device": value.device})
        blank.meta = {k: v for k, v in source.meta.items() if k in ("val", "tensor_meta", "stack_trace")}
        node.replace_input_with(source, blank)
        count += 1
    return count


def _masks_forward(graph: fx.Graph) -> int:
    order = {n: i for i, n in enumerate(graph.nodes)}
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _MASKS:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op == "placeholder":
            continue
        first_use = min(order[u] for u in source.users)
        if order[node] <= first_use:
            continue  # already where the forward half reads it
        # right after its only input: every operand of the comparison but that one is a constant
        if any(isinstance(a, fx.Node) for a in node.args[1:]) or node.kwargs:
            continue
        source.append(node)
        count += 1
    return count


def _divide_before_expand(graph: fx.Graph) -> int:
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.div.Scalar or node.kwargs:
            continue
        expand = node.args[0]
        if not (isinstance(expand, fx.Node) and expand.target == aten.expand.default and len(expand.users) == 1):
            continue
        if not node.users or not all(u.target in _BROADCASTING for u in node.users):
            continue  # only where the expansion can then be left to broadcasting: a view needs it materialised
        small = expand.args[0]
        with graph.inserting_before(expand):
            divided = graph.call_function(aten.div.Scalar, (small, node.args[1]))
        divided.meta = {"val": small.meta["val"] / node.args[1]}
        expand.replace_input_with(small, divided)
        node.replace_all_uses_with(expand)
        graph.erase_node(node)
        count += 1
    return count


def _broadcast_expands(graph: fx.Graph) -> int:
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.expand.default or not node.users:
            continue
        small = node.args[0]
        if not isinstance(small, fx.Node) or not all(_broadcasts_to_same(u, node, small) for u in node.users):
            continue
        node.replace_all_uses_with(small)
        graph.erase_node(node)
        count += 1
    return count


def _broadcasts_to_same(user: fx.Node, expand: fx.Node, small: fx.Node) -> bool:
    if user.op != "call_function" or user.target not in _BROADCASTING or user.kwargs:
        return False
    shapes = []
    for arg in user.args:
        value = (small if arg is expand else arg).meta.get("val") if isinstance(arg, fx.Node) else None
        if isinstance(value, torch.Tensor):
            shapes.append(value.shape)
    try:
        return torch.broadcast_shapes(*shapes) == user.meta["val"].shape
    except RuntimeError:
        return False
