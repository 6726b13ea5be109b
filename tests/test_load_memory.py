"""Loading reads a file's large initializers straight into their arrays (`file_weights`): the
parsed model never holds them, the loaded graph holds them once, and what is loaded is what
ONNX reads, whichever way the data is stored."""
from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import plinio_onnx as po
from plinio_onnx.file_weights import MIN_BYTES, parse_without_weights

from _util import MODELS, relative_error, run_ort, run_torch


def _mlp(rng, width=512, layers=4, opset=17) -> onnx.ModelProto:
    """``layers`` Gemms of ``width``² float32 weights (1 MiB each at 512) with biases, a
    Reshape's int64 shape (small: parsed with the model) and a float16 table."""
    inits, nodes, x = [], [], "x"
    for i in range(layers):
        w = rng.standard_normal((width, width), dtype=np.float32) / np.float32(np.sqrt(width))
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"g{i}"], name=f"fc{i}", transB=1),
                  helper.make_node("Relu", [f"g{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    inits += [numpy_helper.from_array(np.array([-1, width // 2, 2], np.int64), "shape"),
              numpy_helper.from_array(rng.standard_normal((width // 2, 2)).astype(np.float16), "table")]
    nodes += [helper.make_node("Reshape", [x, "shape"], ["folded"], name="fold"),
              helper.make_node("Cast", ["folded"], ["half"], name="to_half", to=TensorProto.FLOAT16),
              helper.make_node("Add", ["half", "table"], ["sum"], name="add"),
              helper.make_node("Cast", ["sum"], ["y"], name="to_float", to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, width // 2, 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory):
    model = _mlp(np.random.default_rng(0))
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    onnx.save_model(model, path)
    return path, model


def _arrays(graph: po.Graph) -> dict[str, np.ndarray]:
    return {name: np.asarray(t.values) for name, t in graph.initializers().items()}


def _save_external(model: onnx.ModelProto, path, location: str) -> None:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # (saving with external data edits the model)
    onnx.save_model(copy, path, save_as_external_data=True, location=location, size_threshold=0)


def _expected(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_the_parsed_model_leaves_the_large_initializers_in_the_file(mlp_file):
    path, model = mlp_file
    proto = parse_without_weights(path)
    assert proto.ByteSize() < 4096 < path.stat().st_size // 1000
    data = path.read_bytes()
    left = {}
    for tensor in proto.graph.initializer:
        info = onnx.external_data_helper.ExternalDataInfo(tensor)
        if tensor.data_location == TensorProto.EXTERNAL:
            assert info.location == "mlp.onnx" and not tensor.raw_data
            left[tensor.name] = data[info.offset:info.offset + info.length]
    expected = _expected(model)
    # Gemm weights (1 MiB), biases (2 KiB) and the float16 table (1 KiB) stay; the shape is parsed
    assert sorted(left) == sorted(n for n, a in expected.items() if a.nbytes >= MIN_BYTES)
    assert "shape" not in left and "table" in left
    for name, raw in left.items():
        assert raw == expected[name].tobytes()


def test_loading_holds_the_weights_once(mlp_file):
    """tracemalloc sees numpy's arrays and Python's bytes (the whole file read into memory, the
    raw_data each array is read from): loading allocates about the weights, once."""
    path, model = mlp_file
    weights = sum(a.nbytes for a in _expected(model).values())
    po.load(path)  # imports and caches of the first call out of the count
    tracemalloc.start()
    try:
        graph = po.load(path)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert weights > 4 * 2**20
    assert peak < 1.15 * weights, (peak, weights)
    assert held < 1.1 * weights, (held, weights)
    loaded = _arrays(graph)
    for name, values in _expected(model).items():
        np.testing.assert_array_equal(loaded[name], values)
        assert loaded[name].dtype == values.dtype and loaded[name].flags.writeable


def test_file_proto_and_external_data_load_the_same_graph(mlp_file, tmp_path):
    path, model = mlp_file
    _save_external(model, tmp_path / "ext.onnx", "ext.bin")
    from_file, from_proto, external = po.load(path), po.load(model), po.load(tmp_path / "ext.onnx")
    for graph in (from_proto, external):
        got = _arrays(graph)
        for name, values in _arrays(from_file).items():
            np.testing.assert_array_equal(got[name], values)
    # saved inline, and what ONNX Runtime computes
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 512)).astype(np.float32)}
    for graph in (from_file, external):
        out = graph.save(tmp_path / "saved.onnx")
        saved = onnx.load(out, load_external_data=False)
        assert all(t.data_location == TensorProto.DEFAULT and not t.external_data for t in saved.graph.initializer)
        assert relative_error(run_ort(model, feeds)[0], run_ort(out, feeds)[0]) < 1e-6
        assert relative_error(run_ort(model, feeds)[0],  # (float16 rounding: the last Add)
                              run_torch(po.to_torch(graph).eval(), feeds, ["x"])[0]) < 2e-3


def test_short_external_data_is_one_clear_error(mlp_file, tmp_path):
    _, model = mlp_file
    _save_external(model, tmp_path / "m.onnx", "m.bin")
    data = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "m.bin").write_bytes(data[: len(data) - 100])
    with pytest.raises(po.ModelLoadError, match="m.onnx.*cannot read external data.*'table'"):
        po.load(tmp_path / "m.onnx")


def test_an_initializer_shorter_than_its_shape_is_refused(tmp_path):
    """Raw data that disagrees with its dims is left to ONNX's readers, which refuse it."""
    model = _mlp(np.random.default_rng(0), width=64, layers=2)
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    onnx.save_model(model, tmp_path / "short.onnx")
    parsed = {t.name: t for t in parse_without_weights(tmp_path / "short.onnx").graph.initializer}
    assert parsed["w0"].data_location != TensorProto.EXTERNAL and len(parsed["w0"].raw_data) == 64 * 64 * 4 - 4
    assert parsed["w1"].data_location == TensorProto.EXTERNAL
    with pytest.raises(po.ModelLoadError, match="short.onnx"):
        po.load(tmp_path / "short.onnx")


def test_old_opsets_with_weights_in_the_file_are_converted(tmp_path):
    """ONNX's opset converter rewrites the model with its weights: they are read into it first."""
    model = _mlp(np.random.default_rng(0), width=64, layers=2, opset=11)
    onnx.save_model(model, tmp_path / "old.onnx")
    assert parse_without_weights(tmp_path / "old.onnx").graph.initializer[0].data_location == TensorProto.EXTERNAL
    graph = po.load(tmp_path / "old.onnx")
    assert graph.opset == 17
    got = _arrays(graph)
    for name, values in _expected(model).items():
        np.testing.assert_array_equal(got[name], values)


def test_files_without_large_initializers_parse_whole(tmp_path):
    model = _mlp(np.random.default_rng(0), width=8, layers=1)
    onnx.save_model(model, tmp_path / "small.onnx")
    assert parse_without_weights(tmp_path / "small.onnx") is None
    got = _arrays(po.load(tmp_path / "small.onnx"))
    for name, values in _expected(model).items():
        np.testing.assert_array_equal(got[name], values)


def test_an_initializer_read_only_inside_a_subgraph_is_read_from_the_file(tmp_path):
    """An If branch reads the main graph's weight (outer scope): it is read into its array too."""
    w = np.arange(512, dtype=np.float32).reshape(2, 256)
    then = helper.make_graph([helper.make_node("Add", ["x", "w"], ["t"], name="add")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 256])])
    other = helper.make_graph([helper.make_node("Sub", ["x", "w"], ["e"], name="sub")], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 256])])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other)], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 256])], [numpy_helper.from_array(w, "w")])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "if.onnx")
    loaded = po.load(tmp_path / "if.onnx")
    branch = loaded.nodes[0].attrs["then_branch"]
    held = next(t for t in branch.nodes[0].inputs if t.name == "w")
    assert isinstance(held._values, np.ndarray)
    np.testing.assert_array_equal(held._values, w)
