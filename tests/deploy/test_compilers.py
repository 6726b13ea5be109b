"""OpenVINO, TVM (Relax ONNX frontend) and IREE (llvm-cpu) compile every method's export and
compute what ONNX Runtime computes on the same inputs: float within 1e-4 of the output scale,
QDQ within one quantization step of the output. The cases are `exports.COMPILER_CASES`; the
documented refusals (`accepts.COMPILER_REFUSALS`) must fail with the compiler's own message."""
from __future__ import annotations

import numpy as np
import pytest

from accepts import COMPILER_REFUSALS
from exports import COMPILER_CASES, output_step, relative_error, run_compilers
from plinio_onnx.runtime import ort_session

COMPILERS = ("openvino", "tvm", "iree")


@pytest.fixture(scope="session")
def compiled(exports, tmp_path_factory, request) -> dict:
    """compiler → {export path: outputs or error} for the selected tests (``-k`` narrows what is
    compiled): each compiler runs its cases in one process, the processes side by side."""
    selected = [item.callspec.params for item in request.session.items
                if getattr(item, "originalname", None) == "test_compiler_matches_onnx_runtime"]
    compilers = [c for c in COMPILERS if any(p["compiler"] == c for p in selected)]
    cases = [c for c in COMPILER_CASES if any(p["case"] == c for p in selected)]
    paths = [exports.get(c.model, c.method, c.format, c.int4) for c in cases]
    return run_compilers(compilers, paths, tmp_path_factory.mktemp("compiled"))


@pytest.mark.parametrize("case", COMPILER_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("compiler", COMPILERS)
def test_compiler_matches_onnx_runtime(compiler, case, exports, compiled):
    export = exports.get(case.model, case.method, case.format, case.int4)
    got = compiled[compiler][export.path]
    refusal = COMPILER_REFUSALS.get((compiler, case.id))
    if refusal is not None:
        assert isinstance(got, str) and refusal in got, f"{compiler} now takes {case.id}: update README and accepts.py"
        return
    assert not isinstance(got, str), f"{compiler} failed on {case.id}:\n{got}"
    expected = ort_session(export.proto).run(None, export.feeds)
    assert len(got) == len(expected)
    for reference, output in zip(expected, got):
        assert output.shape == reference.shape
        if case.format == "float":
            assert relative_error(reference, output) <= 1e-4, case.id
        else:
            assert float(np.max(np.abs(reference - output))) <= output_step(reference) + 1e-6, case.id
