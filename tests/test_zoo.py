"""Round trip: every zoo model and the real architectures ONNX ships match their references."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import plinio_onnx as po
from plinio_onnx.data import random_inputs

from _util import MODELS, ONNX_DATA, ZOO_NAMES, relative_error, run_ort, run_torch

LIGHT = sorted(p.stem for p in (ONNX_DATA / "light").glob("*.onnx"))


def test_zoo_is_present():
    assert {"resnet8", "dscnn", "mobilenetv1_025", "fc_autoencoder", "tcn", "mobilenetv2_tiny",
            "densenet_tiny", "transformer_tiny", "digits_cnn"} <= set(ZOO_NAMES)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_matches_onnxruntime(name):
    path = MODELS / f"{name}.onnx"
    graph = po.load(path)
    feeds = random_inputs(graph, batch=3, seed=1)
    expected = run_ort(path, feeds)
    module = po.to_torch(graph).eval()
    got = run_torch(module, feeds, module.input_names)
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert relative_error(e, g) <= 1e-4


def _runner_input(shape) -> np.ndarray:
    """The input ONNX's backend runner feeds the light models: arange(n)/n, float32."""
    shape = [d if isinstance(d, int) else 1 for d in shape]
    n = int(np.prod(shape))
    return (np.arange(n).reshape(shape) / n).astype(np.float32)


@pytest.mark.parametrize("name", LIGHT)
def test_onnx_shipped_architectures_match_expected_outputs(name):
    path = ONNX_DATA / "light" / f"{name}.onnx"
    graph = po.load(path)
    module = po.to_torch(graph).eval()
    feeds = {t.name: _runner_input(t.shape) for t in graph.gs.inputs}
    got = run_torch(module, feeds, module.input_names)[0]
    expected = numpy_helper.to_array(onnx.load_tensor(str(ONNX_DATA / "light" / f"{name}_output_0.pb")))
    assert relative_error(expected, got) <= 1e-4
    assert relative_error(run_ort(path, feeds)[0], got) <= 1e-4
