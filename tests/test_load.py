"""load / save: canonical form, and one clear error for every kind of bad input."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import plinio_onnx as po
from plinio_onnx.errors import UnsafeExternalDataError

from _util import MODELS, relative_error, run_ort, run_torch


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plinio_onnx.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def _tiny_model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


# -- bad input --------------------------------------------------------------------------------
def test_missing_file_names_it(tmp_path):
    with pytest.raises(po.ModelLoadError, match="missing.onnx.*no such file"):
        po.load(tmp_path / "missing.onnx")


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "noise.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(po.ModelLoadError, match="noise.onnx"):
        po.load(path)


def test_truncated_model_is_refused(tmp_path):
    data = (MODELS / "resnet8.onnx").read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(po.ModelLoadError, match="cut.onnx"):
        po.load(path)


def test_unsupported_ops_are_all_listed_before_running():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="ok"),
             helper.make_node("Frobnicate", ["a"], ["b"], name="weird1", domain="com.example"),
             helper.make_node("Frobnicate", ["b"], ["y"], name="weird2", domain="com.example")]
    model = _tiny_model(nodes, [x], [y])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    graph = po.load(model)
    with pytest.raises(po.UnsupportedOpError) as info:
        po.to_torch(graph)
    assert [p[0] for p in info.value.problems] == ["weird1", "weird2"]
    assert "Frobnicate" in str(info.value)


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    model = _tiny_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [x], [y], [weight])
    inner = tmp_path / "inner"
    inner.mkdir()
    onnx.save_model(model, inner / "m.onnx", save_as_external_data=True, location="w.bin",
                    size_threshold=0)
    assert po.load(inner / "m.onnx").initializers()["w"].values.shape == (4, 4)
    # Point the location outside the folder, at a file that exists.
    shutil.copy(inner / "w.bin", tmp_path / "w.bin")
    proto = onnx.load(inner / "m.onnx", load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../w.bin"
    onnx.save_model(proto, inner / "escape.onnx")
    before = _digest(inner / "escape.onnx")
    with pytest.raises(UnsafeExternalDataError, match="escape.onnx.*outside the model's folder"):
        po.load(inner / "escape.onnx")
    assert _digest(inner / "escape.onnx") == before


def test_inconsistent_shapes_are_refused():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    w = numpy_helper.from_array(np.ones((5, 3), np.float32), "w")
    model = _tiny_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [x], [y], [w])
    with pytest.raises(po.ModelLoadError, match="MatMul"):
        po.load(model)


@pytest.mark.parametrize("kind", ["missing", "noise", "truncated", "unsupported"])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, kind):
    path = tmp_path / f"{kind}.onnx"
    if kind == "noise":
        path.write_bytes(b"\x08\x07garbage" * 100)
    elif kind == "truncated":
        path.write_bytes((MODELS / "digits_cnn.onnx").read_bytes()[:3000])
    elif kind == "unsupported":
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
        model = _tiny_model([helper.make_node("Frob", ["x"], ["y"], name="f", domain="com.x")], [x], [y])
        model.opset_import.append(helper.make_opsetid("com.x", 1))
        onnx.save(model, path)
    before = sorted(os.listdir(tmp_path))
    digest = _digest(path) if path.exists() else None
    result = _cli("verify", path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(path.name) in lines[0]
    assert sorted(os.listdir(tmp_path)) == before
    if digest:
        assert _digest(path) == digest


# -- canonical form ---------------------------------------------------------------------------
def test_canonical_form_constants_identities_and_old_ir_inputs():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    w_info = helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    w = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4), "w")
    nodes = [helper.make_node("Constant", [], ["c"], name="const",
                              value=numpy_helper.from_array(np.full((4,), 2.0, np.float32))),
             helper.make_node("Identity", ["x"], ["xi"], name="id"),
             helper.make_node("MatMul", ["xi", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "c"], ["y"], name="add")]
    model = _tiny_model(nodes, [x, w_info], [y], [w], opset=9)  # IR < 4 style: w is an input
    model.ir_version = 3
    graph = po.load(model)
    assert [n.op for n in graph.nodes] == ["MatMul", "Add"]
    assert [t.name for t in graph.gs.inputs] == ["x"]
    assert graph.opset == 17
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}
    module = po.to_torch(graph)
    assert relative_error(feeds["x"] @ np.arange(16, dtype=np.float32).reshape(4, 4) + 2,
                          run_torch(module, feeds, ["x"])[0]) < 1e-6


def test_save_writes_ir10_atomically_and_never_over_the_input(tmp_path):
    src = tmp_path / "m.onnx"
    shutil.copy(MODELS / "digits_cnn.onnx", src)
    graph = po.load(src)
    out = graph.save(tmp_path / "out.onnx")
    assert onnx.load(out).ir_version == 10
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    digest = _digest(src)
    with pytest.raises(po.PlinioOnnxError, match="overwrite the input"):
        graph.save(src)
    assert _digest(src) == digest
    feeds = {"input": np.random.default_rng(0).random((2, 1, 8, 8), np.float32)}
    assert relative_error(run_ort(src, feeds)[0], run_ort(out, feeds)[0]) < 1e-6


def test_large_models_are_saved_with_external_data(tmp_path, monkeypatch):
    import plinio_onnx.graph as graph_module
    monkeypatch.setattr(graph_module, "EXTERNAL_DATA_THRESHOLD", 10_000)  # stand-in for 2 GB
    graph = po.load(MODELS / "resnet8.onnx")
    out = graph.save(tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    feeds = {"input": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    assert relative_error(run_ort(MODELS / "resnet8.onnx", feeds)[0],
                          run_torch(po.to_torch(po.load(out)).eval(), feeds, ["input"])[0]) < 1e-5


def test_old_opsets_are_converted():
    from _util import ONNX_DATA
    graph = po.load(ONNX_DATA / "light" / "light_squeezenet.onnx")  # opset 9
    assert graph.opset == 17


def test_nameless_and_repeated_node_names_are_made_unique_and_pit_runs(tmp_path):
    """Exporters may leave node names empty or repeat them; passes address nodes by name."""
    import onnxruntime as ort
    proto = onnx.load("models/digits_cnn.onnx")
    for i, node in enumerate(proto.graph.node):
        node.name = "" if i % 2 == 0 else "same"
    names = [node.name for node in po.load(proto).gs.nodes]
    assert all(names) and len(set(names)) == len(names)

    out = tmp_path / "pruned.onnx"
    po.PIT(proto, cost="params").export(out)      # every mask starts kept: same function
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    expected = ort.InferenceSession("models/digits_cnn.onnx").run(None, {proto.graph.input[0].name: x})[0]
    got = ort.InferenceSession(str(out)).run(None, {proto.graph.input[0].name: x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
