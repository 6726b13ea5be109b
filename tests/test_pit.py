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
from plinio_onnx.functions import pit_keep
from plinio_onnx.to_torch import pit_masks
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
    group = next(g for g in model.info.groups if g.producers[0].node == producer)
    alpha = model.tensor(group.alpha[0])
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
    entry = model.info.time[0]
    assert entry.node == "c1" and entry.kernel == 3
    with torch.no_grad():  # drop the oldest tap: kernel 2 (taps 1, 2), dilation 2
        model.tensor(entry.beta).copy_(torch.tensor([0.1, 1.0, 1.0]))
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
    assert len(model.info.groups) == 2
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
    # docs/methods.md#pit-time-masks: k = 5, |β| = (.1,.2,.3,.1,[1]), |γ| = (.2,.9,[1]) → m = (0,0,1,0,1), anchored at
    # the newest tap (k = 2^n + 1: the same as PLiNIO's).
    mask = pit_keep.tap_mask(np.array([.1, .2, .3, .1, .5]), np.array([.2, .9, .3]), 0.5)
    assert mask.tolist() == [0, 0, 1, 0, 1]
    plan = pit_keep.kernel_plan(mask, dilation=1, pads=(4, 0))  # causal
    assert plan.taps == (2, 4) and plan.dilation == 2 and plan.pads == (2, 0)
    torch_mask = pit_fn.taps(torch.tensor([.1, .2, .3, .1, .5]), torch.tensor([.2, .9, .3]),
                             torch.from_numpy(pit_keep.gamma_map(5)), 0.5)
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
    assert 0 < len(only_stack3.info.groups) < len(everything.info.groups)
    assert all(p.node.startswith("/stack3/") for g in only_stack3.info.groups for p in g.producers)
    no_first = po.PIT(MODELS / "resnet8.onnx", exclude=["/conv/Conv"])
    assert len(no_first.info.groups) == len(everything.info.groups) - 1
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
    reasons = " ".join(s.reason for s in model.info.skipped)
    assert "LayerNormalization" in reasons or "graph output" in reasons
    # The two FFN hidden widths and the two attention blocks' heads.
    assert sorted(g.size for g in model.info.groups) == [4, 4, 96, 96]


@pytest.mark.parametrize("kernel", [3, 4, 5])
@pytest.mark.parametrize("searched_time", [True, False])
def test_fused_mask_gradients_equal_the_composed_straight_through_form(kernel, searched_time):
    torch.manual_seed(kernel)
    gamma_map = torch.from_numpy(pit_keep.gamma_map(kernel)).float()

    def composed(beta, gamma):
        theta_beta = torch.cumsum(pit_fn._theta(beta), 0)
        theta_gamma = gamma_map @ pit_fn._theta(gamma)
        return pit_fn.binarize(theta_beta, 0.5) * pit_fn.binarize(theta_gamma, 0.5)

    weights = torch.randn(kernel)
    grads = []
    for fn_ in (lambda b, g: pit_fn.taps(b, g, gamma_map, 0.5), composed):
        beta = torch.linspace(-1, 1, kernel if searched_time else 1).requires_grad_()
        gamma = torch.linspace(0.2, 0.9, pit_keep.dilation_levels(kernel)).requires_grad_()
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


