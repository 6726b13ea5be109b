"""On-device fine-tuning: ONNX Runtime training artifacts of float and QDQ exports, loaded and
trained with ORT's training API on digits; the inference model they export is what they trained."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.training.api import CheckpointState, Module, Optimizer

import plinio_onnx as po
from plinio_onnx.cli import main
from plinio_onnx.data import random_inputs
from plinio_onnx.requantize import requantize
from plinio_onnx.runtime import ort_session
from plinio_onnx.training_artifacts import ARTIFACT_NAMES
from plinio_onnx.training_graph import prepare_for_training

from _util import MODELS, ZOO_NAMES, random_architecture, relative_error

DIGITS = np.load(MODELS / "digits.npz")


def _digits(count: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    order = DIGITS["perm"][offset:offset + count]
    return DIGITS["x"][order].astype(np.float32), DIGITS["y"][order].astype(np.int64)


def _fine_tune(artifacts, steps: int = 24, batch: int = 32, lr: float = 2e-3) -> dict:
    """Load the artifacts with ORT's training API, train on digits, export the inference model;
    returns the losses, the held-out batch and the eval outputs before and after."""
    state = CheckpointState.load_checkpoint(str(artifacts.checkpoint))
    module = Module(str(artifacts.training_model), state, str(artifacts.eval_model))
    optimizer = Optimizer(str(artifacts.optimizer_model), module)
    optimizer.set_learning_rate(lr)
    x_eval, y_eval = _digits(256, offset=1500)
    module.eval()
    before = module(x_eval, y_eval)
    x, y = _digits(steps * batch)
    module.train()
    for step in range(steps):
        module(x[step * batch:(step + 1) * batch], y[step * batch:(step + 1) * batch])
        optimizer.step()
        module.lazy_reset_grad()
    module.eval()
    after = module(x_eval, y_eval)
    inference = artifacts.directory.parent / "fine_tuned.onnx"
    module.export_model_for_inferencing(str(inference), list(artifacts.outputs))
    return {"before": before, "after": after, "x": x_eval, "inference": inference}


def _check_versions(artifacts) -> None:
    for path in (artifacts.training_model, artifacts.eval_model, artifacts.optimizer_model):
        model = onnx.load(str(path))
        assert model.ir_version == 10, path.name
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) <= 21


def _check_inference_equals_training(result: dict, tolerance: float) -> None:
    """The exported inference model in ONNX Runtime == the training Module's eval outputs."""
    got = ort_session(onnx.load(str(result["inference"]))).run(None, {"input": result["x"]})[0]
    assert relative_error(result["after"][1], got) <= tolerance


def test_float_digits_cnn_fine_tunes_and_exports_what_it_trained(tmp_path):
    artifacts = po.training_artifacts(MODELS / "digits_cnn.onnx", tmp_path / "artifacts")
    assert sorted(p.name for p in artifacts.directory.iterdir()) == sorted(ARTIFACT_NAMES)
    assert not artifacts.quantized and artifacts.label_input == "labels"
    _check_versions(artifacts)
    # every weight and bias trains; BN statistics are frozen (folded into factor and shift)
    assert {"conv1.weight", "conv1.bias", "fc2.weight", "fc2.bias"} <= set(artifacts.trainable)
    assert {"/bn1/BatchNormalization.factor", "/bn1/BatchNormalization.shift"} <= set(artifacts.trainable)
    assert not any("running" in name for name in artifacts.trainable)
    result = _fine_tune(artifacts)
    assert result["after"][0] < 0.8 * result["before"][0]
    _check_inference_equals_training(result, 1e-5)
    # before training the eval forward is the input model
    reference = ort_session(onnx.load(str(MODELS / "digits_cnn.onnx"))).run(None, {"input": result["x"]})[0]
    assert relative_error(reference, result["before"][1]) <= 1e-5


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_artifacts_train_and_evaluate_the_input_model(name, tmp_path):
    """Every zoo model (BN, average pools, LayerNorm, depthwise and dilated convs, attention):
    the eval forward is the input model, the loss falls, the inference export is the eval."""
    graph = po.load(MODELS / f"{name}.onnx")
    artifacts = po.training_artifacts(MODELS / f"{name}.onnx", tmp_path / "artifacts", loss="mse")
    assert not any(n.endswith(".averaging_kernel") for n in artifacts.trainable)
    feeds = random_inputs(graph, batch=4, seed=0)
    reference = ort_session(graph.to_onnx()).run(None, feeds)
    state = CheckpointState.load_checkpoint(str(artifacts.checkpoint))
    module = Module(str(artifacts.training_model), state, str(artifacts.eval_model))
    optimizer = Optimizer(str(artifacts.optimizer_model), module)
    target = np.zeros_like(reference[0])
    module.eval()
    before = module(*feeds.values(), target)
    for expected, got in zip(reference, before[1:]):
        assert relative_error(expected, got) <= 1e-5
    module.train()
    for _ in range(3):
        module(*feeds.values(), target)
        optimizer.step()
        module.lazy_reset_grad()
    module.eval()
    after = module(*feeds.values(), target)
    assert after[0] < before[0]
    module.export_model_for_inferencing(str(tmp_path / "inference.onnx"), list(artifacts.outputs))
    got = ort_session(onnx.load(str(tmp_path / "inference.onnx"))).run(None, feeds)
    for expected, value in zip(after[1:], got):
        assert relative_error(expected, value) <= 1e-5


