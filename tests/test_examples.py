"""The runnable examples are documentation: they must run."""
from __future__ import annotations

import subprocess
import sys

from _util import ROOT


def test_train_onnx_in_torch_example(tmp_path):
    out = tmp_path / "trained.onnx"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "01_train_onnx_in_torch.py"),
                             "--epochs", "3", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    accuracy = float(result.stdout.strip().splitlines()[-1].split()[-1])
    assert out.exists() and accuracy > 0.85


def test_pit_training_loop_example(tmp_path):
    out = tmp_path / "pit.onnx"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "02_pit_training_loop.py"),
                             "--epochs", "2", "--strength", "2e-5", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    kept, base = (int(v.replace(",", "")) for v in (last.split()[2], last.split()[5].strip("(),")))
    assert out.exists() and kept < base


def test_mps_to_onnxruntime_example(tmp_path):
    out = tmp_path / "mps.onnx"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "04_mps_to_onnxruntime.py"),
                             "--epochs", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert out.exists() and out.with_suffix(".qonnx.onnx").exists()
    qdq_line = next(line for line in result.stdout.splitlines() if line.startswith("qdq"))
    assert float(qdq_line.split("accuracy")[1].split(",")[0]) > 0.8


def test_regularizers_example_meets_two_targets(tmp_path):
    out = tmp_path / "regularized.onnx"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "06_regularizers.py"),
                             "--regularizer", "adaptive", "--warmup-epochs", "1", "--epochs", "4",
                             "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    targets = next(line for line in lines if line.startswith("targets:"))
    target_params, target_macs = (float(v.split("'")[1].replace(",", "")) for v in targets.split(":")[2:4])
    words = lines[-1].split()
    params, macs = (int(words[i + 1].replace(",", "")) for i in (words.index("params"), words.index("MACs")))
    assert out.exists() and params <= target_params and macs <= target_macs
    assert float(words[-1]) > 0.85


def test_custom_hardware_example():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "05_custom_hardware.py"), "--steps", "20"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    assert lines["my-board"].startswith("digits CNN 130,544 cycles")
    for method in ("pit", "mps"):
        before, after = (float(v.replace(",", "")) for v in lines[method].removesuffix(" cycles").split(" -> "))
        assert after < before


def test_odimo_example_maps_channels_below_both_single_unit_latencies(tmp_path):
    out = tmp_path / "odimo.onnx"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "07_odimo.py"), "--epochs", "1",
                             "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    latency = next(line for line in lines if line.startswith("latency (cycles):"))
    mapping, digital, analog = (float(part.split()[-1].replace(",", "")) for part in latency.split(":")[1].split(","))
    assert mapping < min(digital, analog)
    assert out.exists() and "/odimo/" in next(line for line in lines if line.startswith("sub-layers:"))
    assert float(lines[-1].split()[-1]) > 0.8
