"""`plinio-onnx optimize` on bad input: one named error, exit code 2, nothing written; and the
files it leaves (locks, temporaries, permissions) after a crash or a second run."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from _util import MODELS
from plinio_onnx.cli import main

MODEL = MODELS / "digits_cnn.onnx"
DATA = MODELS / "digits.npz"
SHORT = ("--epochs", "1", "--warmup-epochs", "1", "--finetune-epochs", "1", "--quiet")


def _optimize(capsys, model, data, out: Path, *extra) -> tuple[int, str]:
    code = main(["optimize", str(model), "--data", str(data), "-o", str(out), *SHORT, *extra])
    return code, capsys.readouterr().err


def _digits() -> dict[str, np.ndarray]:
    with np.load(DATA) as d:
        return {"x": d["x"], "y": d["y"]}


def _outputs(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.stem) and p.suffix != ".ckpt"
                  and not p.is_dir())


def _refused(code: int, err: str, out: Path, *words: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and "internal error" not in err, err
    for word in words:
        assert word in err, err
    assert not out.exists() and not any(p.suffix == ".json" for p in out.parent.glob(out.stem + "*")), err


# -- 1. NaN/Inf -------------------------------------------------------------------------------
def test_nan_weight_is_refused_naming_the_initializer(tmp_path, capsys):
    model = onnx.load(MODEL)
    init = model.graph.initializer[0]
    values = numpy_helper.to_array(init).copy()
    values.flat[3] = np.nan
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(model, tmp_path / "nan.onnx")
    code, err = _optimize(capsys, tmp_path / "nan.onnx", DATA, tmp_path / "out.onnx")
    _refused(code, err, tmp_path / "out.onnx", "NaN/Inf in the weights", repr(init.name), "nan.onnx")


def test_nan_samples_in_x_are_refused_naming_the_array_and_sample(tmp_path, capsys):
    arrays = _digits()
    arrays["x"][[4, 9]] = np.nan
    np.savez(tmp_path / "d.npz", **arrays)
    code, err = _optimize(capsys, MODEL, tmp_path / "d.npz", tmp_path / "out.onnx")
    _refused(code, err, tmp_path / "out.onnx", "NaN/Inf in the data", "'x'", "first in sample 4", "(2 samples)")


def test_inf_in_regression_targets_is_refused(tmp_path, capsys):
    arrays = _digits()
    y = np.zeros((len(arrays["x"]), 10), np.float32)
    y[7, 2] = np.inf
    np.savez(tmp_path / "d.npz", x=arrays["x"], y=y)
    code, err = _optimize(capsys, MODEL, tmp_path / "d.npz", tmp_path / "out.onnx")
    _refused(code, err, tmp_path / "out.onnx", "NaN/Inf in the data", "'y'", "1 Inf")


def test_a_diverging_training_loss_stops_the_run(tmp_path, capsys):
    arrays = _digits()   # finite targets whose squared error overflows float32
    np.savez(tmp_path / "d.npz", x=arrays["x"], y=np.full((len(arrays["x"]), 10), 1e20, np.float32))
    code, err = _optimize(capsys, MODEL, tmp_path / "d.npz", tmp_path / "out.onnx")
    _refused(code, err, tmp_path / "out.onnx", "NaN/Inf in the training loss", "warmup epoch 1")


# -- 2. shapes --------------------------------------------------------------------------------
class _Net(torch.nn.Module):
    def __init__(self, fixed_batch: bool = False) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)
        self.fixed_batch = fixed_batch

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(h.reshape(1, 8) if self.fixed_batch else h)


def _export(net, path: Path, batch: int, axes: dict | None) -> Path:
    torch.onnx.export(net, torch.zeros(batch, 1, 8, 8), path, dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes=axes)
    return path


def test_symbolic_spatial_sizes_come_from_the_data_and_the_report_says_so(tmp_path, capsys):
    torch.manual_seed(0)
    model = _export(_Net(), tmp_path / "sym.onnx", 2, {"x": {0: "N", 2: "H", 3: "W"}})
    code, err = _optimize(capsys, model, DATA, tmp_path / "out.onnx")
    assert code == 0, err
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["notes"] == ["symbolic input sizes taken from the data: x ['N', 1, 'H', 'W'] → ['N', 1, 8, 8]"]
    assert "note: symbolic input sizes taken from the data" in (tmp_path / "out.report.md").read_text()
    dims = [d.dim_value or d.dim_param for d in onnx.load(tmp_path / "out.onnx").graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [1, 8, 8]


def test_a_fixed_batch_with_a_hard_coded_reshape_is_refused_up_front(tmp_path, capsys):
    model = _export(_Net(fixed_batch=True), tmp_path / "fixed.onnx", 1, None)
    code, err = _optimize(capsys, model, DATA, tmp_path / "out.onnx")
    _refused(code, err, tmp_path / "out.onnx", "fixes the batch size to 1", "fixed.onnx")
    assert not (tmp_path / "out.ckpt").exists()


# -- 7. labels and options --------------------------------------------------------------------
def test_out_of_range_class_labels_are_named_as_such(tmp_path, capsys):
    arrays = _digits()
    arrays["y"][5] = 12
    np.savez(tmp_path / "d.npz", **arrays)
    code, err = _optimize(capsys, MODEL, tmp_path / "d.npz", tmp_path / "out.onnx")
    _refused(code, err, tmp_path / "out.onnx", "class labels 'y' range over 0..12", "10 classes")
    assert "regression" not in err
