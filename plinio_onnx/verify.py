"""Run a model through ONNX Runtime and through `to_torch` on the same inputs; compare.

Inputs are the user's data (``.npz``) or random values. Symbolic dimensions other than the batch
take the data's shapes or ``input_shapes`` (never sizes made up here); a model whose batch is
fixed (e.g. a ``Reshape`` to ``[1, 2048]`` written by its exporter) runs in batches of that size.
NaN or infinity in the weights, the data or either side's outputs is a `NonFiniteError`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from .data import (data_input_shapes, fixed_batch, input_arrays, load_npz, random_inputs,
                   symbolic_inputs)
from .errors import DataError, PlinioOnnxError
from .finite import check_finite_arrays, check_finite_weights
from .graph import Graph
from .load import load
from .runtime import ort_session
from .to_torch import to_torch


def verify_model(path, *, data: str | None = None, batch: int = 4, max_samples: int = 256,
                 input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict:
    """Compare ONNX Runtime with the torch module on ``data`` (or ``batch`` random samples).

    Returns ``per_output`` (max abs error and output scale), ``relative_error`` (worst error /
    scale), ``samples``, ``quantized`` and ``chunk`` (the fixed batch size runs were split into,
    or None)."""
    if batch < 1:
        raise DataError(f"--batch {batch}: the batch size must be at least 1", file=str(path))
    source = str(path)
    graph = load(path)
    arrays = load_npz(data) if data else None
    shapes = dict(input_shapes or {})
    if arrays is not None and symbolic_inputs(graph):
        shapes = {**data_input_shapes(graph, arrays), **shapes}
    if shapes:
        graph = load(path, input_shapes=shapes)
    check_finite_weights(graph)
    names = [t.name for t in graph.gs.inputs]
    if arrays is not None:
        values = input_arrays(graph, arrays, str(data))
        feeds = {name: value[:max_samples] for name, value in zip(names, values)}
        check_finite_arrays(feeds, what="data", source=str(data))
    else:
        feeds = random_inputs(graph, batch=batch)
    chunk = fixed_batch(graph)
    feeds, samples = _whole_chunks(feeds, chunk, source)
    expected, got = _run_both(graph, feeds, chunk, source)
    check_finite_arrays(dict(zip(_output_names(graph), expected)), what="ONNX Runtime outputs",
                        source=source)
    check_finite_arrays(dict(zip(_output_names(graph), got)), what="torch module's outputs",
                        source=source)
    per_output, worst = {}, 0.0
    for name, e, g in zip(_output_names(graph), expected, got):
        if e.shape != g.shape:
            raise PlinioOnnxError(f"output {name!r}: shape {g.shape} from torch, "
                                  f"{e.shape} from ONNX Runtime", file=source)
        err = float(np.max(np.abs(e.astype(np.float64) - g.astype(np.float64)))) if e.size else 0.0
        scale = float(max(1.0, np.max(np.abs(e)))) if e.size else 1.0
        per_output[name] = {"max_abs_error": err, "scale": scale}
        worst = max(worst, err / scale)
    return {"per_output": per_output, "relative_error": worst, "samples": samples,
            "quantized": _quantized(graph), "chunk": chunk}


def _output_names(graph: Graph) -> list[str]:
    return [t.name for t in graph.gs.outputs]


def _quantized(graph: Graph) -> bool:
    return any(n.op in ("QuantizeLinear", "DequantizeLinear") for n in graph.nodes)


def _whole_chunks(feeds: dict[str, np.ndarray], chunk: int | None, source: str):
    """Feeds cut to a multiple of the fixed batch ``chunk``; (feeds, number of samples)."""
    samples = next((len(v) for v in feeds.values() if v.ndim), 0)
    if chunk is None or samples % chunk == 0 and samples:
        if not samples:
            raise DataError("no samples to compare", file=source)
        return feeds, samples
    usable = samples - samples % chunk
    if usable == 0:
        raise DataError(f"the model's batch is fixed at {chunk}; the data has only {samples} "
                        "samples", file=source)
    return {k: v[:usable] for k, v in feeds.items()}, usable


def _run_both(graph: Graph, feeds: dict[str, np.ndarray], chunk: int | None, source: str):
    """ONNX Runtime's and the torch module's outputs on ``feeds`` (in pieces of ``chunk``)."""
    # QDQ graphs: compare with the nodes as written; fused int8 kernels requantize differently.
    session = ort_session(graph.to_onnx(), source=source, optimize=not _quantized(graph))
    module = to_torch(graph).eval()
    samples = next(len(v) for v in feeds.values())
    step = chunk or samples
    expected_parts, got_parts = [], []
    for start in range(0, samples, step):
        part = {k: v[start:start + step] for k, v in feeds.items()}
        try:
            expected_parts.append(session.run(None, part))
        except Exception as err:
            raise PlinioOnnxError(f"ONNX Runtime cannot run the model on these inputs: "
                                  f"{' '.join(str(err).split())[:300]}", file=source) from None
        with torch.no_grad():
            out = module(*[torch.from_numpy(part[t.name]) for t in graph.gs.inputs])
        out = [out] if isinstance(out, torch.Tensor) else list(out)
        got_parts.append([o.numpy() for o in out])
    join = (lambda parts: parts[0]) if len(expected_parts) == 1 else \
        (lambda parts: np.concatenate(parts) if parts[0].ndim else parts[0])
    expected = [join([p[j] for p in expected_parts]) for j in range(len(expected_parts[0]))]
    got = [join([p[j] for p in got_parts]) for j in range(len(got_parts[0]))]
    return expected, got
