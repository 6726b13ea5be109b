"""Models as users export them: every zoo model re-exported by torch's legacy exporter (fresh
weights, BatchNorm kept, no constant folding: value-tied initializers everywhere) and by the dynamo
exporter (opset 18-21, symbolic batch), checked with ``plinio-onnx verify``; model-local
functions and ``Constant`` nodes as the dynamo exporter and onnxscript write them."""
from __future__ import annotations

import sys
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import plinio_onnx as po
from plinio_onnx.cli import main

from _util import ROOT, relative_error, run_ort, run_torch

sys.path.insert(0, str(ROOT))
from models.zoo import ZOO, example_input, make  # noqa: E402


def _export(model: torch.nn.Module, x: torch.Tensor, path, exporter: str, opset: int = 17,
            optimize: bool = True) -> None:
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset,
                              training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=opset,
                              optimize=optimize, dynamic_shapes=({0: torch.export.Dim("batch")},))


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_reexported_verifies(tmp_path, capsys, name, exporter):
    torch.manual_seed(0)
    model = ZOO[name].build() if exporter == "legacy" else make(name)
    path = tmp_path / f"{name}_{exporter}.onnx"
    _export(model, example_input(name, batch=1), path, exporter, opset=17 if exporter == "legacy" else 18)
    assert main(["verify", str(path), "--batch", "2"]) == 0, capsys.readouterr().err
    assert "OK: " in capsys.readouterr().out


@pytest.mark.parametrize("opset, optimize", [(19, False), (20, True), (21, False)])
def test_dynamo_opsets(tmp_path, capsys, opset, optimize):
    path = tmp_path / f"resnet8_{opset}.onnx"
    _export(make("resnet8"), example_input("resnet8", batch=1), path, "dynamo", opset, optimize)
    assert max(e.version for e in onnx.load(str(path)).opset_import if e.domain in ("", "ai.onnx")) == opset
    assert main(["verify", str(path), "--batch", "3"]) == 0, capsys.readouterr().err


def test_model_local_functions_and_constants_are_inlined():
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    block = helper.make_function(
        "pkg.torch", "Block", ["a", "s"], ["o"],
        [helper.make_node("Constant", [], ["two"], value=two),
         helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Mul", ["r", "two"], ["m"]),
         helper.make_node("Add", ["m", "s"], ["o"])],
        [helper.make_opsetid("", 18)])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    graph = helper.make_graph(
        [helper.make_node("Block", ["x", "S"], ["h"], domain="pkg.torch"),
         helper.make_node("Block", ["h", "S"], ["y"], domain="pkg.torch")], "g", [x], [y],
        [numpy_helper.from_array(np.arange(4, dtype=np.float32), "S")])
    model = helper.make_model(graph, functions=[block], opset_imports=[
        helper.make_opsetid("", 18), helper.make_opsetid("pkg.torch", 1)])
    model.ir_version = 10
    loaded = po.load(model)
    assert [n.op for n in loaded.nodes] == ["Relu", "Mul", "Add"] * 2
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)}
    assert relative_error(run_ort(model, feeds)[0],
                          run_torch(po.to_torch(loaded), feeds, ["x"])[0]) <= 1e-6
