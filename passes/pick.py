"""Finalize SuperNet: keep the argmax branch of every ``Choice``, drop the others and the Choices.

For every Choice recorded by `plinio_onnx.passes.supernet`, the kept branch is argmax α (the
first on ties — the original layer when the logits are untouched), exactly the branch the eval
module computes. Its last node writes the Choice's output tensor again (so downstream names and
graph outputs are unchanged); an identity branch hands its input straight to the consumers (or,
for a graph output, through one ``Identity``). The other branches, the stacking nodes, the
logits and the temperature become dead and are removed.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from plinio_onnx.functions import supernet as fn
from plinio_onnx.graph import Graph
from plinio_onnx.records import SuperNetRecord

from .infra import ConsumingPass

__all__ = ["PickBranches", "pick_branches"]


class PickBranches(ConsumingPass):
    """Replace every Choice by its argmax branch (module docstring)."""

    record = SuperNetRecord

    def apply(self, graph: Graph, info: SuperNetRecord) -> None:
        _pick(graph, info)


def pick_branches(graph: Graph, **options) -> Graph:
    """Replace every Choice of ``graph`` by its argmax branch, in place (`PickBranches`); returns
    ``graph``."""
    return PickBranches()(graph).graph


def _pick(graph: Graph, info: SuperNetRecord) -> None:
    g = graph.gs
    tensors = g.tensors()
    nodes = {n.name: n for n in g.nodes}
    outputs = {id(t) for t in g.outputs}
    # a Choice whose consumers now read another tensor: chained identity picks follow it
    replaced: dict[int, gs.Tensor] = {}
    for choice in info.choices:
        node = nodes[choice.node]
        branch = choice.branches[fn.chosen(tensors[choice.logits].values)]
        kept, out = tensors[branch.output], node.outputs[0]
        while id(kept) in replaced:
            kept = replaced[id(kept)]
        node.inputs.clear()
        node.outputs.clear()
        producer = kept.inputs[0] if kept.inputs else None
        # A branch's own output feeds only the stacking Unsqueeze: its producer may take over `out`.
        own = producer is not None and producer.name in branch.nodes and id(kept) not in outputs
        if own:
            producer.outputs = [out if t is kept else t for t in producer.outputs]
        elif id(out) in outputs:
            g.nodes.append(gs.Node("Identity", name=f"{choice.name}/supernet/kept", inputs=[kept], outputs=[out]))
        else:
            for consumer in list(out.outputs):
                consumer.inputs = [kept if t is out else t for t in consumer.inputs]
            replaced[id(out)] = kept
    g.cleanup(remove_unused_graph_inputs=False).toposort()
