"""PIT: the pass, the searchable module, its costs and the finalized (pruned) export."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import plinio_onnx as po
from plinio_onnx.analysis import analyze_channels
from plinio_onnx.data import random_inputs
from plinio_onnx.functions import pit as pit_fn
from plinio_onnx.graph import PLINIO_DOMAIN

from _util import MODELS, ONNX_DATA, ZOO_NAMES, relative_error, run_ort, run_torch

LIGHT = sorted(p.stem for p in (ONNX_DATA / "light").glob("*.onnx"))


def _randomize_weights(graph: po.Graph, seed: int = 0) -> None:
    """Replace the light models' constant weights by random ones, so outputs depend on them."""
    rng = np.random.default_rng(seed)
    for tensor in graph.initializers().values():
        values = np.asarray(tensor.values)
        if not np.issubdtype(values.dtype, np.floating) or values.size < 2:
            continue
        if values.ndim == 1:  # BN statistics, scales and biases: positive and near 1
            tensor.values = rng.uniform(0.5, 1.5, values.shape).astype(values.dtype)
        else:
            fan_in = int(np.prod(values.shape[1:]))
            tensor.values = (rng.standard_normal(values.shape) * np.sqrt(2.0 / fan_in)).astype(values.dtype)


def _random_masks(model: po.PIT, seed: int = 0, below: float = 0.4) -> None:
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for param in model.nas_parameters():
            values = np.where(rng.random(param.shape) < below, 0.2, 1.0).astype(np.float32)
            param.copy_(torch.from_numpy(values))


def _check_export_equivalence(graph: po.Graph, name: str, seed: int = 0) -> None:
    model = po.PIT(graph)
    _random_masks(model, seed)
    model.eval()
    feeds = random_inputs(graph, batch=2, seed=seed)
    expected = run_torch(model, feeds, [t.name for t in graph.gs.inputs])
    exported = model.export()
    got = run_ort(exported.to_onnx(), feeds)
    for e, g in zip(expected, got):
        assert relative_error(e, g) <= 1e-4
    assert not any((n.domain or "") == PLINIO_DOMAIN for n in exported.nodes)
    # Nothing is added, except where a grouped Conv left with uneven groups became one per group.
    assert len([n for n in exported.nodes if "/group" not in n.name]) <= len(graph.nodes)
    onnx.checker.check_model(exported.to_onnx())
    after = po.cost.total(exported)
    assert after < po.cost.total(graph)
    # What the searchable model reports is what the export costs.
    with torch.no_grad():
        assert float(model.cost_of(po.cost.params)) == pytest.approx(after, abs=1e-3)
        assert float(model.cost_of(po.cost.macs)) == pytest.approx(po.cost.total(exported, po.cost.macs), abs=1e-3)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_random_masks_export_matches(name):
    _check_export_equivalence(po.load(MODELS / f"{name}.onnx"), name)


@pytest.mark.parametrize("name", LIGHT)
def test_onnx_shipped_architectures_random_masks_export_matches(name):
    graph = po.load(ONNX_DATA / "light" / f"{name}.onnx")
    _randomize_weights(graph)
    _check_export_equivalence(graph, name)


@pytest.mark.parametrize("name", ["resnet8", "tcn", "transformer_tiny", "densenet_tiny"])
def test_inserting_masks_changes_no_output(name):
    graph = po.load(MODELS / f"{name}.onnx")
    searchable = po.passes.pit(graph)
    feeds = random_inputs(graph, batch=2, seed=3)
    reference = run_ort(graph.to_onnx(), feeds)[0]
    assert relative_error(reference, run_ort(searchable.to_onnx(), feeds)[0]) <= 1e-6  # ONNX bodies
    module = po.to_torch(searchable).eval()
    assert relative_error(reference, run_torch(module, feeds, module.input_names)[0]) <= 1e-5
    # Finalizing with every mask at 1 is the identity.
    assert relative_error(reference, run_ort(po.finalize(searchable).to_onnx(), feeds)[0]) <= 1e-5


def test_costs_at_full_masks_equal_inspect():
    from plinio_onnx.inspect import inspect_model
    for name in ZOO_NAMES:
        report = inspect_model(MODELS / f"{name}.onnx")
        model = po.PIT(MODELS / f"{name}.onnx")
        with torch.no_grad():
            assert float(model.cost_of("params")) == report["params"], name
            assert float(model.cost_of("macs")) == report["macs"], name


