"""Deployment-compiler checks: collected only where the ``deploy`` extra is installed.

The project's own environment holds onnxruntime-training, which must not be replaced, and the
compilers are large; a test run without them collects nothing here rather than skipping.
qonnx and hls4ml need plain onnxruntime: they run in a separate, cached environment that the
tests build themselves (`qonnx_env.py`)."""
import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

_DEPLOY = all(importlib.util.find_spec(m) for m in ("openvino", "tvm", "iree.compiler", "iree.runtime"))
collect_ignore_glob = [] if _DEPLOY else ["test_*.py"]


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """Every export the deploy tests use, written once per session (`exports.ExportCache`)."""
    from exports import ExportCache
    return ExportCache(tmp_path_factory.mktemp("deploy_exports"))
