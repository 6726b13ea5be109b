"""The OpenVINO limit documented in README (Deployment) and `openvino_gap.py` still holds: with
a dynamic batch, an int8 Conv read by a quantizer and by a Concat gets its dequantization scale
twice on the quantizer branch; with static shapes OpenVINO computes what ONNX Runtime computes.
When OpenVINO fixes it, this test fails until the README and the OpenVINO recipe are updated."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def test_openvino_scales_a_shared_int8_conv_output_twice_with_a_dynamic_batch(tmp_path):
    result_file = tmp_path / "gap.json"
    script = Path(__file__).with_name("openvino_gap.py")
    subprocess.run([sys.executable, str(script), "--json", str(result_file)], check=True, timeout=300,
                   capture_output=True)
    result = json.loads(result_file.read_text())
    x = np.array(result["input"])
    expected = np.concatenate([x, x])
    np.testing.assert_array_equal(result["onnx_runtime"], expected)
    np.testing.assert_array_equal(result["onnx_runtime_fused"], expected)
    np.testing.assert_array_equal(result["openvino_static"], expected)
    twice = np.round(x * 0.125 / 0.25) * 0.25          # the branch with s_in·s_w applied twice
    assert np.array_equal(result["openvino_dynamic"], np.concatenate([x, twice])), (
        f"OpenVINO now computes {result['openvino_dynamic']}: update README (Deployment) and openvino_gap.py")
