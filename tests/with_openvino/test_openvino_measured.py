"""The openvino-cpu profile and the report's OpenVINO measure (where OpenVINO is installed)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import plinio_onnx as po
from plinio_onnx.optimize import measure

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_measured import _tiny  # noqa: E402


def test_openvino_profile_is_cached_beside_the_model(tmp_path, capsys):
    path = tmp_path / "tiny.onnx"
    _tiny(path)
    # In a process of its own, as `optimize` times OpenVINO: loaded here, OpenVINO corrupts the
    # test session's later forks.
    done = subprocess.run([sys.executable, "-m", "plinio_onnx.cli", "profile", str(path), "--hardware",
                           "openvino-cpu", "--repeats", "2", "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["table"] == str(tmp_path / "tiny.openvino-cpu.json") and summary["layers"] == 4
    profile = po.hardware.for_model("openvino-cpu", path)
    assert profile.name == "openvino-cpu" and profile.latency.runtime == "openvino-cpu"
    assert profile.latency.predict(po.load(path)) == pytest.approx(profile.latency.whole_seconds)
    assert not (tmp_path / "tiny.ort-cpu.json").exists()
    assert "openvino" not in sys.modules   # the cache is checked without loading OpenVINO


def test_openvino_profile_is_measured_out_of_process(tmp_path):
    # What `optimize --hardware openvino-cpu` calls before it trains: the table is timed in a
    # child process, so OpenVINO never enters this one (its later forks stay sound).
    path = tmp_path / "tiny.onnx"
    _tiny(path)
    seen = []
    profile = po.hardware.for_model("openvino-cpu", path, channel_multiple=8, progress=lambda *a: seen.append(a))
    assert "openvino" not in sys.modules
    assert seen[0] == (0, 4, "conv1") and seen[-1] == (4, 4, "")
    assert profile.source == str(tmp_path / "tiny.openvino-cpu.json") and (tmp_path / "tiny.openvino-cpu.json").exists()
    assert profile.latency.runtime == "openvino-cpu" and set(profile.latency.layers) == {"conv1", "dw", "conv2", "fc"}
    assert profile.latency.predict(po.load(path)) == pytest.approx(profile.latency.whole_seconds)
    again = po.hardware.for_model("openvino-cpu", path, channel_multiple=8, progress=lambda *a: seen.append(a))
    assert len(seen) == 5 and set(again.latency.layers) == set(profile.latency.layers)   # cached: not timed again
    assert "openvino" not in sys.modules


def test_the_report_measures_in_openvino_too(tmp_path):
    path = tmp_path / "tiny.onnx"
    _tiny(path)
    result = measure.measure_latency(path, path, ["x"], [np.zeros((2, 4, 6, 6), np.float32)], budget_s=0.2)
    assert list(result) == ["ort-cpu", "openvino-cpu"]
    assert result["openvino-cpu"]["input_ms"] > 0 and result["openvino-cpu"]["output_ms"] > 0
