"""``verify`` and its inputs: NaN/Inf stop it, bad batch sizes and non-.npz data are refused in one
line, symbolic sizes come from the data or ``--input-shape``, a fixed batch runs in pieces,
several inputs and outputs are read by name, and files newer than onnx reads are refused."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import plinio_onnx as po
from plinio_onnx.errors import DataError, NonFiniteError
from plinio_onnx.finite import check_finite_arrays, check_finite_weights
from plinio_onnx.verify import verify_model


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plinio_onnx.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def _model(nodes, inputs, outputs, inits=(), opset=17, ir=8) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "m", inputs, outputs, list(inits)),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    return model


def _conv_pool(batch="batch", height="h", width="w") -> onnx.ModelProto:
    """Conv → AveragePool(4) → global mean → Gemm; H and W symbolic by default."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, height, width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((5, 8)).astype(np.float32), "F")]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("AveragePool", ["c"], ["p"], kernel_shape=[4, 4], strides=[4, 4]),
             helper.make_node("GlobalAveragePool", ["p"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "F"], ["y"], transB=1, name="fc")]
    return _model(nodes, [x], [y], inits)


def _fixed_batch_reshape() -> onnx.ModelProto:
    """A batch-1 model whose Reshape spells the batch: ``Reshape [1, 128]`` (ResNet-50 style)."""
    rng = np.random.default_rng(1)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    inits = [numpy_helper.from_array(rng.standard_normal((3, 128)).astype(np.float32), "F"),
             numpy_helper.from_array(np.array([1, 128], np.int64), "shape")]
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]),
             helper.make_node("Gemm", ["r", "F"], ["y"], transB=1)]
    return _model(nodes, [x], [y], inits)


def test_nan_weight_fails_verify_naming_it(tmp_path):
    model = _conv_pool(height=16, width=16)
    weight = numpy_helper.to_array(model.graph.initializer[0]).copy()
    weight[0, 0, 0, 0] = np.nan
    weight[1, 0, 0, 0] = np.inf
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight, "W"))
    path = tmp_path / "nan.onnx"
    onnx.save(model, path)
    with pytest.raises(NonFiniteError, match=r"initializer 'W' \(read by node 'conv' \(Conv\)\) has 1 NaN, 1 Inf"):
        check_finite_weights(po.load(path))
    result = _cli("verify", path)
    assert result.returncode == 2 and "NaN/Inf in the weights" in result.stderr
    assert "OK" not in result.stdout


def test_nan_data_and_nan_outputs_fail(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_conv_pool(height=16, width=16), path)
    x = np.random.default_rng(0).standard_normal((6, 3, 16, 16)).astype(np.float32)
    x[3, 0, 0, 0] = np.nan
    np.savez(tmp_path / "d.npz", x=x)
    with pytest.raises(NonFiniteError, match=r"data: 'x' has 1 NaN of .* first in sample 3"):
        verify_model(path, data=tmp_path / "d.npz")
    # finite weights and data, but an output overflows to inf
    big = _conv_pool(height=16, width=16)
    big.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.full((5, 8), 3e38, np.float32), "F"))
    onnx.save(big, tmp_path / "big.onnx")
    with pytest.raises(NonFiniteError, match="ONNX Runtime outputs"):
        verify_model(tmp_path / "big.onnx", batch=2)
    with pytest.raises(NonFiniteError, match=r"'y' has 1 NaN"):
        check_finite_arrays({"y": np.array([1.0, np.nan])}, what="outputs")


@pytest.mark.parametrize("batch", ["0", "-2"])
def test_bad_batch_is_one_line(tmp_path, batch):
    path = tmp_path / "m.onnx"
    onnx.save(_conv_pool(height=16, width=16), path)
    result = _cli("verify", path, "--batch", batch)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("the batch size must be at least 1")
    assert len(result.stderr.strip().splitlines()) == 1 and "internal error" not in result.stderr


def test_npy_and_csv_data_get_a_clear_message(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_conv_pool(height=16, width=16), path)
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 16, 16), np.float32))
    (tmp_path / "x.csv").write_text("1,2,3\n4,5,6\n")
    for name, words in (("x.npy", "single .npy array"), ("x.csv", "text file")):
        result = _cli("verify", path, "--data", tmp_path / name)
        assert result.returncode == 2, result.stderr
        assert words in result.stderr and "numpy.savez" in result.stderr
        assert "pickle" not in result.stderr and "context manager" not in result.stderr


