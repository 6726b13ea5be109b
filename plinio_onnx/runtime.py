"""ONNX Runtime sessions for verification and benchmarks."""
from __future__ import annotations

import onnx
import onnxruntime as ort

from .errors import PlinioOnnxError


def ort_session(model: onnx.ModelProto, *, source: str | None = None,
                threads: int | None = None, optimize: bool = True) -> ort.InferenceSession:
    """An inference session on CPU; exact int4 MatMul kernels (see DESIGN.md).

    ``optimize=False`` runs every node as written (no fused integer kernels): the reference
    semantics of a QDQ graph, which fused int8 kernels reproduce only up to requantization
    rounding."""
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise PlinioOnnxError(f"ONNX Runtime cannot load the model: {' '.join(str(err).split())[:300]}",
                              file=source) from None