# -- hand-built graphs with costs computed by hand -------------------------------------------
def _model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "hand", inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def _init(name, shape, seed=0):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def _set_alpha(model: po.PIT, producer: str, keep: list[int]) -> None:
    group = next(g for g in model.info["groups"] if g["producers"][0]["node"] == producer)
    alpha = model.tensor(group["alpha"])
    values = torch.full_like(alpha, 0.1)
    values[keep] = 1.0
    values[-1] = 1.0 if (alpha.numel() - 1) in keep else 0.1  # keep-alive ignores the value
    with torch.no_grad():
        alpha.copy_(values)


def test_cost_conv_group_depthwise_flatten_gemm_by_hand():
    # x[1,3,8,8] → conv A (3→8, 3x3, pad 1) → relu → depthwise (8, 3x3, pad 1, bias) → relu
    #   → conv B (8→6, 1x1, stride 2) → flatten (6·4·4 = 96) → gemm (96→5)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="A", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ar"], name="ra"),
             helper.make_node("Conv", ["ar", "wd", "bd"], ["d"], name="D", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["d"], ["dr"], name="rd"),
             helper.make_node("Conv", ["dr", "wb"], ["b"], name="B", strides=[2, 2]),
             helper.make_node("Flatten", ["b"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="G", transB=1)]
    inits = [_init("wa", (8, 3, 3, 3)), _init("ba", (8,)), _init("wd", (8, 1, 3, 3)), _init("bd", (8,)),
             _init("wb", (6, 8, 1, 1)), _init("wg", (5, 96)), _init("bg", (5,))]
    graph = po.load(_model(nodes, [x], [y], inits))
    model = po.PIT(graph)
    full_params = 8 * 27 + 8 + 8 * 9 + 8 + 6 * 8 + 5 * 96 + 5
    full_macs = 8 * 27 * 64 + 8 * 9 * 64 + 6 * 8 * 16 + 5 * 96
    with torch.no_grad():
        assert float(model.cost_of("params")) == full_params
        assert float(model.cost_of("macs")) == full_macs
    _set_alpha(model, "A", keep=[0, 2, 7])    # 3 of 8 (A and the depthwise share the group)
    _set_alpha(model, "B", keep=[1, 5])       # 2 of 6 (6 is B's last: kept alive)
    params = 3 * 27 + 3 + 3 * 9 + 3 + 2 * 3 + 5 * 32 + 5
    macs = 3 * 27 * 64 + 3 * 9 * 64 + 2 * 3 * 16 + 5 * 32
    with torch.no_grad():
        assert float(model.cost_of("params")) == params
        assert float(model.cost_of("macs")) == macs
    exported = model.export()
    assert po.cost.total(exported) == params and po.cost.total(exported, po.cost.macs) == macs
    depthwise = next(n for n in exported.nodes if n.name == "D")
    assert depthwise.attrs["group"] == 3 and depthwise.inputs[1].values.shape == (3, 1, 3, 3)
    assert next(n for n in exported.nodes if n.name == "G").inputs[1].values.shape == (5, 32)


