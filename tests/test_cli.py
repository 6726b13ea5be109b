"""The command line: inspect tables (checked by hand), verify, exit codes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from _util import MODELS


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plinio_onnx.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_inspect_json_counts_resnet8_by_hand():
    result = _cli("inspect", MODELS / "resnet8.onnx", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    # ResNet-8 (3x32x32): conv 3→16 3x3; stack1 16→16 ×2; stack2 16→32 (stride 2) + 32→32 + 1x1
    # shortcut; stack3 32→64 (stride 2) + 64→64 + 1x1 shortcut; fc 64→10. All with bias.
    convs = [(16, 3, 9, 32 * 32), (16, 16, 9, 32 * 32), (16, 16, 9, 32 * 32),
             (32, 16, 9, 16 * 16), (32, 16, 1, 16 * 16), (32, 32, 9, 16 * 16),
             (64, 32, 9, 8 * 8), (64, 32, 1, 8 * 8), (64, 64, 9, 8 * 8)]
    params = sum(o * i * k + o for o, i, k, _ in convs) + 64 * 10 + 10
    macs = sum(o * i * k * s for o, i, k, s in convs) + 64 * 10
    assert report["params"] == params and report["macs"] == macs
    assert len(report["layers"]) == 10 and not report["unsupported"]
    assert report["inputs"][0]["shape"] == ["batch", 3, 32, 32]


def test_inspect_prints_a_table():
    result = _cli("inspect", MODELS / "dscnn.onnx")
    assert result.returncode == 0 and "total" in result.stdout and "Conv" in result.stdout


@pytest.mark.parametrize("name", ["transformer_tiny", "tcn"])
def test_verify_reports_ok(name):
    result = _cli("verify", MODELS / f"{name}.onnx")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_verify_with_data():
    result = _cli("verify", MODELS / "digits_cnn.onnx", "--data", MODELS / "digits.npz")
    assert result.returncode == 0 and "256 samples" in result.stdout


def test_verify_rejects_mismatched_data(tmp_path):
    import numpy as np
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 3, 8, 8), np.float32))
    result = _cli("verify", MODELS / "digits_cnn.onnx", "--data", tmp_path / "bad.npz")
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and "shape" in result.stderr


def test_inspect_says_what_each_method_could_search():
    report = json.loads(_cli("inspect", MODELS / "transformer_tiny.onnx", "--json").stdout)
    pit = report["searchable"]["pit"]
    # Two FFN hidden widths and the heads (4 each) of two attention blocks.
    assert pit["groups"] == 4 and pit["channels"] == 2 * 96 + 2 * 4
    assert any("graph output" in k["reason"] for k in pit["kept_whole"])
    assert report["searchable"]["mps"]["layers"] == 18  # 17 MatMul + 1 Gemm


def test_verify_runs_quantized_exports(tmp_path):
    import plinio_onnx as po
    model = po.MPS(MODELS / "digits_cnn.onnx", w_precisions=(4, 8), a_precisions=(8,))
    import numpy as np
    import torch
    model.calibrate(torch.from_numpy(np.load(MODELS / "digits.npz")["x"][:64]))
    model.export(tmp_path / "q.onnx", format="qdq")
    result = _cli("verify", tmp_path / "q.onnx", "--data", MODELS / "digits.npz")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
