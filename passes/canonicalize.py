"""Canonicalize a freshly loaded graph so every later pass sees one form.

Guarantees: no `Constant` nodes (their values are initializers), constant subgraphs folded,
no `Identity` nodes (except where one would rename a graph input or an initializer straight to
an output), initializers tied by `Identity` chains or by several readers copied or shared
(`tied_initializers`), no
graph input that is also an initializer (IR < 4 models list weights as inputs), no dead nodes,
nodes in topological order. Outputs are unchanged.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from plinio_onnx.graph import PLINIO_DOMAIN, Graph

from .tied_initializers import resolve_tied_initializers

__all__ = ["canonicalize"]


def canonicalize(graph: Graph, *, tied: str = "copy") -> Graph:
    """Bring ``graph`` into canonical form in place (see the module docstring); ``tied`` says what
    happens to initializers read by several nodes (`tied_initializers`: ``"copy"`` unties them,
    ``"share"`` keeps one tensor)."""
    g = graph.gs
    g.inputs = [t for t in g.inputs if not isinstance(t, gs.Constant)]
    _constant_nodes_to_initializers(g)
    # before folding: folding would turn every Identity of an initializer into a nameless copy
    resolve_tied_initializers(g, tied)
    _fold_constants(g)
    _remove_identities(g)
    g.cleanup(remove_unused_graph_inputs=False).toposort()
    _name_nodes(g)
    return graph


def _constant_nodes_to_initializers(g: gs.Graph) -> None:
    for node in g.nodes:
        if node.op != "Constant" or (node.domain or "") not in ("", "ai.onnx"):
            continue
        attrs = node.attrs
        if "value" in attrs:
            value = attrs["value"].values if isinstance(attrs["value"], gs.Constant) else attrs["value"]
        elif "value_float" in attrs:
            value = np.array(attrs["value_float"], dtype=np.float32)
        elif "value_floats" in attrs:
            value = np.array(attrs["value_floats"], dtype=np.float32)
        elif "value_int" in attrs:
            value = np.array(attrs["value_int"], dtype=np.int64)
        elif "value_ints" in attrs:
            value = np.array(attrs["value_ints"], dtype=np.int64)
        else:
            continue  # sparse or string constants stay as nodes
        out = node.outputs[0]
        if out in g.outputs:
            continue
        const = gs.Constant(out.name, np.asarray(value))
        for consumer in list(out.outputs):
            consumer.inputs = [const if t is out else t for t in consumer.inputs]
        node.outputs.clear()


def _foldable(g: gs.Graph) -> bool:
    """Whether folding could change ``g``: a node reads only constants (or nothing), or reads a
    shape. Without one, folding is skipped: it copies the whole model, weights included, to
    evaluate nothing."""
    for node in g.nodes:
        if (node.domain or "") == PLINIO_DOMAIN:
            continue
        if node.op in ("Shape", "Size") or all(isinstance(t, gs.Constant) or not t.name for t in node.inputs):
            return True
    return False


def _fold_constants(g: gs.Graph) -> None:
    # onnx-graphsurgeon evaluates all-constant subgraphs with ONNX Runtime; shape subgraphs of
    # statically known dimensions fold too. Its logging is noisy on partial failures.
    if not _foldable(g):
        return
    import onnxruntime
    onnxruntime.set_default_logger_severity(3)
    logger = logging.getLogger("onnx_graphsurgeon")
    level = logger.level
    gs_logger = gs.logger.G_LOGGER
    old_severity = gs_logger.severity
    gs_logger.severity = gs_logger.ERROR + 10
    try:
        # onnx-graphsurgeon's shape folding ignores Shape's start/end (opset 15); skip it then.
        sliced_shape = any(n.op == "Shape" and ("start" in n.attrs or "end" in n.attrs) for n in g.nodes)
        # ai.plinio functions compute from trainable parameters: folding would freeze them.
        g.fold_constants(error_ok=True, fold_shapes=not sliced_shape,
                         should_exclude_node=lambda node: (node.domain or "") == PLINIO_DOMAIN)
    finally:
        gs_logger.severity = old_severity
        logger.setLevel(level)


def _remove_identities(g: gs.Graph) -> None:
    for node in g.nodes:
        if node.op not in ("Identity",) or (node.domain or "") not in ("", "ai.onnx") \
                or not node.inputs or not node.outputs:  # folded away: cleanup removes it
            continue
        src, dst = node.inputs[0], node.outputs[0]
        if dst in g.outputs:
            if src in g.inputs or src in g.outputs or isinstance(src, gs.Constant):
                continue
            # Let the producer write the graph output directly, under the output's name.
            producer = src.inputs[0] if src.inputs else None
            if producer is None:
                continue
            producer.outputs = [dst if t is src else t for t in producer.outputs]
            for consumer in list(src.outputs):
                consumer.inputs = [dst if t is src else t for t in consumer.inputs]
        else:
            for consumer in list(dst.outputs):
                consumer.inputs = [src if t is dst else t for t in consumer.inputs]
        node.inputs.clear()
        node.outputs.clear()


def _name_nodes(g: gs.Graph) -> None:
    """Give every node a unique name: passes, records and error messages address nodes by name,
    and exporters may leave names empty or repeat them (``OP_k``, avoiding names in use)."""
    taken = {node.name for node in g.nodes if node.name}
    seen: set[str] = set()
    counts: dict[str, int] = {}
    for node in g.nodes:
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        stem = node.name or node.op
        while True:
            counts[stem] = counts.get(stem, 0) + 1
            name = f"{stem}_{counts[stem]}"
            if name not in taken:
                break
        node.name = name
        taken.add(name)
        seen.add(name)
