"""A documented OpenVINO limit (README, Deployment), shown on the smallest graph that has it.

OpenVINO 2026.4.1's CPU plugin, on a model with a dynamic batch dimension, computes wrongly an
int8 convolution's output that feeds both an activation quantizer and a float consumer (Concat,
Add, Mul). Its low-precision transformations fold the convolution's dequantization scale
(s_in·s_w) into the next quantizer's thresholds, which then expect the integer accumulator, yet
the plugin also fuses that scale into the convolution's output for the float consumer: the
quantizer reads dequantized values as accumulator ones, so they are scaled by s_in·s_w twice
(on DenseNet-tiny, ~10⁴× too small: the quantizer branch reads zeros). With the shapes made
static (``model.reshape``) the scale stays a Multiply of its own and the result is exact. DenseNet's dense blocks have this shape (a block's input goes to the Concat and through
BN → Relu → quantizer to the next Conv); the way the file writes the quantizers does not matter
(per-tensor or per-channel weights, a bias, int8 or uint8 input codes, Concat or Add all show it).

By hand, in an environment with the deploy extra (it prints the numbers the README quotes)::

    python tests/deploy/openvino_gap.py [--json RESULT.json]

The hand-built model (`concat_after_int8_conv`): x → Q/DQ (int8, scale 0.25) → Conv0 (1×1,
weight 2 × 0.5) → y0 → Concat(y0, Conv1(Q/DQ(y0) uint8, scale 0.25; weight 4 × 0.25)): on
x = [0.5, 1, 1.5, 2] ONNX Runtime gives [x, x]; OpenVINO with a dynamic batch gives
[x, round(x · 0.125 / 0.25) · 0.25] = [x, 0, 0, 0.25, 0.25] (s_in·s_w = 0.125 applied twice),
and with a static one [x, x].
"""
from __future__ import annotations

import json
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT = np.array([0.5, 1.0, 1.5, 2.0], np.float32).reshape(1, 1, 2, 2)


def concat_after_int8_conv() -> onnx.ModelProto:
    """The smallest QDQ graph OpenVINO computes wrongly with a dynamic batch (module docstring)."""
    constants = {"s_in": np.float32(0.25), "z_in": np.int8(0), "w0": np.full((1, 1, 1, 1), 2, np.int8),
                 "s_w0": np.float32(0.5), "z_w": np.int8(0), "s_a": np.float32(0.25), "z_a": np.uint8(0),
                 "w1": np.full((1, 1, 1, 1), 4, np.int8), "s_w1": np.float32(0.25)}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s_in", "z_in"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "s_in", "z_in"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w0", "s_w0", "z_w"], ["w0_dq"]),
        helper.make_node("Conv", ["x_dq", "w0_dq"], ["y0"], kernel_shape=[1, 1]),
        helper.make_node("QuantizeLinear", ["y0", "s_a", "z_a"], ["a_q"]),
        helper.make_node("DequantizeLinear", ["a_q", "s_a", "z_a"], ["a_dq"]),
        helper.make_node("DequantizeLinear", ["w1", "s_w1", "z_w"], ["w1_dq"]),
        helper.make_node("Conv", ["a_dq", "w1_dq"], ["y1"], kernel_shape=[1, 1]),
        helper.make_node("Concat", ["y0", "y1"], ["y"], axis=1),
    ]
    graph = helper.make_graph(nodes, "concat_after_int8_conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 2, 2])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def run_openvino(model: onnx.ModelProto, x: np.ndarray, static: bool) -> np.ndarray:
    """``model`` compiled by OpenVINO's CPU plugin in f32, as read (dynamic batch) or reshaped
    to ``x``'s shape, run on ``x``."""
    import openvino as ov
    core = ov.Core()
    read = core.read_model(model.SerializeToString(), b"")
    if static:
        read.reshape({read.input(0): list(x.shape)})
    compiled = core.compile_model(read, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.asarray(compiled([x])[compiled.output(0)])


def main(argv: list[str]) -> None:
    from plinio_onnx.runtime import ort_session
    model = concat_after_int8_conv()
    result = {"input": INPUT.ravel().tolist(),
              "onnx_runtime": ort_session(model, optimize=False).run(None, {"x": INPUT})[0].ravel().tolist(),
              "onnx_runtime_fused": ort_session(model).run(None, {"x": INPUT})[0].ravel().tolist(),
              "openvino_dynamic": run_openvino(model, INPUT, static=False).ravel().tolist(),
              "openvino_static": run_openvino(model, INPUT, static=True).ravel().tolist()}
    for key, values in result.items():
        print(f"{key:20s} {values}")
    if "--json" in argv:
        with open(argv[argv.index("--json") + 1], "w") as out:
            json.dump(result, out)


if __name__ == "__main__":
    main(sys.argv[1:])
