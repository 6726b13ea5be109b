"""Deployment-compiler checks: collected only where the ``deploy`` extra (OpenVINO) is installed.

The project's own environment holds onnxruntime-training, which must not be replaced, and the
compilers are large; a test run without them collects nothing here rather than skipping."""
import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("openvino") else ["test_openvino.py"]
