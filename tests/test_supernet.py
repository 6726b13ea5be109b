"""SuperNet: the pass (alternatives and their inherited weights), the Choice function, costs, the
searchable module, the finalized (picked) export and the PIT-after-SuperNet flow."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import plinio_onnx as po
from plinio_onnx.data import random_inputs
from plinio_onnx.functions import relaxation
from plinio_onnx.graph import PLINIO_DOMAIN
from plinio_onnx.methods.supernet import build_searchable, exponential_temperature

from _util import MODELS, ROOT, ZOO_NAMES, random_architecture, relative_error, run_ort, run_torch


def _random_logits(model: po.SuperNet, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for param in model.nas_parameters():
            param.copy_(torch.from_numpy(rng.standard_normal(param.shape).astype(np.float32)))


def _pick(model: po.SuperNet, choice: str, branch: str) -> None:
    entry = model._choice(choice)
    index = [b.name for b in entry.branches].index(branch)
    with torch.no_grad():
        logits = model.logits(choice)
        logits.fill_(-20.0)
        logits[index] = 20.0


def _names(model: po.SuperNet, choice: str) -> list[str]:
    return [b.name for b in model._choice(choice).branches]


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_random_logits_export_matches_hard_eval(name):
    graph = po.load(MODELS / f"{name}.onnx")
    model = po.SuperNet(graph)
    assert model.info.choices, "the default menu searches something in every zoo model"
    _random_logits(model, seed=1)
    model.eval()
    feeds = random_inputs(graph, batch=2, seed=1)
    expected = run_torch(model, feeds, model.module.input_names)
    exported = model.export()
    got = run_ort(exported.to_onnx(), feeds)
    for e, g in zip(expected, got):
        assert relative_error(e, g) <= 1e-5
    assert not any((n.domain or "") == PLINIO_DOMAIN for n in exported.nodes)
    onnx.checker.check_model(exported.to_onnx())
    assert [t.name for t in exported.gs.outputs] == [t.name for t in graph.gs.outputs]
    # What the eval-mode model reports is what the export costs.
    with torch.no_grad():
        assert float(model.cost_of(po.cost.params)) == po.cost.total(exported, po.cost.params)
        assert float(model.cost_of(po.cost.macs)) == po.cost.total(exported, po.cost.macs)
    picked = model.chosen()
    assert any(branch != "original" for branch in picked.values())


@pytest.mark.parametrize("name", ["resnet8", "transformer_tiny", "tcn"])
def test_initial_logits_are_the_original_model(name):
    graph = po.load(MODELS / f"{name}.onnx")
    model = po.SuperNet(graph)
    feeds = random_inputs(graph, batch=2, seed=2)
    reference = run_ort(graph.to_onnx(), feeds)[0]
    model.eval()  # equal logits: argmax ties go to branch 0, the untouched original
    assert relative_error(reference, run_torch(model, feeds, model.module.input_names)[0]) <= 1e-6
    exported = model.export()
    assert relative_error(reference, run_ort(exported.to_onnx(), feeds)[0]) <= 1e-6
    assert po.cost.total(exported) == po.cost.total(graph)
    assert len(exported.nodes) == len(graph.nodes)


def test_logits_favouring_the_original_reproduce_the_input_model():
    graph = po.load(MODELS / "dscnn.onnx")  # no BatchNorm: train and eval forward agree elsewhere
    model = po.SuperNet(graph)
    with torch.no_grad():
        for logits in model.nas_parameters():
            logits.fill_(-30.0)
            logits[0] = 30.0
    feeds = random_inputs(graph, batch=2, seed=4)
    reference = run_ort(graph.to_onnx(), feeds)[0]
    # The searchable graph in ONNX Runtime (the softmax body) and the soft torch forward.
    assert relative_error(reference, run_ort(model.searchable_graph().to_onnx(), feeds)[0]) <= 1e-6
    model.train()
    assert relative_error(reference, run_torch(model, feeds, model.module.input_names)[0]) <= 1e-6
    model.eval()
    assert relative_error(reference, run_torch(model, feeds, model.module.input_names)[0]) <= 1e-6


def test_choice_body_is_the_softmax_mix_of_the_training_forward():
    graph = po.load(MODELS / "tcn.onnx")
    model = po.SuperNet(graph, temperature=0.7)
    _random_logits(model, seed=3)
    feeds = random_inputs(graph, batch=2, seed=3)
    model.train()
    soft = run_torch(model, feeds, model.module.input_names)[0]
    assert relative_error(soft, run_ort(model.searchable_graph().to_onnx(), feeds)[0]) <= 1e-5
    model.eval()
    hard = run_torch(model, feeds, model.module.input_names)[0]
    assert relative_error(soft, hard) > 1e-3  # eval is the argmax network, not the mix


# -- hand-built graphs: inherited weights and costs by hand ------------------------------------
def _model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "hand", inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def _arr(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _hand_graph(wa: np.ndarray | None = None) -> po.Graph:
    # x[n,4,8,8] → A (4→6, 3x3, pad 1, bias) → relu → flatten(384) → G (Gemm 384→5, transB)
    #   → M (MatMul 5→5) → + bias → y
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="A", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ar"], name="ra"),
             helper.make_node("Flatten", ["ar"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["gm"], name="G", transB=1),
             helper.make_node("MatMul", ["gm", "wm"], ["mm"], name="M"),
             helper.make_node("Add", ["mm", "bm"], ["y"], name="Mb")]
    inits = [numpy_helper.from_array(wa if wa is not None else _arr((6, 4, 3, 3), 1), "wa"),
             numpy_helper.from_array(_arr((6,), 2), "ba"), numpy_helper.from_array(_arr((5, 384), 3) / 10, "wg"),
             numpy_helper.from_array(_arr((5,), 4), "bg"), numpy_helper.from_array(_arr((5, 5), 5), "wm"),
             numpy_helper.from_array(_arr((5,), 6), "bm")]
    return po.load(_model(nodes, [x], [y], inits))


def _first_layer(graph: po.Graph, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, **conv) -> np.ndarray:
    """The hand graph with layer A replaced by F.conv2d(x, weight, bias, **conv)."""
    init = {t.name: np.asarray(t.values) for t in graph.initializers().values()}
    with torch.no_grad():
        h = F.relu(F.conv2d(torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias), **conv))
        h = F.linear(h.flatten(1), torch.from_numpy(init["wg"]), torch.from_numpy(init["bg"]))
        return (h @ torch.from_numpy(init["wm"]) + torch.from_numpy(init["bm"])).numpy()


def _eval_branch(model: po.SuperNet, choice: str, branch: str, feeds) -> np.ndarray:
    _pick(model, choice, branch)
    model.eval()
    out = run_torch(model, feeds, ["x"])[0]
    assert relative_error(out, run_ort(model.export().to_onnx(), feeds)[0]) <= 1e-5
    return out


def test_kernel_alternatives_inherit_centred_weights():
    graph = _hand_graph()
    model = po.SuperNet(graph, layers={"A": ["kernel:5", "kernel:1"]}, automatic=False)
    assert _names(model, "A") == ["original", "kernel5", "kernel1"]
    feeds = random_inputs(graph, batch=2, seed=5)
    reference = run_ort(graph.to_onnx(), feeds)[0]
    # A zero-padded 5x5 kernel (pads 2) computes exactly the original 3x3.
    assert relative_error(reference, _eval_branch(model, "A", "kernel5", feeds)) <= 1e-5
    # The 1x1 alternative is the centre tap.
    wa = np.asarray(graph.initializers()["wa"].values)
    ba = np.asarray(graph.initializers()["ba"].values)
    centre = _first_layer(graph, feeds["x"], np.ascontiguousarray(wa[:, :, 1:2, 1:2]), ba)
    assert relative_error(centre, _eval_branch(model, "A", "kernel1", feeds)) <= 1e-5


def test_separable_and_grouped_alternatives_are_exact_on_such_kernels():
    rng = np.random.default_rng(7)
    pointwise, depthwise = rng.standard_normal((6, 4)), rng.standard_normal((4, 3, 3))
    separable = (pointwise[:, :, None, None] * depthwise[None]).astype(np.float32)
    graph = _hand_graph(separable)
    model = po.SuperNet(graph, layers={"A": ["separable"]}, automatic=False)
    feeds = random_inputs(graph, batch=2, seed=6)
    reference = run_ort(graph.to_onnx(), feeds)[0]
    assert relative_error(reference, _eval_branch(model, "A", "separable", feeds)) <= 1e-5

    block_diagonal = _arr((6, 4, 3, 3), 8)
    block_diagonal[:3, 2:] = 0.0
    block_diagonal[3:, :2] = 0.0
    graph = _hand_graph(block_diagonal)
    model = po.SuperNet(graph, layers={"A": ["group:2"]}, automatic=False)
    reference = run_ort(graph.to_onnx(), feeds)[0]
    assert relative_error(reference, _eval_branch(model, "A", "group2", feeds)) <= 1e-5
    exported = model.export()
    assert next(n for n in exported.nodes if n.op == "Conv").attrs["group"] == 2


def test_low_rank_at_full_rank_reproduces_the_original():
    graph = _hand_graph()
    model = po.SuperNet(graph, layers={"G": ["rank:5", "rank:2"], "M": ["rank:5", "identity"],
                                       "A": ["rank:6"]}, automatic=False)
    assert _names(model, "G") == ["original", "rank5", "rank2"]
    assert _names(model, "M") == ["original", "rank5", "identity"]
    feeds = random_inputs(graph, batch=2, seed=7)
    reference = run_ort(graph.to_onnx(), feeds)[0]
    for choice in ("A", "G", "M"):
        _pick(model, choice, "original")
    for choice, branch in (("G", "rank5"), ("M", "rank5"), ("A", "rank6")):
        assert relative_error(reference, _eval_branch(model, choice, branch, feeds)) <= 1e-5
    # The MatMul's bias Add belongs to each branch: costs count it like the original.
    exported = model.export()
    assert po.cost.total(exported) == 6 * 36 + (6 * 6 + 6) + 384 * 5 + (5 * 5 + 5) + 5 * 5 + (5 * 5 + 5)


def test_expected_cost_is_the_softmax_weighted_branch_cost_by_hand():
    graph = _hand_graph()
    model = po.SuperNet(graph, layers={"A": ["kernel:1", "separable"], "G": ["rank:2"]}, automatic=False)
    assert _names(model, "A") == ["original", "kernel1", "separable"]
    a_params = [6 * 36 + 6, 6 * 4 + 6, 4 * 9 + 6 * 4 + 6]
    a_macs = [6 * 36 * 64, 6 * 4 * 64, (4 * 9 + 6 * 4) * 64]
    g_params, g_macs = [5 * 384 + 5, 2 * 384 + 5 * 2 + 5], [5 * 384, 2 * 384 + 5 * 2]
    m_params, m_macs = 25 + 5, 25
    with torch.no_grad():
        model.logits("A").copy_(torch.tensor([0.5, 1.0, -1.0]))
        model.logits("G").copy_(torch.tensor([0.2, 0.3]))
    model.set_temperature(0.5)
    model.train()
    theta_a = relaxation.probabilities(np.array([0.5, 1.0, -1.0]), 0.5)
    theta_g = relaxation.probabilities(np.array([0.2, 0.3]), 0.5)
    expected_params = theta_a @ a_params + theta_g @ g_params + m_params
    expected_macs = theta_a @ a_macs + theta_g @ g_macs + m_macs
    assert model.cost_of("params").item() == pytest.approx(expected_params, rel=1e-6)
    assert model.cost_of(po.cost.macs).item() == pytest.approx(expected_macs, rel=1e-6)
    # Gradient of the expected cost reaches the logits.
    model.cost.backward()
    assert torch.all(model.logits("A").grad != 0)
    # Eval (and discrete_cost) cost = argmax branches = the exported model's.
    model.eval()
    assert float(model.cost_of("params")) == a_params[1] + g_params[1] + m_params
    assert float(model.cost_of("params")) == po.cost.total(model.export())
    discrete = po.SuperNet(model.searchable_graph(), discrete_cost=True)
    assert discrete.cost_of("params").item() == a_params[1] + g_params[1] + m_params


def test_sampling_modes_temperature_and_gradients():
    model = po.SuperNet(MODELS / "digits_cnn.onnx")
    x = torch.rand(4, 1, 8, 8)
    _random_logits(model, seed=9)
    for sampling in relaxation.SAMPLINGS:
        model.set_sampling(sampling)
        model.train()
        model.zero_grad()
        loss = model(x).square().mean() + 1e-6 * model.cost
        loss.backward()
        grads = [p.grad for p in model.nas_parameters()]
        assert all(g is not None and torch.isfinite(g).all() and torch.any(g != 0) for g in grads), sampling
    model.eval()
    reference = model(x)
    for sampling in relaxation.SAMPLINGS:
        model.set_sampling(sampling)
        assert torch.equal(model(x), reference)  # eval ignores the sampling: always the argmax
    assert model.searchable_graph().nodes and all(
        n.attrs["sampling"] == "hard" for n in model.searchable_graph().nodes if n.op == "Choice")
    with pytest.raises(ValueError):
        model.set_sampling("uniform")
    # T sharpens the softmax; it is a buffer written into the checkpoint.
    model.train()
    soft = model.cost_of("params").item()
    model.set_temperature(1e-5)
    assert model.temperature == pytest.approx(1e-5)
    model.eval()
    hard = float(model.cost_of("params"))
    model.train()
    assert model.cost_of("params").item() == pytest.approx(hard, rel=1e-6) and soft != pytest.approx(hard)
    assert float(po.SuperNet(model.searchable_graph()).temperature) == pytest.approx(1e-5)
    assert exponential_temperature(0, 10) == 1.0 and exponential_temperature(10, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_searchable_graph_is_a_checkpoint(tmp_path):
    model = po.SuperNet(MODELS / "mobilenetv2_tiny.onnx", cost="macs")
    _random_logits(model, seed=11)
    model.eval()
    feeds = random_inputs(model.graph, batch=2)
    expected = run_torch(model, feeds, model.module.input_names)[0]
    path = model.searchable_graph().save(tmp_path / "search.onnx")
    run_ort(path, feeds)  # runs in ONNX Runtime as is (the softmax mix)
    resumed = po.SuperNet(path, cost="macs").eval()
    assert resumed.chosen() == model.chosen()
    assert np.array_equal(expected, run_torch(resumed, feeds, resumed.module.input_names)[0])
    assert float(resumed.cost) == float(model.cost)


def test_pit_after_supernet_on_the_chosen_model():
    model = po.SuperNet(MODELS / "digits_cnn.onnx")
    _pick(model, "/conv2/Conv", "separable")
    _pick(model, "/fc1/Gemm", "rank16")
    chosen = model.export()
    assert {"/conv2/Conv/supernet/separable/depthwise", "/fc1/Gemm/supernet/rank16/reduce"} <= \
        {n.name for n in chosen.nodes}
    pit = po.PIT(chosen)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for p in pit.nas_parameters():
            p.copy_(torch.from_numpy(np.where(rng.random(p.shape) < 0.4, 0.2, 1.0).astype(np.float32)))
    pit.eval()
    feeds = random_inputs(chosen, batch=2)
    pruned = pit.export()
    assert relative_error(run_torch(pit, feeds, ["input"])[0], run_ort(pruned.to_onnx(), feeds)[0]) <= 1e-5
    assert po.cost.total(pruned) < po.cost.total(chosen)


def test_enforce_reaches_a_target_and_summary_reports():
    model = po.SuperNet(MODELS / "resnet8.onnx", cost="params")
    full = po.cost.total(po.load(MODELS / "resnet8.onnx"))
    assert model.enforce("params", 0.5 * full)
    model.eval()
    assert float(model.cost) <= 0.5 * full
    assert po.cost.total(model.export()) <= 0.5 * full
    text = model.summary()
    assert "chosen" in text and "/stack1/conv1/Conv" in text and "total" in text
    assert set(model.architecture()["choices"]) == {c.name for c in model.info.choices}
    assert isinstance(build_searchable(po.load(MODELS / "tcn.onnx"), "macs", menu={"kernels": [3]}), po.SuperNet)


def test_menu_include_exclude_and_op_types():
    only_fc = po.SuperNet(MODELS / "digits_cnn.onnx", op_types=["Gemm"])
    assert [c.name for c in only_fc.info.choices] == ["/fc1/Gemm", "/fc2/Gemm"]
    some = po.SuperNet(MODELS / "digits_cnn.onnx", include=["/conv*"], exclude=["/conv1/*"],
                       menu={"kernels": [5], "separable": False, "groups": [], "identity": False})
    assert {c.name: _names(some, c.name) for c in some.info.choices} == {
        "/conv2/Conv": ["original", "kernel5"], "/conv3/Conv": ["original", "kernel5"]}
    # dscnn's 10x4 first conv (pads 5,1) cannot shrink to 1x1 without negative padding.
    dscnn = po.SuperNet(MODELS / "dscnn.onnx", include=["/conv1/Conv"])
    assert "kernel1" not in _names(dscnn, "/conv1/Conv") and "kernel3" in _names(dscnn, "/conv1/Conv")
    with pytest.raises(po.PlinioOnnxError, match="unknown SuperNet menu entries"):
        po.SuperNet(MODELS / "digits_cnn.onnx", menu={"kernel": [3]})


# -- user-defined alternatives ---------------------------------------------------------------
def _conv_block_model(c_in: int, c_out: int, kernel: int, name: str, seed: int = 0) -> onnx.ModelProto:
    """An alternative named ``name``: Conv(k, no bias) → Relu on a [n, c_in, 8, 8] input."""
    x = helper.make_tensor_value_info("in", TensorProto.FLOAT, ["n", c_in, 8, 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", c_out, 8, 8])
    nodes = [helper.make_node("Conv", ["in", "w"], ["c"], name="conv", pads=[kernel // 2] * 4),
             helper.make_node("Relu", ["c"], ["out"], name="relu")]
    model = _model(nodes, [x], [y], [numpy_helper.from_array(_arr((c_out, c_in, kernel, kernel), seed) / 4, "w")])
    model.graph.name = name
    return model


def test_user_alternatives_for_a_region_and_a_node():
    graph = _hand_graph()
    cheap = _conv_block_model(4, 6, 1, "cheap")       # replaces A → relu (region x → ar)
    model = po.SuperNet(graph, automatic=False,
                        regions=[{"input": "x", "output": "ar", "alternatives": [cheap], "name": "block"}],
                        layers={"M": [_matmul_graph(), "identity"]})
    assert _names(model, "block") == ["original", "cheap"]
    assert _names(model, "M") == ["original", "scaled", "identity"]
    feeds = random_inputs(graph, batch=2, seed=12)
    reference = run_ort(graph.to_onnx(), feeds)[0]
    model.eval()
    assert relative_error(reference, run_torch(model, feeds, ["x"])[0]) <= 1e-6
    _pick(model, "block", "cheap")
    _pick(model, "M", "scaled")
    out = _eval_branch(model, "block", "cheap", feeds)
    exported = model.export()
    assert {"block/supernet/cheap/conv", "M/supernet/scaled/mul"} <= {n.name for n in exported.nodes}
    # By hand: relu(conv1x1(x)) → flatten → G → ×2 (the user's MatMul replacement keeps no bias).
    init = {t.name: np.asarray(t.values) for t in graph.initializers().values()}
    with torch.no_grad():
        w = numpy_helper.to_array(cheap.graph.initializer[0]).copy()
        h = F.relu(F.conv2d(torch.from_numpy(feeds["x"]), torch.from_numpy(w)))
        h = F.linear(h.flatten(1), torch.from_numpy(init["wg"]), torch.from_numpy(init["bg"])) * 2.0
    assert relative_error(h.numpy(), out) <= 1e-5
    # The user's weights are trainable parameters of the searchable model.
    assert any(name.endswith("block/supernet/cheap/w") for name in model.module.initializer_names.values())


def _matmul_graph() -> onnx.GraphProto:
    """A MatMul+bias replacement: y = 2·x (a GraphProto, any input/output names)."""
    x = helper.make_tensor_value_info("v", TensorProto.FLOAT, ["n", 5])
    y = helper.make_tensor_value_info("w", TensorProto.FLOAT, ["n", 5])
    return helper.make_graph([helper.make_node("Mul", ["v", "two"], ["w"], name="mul")], "scaled", [x], [y],
                             [numpy_helper.from_array(np.array(2.0, np.float32), "two")])


def test_spec_file_with_paths_and_builtins(tmp_path):
    graph = _hand_graph()
    onnx.save(_conv_block_model(4, 6, 5, "wide", seed=3), tmp_path / "wide.onnx")
    spec = {"automatic": False, "regions": [{"input": "x", "output": "ar", "alternatives": ["wide.onnx"]}],
            "layers": {"G": ["rank:0.5", "rank:1"]}, "sampling": "hard", "temperature": 2.0}
    (tmp_path / "supernet.json").write_text(json.dumps(spec))
    model = po.SuperNet(graph, spec=tmp_path / "supernet.json")
    assert _names(model, "ar") == ["original", "wide"]          # a region is named after its output
    assert _names(model, "G") == ["original", "rank2", "rank1"]  # 0.5 of min(384, 5) = 2 (rounded)
    assert model.info.sampling == "hard" and model.temperature == 2.0
    _random_logits(model, seed=2)
    model.eval()
    feeds = random_inputs(graph, batch=2)
    assert relative_error(run_torch(model, feeds, ["x"])[0], run_ort(model.export().to_onnx(), feeds)[0]) <= 1e-5


def test_bad_alternatives_are_reported_together():
    graph = _hand_graph()
    wrong = _conv_block_model(4, 7, 1, "wrong")
    with pytest.raises(po.PlinioOnnxError) as info:
        po.SuperNet(graph, automatic=False,
                    regions=[{"input": "a", "output": "ar", "alternatives": [wrong]},       # wrong shapes
                             {"input": "f", "output": "gm", "alternatives": ["kernel:3"]}],  # builtin on a region
                    layers={"nope": ["identity"], "M": ["kernel:3", "rank:9"], "A": ["identity"]})
    message = str(info.value)
    for expected in ("alternative 'wrong'", "builtin 'kernel:3' needs a Conv/Gemm/MatMul layer",
                     "'nope' is not in the graph", "'kernel' does not apply to MatMul",
                     "rank 9 is not in [1, 5]", "input and output shapes differ"):
        assert expected in message, expected
    with pytest.raises(po.PlinioOnnxError, match="already holds ai.plinio nodes"):
        po.SuperNet(po.passes.pit(graph))


def test_regions_must_have_one_input_and_one_output():
    # x → relu → r ─┬→ neg → n ─→ add → y
    #               └───────────────┘
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Neg", ["r"], ["n"], name="neg"),
             helper.make_node("Add", ["r", "n"], ["y"], name="add")]
    graph = po.load(_model(nodes, [x], [y], []))
    with pytest.raises(po.PlinioOnnxError, match="'r' is also used outside the region"):
        po.passes.supernet(graph, regions=[{"input": "x", "output": "n", "alternatives": ["identity"]}])
    with pytest.raises(po.PlinioOnnxError, match="node 'add' reads 'r', which does not come from 'n'"):
        po.passes.supernet(graph, regions=[{"input": "n", "output": "y", "alternatives": ["identity"]}])
    searchable = po.passes.supernet(graph, regions=[{"input": "r", "output": "y", "alternatives": ["identity"]}])
    feeds = random_inputs(graph, batch=2)
    model = po.SuperNet(searchable)
    _pick(model, "y", "identity")
    exported = model.export()
    assert [n.op for n in exported.nodes] == ["Relu", "Identity"]  # the graph output keeps its name
    assert np.array_equal(run_ort(exported.to_onnx(), feeds)[0], np.maximum(feeds["x"], 0))


# -- SuperNet + PIT, searched jointly ----------------------------------------------------------
_PIT_SUFFIXES = (".pit_alpha", ".pit_beta", ".pit_gamma")


def _random_architecture(model: po.SuperNet, seed: int = 0, below: float = 0.4) -> None:
    """Random logits and random PIT masks (each entry below the threshold with probability ``below``)."""
    random_architecture(model, seed, (".supernet_logits",), _PIT_SUFFIXES, below)


def _keep(model: po.SuperNet, producer: str, kept: int) -> None:
    """Keep exactly ``kept`` channels of the PIT group ``producer`` writes (the last ones: PIT
    always keeps the last channel alive)."""
    group = next(g for g in model.pit.info.groups if producer in [p.node for p in g.producers])
    with torch.no_grad():
        alpha = model.tensor(group.alpha[0])
        alpha.fill_(0.2)
        alpha[alpha.numel() - kept:] = 1.0


def _pit_hand_graph() -> po.Graph:
    # x[n,4,8,8] → A (4→6, 3x3, pad 1, bias) → relu → B (6→5, 1x1, bias) → relu → flatten(320)
    #   → G (Gemm 320→3, transB) → y
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="A", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ar"], name="ra"),
             helper.make_node("Conv", ["ar", "wb", "bb"], ["b"], name="B"),
             helper.make_node("Relu", ["b"], ["br"], name="rb"),
             helper.make_node("Flatten", ["br"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="G", transB=1)]
    inits = [numpy_helper.from_array(_arr((6, 4, 3, 3), 1), "wa"), numpy_helper.from_array(_arr((6,), 2), "ba"),
             numpy_helper.from_array(_arr((5, 6, 1, 1), 3), "wb"), numpy_helper.from_array(_arr((5,), 4), "bb"),
             numpy_helper.from_array(_arr((3, 320), 5) / 10, "wg"), numpy_helper.from_array(_arr((3,), 6), "bg")]
    return po.load(_model(nodes, [x], [y], inits))


def test_supernet_pit_cost_is_the_softmax_weighted_pruned_branch_cost_by_hand():
    graph = _pit_hand_graph()
    model = po.SuperNet(graph, layers={"A": ["rank:3", "kernel:1"]}, automatic=False, pit=True)
    assert _names(model, "A") == ["original", "rank3", "kernel1"]
    # One group couples the three branches' outputs (united at the Choice) and B's input; the
    # low-rank pair has its own inner group; B's output is read by G; G feeds the graph output.
    groups = {frozenset(p.node for p in g.producers): g.size for g in model.pit.info.groups}
    assert groups == {frozenset({"A", "A/supernet/rank3/expand", "A/supernet/kernel1/Conv"}): 6,
                      frozenset({"A/supernet/rank3/reduce"}): 3, frozenset({"B"}): 5}
    k_a, k_r, k_b = 4, 2, 3   # kept: A's united group, the rank branch's inner group, B's output
    _keep(model, "A", k_a)
    _keep(model, "A/supernet/rank3/reduce", k_r)
    _keep(model, "B", k_b)
    s = 64  # output pixels
    a_params = [k_a * (4 * 9 + 1), k_r * 4 * 9 + k_a * (k_r + 1), k_a * (4 + 1)]   # original, rank3, kernel1
    a_macs = [k_a * 4 * 9 * s, (k_r * 4 * 9 + k_a * k_r) * s, k_a * 4 * s]
    outside_params = k_b * (k_a + 1) + 3 * (k_b * s + 1)                            # B, G
    outside_macs = k_b * k_a * s + 3 * k_b * s
    logits = np.array([0.3, 1.1, -0.4])
    with torch.no_grad():
        model.logits("A").copy_(torch.from_numpy(logits.astype(np.float32)))
    model.set_temperature(0.7)
    model.train()
    theta = relaxation.probabilities(logits.astype(np.float32), 0.7)
    assert model.cost_of("params").item() == pytest.approx(theta @ a_params + outside_params, rel=1e-6)
    assert model.cost_of(po.cost.macs).item() == pytest.approx(theta @ a_macs + outside_macs, rel=1e-6)
    # Gradients reach the logits and the PIT masks (straight-through).
    model.cost.backward()
    assert torch.all(model.logits("A").grad != 0)
    alphas = [n for n in model.module.initializer_names.values() if n.endswith(".pit_alpha")]
    assert len(alphas) == 3 and all(torch.any(model.grad(n) != 0) for n in alphas)
    assert len(list(model.nas_parameters())) == 2  # the logits, the three alphas packed
    # Eval: the argmax branch (rank3, its inner group pruned too) = the exported model, exactly.
    feeds = random_inputs(graph, batch=2, seed=3)
    model.eval()
    with torch.no_grad():
        assert float(model.cost_of("params")) == a_params[1] + outside_params
        assert float(model.cost_of("macs")) == a_macs[1] + outside_macs
    exported = model.export()
    assert po.cost.total(exported) == a_params[1] + outside_params
    assert po.cost.total(exported, po.cost.macs) == a_macs[1] + outside_macs
    assert relative_error(run_torch(model, feeds, ["x"])[0], run_ort(exported.to_onnx(), feeds)[0]) <= 1e-5
    assert {n.name for n in exported.nodes} >= {"A/supernet/rank3/reduce", "A/supernet/rank3/expand", "B", "G"}
    # The masked branch dropped: kernel1 kept, the rank branch's masks leave with it.
    _pick(model, "A", "kernel1")
    exported = model.export()
    assert po.cost.total(exported) == a_params[2] + outside_params == float(model.cost_of("params").detach())
    assert relative_error(run_torch(model, feeds, ["x"])[0], run_ort(exported.to_onnx(), feeds)[0]) <= 1e-5
    assert not any((n.domain or "") == PLINIO_DOMAIN for n in exported.nodes)
    text = model.summary()
    assert "PIT channels" in text and "A/supernet/rank3/reduce" in text and "dropped branch" in text
    assert model.architecture()["kept_channels"]["B"] == {"kept": k_b, "total": 5}


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_supernet_pit_random_architecture_export_matches(name):
    graph = po.load(MODELS / f"{name}.onnx")
    model = po.SuperNet(graph, pit=True)
    assert model.pit is not None and model.pit.info.groups
    _random_architecture(model, seed=0)
    model.eval()
    feeds = random_inputs(graph, batch=2, seed=0)
    expected = run_torch(model, feeds, model.module.input_names)
    exported = model.export()
    for e, g in zip(expected, run_ort(exported.to_onnx(), feeds)):
        assert relative_error(e, g) <= 1e-4
    assert not any((n.domain or "") == PLINIO_DOMAIN for n in exported.nodes)
    onnx.checker.check_model(exported.to_onnx())
    with torch.no_grad():
        assert float(model.cost_of(po.cost.params)) == po.cost.total(exported, po.cost.params)
        assert float(model.cost_of(po.cost.macs)) == po.cost.total(exported, po.cost.macs)
        # The same choices without pruning: the SuperNet-only export.
        for name in model.module.initializer_names.values():
            if name.endswith(_PIT_SUFFIXES):
                model.tensor(name).fill_(1.0)
    assert po.cost.total(exported) < po.cost.total(model.export())


def test_supernet_pit_checkpoint_options_and_refusals(tmp_path):
    graph = po.load(MODELS / "digits_cnn.onnx")
    model = po.SuperNet(graph, pit={"exclude": ["/fc1/*"]}, cost="macs")
    assert not any(g.producers[0].node.startswith("/fc1/") for g in model.pit.info.groups)
    def held(parameters) -> set[str]:
        parameters = list(parameters)
        return {n for _, p, names in model.module.parameter_initializers() if any(p is q for q in parameters)
                for n in names}
    names = held(model.nas_parameters())
    assert any(n.endswith(".supernet_logits") for n in names) and any(n.endswith(".pit_alpha") for n in names)
    assert not any(n.endswith((".supernet_logits", ".pit_alpha")) for n in held(model.net_parameters()))
    _random_architecture(model, seed=5)
    model.eval()
    path = model.searchable_graph().save(tmp_path / "search.onnx")
    resumed = po.SuperNet(path, cost="macs").eval()   # PIT masks resume with the SuperNet
    assert resumed.pit is not None and resumed.chosen() == model.chosen()
    assert resumed.kept_channels() == model.kept_channels()
    with torch.no_grad():
        assert float(resumed.cost) == float(model.cost)
    # PIT on a SuperNet graph (the graph-passes route) = the same searchable model.
    joint = po.passes.pit(po.passes.supernet(graph))
    assert po.SuperNet(joint).pit is not None
    with pytest.raises(po.PlinioOnnxError, match="already holds ai.plinio nodes"):
        po.passes.pit(joint)
    with pytest.raises(po.PlinioOnnxError, match="already holds ai.plinio nodes"):
        po.passes.pit(po.passes.mps(graph))


def test_cli_optimize_supernet_pit(tmp_path):
    from plinio_onnx.cli import main
    out = tmp_path / "snp.onnx"
    fast = ["--warmup-epochs", "1", "--epochs", "1", "--finetune-epochs", "1", "--threads", "1", "--quiet"]
    assert main(["optimize", str(MODELS / "digits_cnn.onnx"), "--method", "supernet+pit",
                 "--data", str(MODELS / "digits.npz"), "-o", str(out), "--target-params", "50%"] + fast) == 0
    exported = po.load(out)
    assert not any((n.domain or "") == PLINIO_DOMAIN for n in exported.nodes)
    assert po.cost.total(exported) <= 0.5 * po.cost.total(po.load(MODELS / "digits_cnn.onnx"))
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["method"] == "supernet+pit" and report["after"]["test"]["accuracy"] > 0.5
    assert run_ort(out, {"input": np.load(MODELS / "digits.npz")["x"][:4]})[0].shape == (4, 10)
    # The searchable checkpoint exports again, recognized as the joint method.
    again = tmp_path / "again.onnx"
    assert main(["export", str(tmp_path / "snp.ckpt" / "search.best.onnx"), "-o", str(again)]) == 0
    from plinio_onnx.optimize import export_searchable
    _, method = export_searchable(tmp_path / "snp.ckpt" / "search.best.onnx", tmp_path / "again2.onnx")
    assert method == "supernet+pit"


@pytest.mark.parametrize("extra", [[], ["--pit"]], ids=["supernet", "supernet+pit"])
def test_example_script_runs(tmp_path, extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model: threads only add contention
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "03_supernet_digits.py"), "--epochs", "1",
                             "--out", str(tmp_path / "chosen.onnx")] + extra, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ONNX Runtime test accuracy" in result.stdout and (tmp_path / "chosen.onnx").is_file()