def _split_model(cut: str) -> onnx.ModelProto:
    # x[n,4,6,6] → A (4→8) → relu → split 3 | 5 ─ B (3→4) → relu ┐
    #                                            └ C (5→4) → relu ┴ concat (8) + D (4→8)(x) → relu → E (8→2)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 6, 6])
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="A"),
             helper.make_node("Relu", ["a"], ["ar"], name="ra")]
    inits = [_init("wa", (8, 4, 1, 1)), _init("ba", (8,), 1), _init("wb", (4, 3, 1, 1), 2),
             _init("wc", (4, 5, 1, 1), 3), _init("wd", (8, 4, 1, 1), 4), _init("bd", (8,), 5),
             _init("we", (2, 8, 1, 1), 6)]
    if cut == "split":
        nodes.append(helper.make_node("Split", ["ar", "sizes"], ["s1", "s2"], name="cut", axis=1))
        inits.append(numpy_helper.from_array(np.array([3, 5], np.int64), "sizes"))
    else:
        for name, begin, end in (("s1", 0, 3), ("s2", 3, 8)):
            nodes.append(helper.make_node("Slice", ["ar", f"{name}_begin", f"{name}_end", "axis1"], [name], name=name))
            inits += [numpy_helper.from_array(np.array([begin], np.int64), f"{name}_begin"),
                      numpy_helper.from_array(np.array([end], np.int64), f"{name}_end")]
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    nodes += [helper.make_node("Conv", ["s1", "wb"], ["b"], name="B"),
              helper.make_node("Relu", ["b"], ["br"], name="rb"),
              helper.make_node("Conv", ["s2", "wc"], ["c"], name="C"),
              helper.make_node("Relu", ["c"], ["cr"], name="rc"),
              helper.make_node("Concat", ["br", "cr"], ["bc"], name="cat", axis=1),
              helper.make_node("Conv", ["x", "wd", "bd"], ["d"], name="D"),
              helper.make_node("Add", ["bc", "d"], ["s"], name="add"),
              helper.make_node("Relu", ["s"], ["sr"], name="rs"),
              helper.make_node("Conv", ["sr", "we"], ["y"], name="E")]
    return _model(nodes, [x], [y], inits)


def _set_atoms(model: po.PIT, producer: str, keep: list[int]) -> None:
    """Keep exactly ``keep`` of a group whose mask has one parameter per atom (each atom keeps its
    last channel alive, so ``keep`` must hold every atom's last channel)."""
    group = next(g for g in model.info.groups if producer in {p.node for p in g.producers})
    assert all(atom[-1] in keep for atom in group.atoms)
    with torch.no_grad():
        for name, atom in zip(group.alpha, group.atoms):
            model.tensor(name).copy_(torch.tensor([1.0 if c in keep else 0.1 for c in atom]))


@pytest.mark.parametrize("cut", ["split", "slice"])
def test_split_and_concat_added_to_a_layer_prune_by_parts(cut):
    graph = po.load(_split_model(cut))
    model = po.PIT(graph)
    groups = {p.node: g for g in model.info.groups for p in g.producers}
    # A's channels are cut 3 | 5; B, C (concatenated) and D share one group of 8, in parts 4 | 4.
    assert groups["A"].atoms == [[0, 1, 2], [3, 4, 5, 6, 7]]
    assert {p.node for p in groups["B"].producers} == {"B", "C", "D"}
    assert groups["B"].atoms == [[0, 1, 2, 3], [4, 5, 6, 7]]
    keep_a, keep_s = [0, 2, 4, 7], [3, 5, 7]      # B keeps 1 output, C 2, D 3
    _set_atoms(model, "A", keep_a)
    _set_atoms(model, "B", keep_s)
    in_b, in_c = sum(c < 3 for c in keep_a), sum(c >= 3 for c in keep_a)
    out_b, out_c = sum(c < 4 for c in keep_s), sum(c >= 4 for c in keep_s)
    params = (4 * 4 + 4) + out_b * in_b + out_c * in_c + (3 * 4 + 3) + 2 * 3
    with torch.no_grad():
        assert float(model.cost_of("params")) == params
        assert float(model.cost_of("macs")) == (params - 4 - 3) * 36
    model.eval()
    exported = model.export()
    assert po.cost.total(exported) == params
    feeds = random_inputs(graph, batch=2, seed=4)
    assert relative_error(run_torch(model, feeds, ["x"])[0], run_ort(exported.to_onnx(), feeds)[0]) <= 1e-5
    onnx.checker.check_model(exported.to_onnx())
    if cut == "split":
        split = next(n for n in exported.nodes if n.op == "Split")
        assert split.inputs[1].values.tolist() == [in_b, in_c]
    else:
        bounds = [(int(n.inputs[1].values[0]), int(n.inputs[2].values[0])) for n in exported.nodes if n.op == "Slice"]
        assert bounds == [(0, in_b), (in_b, in_b + in_c)]


