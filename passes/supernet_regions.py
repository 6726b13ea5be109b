"""SuperNet regions: the original subgraph each ``Choice`` replaces (`plinio_onnx.passes.supernet`).

A *layer*'s region is its node plus, for a MatMul, the constant bias ``Add`` right after it (so
every branch carries its own bias and costs count it like `plinio_onnx.cost` does). A user-named
node, or the single-entry, single-exit subgraph between two tensors, is a region too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from plinio_onnx.errors import PassError

__all__ = ["LAYER_OPS", "Region", "is_layer", "layer_region", "node_region", "subgraph_region"]

LAYER_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class Region:
    """The original subgraph a Choice replaces: one activation input, one output."""

    name: str                   # base name of the Choice (the layer's node name, or the output)
    x: gs.Variable              # the single activation input
    out: gs.Variable            # the single output
    nodes: list[gs.Node]        # the original nodes
    layer: gs.Node | None = None  # set for a Conv/Gemm/MatMul layer region
    bias_add: gs.Node | None = None  # MatMul's bias Add
    #: what the alternatives' makers compute once and share (e.g. a weight's decomposition)
    decompositions: dict = field(default_factory=dict, repr=False, compare=False)


def is_layer(node: gs.Node) -> bool:
    """A Conv/Gemm/MatMul (standard domain) with a constant weight, a non-constant input and a
    constant bias (if any): the layers that get builtin alternatives."""
    if node.op not in LAYER_OPS or (node.domain or "") not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    weight = node.inputs[1]
    if not isinstance(weight, gs.Constant) or isinstance(node.inputs[0], gs.Constant):
        return False
    if node.op == "MatMul":
        return len(weight.shape) == 2
    bias = node.inputs[2] if len(node.inputs) > 2 else None   # copied into every alternative
    return bias is None or not bias.name or isinstance(bias, gs.Constant)


def _bias_add(node: gs.Node, graph_outputs: set[int]) -> gs.Node | None:
    """The constant [N] bias ``Add`` right after a MatMul layer (as `plinio_onnx.cost` sees it)."""
    out = node.outputs[0]
    if node.op != "MatMul" or id(out) in graph_outputs or len(out.outputs) != 1 or out.outputs[0].op != "Add":
        return None
    add = out.outputs[0]
    width = int(node.inputs[1].shape[-1])
    other = [t for t in add.inputs if t is not out]
    if len(other) == 1 and isinstance(other[0], gs.Constant) and tuple(other[0].shape) == (width,):
        return add
    return None


def layer_region(node: gs.Node, graph_outputs: set[int]) -> Region:
    """A layer's region: the node plus, for a MatMul, its constant bias ``Add``."""
    add = _bias_add(node, graph_outputs)
    out = (add or node).outputs[0]
    return Region(node.name, node.inputs[0], out, [node] + ([add] if add else []), node, add)


def node_region(node: gs.Node, graph_outputs: set[int]) -> Region:
    """A user-named node's region: its layer region, else the node from its single non-constant
    input to its single output."""
    if is_layer(node):
        return layer_region(node, graph_outputs)
    activations = [t for t in node.inputs if t.name and not isinstance(t, gs.Constant)]
    outputs = [t for t in node.outputs if t.name]
    if len(activations) != 1 or len(outputs) != 1:
        raise PassError(f"alternatives need a node with one non-constant input and one output "
                        f"(it has {len(activations)} and {len(outputs)}); name the subgraph with "
                        "regions=[{'input': ..., 'output': ...}]", node=node.name, op=node.op)
    return Region(node.name, activations[0], outputs[0], [node])


def subgraph_region(g: gs.Graph, tensors: dict[str, gs.Tensor], input_name: str, output_name: str,
                     name: str | None) -> Region:
    """The nodes between two tensors; refuses regions that read or leak other activations."""
    for t in (input_name, output_name):
        if t not in tensors:
            raise PassError(f"region tensor {t!r} is not in the graph")
    x, out = tensors[input_name], tensors[output_name]
    where = f"region {input_name!r} → {output_name!r}"
    if x is out or isinstance(out, gs.Constant) or not out.inputs:
        raise PassError(f"{where}: the output must be computed from the input")
    downstream: set[int] = set()        # nodes that depend on x
    stack = list(x.outputs)
    while stack:
        node = stack.pop()
        if id(node) not in downstream:
            downstream.add(id(node))
            stack.extend(c for t in node.outputs for c in t.outputs)
    nodes: dict[int, gs.Node] = {}      # ... and that out depends on
    stack = [out.inputs[0]]
    while stack:
        node = stack.pop()
        if id(node) in nodes or id(node) not in downstream:
            continue
        nodes[id(node)] = node
        stack.extend(t.inputs[0] for t in node.inputs if t is not x and t.inputs)
    if id(out.inputs[0]) not in downstream:
        raise PassError(f"{where}: the output does not depend on the input")
    for node in nodes.values():
        for t in node.inputs:
            if t.name and t is not x and not isinstance(t, gs.Constant) and \
                    (not t.inputs or id(t.inputs[0]) not in nodes):
                raise PassError(f"{where}: node {node.name!r} reads {t.name!r}, which does not come from "
                                f"{input_name!r}; a region has a single input")
    graph_outputs = {id(t) for t in g.outputs}
    for node in nodes.values():
        for t in node.outputs:
            if t is out or not t.name:
                continue
            if id(t) in graph_outputs or any(id(c) not in nodes for c in t.outputs):
                raise PassError(f"region {input_name!r} → {output_name!r}: its tensor {t.name!r} is "
                                "also used outside the region; a region has a single output")
    order = {id(n): i for i, n in enumerate(g.nodes)}
    members = sorted(nodes.values(), key=lambda n: order[id(n)])
    return Region(name or output_name, x, out, members)
