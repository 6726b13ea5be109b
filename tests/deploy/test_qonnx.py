"""QONNX exports of the digits CNN in qonnx's reference executor and through hls4ml (convert +
C simulation with g++), in the separate qonnx environment (`qonnx_env.py`), against ONNX
Runtime on the QDQ export of the same model, on the digits test split.

The CNN is first trained for a few epochs (agreement on an untrained network's near-ties would
say nothing). hls4ml takes per-tensor weight scales (its scale propagation through a Conv with a
bias handles per-channel scales only without one), so the hls4ml exports are searched with
``per_channel=False, weight_scale="per_tensor"``: QAT 8-bit and a per-layer mixed 4/8-bit MPS
result. The per-channel mixed-precision export (one Quant per precision group) runs in qonnx's
executor; hls4ml refuses it (documented, asserted)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import plinio_onnx as po
from exports import LOGITS, MASKS, MODELS, random_architecture
from qonnx_env import qonnx_python
from plinio_onnx.runtime import ort_session

DIGITS = np.load(MODELS / "digits.npz")
_SPLIT = int(0.8 * len(DIGITS["x"]))
TRAIN = DIGITS["perm"][:_SPLIT]
TEST = DIGITS["perm"][_SPLIT:]
RUNNER = Path(__file__).with_name("qonnx_runner.py")
HLS4ML_REFUSAL = "Unsupported operation type: Gather"   # per-channel mixed precisions (README)


@pytest.fixture(scope="module")
def trained_digits() -> po.Graph:
    """The digits CNN after 15 epochs of Adam on the training split."""
    graph = po.load(MODELS / "digits_cnn.onnx")
    module = po.to_torch(graph).train()
    x, y = torch.from_numpy(DIGITS["x"][TRAIN]), torch.from_numpy(DIGITS["y"][TRAIN])
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(15):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(module(x[batch]), y[batch]).backward()
            optimizer.step()
    return po.sync(graph, module.eval())


def _quantized(graph: po.Graph, seed: int, **options) -> po.MPS:
    model = po.MPS(graph.copy(), **options)
    model.calibrate(torch.from_numpy(DIGITS["x"][TRAIN[:256]]))
    random_architecture(model, seed, LOGITS, MASKS, 0.4)
    return model.eval()


VARIANTS = {   # name → (MPS options, seed)
    "qat8": ({"w_precisions": (8,), "a_precisions": (8,), "per_channel": False, "weight_scale": "per_tensor"}, 0),
    "mps48": ({"w_precisions": (4, 8), "a_precisions": (4, 8), "per_channel": False, "weight_scale": "per_tensor"}, 1),
    "mps48_per_channel": ({"w_precisions": (4, 8), "a_precisions": (8,)}, 0),
}


@pytest.fixture(scope="module")
def digits_exports(trained_digits, tmp_path_factory) -> dict:
    """variant → (QONNX path, ONNX Runtime's outputs of the QDQ export on the test split)."""
    folder = tmp_path_factory.mktemp("qonnx")
    np.savez(folder / "test.npz", input=DIGITS["x"][TEST])
    out = {"inputs": folder / "test.npz", "folder": folder}
    for name, (options, seed) in VARIANTS.items():
        model = _quantized(trained_digits, seed, **options)
        bits = {b for e in model.chosen_precisions().values() for b in np.atleast_1d(e["weight_bits"])}
        assert bits == ({8} if name == "qat8" else {4, 8}), (name, bits)
        path = folder / f"{name}.onnx"
        model.export(path, format="qonnx")
        qdq = model.export(format="qdq").to_onnx()
        out[name] = (path, ort_session(qdq).run(None, {"input": DIGITS["x"][TEST]})[0])
    return out


def _run(mode: str, path: Path, inputs: Path, folder: Path) -> "np.ndarray | str":
    result = folder / f"{path.stem}.{mode}.npz"
    done = subprocess.run([str(qonnx_python()), str(RUNNER), mode, str(path), str(inputs), str(result),
                           str(folder / f"{path.stem}.hls")], capture_output=True, text=True, timeout=900)
    if done.returncode:
        return done.stderr
    with np.load(result) as saved:
        return saved["output0"]


def _step(reference: np.ndarray) -> float:
    return float(reference.max() - reference.min()) / 255


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_qonnx_executor_matches_onnx_runtime(variant, digits_exports):
    path, reference = digits_exports[variant]
    got = _run("qonnx", path, digits_exports["inputs"], digits_exports["folder"])
    assert not isinstance(got, str), got
    assert float(np.max(np.abs(got - reference))) <= _step(reference)
    assert np.mean(got.argmax(1) == DIGITS["y"][TEST]) > 0.8   # the trained network, quantized


@pytest.mark.skipif(shutil.which("g++") is None, reason="hls4ml's C simulation needs g++")
@pytest.mark.parametrize("variant", ["qat8", "mps48"])
def test_hls4ml_c_simulation_agrees_with_onnx_runtime(variant, digits_exports):
    path, reference = digits_exports[variant]
    got = _run("hls4ml", path, digits_exports["inputs"], digits_exports["folder"])
    assert not isinstance(got, str), got
    assert got.shape == reference.shape
    assert np.mean(got.argmax(1) == reference.argmax(1)) >= 0.99


def test_hls4ml_refuses_per_channel_precision_groups(digits_exports):
    path, _ = digits_exports["mps48_per_channel"]
    got = _run("hls4ml", path, digits_exports["inputs"], digits_exports["folder"])
    assert isinstance(got, str) and HLS4ML_REFUSAL in got, "hls4ml now takes it: update README"