def _attention_model() -> onnx.ModelProto:
    # x[n,5,8] → q/k/v (8→8, +bias) → 2 heads of 4 → softmax(q·kᵀ/2)·v → merge → proj (8→6) → y
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5, 6])
    nodes, inits = [], [numpy_helper.from_array(np.array([-1, 5, 2, 4], np.int64), "heads"),
                        numpy_helper.from_array(np.array([-1, 5, 8], np.int64), "merged"),
                        numpy_helper.from_array(np.array(0.5, np.float32), "scale"),
                        _init("wp", (8, 6), 9)]
    for k, name in enumerate("qkv"):
        nodes += [helper.make_node("MatMul", ["x", f"w{name}"], [f"{name}0"], name=name),
                  helper.make_node("Add", [f"{name}0", f"b{name}"], [f"{name}1"], name=f"{name}_bias"),
                  helper.make_node("Reshape", [f"{name}1", "heads"], [f"{name}2"], name=f"{name}_split"),
                  helper.make_node("Transpose", [f"{name}2"], [f"{name}3"], name=f"{name}_t",
                                   perm=[0, 2, 3, 1] if name == "k" else [0, 2, 1, 3])]
        inits += [_init(f"w{name}", (8, 8), k), _init(f"b{name}", (8,), 10 + k)]
    nodes += [helper.make_node("MatMul", ["q3", "k3"], ["s"], name="scores"),
              helper.make_node("Mul", ["s", "scale"], ["s1"], name="scaled"),
              helper.make_node("Softmax", ["s1"], ["p"], name="softmax", axis=-1),
              helper.make_node("MatMul", ["p", "v3"], ["o"], name="mix"),
              helper.make_node("Transpose", ["o"], ["o1"], name="o_t", perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["o1", "merged"], ["o2"], name="merge"),
              helper.make_node("MatMul", ["o2", "wp"], ["y"], name="proj")]
    return _model(nodes, [x], [y], inits)


def test_attention_heads_prune_whole_by_hand():
    graph = po.load(_attention_model())
    model = po.PIT(graph)
    (group,) = model.info.groups
    assert group.size == 2 and {p.node for p in group.producers} == {"q", "k", "v"}
    full_params = 3 * (8 * 8 + 8) + 8 * 6
    full_macs = 3 * 8 * 8 * 5 + 2 * (4 * 5 * 2 * 5) + 8 * 6 * 5
    with torch.no_grad():
        assert float(model.cost_of("params")) == full_params
        assert float(model.cost_of("macs")) == full_macs
        model.tensor(group.alpha[0]).copy_(torch.tensor([0.1, 1.0]))   # drop head 0
    params = 3 * (8 * 4 + 4) + 4 * 6
    macs = 3 * 8 * 4 * 5 + 2 * (4 * 5 * 5) + 4 * 6 * 5
    with torch.no_grad():
        assert float(model.cost_of("params")) == params
        assert float(model.cost_of("macs")) == macs
    model.eval()
    exported = model.export()
    assert po.cost.total(exported) == params and po.cost.total(exported, po.cost.macs) == macs
    feeds = random_inputs(graph, batch=2, seed=5)
    assert relative_error(run_torch(model, feeds, ["x"])[0], run_ort(exported.to_onnx(), feeds)[0]) <= 1e-5
    nodes = {n.name: n for n in exported.nodes}
    assert nodes["q"].inputs[1].values.shape == (8, 4) and nodes["proj"].inputs[1].values.shape == (4, 6)
    assert nodes["q_split"].inputs[1].values.tolist() == [-1, 5, 1, 4]
    assert nodes["merge"].inputs[1].values.tolist() == [-1, 5, 4]


# -- fused masks and compiled costs: the same values and gradients as the per-node functions ---
class _PerNodePIT(po.PIT):
    """PIT whose module is built without `fuse_pit_masks`: every mask a node of its own (the
    reference the fused masks must reproduce)."""
    module_passes = ()


def _unfused_twin(graph: po.Graph) -> po.PIT:
    return _PerNodePIT(graph)


