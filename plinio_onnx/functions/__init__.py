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
    """Return ``graph`` with ``functions`` defined (once each) and the ``ai.plinio`` domain imported."""
    import onnx_graphsurgeon as gs

    model = gs.export_onnx(graph.gs, do_type_check=False)
    have = {(f.domain, f.name) for f in model.functions}
    for function in functions:
        if (function.domain, function.name) not in have:
            model.functions.append(function)
            have.add((function.domain, function.name))
    if not any(o.domain == PLINIO_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(PLINIO_DOMAIN, 1))
    return Graph(gs.import_onnx(model), source=graph.source, metadata=graph.metadata)


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
