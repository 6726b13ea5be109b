"""Shared test helpers: paths, ONNX Runtime reference runs, error metrics."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
ONNX_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
ZOO_NAMES = sorted(p.stem for p in MODELS.glob("*.onnx"))


def run_ort(model: onnx.ModelProto | str | os.PathLike, feeds: dict) -> list[np.ndarray]:
    from plinio_onnx.runtime import ort_session
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    return ort_session(model).run(None, feeds)


def run_torch(module: torch.nn.Module, feeds: dict, names: list[str]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*[torch.from_numpy(np.asarray(feeds[n])) for n in names])
    out = [out] if isinstance(out, torch.Tensor) else list(out)
    return [o.numpy() for o in out]


def relative_error(expected: np.ndarray, got: np.ndarray) -> float:
    assert expected.shape == got.shape, (expected.shape, got.shape)
    if expected.size == 0:
        return 0.0
    scale = max(1.0, float(np.max(np.abs(expected))))
    return float(np.max(np.abs(expected.astype(np.float64) - got.astype(np.float64)))) / scale


def random_architecture(model, seed: int, logits: tuple[str, ...], masks: tuple[str, ...], below: float) -> None:
    """Random architecture parameters of a searchable model, by ONNX name: standard normal for the
    initializers ending in ``logits``, and for those ending in ``masks`` each entry 0.2 (below
    the threshold) with probability ``below``, else 1."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name in model.module.initializer_names.values():
            param = model.tensor(name)
            if not param.requires_grad:
                continue
            if name.endswith(logits):
                param.copy_(torch.from_numpy(rng.standard_normal(param.shape).astype(np.float32)))
            elif name.endswith(masks):
                param.copy_(torch.from_numpy(np.where(rng.random(param.shape) < below, 0.2, 1.0).astype(np.float32)))


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests (modules that train: `pytestmark = usefixtures(...)`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