def _by_onnx_name(model, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every initializer's tensor (or gradient, where it has one) by ONNX name (packed
    parameters split into theirs)."""
    module, out = model.module, {}
    for attr, name in module.initializer_names.items():
        value = module.initializer_grad(attr) if grads else module.initializer(attr)
        if value is not None:
            out[name] = value
    return out


def _copy_values(source, target) -> None:
    """Copy every initializer's value from ``source`` to ``target`` (made from the same graph,
    packed or not) by ONNX name."""
    values = _by_onnx_name(source)
    with torch.no_grad():
        for name, value in values.items():
            target.tensor(name).copy_(value)


def _random_nas(model: po.PIT, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.nas_parameters():  # signs, pruned and kept entries, shortened kernels
            param.copy_(torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("name", ["digits_cnn", "tcn", "resnet8", "densenet_tiny", "transformer_tiny"])
def test_fused_masks_equal_the_per_node_functions(name):
    graph = po.load(MODELS / f"{name}.onnx")
    fused, reference = po.PIT(graph), _unfused_twin(graph)
    assert isinstance(fused.module.pit_masks, pit_masks.PITMasks)
    assert not any(f"pit_{f}(" in fused.module.code for f in ("channel_mask", "mask_blocks", "mask_weight", "time_mask"))
    assert "pit_mask_blocks(" in reference.module.code or "pit_mask_weight(" in reference.module.code
    _random_nas(fused, seed=1)
    _copy_values(fused, reference)
    inputs = [torch.from_numpy(v) for v in random_inputs(graph, batch=3, seed=0).values()]
    results = []
    for model in (fused, reference):
        model.train()
        out = model(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        weights = torch.linspace(-1, 1, out.numel()).view(out.shape)
        ((out * weights).sum() + 1e-3 * model.cost_of(po.cost.macs)).backward()
        results.append((out.detach(), _by_onnx_name(model, grads=True)))
    (out, grads), (out_ref, grads_ref) = results
    assert torch.equal(out, out_ref)
    assert grads.keys() == grads_ref.keys()
    assert fused.module.packed and not reference.module.packed  # the masks: one parameter
    assert len(list(fused.nas_parameters())) == 1
    nas = {n for n in fused.module.initializer_names.values() if fused._is_nas_parameter(n)}
    assert nas and nas <= grads.keys()
    for n in grads:
        if n in nas:  # sums in another order (groups read by several layers, conv1d chains)
            assert torch.allclose(grads[n], grads_ref[n], rtol=1e-5, atol=1e-6), n
        else:         # weights: the same products
            assert torch.equal(grads[n], grads_ref[n]), n


@pytest.mark.parametrize("name", ["tcn", "densenet_tiny", "mobilenetv2_tiny"])
@pytest.mark.parametrize("discrete", [True, False])
def test_compiled_costs_equal_the_layer_by_layer_sum(name, discrete):
    model = po.PIT(MODELS / f"{name}.onnx", discrete_cost=discrete)
    _random_nas(model, seed=3)
    for cost_name, cost in po.cost.BY_NAME.items():
        results = []
        for fn_ in (cost, lambda spec: cost(spec)):  # a lambda is not compiled: the reference
            model.zero_grad()
            value = model.cost_of(fn_)
            value.backward()
            results.append((value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        assert model.pit.compiled(cost, model.specs) is not None, cost_name
        (value, grads), (value_ref, grads_ref) = results
        assert grads.keys() == grads_ref.keys() and grads
        if discrete:  # integer counts: exactly the same sums
            assert torch.equal(value, value_ref), cost_name
            assert all(torch.equal(grads[n], grads_ref[n]) for n in grads), cost_name
        else:
            assert torch.allclose(value, value_ref, rtol=1e-12), cost_name
            assert all(torch.allclose(grads[n], grads_ref[n], rtol=1e-6, atol=1e-9) for n in grads), cost_name


def test_cost_reuses_the_forward_masks_only_while_they_are_current(monkeypatch):
    model = po.PIT(MODELS / "tcn.onnx")
    _random_nas(model, seed=2)
    calls = []
    forward = pit_masks.MaskPlan.forward
    monkeypatch.setattr(pit_masks.MaskPlan, "forward", lambda self, inputs: calls.append(1) or forward(self, inputs))
    x = torch.randn(2, *model.graph.gs.inputs[0].shape[1:])
    (model(x).sum() + model.cost).backward()
    assert len(calls) == 1  # the cost read the forward's masks
    with torch.no_grad():
        expected = float(model.cost)
        assert len(calls) == 1  # still current
        model.tensor(model.info.groups[0].alpha[0]).fill_(0.1)  # prune all but the kept-alive channel
        after = float(model.cost)
    assert len(calls) == 2 and after < expected
    reference = _unfused_twin(model.graph)
    _copy_values(model, reference)
    with torch.no_grad():
        assert after == float(reference.cost_of(lambda spec: po.cost.params(spec)))


def test_cost_models_outside_the_polynomials_run_layer_by_layer():
    model = po.PIT(MODELS / "digits_cnn.onnx")
    _random_nas(model, seed=4)

    def capped(spec):  # not a polynomial in the counts: a comparison
        return max(po.cost.params(spec), 100)

    from plinio_onnx.methods.searchable import Sym, compile_cost
    assert compile_cost(capped, [model.specs[0].with_(out_channels=Sym.var("c"))]) is None
    with torch.no_grad():
        expected = sum(max(float(po.cost.params(model.effective_spec(s))), 100) for s in model.specs)
        assert float(model.cost_of(capped)) == expected


def test_depthwise_conv_after_a_concat_costs_what_it_keeps():
    # C1 (3→4) and C2 (3→6) → concat (10) → depthwise → PW (10→4)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 5, 5])
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="C1"),
             helper.make_node("Conv", ["x", "w2"], ["c2"], name="C2"),
             helper.make_node("Concat", ["c1", "c2"], ["c"], name="cat", axis=1),
             helper.make_node("Conv", ["c", "wd"], ["d"], name="DW", group=10, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["d", "wp"], ["y"], name="PW")]
    inits = [_init("w1", (4, 3, 1, 1)), _init("w2", (6, 3, 1, 1), 1), _init("wd", (10, 1, 3, 3), 2),
             _init("wp", (4, 10, 1, 1), 3)]
    graph = po.load(_model(nodes, [x], [y], inits))
    model = po.PIT(graph)
    _set_alpha(model, "C1", keep=[3])
    _set_alpha(model, "C2", keep=[5])
    params = 3 + 3 + 2 * 9 + 4 * 2
    with torch.no_grad():
        assert float(model.cost_of("params")) == params
    exported = model.export()
    assert po.cost.total(exported) == params


def test_fused_masks_index_the_rows_of_a_weight_masked_along_its_rows_only():
    # transformer_tiny's MatMul weights [in, out] are masked along their input rows only: one
    # factor entry and one index per row, not per weight entry (the per-node equivalence of the
    # fused masks, gradients included, is test_fused_masks_equal_the_per_node_functions).
    plan = po.PIT(MODELS / "transformer_tiny.onnx").module.pit_masks.plan
    assert [s for s in plan.shapes if s[0] != 1] == [(48, 1), (96, 1), (48, 1), (96, 1)]
    assert plan.per_row == [s[0] != 1 for s in plan.shapes]
    assert plan.rows.shape[1] == sum(int(np.prod(s)) for s in plan.shapes) < 2000


def test_fused_masks_of_a_grouped_conv_index_channel_pairs_not_taps():
    # G (8→6, 3x3, group 2) is masked along its rows (the input channel each row reads in its
    # group) and its columns together: one factor entry and one index per (output, input)
    # channel pair, broadcast over the 3x3 taps (the per-node equivalence, gradients included,
    # is test_fused_training_follows_the_per_node_functions[grouped]).
    plan = po.PIT(po.load(_grouped_model(shuffle=False))).module.pit_masks.plan
    assert sorted(plan.shapes) == [(1, 6, 1, 1), (6, 4, 1, 1)]
    assert plan.rows.shape[1] == 6 + 6 * 4


@pytest.mark.parametrize("name", ["digits_cnn", "tcn", "grouped"])
def test_fused_training_follows_the_per_node_functions(name):
    # Steps large enough to flip masks: the fused module (with the cost computed in its forward
    # from the second step on, and everything that depends on the masks reused while they do not
    # flip) and the per-node one train alike.
    graph = po.load(_grouped_model(shuffle=True) if name == "grouped" else MODELS / f"{name}.onnx")
    fused, reference = po.PIT(graph), _unfused_twin(graph)
    _random_nas(fused, seed=7)
    _copy_values(fused, reference)
    inputs = [torch.from_numpy(v) for v in random_inputs(graph, batch=4, seed=1).values()]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (fused, reference)]
    flips, kept = 0, fused.kept_channels()
    for step in range(6):
        results = []
        for model, optimizer in zip((fused, reference), optimizers):
            optimizer.zero_grad()
            out = model(*inputs)
            out = out[0] if isinstance(out, tuple) else out
            cost = model.cost
            if step % 2:  # separate backward calls work too
                out.square().mean().backward()
                (1e-4 * cost).backward()
            else:
                (out.square().mean() + 1e-4 * cost).backward()
            results.append((out.detach(), cost.detach(), _by_onnx_name(model, grads=True)))
            optimizer.step()
        (out, cost, grads), (out_ref, cost_ref, grads_ref) = results
        assert torch.equal(out, out_ref) and torch.equal(cost, cost_ref), step
        assert grads.keys() == grads_ref.keys()
        assert all(torch.allclose(grads[n], grads_ref[n], rtol=1e-4, atol=1e-6) for n in grads)
        _copy_values(fused, reference)  # keep the two exactly in step (sums in another order differ by an ulp)
        flips += fused.kept_channels() != kept
        kept = fused.kept_channels()
    assert flips
    assert fused.module.pit_masks.last_forward is not None


def test_fused_factors_equal_their_per_node_fallback():
    # Mask parameters of different dtypes take `PITMasks.per_node`: the same
    # masked weights, and gradients, from the per-node functions.
    model = po.PIT(MODELS / "tcn.onnx")
    _random_nas(model, seed=3)
    masks = model.module.pit_masks
    (packed,) = params = masks.mask_inputs(model.module)
    weights = [torch.linspace(-1, 1, int(np.prod(s))).view(s).requires_grad_() for s in masks.plan.shapes]
    results = []
    for compute in (lambda: masks(*weights), lambda: masks.per_node(packed.split(masks.plan.masks.lengths), weights)):
        masked = compute()
        assert len(masked) == len(weights)
        model.zero_grad()
        for w in weights:
            w.grad = None
        sum((m * torch.cos(torch.arange(m.numel()).view(m.shape))).sum() for m in masked).backward()
        results.append(([m.detach() for m in masked], [p.grad.clone() for p in params if p.grad is not None],
                        [w.grad.clone() for w in weights]))
    (masked, grads, wgrads), (masked_ref, grads_ref, wgrads_ref) = results
    assert all(torch.equal(m, r) for m, r in zip(masked, masked_ref))
    assert all(torch.equal(g, r) for g, r in zip(wgrads, wgrads_ref))
    assert len(grads) == len(grads_ref) and all(torch.allclose(g, r, rtol=1e-5, atol=1e-6) for g, r in zip(grads, grads_ref))


def test_packed_masks_read_write_and_sync_by_onnx_name():
    # The mask parameters of the fused module are one packed parameter; each initializer stays
    # reachable by its ONNX name (a view: writes land in the packed values and in `sync`).
    model = po.PIT(MODELS / "tcn.onnx")
    packed = list(model.nas_parameters())
    assert len(packed) == 1 and packed[0].numel() == sum(
        model.tensor(n).numel() for n in model.module.initializer_names.values() if model._is_nas_parameter(n))
    name = model.info.groups[0].alpha[0]
    with torch.no_grad():
        model.tensor(name).fill_(0.25)
    assert np.all(np.asarray(model.searchable_graph().initializers()[name].values) == 0.25)
    x = torch.randn(2, *model.graph.gs.inputs[0].shape[1:])
    model(x).sum().backward()
    assert model.grad(name) is not None and model.grad(name).shape == model.tensor(name).shape


def test_weights_changed_in_place_before_backward_are_refused():
    model = po.PIT(MODELS / "digits_cnn.onnx")
    out = model(torch.randn(2, 1, 8, 8)).sum()
    with torch.no_grad():
        model.module.conv2_weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.backward()


def test_double_backward_through_the_masks_is_refused():
    model = po.PIT(MODELS / "digits_cnn.onnx")
    out = model(torch.randn(2, 1, 8, 8)).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out, list(model.nas_parameters()), create_graph=True)
