"""OpenVINO compiles the float PIT exports and computes what ONNX Runtime computes.

Compiled for the CPU with ``INFERENCE_PRECISION_HINT=f32`` (OpenVINO would otherwise run bf16
or f16 where the CPU has it); outputs within 1e-4 of the output scale of ONNX Runtime's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import torch

import plinio_onnx as po
from plinio_onnx.data import random_inputs
from plinio_onnx.runtime import ort_session

MODELS = Path(__file__).resolve().parents[2] / "models"


def _pruned_export(name: str, tmp_path: Path, seed: int = 0) -> tuple[Path, po.Graph]:
    """The PIT export of a zoo model with about 40 % of its channels pruned at random."""
    model = po.PIT(MODELS / f"{name}.onnx")
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for param in model.nas_parameters():
            param.copy_(torch.from_numpy(np.where(rng.random(param.shape) < 0.4, 0.2, 1.0).astype(np.float32)))
    path = tmp_path / f"{name}_pit.onnx"
    exported = model.export(path)
    return path, exported


def _relative_error(expected: np.ndarray, got: np.ndarray) -> float:
    scale = max(1.0, float(np.max(np.abs(expected))))
    return float(np.max(np.abs(expected.astype(np.float64) - got.astype(np.float64)))) / scale


@pytest.mark.parametrize("name", ["resnet8", "digits_cnn"])
def test_openvino_float_pit_export_matches_onnx_runtime(name, tmp_path):
    path, exported = _pruned_export(name, tmp_path)
    original = po.load(MODELS / f"{name}.onnx")
    assert po.cost.total(exported, po.cost.params) < po.cost.total(original, po.cost.params)
    feeds = random_inputs(exported, batch=4, seed=1)
    expected = ort_session(exported.to_onnx()).run(None, feeds)
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(feeds)
    for index, reference in enumerate(expected):
        got = np.asarray(result[compiled.output(index)])
        assert got.shape == reference.shape
        assert _relative_error(reference, got) <= 1e-4, name
