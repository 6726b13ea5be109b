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
    missing = [f for f in functions if (f.domain, f.name) not in have]
    if missing:
        # onnx-graphsurgeon builds its Function objects on import: import a model holding only them.
        holder = helper.make_model(helper.make_graph([], "functions", [], []),
                                   opset_imports=[helper.make_opsetid("", FUNCTION_OPSET),
                                                  helper.make_opsetid(PLINIO_DOMAIN, 1)],
                                   functions=missing)
        graph.gs.functions = list(graph.gs.functions) + list(gs.import_onnx(holder).functions)
    domains = list(graph.gs.import_domains or [])
    if not any(d.domain == PLINIO_DOMAIN for d in domains):
        domains.append(helper.make_opsetid(PLINIO_DOMAIN, 1))
        graph.gs.import_domains = domains
    return graph


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
