"""Run a model through ONNX Runtime and through `to_torch` on the same inputs; compare."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import graph_inputs_from_npz, random_inputs
from .errors import PlinioOnnxError
from .load import load
from .runtime import ort_session
from .to_torch import to_torch


def verify_model(path, *, data: str | None = None, batch: int = 4, max_samples: int = 256) -> dict:
    graph = load(path)
    if data:
        feeds = graph_inputs_from_npz(graph, data, limit=max_samples)
    else:
        feeds = random_inputs(graph, batch=batch)
    # QDQ graphs: compare with the nodes as written; fused int8 kernels requantize differently.
    quantized = any(n.op in ("QuantizeLinear", "DequantizeLinear") for n in graph.nodes)
    session = ort_session(graph.to_onnx(), source=str(path), optimize=not quantized)
    expected = session.run(None, feeds)
    module = to_torch(graph).eval()
    with torch.no_grad():
        got = module(*[torch.from_numpy(feeds[t.name]) for t in graph.gs.inputs])
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    per_output, worst = {}, 0.0
    for tensor, e, g in zip(graph.gs.outputs, expected, got):
        g = g.numpy()
        if e.shape != g.shape:
            raise PlinioOnnxError(f"output {tensor.name!r}: shape {g.shape} from torch, "
                                  f"{e.shape} from ONNX Runtime", file=str(path))
        err = float(np.max(np.abs(e.astype(np.float64) - g.astype(np.float64)))) if e.size else 0.0
        scale = float(max(1.0, np.max(np.abs(e)))) if e.size else 1.0
        per_output[tensor.name] = {"max_abs_error": err, "scale": scale}
        worst = max(worst, err / scale)
    samples = next(iter(feeds.values())).shape[0] if feeds else 0
    return {"per_output": per_output, "relative_error": worst, "samples": samples, "quantized": quantized}
