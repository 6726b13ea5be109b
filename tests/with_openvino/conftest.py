"""OpenVINO's measured profile and report measures: collected only where ``openvino`` is installed
(the project's own environment holds onnxruntime-training and no OpenVINO); a run without it
collects nothing here rather than skipping. Without it, `tests/test_measured.py` checks the
error that says how to install it."""
import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("openvino") else ["test_*.py"]