def test_cost_residual_group_and_dilated_conv1d_by_hand():
    # x[1,4,32] → c1 (4→6, k3, dil 2, pad 2) ─┬→ add → relu → c3 (6→3, k1) → y
    #             c2 (4→6, k1)  ──────────────┘
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 32])
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="c1", dilations=[2], pads=[2, 2]),
             helper.make_node("Conv", ["x", "w2"], ["c2"], name="c2"),
             helper.make_node("Add", ["c1", "c2"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w3"], ["y"], name="c3")]
    inits = [_init("w1", (6, 4, 3)), _init("b1", (6,)), _init("w2", (6, 4, 1)), _init("w3", (3, 6, 1))]
    graph = po.load(_model(nodes, [x], [y], inits))
    analysis = analyze_channels(graph)
    residual = [g for g in analysis.prunable()]
    assert len(residual) == 1 and {p.node for p in residual[0].producers} == {"c1", "c2"}
    model = po.PIT(graph)
    _set_alpha(model, "c1", keep=[0, 3])  # shared by c1 and c2: 2 of 6 (channel 5 kept alive)
    entry = model.info["time"][0]
    assert entry["node"] == "c1" and entry["kernel"] == 3
    with torch.no_grad():  # drop the oldest tap: kernel 2 (taps 1, 2), dilation 2
        model.tensor(entry["beta"]).copy_(torch.tensor([0.1, 1.0, 1.0]))
    c = 3  # kept channels 0, 3, 5
    params = c * (4 * 2) + c + c * 4 + 3 * c
    macs = (c * 4 * 2 + c * 4 + 3 * c) * 32
    with torch.no_grad():
        assert float(model.cost_of("params")) == params
        assert float(model.cost_of("macs")) == macs
    exported = model.export()
    conv = next(n for n in exported.nodes if n.name == "c1")
    assert conv.attrs["kernel_shape"] == [2] and conv.attrs["dilations"] == [2] and conv.attrs["pads"] == [0, 2]
    assert po.cost.total(exported) == params
    feeds = random_inputs(graph, batch=2)
    model.eval()
    assert relative_error(run_torch(model, feeds, ["x"])[0], run_ort(exported.to_onnx(), feeds)[0]) <= 1e-5


def _grouped_model(shuffle: bool) -> onnx.ModelProto:
    # x[n,4,6,6] → A (4→8, 1x1) → relu → [shuffle in 2] → G (8→6, 3x3, group 2, pad 1, bias) → relu
    #   → C (6→3, 1x1) → y
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 6, 6])
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="A"),
             helper.make_node("Relu", ["a"], ["ar"], name="ra")]
    inits = [_init("wa", (8, 4, 1, 1)), _init("ba", (8,), 1), _init("wg", (6, 4, 3, 3), 2), _init("bg", (6,), 3),
             _init("wc", (3, 6, 1, 1), 4)]
    source = "ar"
    if shuffle:
        nodes += [helper.make_node("Reshape", ["ar", "split_shape"], ["s1"], name="split"),
                  helper.make_node("Transpose", ["s1"], ["s2"], name="swap", perm=[0, 2, 1, 3, 4]),
                  helper.make_node("Reshape", ["s2", "merge_shape"], ["s3"], name="merge")]
        inits += [numpy_helper.from_array(np.array([-1, 2, 4, 6, 6], np.int64), "split_shape"),
                  numpy_helper.from_array(np.array([-1, 8, 6, 6], np.int64), "merge_shape")]
        source = "s3"
    nodes += [helper.make_node("Conv", [source, "wg", "bg"], ["g"], name="G", group=2, pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["g"], ["gr"], name="rg"),
              helper.make_node("Conv", ["gr", "wc"], ["y"], name="C")]
    return _model(nodes, [x], [y], inits)


