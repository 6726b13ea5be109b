"""The ai.plinio functions at the model's opset: a searchable graph of an opset-18+ model (torch's
default export is opset 20) passes the checker, saves, runs in ONNX Runtime with the values the
opset-17 graph gives, and exports."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import version_converter

import plinio_onnx as po
from _util import MODELS


def _searchable_outputs(method, path, tmp_path, x):
    model = method(path)
    graph = model.searchable_graph()
    saved = tmp_path / f"{method.__name__}_{graph.opset}.onnx"
    graph.save(saved)
    proto = onnx.load(saved)
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(str(saved), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x})[0]
    model.export(tmp_path / f"{method.__name__}_{graph.opset}_deployable.onnx")
    return out


@pytest.mark.parametrize("opset", [18, 20, 21])
@pytest.mark.parametrize("method", [po.PIT, po.MPS, po.SuperNet], ids=["pit", "mps", "supernet"])
def test_searchable_graph_at_the_model_opset(tmp_path, method, opset):
    base = onnx.load(MODELS / "digits_cnn.onnx")
    assert base.opset_import[0].version == 17
    newer = tmp_path / f"digits_{opset}.onnx"
    onnx.save(version_converter.convert_version(base, opset), newer)
    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    reference = _searchable_outputs(method, MODELS / "digits_cnn.onnx", tmp_path, x)
    got = _searchable_outputs(method, newer, tmp_path, x)
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5 * float(np.abs(reference).max()))
