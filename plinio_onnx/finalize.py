"""`finalize`: a searchable graph → the deployable graph (pruned, picked, quantized; no ai.plinio).

Each method contributes one finalizing pass, registered with `finalizer` (an order and a
function editing the graph in place); `finalize` runs them in order, removes the ``ai.plinio``
functions and domain, re-infers shapes and checks the model (its postcondition: no ``ai.plinio``
node is left and the ONNX checker passes).
"""
from __future__ import annotations

from typing import Callable

import onnx_graphsurgeon as gs

from .errors import PassError
from .graph import PLINIO_DOMAIN, Graph, infer_shapes


_FINALIZERS: list[tuple[int, str, Callable[..., Graph]]] = []


def finalizer(order: int) -> Callable:
    """Register a finalizing pass ``fn(graph, **options) -> graph`` (it edits ``graph`` and ignores
    options it does not know); lower ``order`` runs first (SuperNet picks branches at 10, PIT
    prunes channels at 20, quantizers are folded at 30)."""
    def decorate(fn: Callable[..., Graph]) -> Callable[..., Graph]:
        _FINALIZERS.append((order, fn.__name__, fn))
        _FINALIZERS.sort(key=lambda entry: entry[:2])
        return fn
    return decorate


def finalize(graph: Graph, **options) -> Graph:
    """Return the deployable graph of a searchable ``graph`` (which is left unchanged).

    ``options`` reach every finalizer, e.g. ``format="qdq"|"qonnx"`` for quantized exports."""
    import plinio_onnx.passes  # noqa: F401  (registers the finalizers)

    result = graph.copy()
    for _, _, step in _FINALIZERS:
        result = step(result, **options)
    left = [f"{n.name} ({n.op})" for n in result.nodes if (n.domain or "") == PLINIO_DOMAIN]
    if left:
        raise PassError(f"finalize left ai.plinio nodes: {', '.join(left)}", file=graph.source)
    return reinfer(result)


def reinfer(graph: Graph) -> Graph:
    """Drop stale intermediate shapes and the ai.plinio functions, infer shapes again and check;
    edits and returns ``graph``."""
    g = graph.gs
    boundary = set(map(id, g.inputs)) | set(map(id, g.outputs))
    for tensor in g.tensors().values():
        if isinstance(tensor, gs.Variable) and id(tensor) not in boundary:
            tensor.shape = None
    g.functions = [f for f in g.functions if f.domain != PLINIO_DOMAIN]
    g.import_domains = [d for d in (g.import_domains or []) if d.domain != PLINIO_DOMAIN] or None
    g.toposort()  # every export is sorted before it is checked and written
    try:
        infer_shapes(g)
    except Exception as err:
        raise PassError(f"the finalized model is invalid: {' '.join(str(err).split())[:400]}",
                        file=graph.source) from None
    graph.metadata = {k: v for k, v in graph.metadata.items() if not k.startswith("plinio.")}
    return graph