@pytest.mark.parametrize("keep_a, keep_g, split", [
    ([0, 1, 2, 5], [0, 3, 4], True),     # uneven: group 0 reads 3 inputs → 1 output, group 1: 1 → 2
    ([0, 1, 4], [1, 2, 4], False),       # even: 2 inputs and 2 outputs per group stay one grouped Conv
])
def test_grouped_conv_cost_by_hand_and_export(keep_a, keep_g, split):
    graph = po.load(_grouped_model(shuffle=False))
    model = po.PIT(graph)
    _set_alpha(model, "A", keep=keep_a + [7])   # 7 is kept alive anyway
    _set_alpha(model, "G", keep=keep_g + [5])
    kept_a, kept_g = sorted(set(keep_a + [7])), sorted(set(keep_g + [5]))
    per_in = [sum(c // 4 == k for c in kept_a) for k in range(2)]
    per_out = [sum(c // 3 == k for c in kept_g) for k in range(2)]
    g_weights = sum(i * o * 9 for i, o in zip(per_in, per_out))
    params = len(kept_a) * 4 + len(kept_a) + g_weights + len(kept_g) + 3 * len(kept_g)
    macs = (len(kept_a) * 4 + g_weights + 3 * len(kept_g)) * 36
    with torch.no_grad():
        assert float(model.cost_of("params")) == params
        assert float(model.cost_of("macs")) == macs
    exported = model.export()
    assert po.cost.total(exported) == params and po.cost.total(exported, po.cost.macs) == macs
    convs = [n for n in exported.nodes if n.op == "Conv" and n.name.startswith("G")]
    if split:
        assert [(c.attrs["group"], c.inputs[1].values.shape) for c in convs] == \
            [(1, (o, i, 3, 3)) for i, o in zip(per_in, per_out) if o]
    else:
        assert len(convs) == 1 and convs[0].attrs["group"] == 2 and convs[0].inputs[1].values.shape == (4, 2, 3, 3)
    feeds = random_inputs(graph, batch=2, seed=1)
    model.eval()
    assert relative_error(run_torch(model, feeds, ["x"])[0], run_ort(exported.to_onnx(), feeds)[0]) <= 1e-5
    onnx.checker.check_model(exported.to_onnx())


def test_channel_shuffle_prunes_through_a_permutation():
    graph = po.load(_grouped_model(shuffle=True))
    analysis = analyze_channels(graph)
    # On the graph as loaded the Reshape–Transpose–Reshape splits A's channel axis.
    assert [g.name for g in analysis.prunable()] == ["G"]
    feeds = random_inputs(graph, batch=2, seed=2)
    reference = run_ort(graph.to_onnx(), feeds)[0]
    model = po.PIT(graph)
    assert len(model.info["groups"]) == 2
    # All kept: the export is the original graph again, shuffle spelled as before.
    unpruned = model.export()
    assert [n.op for n in unpruned.nodes] == [n.op for n in graph.nodes]
    assert relative_error(reference, run_ort(unpruned.to_onnx(), feeds)[0]) <= 1e-5
    # G's input m is A's channel (m mod 2)·4 + m // 2. A keeps 1, 4 and 7 (kept alive): G reads
    # them at 2, 1 and 7 — two inputs in group 0, one in group 1.
    model = po.PIT(graph)
    _set_alpha(model, "A", keep=[1, 4])
    _set_alpha(model, "G", keep=[0, 1, 3])
    model.eval()
    exported = model.export()
    assert relative_error(run_torch(model, feeds, ["x"])[0], run_ort(exported.to_onnx(), feeds)[0]) <= 1e-5
    gather = next(n for n in exported.nodes if n.op == "Gather")
    assert gather.inputs[1].values.tolist() == [1, 0, 2]   # sources 4, 1, 7 among the kept 1, 4, 7
    assert [n.inputs[1].values.shape[1] for n in exported.nodes
            if n.op == "Conv" and n.name.startswith("G/group")] == [2, 1]
    with torch.no_grad():
        assert float(model.cost_of("params")) == po.cost.total(exported)
    # Keeping whole shuffle groups keeps a shuffle: A keeps 0, 3, 4, 7 → shuffle of 4 in 2.
    model = po.PIT(graph)
    _set_alpha(model, "A", keep=[0, 3, 4])
    model.eval()
    exported = model.export()
    assert "Gather" not in [n.op for n in exported.nodes] and "Transpose" in [n.op for n in exported.nodes]
    assert relative_error(run_torch(model, feeds, ["x"])[0], run_ort(exported.to_onnx(), feeds)[0]) <= 1e-5


def test_time_mask_semantics_match_the_paper_example():
    # METHODS.md: k = 5, |β| = (.1,.2,.3,.1,[1]), |γ| = (.2,.9,[1]) → m = (0,0,1,0,1), anchored at
    # the newest tap (k = 2^n + 1: the same as PLiNIO's).
    mask = pit_fn.tap_mask(np.array([.1, .2, .3, .1, .5]), np.array([.2, .9, .3]), 0.5)
    assert mask.tolist() == [0, 0, 1, 0, 1]
    plan = pit_fn.kernel_plan(mask, dilation=1, pads=(4, 0))  # causal
    assert plan.taps == (2, 4) and plan.dilation == 2 and plan.pads == (2, 0)
    torch_mask = pit_fn.taps(torch.tensor([.1, .2, .3, .1, .5]), torch.tensor([.2, .9, .3]),
                             torch.from_numpy(pit_fn.gamma_map(5)), 0.5)
    assert torch_mask.tolist() == [0, 0, 1, 0, 1]


def test_masks_get_straight_through_gradients():
    model = po.PIT(MODELS / "digits_cnn.onnx")
    x = torch.rand(4, 1, 8, 8)
    loss = model(x).square().mean() + 1e-5 * model.cost
    loss.backward()
    grads = [p.grad for p in model.nas_parameters()]
    assert grads and all(g is not None and torch.any(g != 0) for g in grads)


def test_include_exclude_and_threshold_options():
    everything = po.PIT(MODELS / "resnet8.onnx")
    only_stack3 = po.PIT(MODELS / "resnet8.onnx", include=["/stack3/*"])
    assert 0 < len(only_stack3.info["groups"]) < len(everything.info["groups"])
    assert all(p["node"].startswith("/stack3/") for g in only_stack3.info["groups"] for p in g["producers"])
    no_first = po.PIT(MODELS / "resnet8.onnx", exclude=["/conv/Conv"])
    assert len(no_first.info["groups"]) == len(everything.info["groups"]) - 1
    strict = po.PIT(MODELS / "digits_cnn.onnx", threshold=0.9)
    with torch.no_grad():
        for p in strict.nas_parameters():
            p.fill_(0.8)  # kept at the default threshold, pruned at 0.9 (but the last channel)
    assert all(kept == 1 for kept, _ in strict.kept_channels().values())
    with pytest.raises(po.PlinioOnnxError, match="unknown PIT masks"):
        po.passes.pit(po.load(MODELS / "tcn.onnx"), masks=["channels", "width"])


def test_searchable_graph_is_a_checkpoint(tmp_path):
    model = po.PIT(MODELS / "tcn.onnx")
    _random_masks(model, seed=5)
    model.eval()
    feeds = random_inputs(model.graph, batch=2)
    expected = run_torch(model, feeds, model.module.input_names)[0]
    path = model.searchable_graph().save(tmp_path / "search.onnx")
    assert relative_error(expected, run_ort(path, feeds)[0]) <= 1e-5  # runs in ONNX Runtime as is
    resumed = po.PIT(path).eval()
    assert np.array_equal(expected, run_torch(resumed, feeds, resumed.module.input_names)[0])
    assert resumed.kept_channels() == model.kept_channels()


def test_summary_and_unprunable_reasons_are_reported():
    model = po.PIT(MODELS / "transformer_tiny.onnx")
    text = model.summary()
    assert "ff1" in text and "total" in text
    reasons = " ".join(s["reason"] for s in model.info["skipped"])
    assert "LayerNormalization" in reasons or "graph output" in reasons
    assert len(model.info["groups"]) == 2  # the two FFN hidden widths


@pytest.mark.parametrize("kernel", [3, 4, 5])
@pytest.mark.parametrize("searched_time", [True, False])
def test_fused_mask_gradients_equal_the_composed_straight_through_form(kernel, searched_time):
    torch.manual_seed(kernel)
    gamma_map = torch.from_numpy(pit_fn.gamma_map(kernel)).float()

    def composed(beta, gamma):
        theta_beta = torch.cumsum(pit_fn._theta(beta), 0)
        theta_gamma = gamma_map @ pit_fn._theta(gamma)
        return pit_fn.binarize(theta_beta, 0.5) * pit_fn.binarize(theta_gamma, 0.5)

    weights = torch.randn(kernel)
    grads = []
    for fn_ in (lambda b, g: pit_fn.taps(b, g, gamma_map, 0.5), composed):
        beta = torch.linspace(-1, 1, kernel if searched_time else 1).requires_grad_()
        gamma = torch.linspace(0.2, 0.9, pit_fn.dilation_levels(kernel)).requires_grad_()
        (fn_(beta, gamma) * weights).sum().backward()
        grads.append((fn_(beta, gamma).detach(), beta.grad, gamma.grad))
    for fused, reference in zip(*grads):
        assert torch.allclose(fused, reference)
    alpha = torch.randn(9, requires_grad=True)
    (pit_fn.channel_mask(alpha, 0.5) * weights.repeat(3)[:9]).sum().backward()
    fused = alpha.grad.clone()
    alpha.grad = None
    (pit_fn.binarize(pit_fn._theta(alpha), 0.5) * weights.repeat(3)[:9]).sum().backward()
    assert torch.allclose(fused, alpha.grad)