def test_frozen_batchnorm_forward_equals_the_input_model():
    graph = po.load(MODELS / "resnet8.onnx")
    prepared = prepare_for_training(graph)
    assert not any(n.op_type == "BatchNormalization" for n in prepared.model.graph.node)
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    expected = ort_session(graph.to_onnx()).run(None, {"input": x})[0]
    got = ort_session(prepared.model).run(None, {"input": x})[0]
    assert relative_error(expected, got) <= 1e-5
    assert len(graph.nodes) == len(po.load(MODELS / "resnet8.onnx").nodes)  # input untouched


def _mixed_precision_qdq() -> po.Graph:
    """An MPS export of the digits CNN with random precisions (2, 4 and 8 bits mixed per channel)."""
    model = po.MPS(MODELS / "digits_cnn.onnx", w_precisions=(2, 4, 8), a_precisions=(4, 8))
    model.calibrate(torch.from_numpy(_digits(256)[0]))
    random_architecture(model, 0, (".mps_w_alpha", ".mps_a_alpha"), (".pit_alpha",), 0.0)
    model.eval()
    return model.export(format="qdq")


def test_qdq_fine_tunes_with_fake_quant_and_exports_what_it_trained(tmp_path):
    exported = _mixed_precision_qdq()
    path = exported.save(tmp_path / "mps.onnx")
    prepared = prepare_for_training(po.load(path))
    # the fake-quant forward is the QDQ model's reference (unfused) value, exactly
    x = _digits(256, offset=1500)[0]
    reference = ort_session(onnx.load(str(path)), optimize=False).run(None, {"input": x})[0]
    assert relative_error(reference, ort_session(prepared.model).run(None, {"input": x})[0]) <= 1e-6
    ops = [n.op_type for n in prepared.model.graph.node]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops and "FakeQuant" in ops
    assert {"Max", "Min"} <= set(ops), "channels of different bit-widths are clamped per channel"

    artifacts = po.training_artifacts(path, tmp_path / "artifacts")
    assert artifacts.quantized
    assert all(name.endswith(".float") for name in artifacts.trainable)
    assert not any(name.endswith((".scale", ".zero_point")) for name in artifacts.trainable)
    _check_versions(artifacts)
    result = _fine_tune(artifacts)
    assert result["after"][0] < result["before"][0]
    _check_inference_equals_training(result, 1e-6)
    assert relative_error(reference, result["before"][1]) <= 1e-6
    # the weights trained, behind the same frozen quantizers (FakeQuant stays in the inference model)
    fine_tuned = onnx.load(str(result["inference"]))
    assert [n.op_type for n in fine_tuned.graph.node].count("FakeQuant") == ops.count("FakeQuant")
    initial = {t.name: numpy_helper.to_array(t) for t in prepared.model.graph.initializer}
    trained = {t.name: numpy_helper.to_array(t) for t in fine_tuned.graph.initializer}
    changed = [n for n in artifacts.trainable if not np.array_equal(initial[n], trained[n])]
    assert len(changed) == len(artifacts.trainable)
    frozen = [n for n in artifacts.frozen if n in trained]
    assert frozen and all(np.array_equal(initial[n], trained[n]) for n in frozen)

    # back to standard QDQ (CLI export): the fine-tuned network with integer weights and biases,
    # the same nodes as the input export, computing what the artifacts trained
    out = tmp_path / "fine_tuned_qdq.onnx"
    assert main(["export", str(result["inference"]), "-o", str(out)]) == 0
    requantized, original = onnx.load(str(out)), onnx.load(str(path))
    assert sorted(n.op_type for n in requantized.graph.node) == sorted(n.op_type for n in original.graph.node)
    assert {o.domain for o in requantized.opset_import} == {""}
    stored = {t.name: t for t in requantized.graph.initializer}
    for node in requantized.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in stored:
            assert stored[node.input[0]].data_type in (TensorProto.INT8, TensorProto.INT32)
    got = ort_session(requantized, optimize=False).run(None, {"input": x})[0]
    assert relative_error(result["after"][1], got) <= 1e-6


