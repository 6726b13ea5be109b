"""The separate environment for qonnx and hls4ml, built once and cached in ``.venv-qonnx``.

qonnx (and so hls4ml) depends on plain ``onnxruntime``, which installs the same ``onnxruntime``
module as the project's onnxruntime-training and would replace it. So they live in their own
virtual environment, without the project's packages, pinned by ``.ci/constraints-qonnx.txt``;
the tests run `qonnx_runner.py` there on files the project wrote. The environment is rebuilt
when the pins change (a stamp file holds the pins it was built from). By hand::

    python3 -m venv .venv-qonnx && .venv-qonnx/bin/pip install -c .ci/constraints-qonnx.txt \\
        qonnx hls4ml onnxruntime numpy
"""
from __future__ import annotations

import fcntl
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = ROOT / ".venv-qonnx"
PINS = ROOT / ".ci" / "constraints-qonnx.txt"
PACKAGES = ["qonnx", "hls4ml", "onnxruntime", "numpy"]


def qonnx_python() -> Path:
    """The interpreter of the qonnx environment, building it first if needed (under a lock)."""
    python = ENV / "bin" / "python"
    stamp = ENV / "pins.txt"
    pins = PINS.read_text()
    with open(ROOT / ".venv-qonnx.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (python.exists() and stamp.exists() and stamp.read_text() == pins):
            base = getattr(sys, "_base_executable", sys.executable)
            subprocess.run([base, "-m", "venv", "--clear", str(ENV)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(PINS), *PACKAGES], check=True)
            stamp.write_text(pins)
    return python
