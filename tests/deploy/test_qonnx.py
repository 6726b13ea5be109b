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

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

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


def _run(mode: str, path: Path, inputs: Path, folder: Path) -> "dict | str":
    """What `qonnx_runner.py` saved (``output0`` …), or its error output."""
    result = folder / f"{path.stem}.{mode}.npz"
    done = subprocess.run([str(qonnx_python()), str(RUNNER), mode, str(path), str(inputs), str(result),
                           str(folder / f"{path.stem}.hls")], capture_output=True, text=True, timeout=900)
    if done.returncode:
        return done.stderr
    with np.load(result) as saved:
        return {key: saved[key] for key in saved.files}


@pytest.fixture(scope="module")
def hls4ml_results(digits_exports) -> "callable":
    """variant → hls4ml's run of its QONNX export (`_run`), each run once per module."""
    done: dict = {}

    def result(variant: str):
        if variant not in done:
            done[variant] = _run("hls4ml", digits_exports[variant][0], digits_exports["inputs"],
                                 digits_exports["folder"])
        return done[variant]
    return result


def _step(reference: np.ndarray) -> float:
    return float(reference.max() - reference.min()) / 255


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_qonnx_executor_matches_onnx_runtime(variant, digits_exports):
    path, reference = digits_exports[variant]
    got = _run("qonnx", path, digits_exports["inputs"], digits_exports["folder"])
    assert not isinstance(got, str), got
    got = got["output0"]
    assert float(np.max(np.abs(got - reference))) <= _step(reference)
    assert np.mean(got.argmax(1) == DIGITS["y"][TEST]) > 0.8   # the trained network, quantized


@pytest.mark.skipif(shutil.which("g++") is None, reason="hls4ml's C simulation needs g++")
@pytest.mark.parametrize("variant", ["qat8", "mps48"])
def test_hls4ml_c_simulation_agrees_with_onnx_runtime(variant, digits_exports, hls4ml_results):
    _, reference = digits_exports[variant]
    got = hls4ml_results(variant)
    assert not isinstance(got, str), got
    got = got["output0"]
    assert got.shape == reference.shape
    assert np.mean(got.argmax(1) == reference.argmax(1)) >= 0.99


def test_hls4ml_refuses_per_channel_precision_groups(digits_exports, hls4ml_results):
    got = hls4ml_results("mps48_per_channel")
    assert isinstance(got, str) and HLS4ML_REFUSAL in got, "hls4ml now takes it: update README"


def _written_layers(path: Path) -> list[dict]:
    """Each Conv/Gemm of a QONNX export, in graph order, as the file writes it: weights in
    hls4ml's layout (Conv: kh, kw, in, out; Dense: in, out), per-output-channel weight scales,
    bit-width, the input quantizer's scale and the bias."""
    model = onnx.load(str(path))
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    layers = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        weight_quant, input_quant = producer[node.input[1]], producer[node.input[0]]
        assert weight_quant.op_type == input_quant.op_type == "Quant", node.name
        weight = values[weight_quant.input[0]]
        transposed = any(a.name == "transB" and a.i for a in node.attribute)
        weight = weight.transpose(2, 3, 1, 0) if node.op_type == "Conv" else (weight.T if transposed else weight)
        channels = weight.shape[-1]
        layers.append({"name": node.name, "weight": weight, "bias": values[node.input[2]],
                       "weight_scale": np.broadcast_to(values[weight_quant.input[1]].reshape(-1), (channels,)),
                       "bits": int(values[weight_quant.input[3]]), "input_scale": float(values[input_quant.input[1]])})
    return layers


def _hls4ml_layers(saved: dict) -> list[dict]:
    """Each Conv/Dense layer of hls4ml's model with the ApplyAlpha layers before (input scale)
    and after it (rescaling): arrays as `qonnx_runner.py` saved them."""
    described = json.loads(str(saved["layers"]))
    by_output = {out: i for i, layer in enumerate(described) for out in layer["outputs"]}
    layers = []
    for i, layer in enumerate(described):
        if not layer["class"].endswith(("Conv2D", "Dense")):
            continue
        before = by_output[layer["inputs"][0]]
        after = next(j for j, other in enumerate(described) if other["inputs"][:1] == layer["outputs"][:1])
        assert described[before]["class"].endswith("ApplyAlpha") and described[after]["class"].endswith("ApplyAlpha")
        layers.append({"name": layer["name"], "precision": layer["weights"]["weight"],
                       **{f"{key}": saved[f"layer{i}.{key}"] for key in ("weight", "bias")},
                       "input_scale": saved[f"layer{before}.scale"], "input_offset": saved[f"layer{before}.bias"],
                       "rescale": saved[f"layer{after}.scale"], "rebias": saved[f"layer{after}.bias"]})
    return layers


@pytest.mark.parametrize("variant", ["qat8", "mps48"])
def test_hls4ml_holds_the_weights_scales_and_biases_the_export_wrote(variant, digits_exports, hls4ml_results):
    saved = hls4ml_results(variant)
    assert not isinstance(saved, str), saved
    written, held = _written_layers(digits_exports[variant][0]), _hls4ml_layers(saved)
    assert [w["name"] for w in written] and len(written) == len(held), ([w["name"] for w in written],
                                                                        [h["name"] for h in held])
    for w, h in zip(written, held):
        channels = w["weight"].shape[-1]
        width = int(re.match(r"fixed<(\d+),", h["precision"]).group(1))
        assert width == w["bits"], (w["name"], h["precision"], w["bits"])
        assert np.array_equal(h["weight"], np.round(h["weight"])), w["name"]   # integer codes
        np.testing.assert_allclose(h["weight"] * w["weight_scale"], w["weight"], rtol=1e-6,
                                   atol=1e-7 * np.abs(w["weight"]).max(), err_msg=w["name"])
        np.testing.assert_allclose(h["input_scale"], 1 / w["input_scale"], rtol=1e-6, err_msg=w["name"])
        assert not np.any(h["input_offset"]), w["name"]
        rescale, rebias = h["rescale"].reshape(-1, channels), h["rebias"].reshape(-1, channels)
        np.testing.assert_allclose(rescale, np.broadcast_to(w["input_scale"] * w["weight_scale"], rescale.shape),
                                   rtol=1e-6, err_msg=w["name"])
        # hls4ml keeps the bias in the layer and folds the rescaling into ApplyAlpha's bias:
        # y = rescale·(Σ codes + bias) + rebias, so the bias it computes is rescale·bias + rebias
        bias = rescale * np.broadcast_to(h["bias"], (channels,)) + rebias
        np.testing.assert_allclose(bias, np.broadcast_to(w["bias"], bias.shape), rtol=1e-5,
                                   atol=1e-6 * np.abs(w["bias"]).max(), err_msg=w["name"])