def test_symbolic_spatial_sizes_from_data_or_option(tmp_path):
    path = tmp_path / "sym.onnx"
    onnx.save(_conv_pool(), path)
    result = _cli("verify", path)  # no sizes to run it with: refused, never made up
    assert result.returncode == 2 and "--input-shape" in result.stderr
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((3, 3, 20, 12)).astype(np.float32))
    assert verify_model(path, data=tmp_path / "d.npz")["relative_error"] <= 1e-5
    result = _cli("verify", path, "--input-shape", "x:1x3x16x24", "--batch", "2")
    assert result.returncode == 0 and "on 2 samples" in result.stdout, result.stderr
    result = _cli("inspect", path)
    assert result.returncode == 2 and "--input-shape" in result.stderr
    result = _cli("inspect", path, "--input-shape", "1x3x16x16", "--json")
    assert result.returncode == 0, result.stderr
    assert '"macs": ' in result.stdout
    result = _cli("verify", path, "--input-shape", "1x4x16x16")
    assert result.returncode == 2 and "does not fit" in result.stderr


def test_fixed_batch_runs_in_pieces(tmp_path):
    path = tmp_path / "fixed.onnx"
    onnx.save(_fixed_batch_reshape(), path)
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((5, 2, 8, 8)).astype(np.float32))
    result = verify_model(path, data=tmp_path / "d.npz")
    assert result["samples"] == 5 and result["chunk"] == 1 and result["relative_error"] <= 1e-5
    cli = _cli("verify", path, "--data", tmp_path / "d.npz")
    assert cli.returncode == 0 and "batches of 1" in cli.stdout, cli.stderr


def test_several_inputs_and_outputs(tmp_path):
    rng = np.random.default_rng(0)
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 4])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 4])
    s = helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["n", 4])
    p = helper.make_tensor_value_info("prod", TensorProto.FLOAT, ["n", 4])
    model = _model([helper.make_node("Add", ["a", "b"], ["sum"]),
                    helper.make_node("Mul", ["a", "b"], ["prod"])], [a, b], [s, p])
    path = tmp_path / "two.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "d.npz", a=rng.standard_normal((7, 4)).astype(np.float32),
             b=rng.standard_normal((7, 4)).astype(np.float32))
    result = verify_model(path, data=tmp_path / "d.npz")
    assert set(result["per_output"]) == {"sum", "prod"} and result["samples"] == 7
    np.savez(tmp_path / "x.npz", x=rng.standard_normal((7, 4)).astype(np.float32))
    with pytest.raises(DataError, match="no array for graph input 'a'"):
        verify_model(path, data=tmp_path / "x.npz")
    np.savez(tmp_path / "uneven.npz", a=np.zeros((7, 4), np.float32), b=np.zeros((6, 4), np.float32))
    with pytest.raises(DataError, match="different numbers of samples"):
        verify_model(path, data=tmp_path / "uneven.npz")


@pytest.mark.parametrize("ir, opset", [(11, 21), (10, 23)])
def test_newer_than_onnx_reads_is_refused_in_one_line(tmp_path, ir, opset):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    path = tmp_path / "new.onnx"
    onnx.save(_model([helper.make_node("Relu", ["x"], ["y"])], [x], [y], opset=opset, ir=ir), path)
    result = _cli("inspect", path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert f"IR version {ir}, opset {opset} is newer" in result.stderr
    assert f"IR version <= {onnx.IR_VERSION}" in result.stderr and "opset 7-" in result.stderr


@pytest.mark.parametrize("opset", [7, 9, 11, 13, 15, 17, 19, 21])
def test_opsets_7_to_21(opset):
    rng = np.random.default_rng(opset)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 3, 3])
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B")]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    # IR 3 (opset 7, 8) lists every initializer as a graph input too
    extra = [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits]
    path_model = _model(nodes, [x] + (extra if opset < 9 else []), [y], inits, opset=opset,
                        ir=3 if opset < 9 else 7)
    graph = po.load(path_model)
    feeds = {"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32)}
    from _util import relative_error, run_ort, run_torch
    assert relative_error(run_ort(path_model, feeds)[0],
                          run_torch(po.to_torch(graph).eval(), feeds, ["x"])[0]) <= 1e-5
