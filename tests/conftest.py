"""Every test: no deployment compiler loaded into the test session.

OpenVINO, TVM and IREE, once imported, stay in the process: OpenVINO's threads and allocator made
later tests' forks (DataLoader workers) read corrupted memory and later tests crash with a
segmentation fault; loaded together they can crash at exit. The deploy tests and the
OpenVINO timing run them in child processes; this check names the test that loads one here."""
import sys

import pytest

COMPILER_MODULES = ("openvino", "tvm", "tvm_ffi", "iree.compiler", "iree.runtime")


def _loaded() -> set[str]:
    return {name for name in COMPILER_MODULES if sys.modules.get(name) is not None}


@pytest.fixture(autouse=True)
def _no_compiler_in_the_test_process():
    before = _loaded()
    yield
    loaded = _loaded() - before
    assert not loaded, f"this test imported {', '.join(sorted(loaded))} into the test session: run it in a subprocess"
