"""The ``ai.plinio`` functions: trainable subgraphs that search passes insert.

Each function has two faces: an ONNX ``FunctionProto`` whose body of standard ops gives its
forward value (so a searchable graph runs in ONNX Runtime and is its own checkpoint), and a torch
handler registered with the loader that computes the same value with the gradients the method
needs (straight-through estimators, softmax relaxations).
"""
from __future__ import annotations

import onnx
from onnx import helper

from ..graph import PLINIO_DOMAIN, Graph

FUNCTION_OPSET = 17


def add_functions(graph: Graph, functions: list[onnx.FunctionProto]) -> Graph:
    """Define ``functions`` (once each) in ``graph`` and import the ``ai.plinio`` domain; in place."""
    import onnx_graphsurgeon as gs

    have = {(f.domain, f.name) for f in graph.gs.functions}
    # The checker wants a function's default-domain opset equal to the model's; the bodies use ops
    # whose semantics are the same from FUNCTION_OPSET up to the newest opset the loader reads.
    opset = max(FUNCTION_OPSET, graph.opset)
    missing = [_at_opset(f, opset) for f in functions if (f.domain, f.name) not in have]
    if missing:
        # onnx-graphsurgeon builds its Function objects on import: import a model holding only them.
        holder = helper.make_model(helper.make_graph([], "functions", [], []),
                                   opset_imports=[helper.make_opsetid("", opset),
                                                  helper.make_opsetid(PLINIO_DOMAIN, 1)],
                                   functions=missing)
        graph.gs.functions = list(graph.gs.functions) + list(gs.import_onnx(holder).functions)
    domains = list(graph.gs.import_domains or [])
    if not any(d.domain == PLINIO_DOMAIN for d in domains):
        domains.append(helper.make_opsetid(PLINIO_DOMAIN, 1))
        graph.gs.import_domains = domains
    return graph


#: Reductions whose ``axes`` moved from an attribute to an input in opset 18.
_AXES_INPUT_SINCE_18 = {"ReduceMax", "ReduceMin", "ReduceMean", "ReduceProd", "ReduceL1", "ReduceL2",
                        "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}


def _at_opset(function: onnx.FunctionProto, opset: int) -> onnx.FunctionProto:
    """A copy of ``function`` (written for `FUNCTION_OPSET`) importing the default domain at
    ``opset``: from 18 on, a reduction's ``axes`` attribute becomes a ``Constant`` input."""
    copy = onnx.FunctionProto()
    copy.CopyFrom(function)
    for entry in copy.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset
    if opset < 18:
        return copy
    nodes = []
    for node in copy.node:
        axes = next((a for a in node.attribute if a.name == "axes"), None)
        if node.op_type in _AXES_INPUT_SINCE_18 and node.domain in ("", "ai.onnx") and axes is not None:
            constant = helper.make_node("Constant", [], [f"{node.output[0]}__axes"])
            value = onnx.AttributeProto()
            value.CopyFrom(axes)
            value.name = "value_ints"
            constant.attribute.append(value)
            node.attribute.remove(axes)
            node.input.append(constant.output[0])
            nodes.append(constant)
        nodes.append(node)
    del copy.node[:]
    copy.node.extend(nodes)
    return copy


def make_function(name: str, inputs: list[str], outputs: list[str], nodes: list[onnx.NodeProto],
                  attributes: list[str] = ()) -> onnx.FunctionProto:
    return helper.make_function(PLINIO_DOMAIN, name, inputs, outputs, nodes,
                                opset_imports=[helper.make_opsetid("", FUNCTION_OPSET)],
                                attributes=list(attributes))


def constant_from_attribute(output: str, attribute: str) -> onnx.NodeProto:
    """``Constant(value_float = <the function's attribute>)``."""
    node = helper.make_node("Constant", [], [output])
    ref = onnx.AttributeProto()
    ref.name = "value_float"
    ref.ref_attr_name = attribute
    ref.type = onnx.AttributeProto.FLOAT
    node.attribute.append(ref)
    return node
