"""`inspect_model`: the graph summary and per-layer cost table behind ``plinio-onnx inspect``."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from . import cost
from .data import symbolic_inputs
from .errors import DataError, UnsupportedOpError
from .load import load


def _shape(t: gs.Tensor) -> list:
    return [d if isinstance(d, (int, np.integer)) else str(d) for d in (t.shape or [])]


def inspect_model(path, hardware=None, *, input_shapes=None) -> dict:
    """A JSON-ready summary: inputs/outputs, op counts, layers with params and MACs, totals;
    with ``hardware`` (a `plinio_onnx.hardware` profile or its name) also each layer's modelled
    ``latency`` (and ``energy``), their totals and the profile (`hardware_costs`).

    ``input_shapes`` fixes symbolic sizes (`plinio_onnx.load`); MACs need every spatial size."""
    graph = load(path, input_shapes=input_shapes)
    layers = []
    for spec in _layer_specs(graph, str(path)):
        layers.append({"name": spec.name, "op": spec.op, "kind": spec.kind,
                       "in_channels": spec.in_channels, "out_channels": spec.out_channels,
                       "kernel_size": spec.kernel_size, "groups": spec.groups, "bias": spec.bias,
                       "output_positions": spec.output_positions,
                       "params": int(cost.params(spec)), "macs": int(cost.macs(spec))})
    unsupported = []
    try:
        from .to_torch import to_torch
        to_torch(graph)
    except UnsupportedOpError as err:
        unsupported = [{"node": n, "op": op, "reason": why} for n, op, why in err.problems]
    searchable = _searchable(graph)
    all_params = sum(int(np.asarray(t.values).size) for t in graph.initializers().values()
                     if np.issubdtype(np.asarray(t.values).dtype, np.floating))
    report = {
        "file": str(path),
        "opset": graph.opset,
        "nodes": len(graph.nodes),
        "inputs": [{"name": t.name, "shape": _shape(t), "dtype": str(np.dtype(t.dtype))} for t in graph.gs.inputs],
        "outputs": [{"name": t.name, "shape": _shape(t), "dtype": str(np.dtype(t.dtype))
                     if t.dtype is not None else "?"} for t in graph.gs.outputs],
        "op_counts": dict(Counter(n.op for n in graph.nodes).most_common()),
        "layers": layers,
        "params": sum(r["params"] for r in layers),
        "macs": sum(r["macs"] for r in layers),
        "all_parameters": all_params,
        "unsupported": unsupported,
        "searchable": searchable,
    }
    if hardware is not None:
        from .hardware import for_model, hardware_costs, is_measured
        if is_measured(hardware):   # the model's own table: cached beside it, or measured now
            hardware = for_model(hardware, path)
        costs = hardware_costs(graph, hardware)
        by_name = {row["name"]: row for row in costs.pop("layers")}
        for row in layers:
            row.update({k: v for k, v in by_name[row["name"]].items() if k in ("latency", "energy")})
        report.update(latency=costs.pop("latency"), energy=costs.pop("energy"), hardware=costs)
    return report


def _layer_specs(graph, source: str) -> list:
    try:
        return cost.layer_specs(graph)
    except ValueError:  # a layer's output size depends on a symbolic input size
        symbolic = symbolic_inputs(graph)
        if not symbolic:
            raise
        name, shape = next(iter(symbolic.items()))
        dims = "x".join(str(d) if isinstance(d, int) else "N" for d in shape)
        raise DataError(f"input {name!r} has symbolic sizes {shape}, so MACs cannot be counted: "
                        f"give --input-shape {name}:{dims} with the sizes to inspect",
                        file=source) from None


def _searchable(graph) -> dict:
    """What each method could search: PIT's channel groups (and why the others are kept whole),
    the layers MPS would quantize, and the layers SuperNet would give alternatives."""
    from .analysis import analyze_channels
    from .passes.shuffle import shuffles_as_gather
    graph = graph.copy()
    shuffles_as_gather(graph.gs)  # as the PIT pass sees the graph
    analysis = analyze_channels(graph)
    prunable = analysis.prunable()
    kept_whole = [{"group": g.name, "channels": g.size,
                   "reason": g.unprunable[0] if g.unprunable else "no layer produces or reads it"}
                  for g in analysis.groups if not g.prunable]
    layers = [n for n in graph.nodes if n.op in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    return {"pit": {"groups": len(prunable), "channels": sum(g.size for g in prunable),
                    "layers": sorted({p.node for g in prunable for p in g.producers}),
                    "kept_whole": kept_whole},
            "mps": {"layers": len(layers)},
            "supernet": {"layers": sum(1 for n in layers if n.op in ("Conv", "Gemm", "MatMul"))}}