def test_requantizing_untrained_artifacts_gives_back_the_qdq_export(tmp_path):
    """Fake quantizers and their inverse are exact: no training → the same integers."""
    path = _mixed_precision_qdq().save(tmp_path / "mps.onnx")
    artifacts = po.training_artifacts(path, tmp_path / "artifacts")
    state = CheckpointState.load_checkpoint(str(artifacts.checkpoint))
    module = Module(str(artifacts.training_model), state, str(artifacts.eval_model))
    module.export_model_for_inferencing(str(tmp_path / "inference.onnx"), list(artifacts.outputs))
    requantized = requantize(tmp_path / "inference.onnx").to_onnx()
    original = onnx.load(str(path))
    values = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    integers = [t for t in requantized.graph.initializer if t.data_type in (TensorProto.INT8, TensorProto.INT32)]
    assert len(integers) >= 10
    for tensor in integers:
        assert np.array_equal(numpy_helper.to_array(tensor), values[tensor.name]), tensor.name
    x = _digits(128)[0]
    expected = ort_session(original, optimize=False).run(None, {"input": x})[0]
    assert np.array_equal(expected, ort_session(requantized, optimize=False).run(None, {"input": x})[0])


def test_cli_export_of_a_searchable_checkpoint_with_training_artifacts(tmp_path, capsys):
    model = po.PIT(MODELS / "digits_cnn.onnx")
    with torch.no_grad():
        mask = next(p for p in model.nas_parameters())
        mask.view(-1)[: mask.numel() // 2] = 0.2   # prune some channels
    searchable = model.searchable_graph().save(tmp_path / "search.onnx")
    out, folder = tmp_path / "pruned.onnx", tmp_path / "artifacts"
    assert main(["export", str(searchable), "-o", str(out), "--training-artifacts", str(folder)]) == 0
    assert "training artifacts" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == sorted(ARTIFACT_NAMES)
    # the artifacts are those of the pruned model: same parameter shapes
    pruned = {t.name: t.shape for t in po.load(out).initializers().values()}
    state = CheckpointState.load_checkpoint(str(folder / "checkpoint"))
    assert tuple(state.parameters["conv1.weight"].data.shape) == tuple(pruned["conv1.weight"])
    assert pruned["conv1.weight"][0] < 16
    # the Python call finalizes the searchable checkpoint the same way
    direct = po.training_artifacts(searchable, tmp_path / "direct")
    state = CheckpointState.load_checkpoint(str(direct.checkpoint))
    assert tuple(state.parameters["conv1.weight"].data.shape) == tuple(pruned["conv1.weight"])
    # a deployable model straight to artifacts, mse loss, SGD
    again = tmp_path / "again"
    assert main(["export", str(out), "--training-artifacts", str(again), "--loss", "mse",
                 "--optimizer", "sgd"]) == 0


def test_bad_inputs_are_one_clear_error(tmp_path, capsys):
    # QONNX has no gradient in ONNX Runtime: the Quant node is named
    model = po.MPS(MODELS / "digits_cnn.onnx", w_precisions=(8,), a_precisions=(8,))
    model.calibrate(torch.from_numpy(_digits(64)[0]))
    model.eval()
    qonnx = model.export(tmp_path / "q.onnx", format="qonnx")
    assert qonnx is not None
    assert main(["export", str(tmp_path / "q.onnx"), "--training-artifacts", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "(Quant)" in err and "QDQ" in err and not (tmp_path / "a").exists()
    # an op ONNX Runtime cannot differentiate: node and op named, nothing written
    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"], name="layer"),
         helper.make_node("Round", ["m"], ["y"], name="the_round")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [weight])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    with pytest.raises(po.PlinioOnnxError, match=r"node 'the_round' \(Round\)"):
        po.training_artifacts(proto, tmp_path / "b", loss="mse")
    assert not (tmp_path / "b").exists()
    # an average pool whose divisor depends on the position: no exact convolution form
    pool = helper.make_graph(
        [helper.make_node("Conv", ["x", "K"], ["c"], name="conv", kernel_shape=[1, 1]),
         helper.make_node("AveragePool", ["c"], ["y"], name="border_pool", kernel_shape=[3, 3],
                          pads=[1, 1, 1, 1], count_include_pad=0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "K")])
    proto = helper.make_model(pool, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    with pytest.raises(po.PlinioOnnxError, match=r"node 'border_pool' \(AveragePool\).*count_include_pad"):
        po.training_artifacts(proto, tmp_path / "b", loss="mse")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left
    # a folder with other files is never overwritten; the input model never
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep")
    with pytest.raises(po.PlinioOnnxError, match="not training artifacts"):
        po.training_artifacts(MODELS / "digits_cnn.onnx", busy)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    with pytest.raises(po.PlinioOnnxError, match="unknown loss"):
        po.training_artifacts(MODELS / "digits_cnn.onnx", tmp_path / "c", loss="hinge")
    assert main(["export", str(MODELS / "digits_cnn.onnx")]) == 2


def test_rewriting_earlier_artifacts_replaces_them(tmp_path):
    folder = tmp_path / "artifacts"
    first = po.training_artifacts(MODELS / "digits_cnn.onnx", folder, optimizer="sgd")
    size = first.optimizer_model.stat().st_size
    second = po.training_artifacts(MODELS / "digits_cnn.onnx", folder, optimizer="adamw")
    assert second.optimizer_model.stat().st_size != size
    assert sorted(p.name for p in folder.iterdir()) == sorted(ARTIFACT_NAMES)
