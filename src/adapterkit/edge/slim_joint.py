"""Keep less alive between the forward and backward halves of a training program (the device's
version of edge/lean.py), by rewriting the joint graph before ExecuTorch plans its memory.

ExecuTorch plans one buffer per value for as long as any instruction still reads it, so what the
backward half reads decides the arena. Four things in the joint graph keep more than backward needs:

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
PyTorch's. One more, asked for with `activation_bits=8`, does not: it keeps the activations that
trainable convolutions read for their weights' gradients as bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

aten = torch.ops.aten
_BROADCASTING = {aten.where.self, aten.add.Tensor, aten.mul.Tensor, aten.sub.Tensor}
_MASKS = {aten.le.Scalar, aten.lt.Scalar, aten.ge.Scalar, aten.gt.Scalar, aten.eq.Scalar, aten.ne.Scalar}


def slim_joint(program: Any, activation_bits: int | None = None) -> dict[str, int]:
    """Rewrite the joint forward-backward ExportedProgram in place; how many of each rewrite were made.
    `activation_bits=8`: the activations a trainable convolution keeps for its weight's gradient are
    kept as bytes (see `_bytes_for_weight_gradients`)."""
    graph: fx.Graph = program.graph_module.graph
    done = {"aliases": _drop_aliases(graph), "shape_only_inputs": _shape_only_inputs(graph),
            "masks_moved_forward": _masks_forward(graph), "divided_before_expand": _divide_before_expand(graph),
            "expands_broadcast": _broadcast_expands(graph)}
    if activation_bits is not None:
        if activation_bits != 8:
            raise ValueError(f"a device program keeps saved activations in 8 bits or in full, not {activation_bits}")
        done["activations_in_bytes"] = _bytes_for_weight_gradients(graph)
    graph.lint()
    program.graph_module.recompile()
    return done


def _calls(graph: fx.Graph, *targets: Any) -> list[fx.Node]:
    """The graph's calls of these operators, listed before any rewrite changes the graph."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target in targets]


def _output_mask(backward: fx.Node) -> Sequence[bool]:
    """Which gradients a convolution's backward makes: input, weight, bias."""
    mask = backward.args[-1]
    assert isinstance(mask, (list, tuple))
    return [bool(m) for m in mask]


def _drop_aliases(graph: fx.Graph) -> int:
    count = 0
    for node in _calls(graph, aten.alias.default):
        source = node.args[0]
        assert isinstance(source, fx.Node)
        node.replace_all_uses_with(source)
        graph.erase_node(node)
        count += 1
    return count


def _shape_only_inputs(graph: fx.Graph) -> int:
    count = 0
    for node in _calls(graph, aten.convolution_backward.default):
        source = node.args[1]
        if _output_mask(node)[1] or not isinstance(source, fx.Node) or source.op == "placeholder":
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
    for node in _calls(graph, *_MASKS):
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
    for node in _calls(graph, aten.div.Scalar):
        expand = node.args[0]
        if node.kwargs:
            continue
        if not (isinstance(expand, fx.Node) and expand.target == aten.expand.default and len(expand.users) == 1):
            continue
        if not node.users or not all(u.target in _BROADCASTING for u in node.users):
            continue  # only where the expansion can then be left to broadcasting: a view needs it materialised
        small = expand.args[0]
        if not isinstance(small, fx.Node):
            continue
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
    for node in _calls(graph, aten.expand.default):
        if not node.users:
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


def _bytes_for_weight_gradients(graph: fx.Graph, min_elements: int = 1024) -> int:
    """The input a trainable convolution's backward reads for its weight's gradient, when the forward
    half made it, is quantised right there to bytes (per channel of each example: its minimum and step,
    round to nearest) and rebuilt right before the backward reads it: the activation dies in the
    forward half and backward keeps a quarter of it. Round to nearest, not stochastic rounding: the
    device runtime has no random kernel to rely on; 8 bits keep the bias below a part in 500 of the
    range."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    done: dict[fx.Node, tuple[fx.Node, fx.Node, fx.Node]] = {}
    count = 0
    for node in _calls(graph, aten.convolution_backward.default):
        if not _output_mask(node)[1]:
            continue
        source = node.args[1]
        if not isinstance(source, fx.Node) or source.op == "placeholder":
            continue
        value = source.meta["val"]
        if value.dim() < 3 or value.numel() < min_elements or not value.is_floating_point():
            continue
        if order[node] <= max(order[u] for u in source.users if u is not node):
            continue  # something after the backward reads it anyway: nothing to gain
        if source not in done:
            done[source] = _quantise_after(graph, source)
        codes, low, step = done[source]
        with graph.inserting_before(node):
            wide = graph.call_function(aten._to_copy.default, (codes,), {"dtype": value.dtype})
            scaled = graph.call_function(aten.mul.Tensor, (wide, step))
            rebuilt = graph.call_function(aten.add.Tensor, (scaled, low))
        for made, val in ((wide, value.new_empty(value.shape)), (scaled, value), (rebuilt, value)):
            made.meta = {"val": val}
        node.replace_input_with(source, rebuilt)
        count += 1
    return count


def _quantise_after(graph: fx.Graph, source: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
    value = source.meta["val"]
    dims = list(range(2, value.dim()))
    stats = value.new_empty((*value.shape[:2], *([1] * len(dims))))
    with graph.inserting_after(source):
        low = graph.call_function(aten.amin.default, (source, dims, True))
    with graph.inserting_after(low):
        high = graph.call_function(aten.amax.default, (source, dims, True))
    with graph.inserting_after(high):
        spread = graph.call_function(aten.sub.Tensor, (high, low))
    with graph.inserting_after(spread):
        step = graph.call_function(aten.div.Scalar, (spread, 255.0))
    with graph.inserting_after(step):
        safe = graph.call_function(aten.clamp_min.default, (step, 1e-12))  # a constant channel: codes all 0
    with graph.inserting_after(safe):
        shifted = graph.call_function(aten.sub.Tensor, (source, low))
    with graph.inserting_after(shifted):
        scaled = graph.call_function(aten.div.Tensor, (shifted, safe))
    with graph.inserting_after(scaled):
        rounded = graph.call_function(aten.round.default, (scaled,))
    with graph.inserting_after(rounded):
        codes = graph.call_function(aten._to_copy.default, (rounded,), {"dtype": torch.uint8})
    for made in (low, high, spread, step, safe):
        made.meta = {"val": stats}
    for made in (shifted, scaled, rounded):
        made.meta = {"val": value}
    codes.meta = {"val": value.new_empty(value.shape, dtype=torch.uint8)}
    return codes, low, safe
