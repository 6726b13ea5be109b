"""Where OpenVINO's int8 QDQ output leaves ONNX Runtime's on DenseNet-tiny QAT (README,
Deployment), by hand in an environment with the deploy extra::

    python tests/deploy/openvino_gap.py

The QAT QDQ export the deploy tests would write (`exports.ExportCache`, random architecture) is
run whole and cut after its first dense block's Concat (``onnx.utils.extract_model``), as
written and without the input quantizer; OpenVINO runs them in a child process (`compilers.py`).
It prints, for each, the largest |OpenVINO − ONNX Runtime| beside the largest |ONNX Runtime|
output, and how far the whole model's output moves in ONNX Runtime when that block's
convolution is zeroed (how much of an inner error the output shows on this untrained model).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.utils

from exports import Export, ExportCache, output_step, run_compiler
from plinio_onnx.runtime import ort_session


def _without_input_quantizer(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the graph input's Q → Clip → DQ removed (the first Conv reads floats)."""
    source = model.graph.input[0].name
    chain, tensor = [], source
    while len(chain) < 3:
        node = next(n for n in model.graph.node if n.input and n.input[0] == tensor and n.op_type != "Conv")
        chain.append(node)
        tensor = node.output[0]
    for node in model.graph.node:
        node.input[:] = [source if name == tensor else name for name in node.input]
    for node in chain:
        model.graph.node.remove(node)
    return model


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="openvino-gap-"))
    whole = ExportCache(folder).get("densenet_tiny", "qat", "qdq")
    concat = next(n for n in whole.proto.graph.node if n.op_type == "Concat")
    cut = folder / "cut.onnx"
    onnx.utils.extract_model(str(whole.path), str(cut), [whole.proto.graph.input[0].name], [concat.output[0]])
    float_input = folder / "cut_float_input.onnx"
    onnx.save(_without_input_quantizer(onnx.load(str(cut))), str(float_input))
    zeroed = whole.proto
    branch_conv = next(n for n in zeroed.graph.node if n.op_type == "Conv" and n.output[0] in concat.input[1:])
    weight_dq = next(n for n in zeroed.graph.node if n.output[0] == branch_conv.input[1])
    weights = next(t for t in zeroed.graph.initializer if t.name == weight_dq.input[0])
    weights.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(onnx.numpy_helper.to_array(weights)), weights.name))
    zeroed_path = folder / "zeroed.onnx"
    onnx.save(zeroed, str(zeroed_path))

    cases = [whole] + [Export(p, "qat", "qdq", whole.feeds) for p in (cut, float_input)]
    openvino = run_compiler("openvino", cases, folder / "openvino")
    for case in cases:
        expected = ort_session(case.proto).run(None, case.feeds)[0]
        got = openvino[case.path]
        error = "compile error" if isinstance(got, str) else f"{float(np.max(np.abs(got[0] - expected))):.3g}"
        print(f"{case.path.name:24s} max |OpenVINO - ONNX Runtime| {error} (max |output| "
              f"{float(np.max(np.abs(expected))):.3g}, one output step {output_step(expected):.3g})")
    moved = np.abs(ort_session(onnx.load(str(zeroed_path))).run(None, whole.feeds)[0]
                   - ort_session(whole.proto).run(None, whole.feeds)[0])
    print(f"zeroing {branch_conv.name} moves the whole output by {float(moved.max()):.3g} in ONNX Runtime")


if __name__ == "__main__":
    main()
