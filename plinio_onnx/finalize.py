"""`finalize`: a searchable graph → the deployable graph (picked, pruned, quantized; no ai.plinio).

The pipeline, in the order written here and nowhere else:

1. `PickBranches` — every SuperNet ``Choice`` becomes its argmax branch;
2. `PruneChannels` — PIT masks are binarized and the channels sliced; it *requires* the choices
   picked (masks of dropped branches are gone then, and their groups are skipped);
3. `SplitAccelerators` — every ODiMO layer becomes one sub-layer per accelerator it uses (their
   quantizers stay for the next step);
4. `FoldQuantizers` — MPS quantizers become QDQ or QONNX at their argmax precisions (zero-bit
   channels sliced); it requires the masks pruned (quantized weights are constants then);
5. `StripSearchFunctions` — the ``ai.plinio`` functions, domain and ``plinio.*`` records go,
   shapes are inferred again.

`Finalize` copies the graph first (the searchable graph is left unchanged) and *ensures* what a
deployable graph is: no ``ai.plinio`` node, function or domain is left and the ONNX checker
passes.
"""
from __future__ import annotations

from plinio_onnx.passes.infra import FunctionalPass, InPlacePass, Pass, PassResult, Sequential
from plinio_onnx.passes.odimo_split import SplitAccelerators
from plinio_onnx.passes.pick import PickBranches
from plinio_onnx.passes.prune import PruneChannels
from plinio_onnx.passes.quantize import FoldQuantizers

from .graph import PLINIO_DOMAIN, Graph, check_graph, reinfer_shapes

__all__ = ["Finalize", "StripSearchFunctions", "finalize", "finalize_passes"]


class StripSearchFunctions(InPlacePass):
    """Remove the ``ai.plinio`` functions and domain and every ``plinio.*`` metadata record, and
    infer the shapes again (the finalizing passes leave stale ones)."""

    def call(self, graph: Graph) -> PassResult:
        g = graph.gs
        g.functions = [f for f in g.functions if f.domain != PLINIO_DOMAIN]
        g.import_domains = [d for d in (g.import_domains or []) if d.domain != PLINIO_DOMAIN] or None
        g.toposort()  # every export is sorted before it is checked and written
        reinfer_shapes(graph, what="the finalized model is invalid", check=False)
        graph.metadata = {k: v for k, v in graph.metadata.items() if not k.startswith("plinio.")}
        return PassResult(graph, True)


def finalize_passes(*, format: str | None = "qdq", int4: "str | bool" = "off") -> list[Pass]:
    """The finalizing passes, in order (module docstring)."""
    return [PickBranches(), PruneChannels(), SplitAccelerators(), FoldQuantizers(format=format, int4=int4), StripSearchFunctions()]


class Finalize(FunctionalPass):
    """Searchable → deployable (module docstring); ``format``: "qdq" or "qonnx" for quantized
    graphs, ``int4``: "off" (default: int8 containers), "auto" (INT4 ≤ 4-bit weights where the
    opset is ≥ 21) or "on" (INT4, raising the opset to 21) — `plinio_onnx.passes.qdq`."""

    def __init__(self, *, format: str | None = "qdq", int4: "str | bool" = "off") -> None:
        self.steps = Sequential(finalize_passes(format=format, int4=int4), name="finalize")

    def call(self, graph: Graph) -> PassResult:
        result = self.steps(graph.copy())
        return PassResult(result.graph, result.modified)

    def ensures(self, graph: Graph) -> None:
        left = [f"{n.name} ({n.op})" for n in graph.nodes if (n.domain or "") == PLINIO_DOMAIN]
        if left:
            raise ValueError(f"ai.plinio nodes are left: {', '.join(left)}")
        if any(f.domain == PLINIO_DOMAIN for f in graph.gs.functions):
            raise ValueError("ai.plinio functions are left")
        try:
            check_graph(graph.gs)
        except Exception as err:
            raise ValueError(f"the finalized model is invalid: {' '.join(str(err).split())[:400]}") from None


def finalize(graph: Graph, **options) -> Graph:
    """Return the deployable graph of a searchable ``graph`` (which is left unchanged).

    ``options``: ``format="qdq"|"qonnx"`` for quantized exports, ``int4="off"|"auto"|"on"``
    (`Finalize`); others are ignored."""
    return Finalize(format=options.get("format", "qdq"), int4=options.get("int4", "off"))(graph).graph
