"""MPS: quantizer functions, the pass, the searchable module, bit costs, QDQ and QONNX exports."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import plinio_onnx as po
from plinio_onnx.cost import bits as bit_costs
from plinio_onnx.cost.spec import weight_source
from plinio_onnx.data import random_inputs
from plinio_onnx.errors import PassError, PlinioOnnxError
from plinio_onnx.functions import mps as fn
from plinio_onnx.graph import PLINIO_DOMAIN
from plinio_onnx.methods.mps import build_searchable
from plinio_onnx.passes.quantize import BITS_METADATA_KEY, QONNX_DOMAIN

from _util import MODELS, ZOO_NAMES, random_architecture, relative_error, run_ort, run_torch


# -- helpers ----------------------------------------------------------------------------------
def _tensors(feeds: dict) -> list[torch.Tensor]:
    return [torch.from_numpy(v) for v in feeds.values()]


def _randomize_logits(model: po.MPS, seed: int = 0, pit_below: float = 0.4) -> None:
    """Random precision logits (and, with PIT, random masks): mixed bit-widths everywhere."""
    random_architecture(model, seed, (".mps_w_alpha", ".mps_a_alpha"), (".pit_alpha",), pit_below)


def _output_step(reference: np.ndarray) -> float:
    """One quantization step of the output: its range over 2^8 − 1 levels."""
    return max(float(reference.max() - reference.min()), 1e-6) / 255


def _searched_model(name: str, seed: int = 0, **options) -> tuple[po.Graph, po.MPS, dict]:
    graph = po.load(MODELS / f"{name}.onnx")
    model = po.MPS(graph, **options)
    feeds = random_inputs(graph, batch=2, seed=seed + 1)
    model.calibrate(*_tensors(feeds))
    _randomize_logits(model, seed)
    model.eval()
    return graph, model, feeds


def _producer(tensor):
    return tensor.inputs[0] if tensor.inputs else None


def _exported_bits(chosen_bits, stored_entry: dict):
    """The chosen bit-widths of the channels the export kept (removed ones are sliced out)."""
    if isinstance(chosen_bits, int):
        return chosen_bits
    return np.delete(np.asarray(chosen_bits), stored_entry["removed_channels"]).tolist()


def _check_qdq_bit_widths(model: po.MPS, exported: po.Graph) -> None:
    """The exported integers and clips hold exactly the chosen bit-widths."""
    chosen = model.chosen_precisions()
    stored = json.loads(exported.metadata[BITS_METADATA_KEY])
    assert stored["format"] == "qdq"
    nodes = {n.name: n for n in exported.nodes}
    for layer, entry in chosen.items():
        weight_bits = _exported_bits(entry["weight_bits"], stored["layers"][layer])
        assert stored["layers"][layer]["weight_bits"] == weight_bits, layer
        assert stored["layers"][layer]["input_bits"] == entry["input_bits"], layer
        node = nodes[layer]
        dq = _producer(node.inputs[1])
        assert dq.op == "DequantizeLinear"
        ints = np.asarray(dq.inputs[0].values).astype(np.int64)
        info = model._layers[layer]
        moved = np.moveaxis(ints, info.axis, 0).reshape(ints.shape[info.axis], -1)  # [C, ...]
        per_channel = np.broadcast_to(np.asarray(weight_bits), (moved.shape[0],))
        for c, bits in enumerate(per_channel):
            if bits == 0:
                assert not moved[c].any(), (layer, c)
            else:
                lo, hi = fn.weight_range(int(bits))
                assert moved[c].min() >= lo and moved[c].max() <= hi, (layer, c, bits)
        # The input: DequantizeLinear ← (Clip ←) QuantizeLinear, clipped to the chosen range.
        act_dq = _producer(node.inputs[0])
        assert act_dq.op == "DequantizeLinear"
        source = _producer(act_dq.inputs[0])
        lo, hi = fn.act_range(entry["input_bits"], entry["input_signed"])
        if source.op == "Clip":
            assert int(source.inputs[1].values) == lo and int(source.inputs[2].values) == hi, layer
            source = _producer(source.inputs[0])
        else:
            info8 = np.iinfo(np.int8 if entry["input_signed"] else np.uint8)
            assert (lo, hi) == (info8.min, info8.max), layer
        assert source.op == "QuantizeLinear"
        assert np.asarray(source.inputs[2].values).dtype == (np.int8 if entry["input_signed"] else np.uint8)


# -- the zoo: what you evaluate is what you export --------------------------------------------
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_random_logits_qdq_export_matches(name):
    graph, model, feeds = _searched_model(name, zero_bit=True)
    expected = run_torch(model, feeds, [t.name for t in graph.gs.inputs])
    exported = model.export()
    proto = exported.to_onnx()
    assert proto.ir_version == 10
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) <= 21
    assert not any((n.domain or "") == PLINIO_DOMAIN for n in exported.nodes)
    assert not any(f.domain == PLINIO_DOMAIN for f in proto.functions)
    got = run_ort(proto, feeds)
    for e, g in zip(expected, got):
        assert np.max(np.abs(e - g)) <= _output_step(e), name
    _check_qdq_bit_widths(model, exported)
    # Random logits really mix precisions (and prune some channels).
    chosen = [b for entry in model.chosen_precisions().values()
              for b in np.atleast_1d(entry["weight_bits"])]
    assert len(set(chosen)) > 1


def test_searchable_graph_runs_in_onnx_runtime_with_the_eval_value():
    """The function bodies give the argmax (eval) value: the searchable file is a checkpoint."""
    for name in ("resnet8", "transformer_tiny"):
        graph, model, feeds = _searched_model(name, zero_bit=True, seed=3)
        expected = run_torch(model, feeds, ["input"])[0]
        searchable = model.searchable_graph()
        assert relative_error(expected, run_ort(searchable.to_onnx(), feeds)[0]) <= 1e-6


def test_checkpoint_resumes(tmp_path):
    graph, model, feeds = _searched_model("tcn", zero_bit=True)
    model.temperature = 0.25
    path = tmp_path / "searchable.onnx"
    model.searchable_graph().save(path)
    resumed = po.MPS(path).eval()
    assert resumed.temperature == pytest.approx(0.25)
    assert resumed.chosen_precisions() == model.chosen_precisions()
    np.testing.assert_array_equal(run_torch(model, feeds, ["input"])[0], run_torch(resumed, feeds, ["input"])[0])


# -- QONNX: executed by a reference implementation of the published Quant semantics -----------
def _spec_quant(x, scale, zeropt, bitwidth, signed, narrow, rounding_mode):
    """The QONNX spec's sample implementation of ``Quant`` (docs/qonnx-custom-ops/quant_op.md)."""
    assert rounding_mode.upper() == "ROUND"
    y = x / scale + zeropt
    if signed:
        lo = -(2.0 ** (bitwidth - 1)) + (1 if narrow else 0)
        hi = 2.0 ** (bitwidth - 1) - 1
    else:
        lo = 0.0 * bitwidth
        hi = 2.0 ** bitwidth - (2 if narrow else 1)
    y = np.where(y > hi, hi, y)
    y = np.where(y < lo, lo, y)
    y = np.round(y)  # half to even
    return ((y - zeropt) * scale).astype(np.float32)


def _quant_reference_function() -> onnx.FunctionProto:
    """``Quant`` of the spec, written with standard ONNX ops, as a model-local function."""
    def attr_const(out, attr):
        node = helper.make_node("Constant", [], [out])
        ref = onnx.AttributeProto()
        ref.name, ref.ref_attr_name, ref.type = "value_int", attr, onnx.AttributeProto.INT
        node.attribute.append(ref)
        return node

    f32 = lambda name, v: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.float32)))
    nodes = [
        attr_const("signed_i", "signed"), attr_const("narrow_i", "narrow"),
        helper.make_node("Cast", ["signed_i"], ["s"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["narrow_i"], ["n"], to=TensorProto.FLOAT),
        f32("one", 1.0), f32("two", 2.0),
        helper.make_node("Cast", ["bitwidth"], ["b"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["b", "one"], ["b1"]),
        helper.make_node("Pow", ["two", "b1"], ["half"]),
        helper.make_node("Pow", ["two", "b"], ["full"]),
        # signed: lo = −2^(b−1) + n, hi = 2^(b−1) − 1; unsigned: lo = 0, hi = 2^b − 1 − n
        helper.make_node("Neg", ["half"], ["neg_half"]),
        helper.make_node("Add", ["neg_half", "n"], ["lo_signed"]),
        helper.make_node("Mul", ["lo_signed", "s"], ["lo"]),
        helper.make_node("Sub", ["half", "one"], ["hi_signed"]),
        helper.make_node("Sub", ["full", "one"], ["full_1"]),
        helper.make_node("Sub", ["full_1", "n"], ["hi_unsigned"]),
        helper.make_node("Sub", ["one", "s"], ["u"]),
        helper.make_node("Mul", ["hi_signed", "s"], ["hs"]),
        helper.make_node("Mul", ["hi_unsigned", "u"], ["hu"]),
        helper.make_node("Add", ["hs", "hu"], ["hi"]),
        helper.make_node("Div", ["X", "scale"], ["xs"]),
        helper.make_node("Add", ["xs", "zeropt"], ["xz"]),
        helper.make_node("Greater", ["xz", "hi"], ["above"]),
        helper.make_node("Where", ["above", "hi", "xz"], ["c1"]),
        helper.make_node("Less", ["c1", "lo"], ["below"]),
        helper.make_node("Where", ["below", "lo", "c1"], ["c2"]),
        helper.make_node("Round", ["c2"], ["r"]),
        helper.make_node("Sub", ["r", "zeropt"], ["rz"]),
        helper.make_node("Mul", ["rz", "scale"], ["Y"]),
    ]
    return helper.make_function(QONNX_DOMAIN, "Quant", ["X", "scale", "zeropt", "bitwidth"], ["Y"], nodes,
                                opset_imports=[helper.make_opsetid("", 17)],
                                attributes=["signed", "narrow", "rounding_mode"])


def _run_qonnx_reference(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for node in model.graph.node:
        if node.domain == QONNX_DOMAIN:
            assert node.op_type == "Quant"
            assert {a.name for a in node.attribute} == {"signed", "narrow", "rounding_mode"}
    model.functions.append(_quant_reference_function())
    return run_ort(model, feeds)


def test_qonnx_reference_function_is_the_spec():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 3, 5)) * 4).astype(np.float32)
    cases = [(np.float32(0.3), 3.0, 1, 0), (np.float32(0.25), 4.0, 0, 0), (np.float32(0.5), 2.0, 1, 1),
             (rng.uniform(0.1, 1, (4, 1, 1)).astype(np.float32), np.array([2, 3, 4, 8], np.float32).reshape(4, 1, 1), 1, 0)]
    for scale, bitwidth, signed, narrow in cases:
        inits = [numpy_helper.from_array(np.asarray(scale, np.float32), "scale"),
                 numpy_helper.from_array(np.array(0.0, np.float32), "zeropt"),
                 numpy_helper.from_array(np.asarray(bitwidth, np.float32), "bitwidth")]
        node = helper.make_node("Quant", ["x", "scale", "zeropt", "bitwidth"], ["y"], domain=QONNX_DOMAIN,
                                signed=signed, narrow=narrow, rounding_mode="ROUND")
        graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(QONNX_DOMAIN, 1)])
        model.ir_version = 10
        got = _run_qonnx_reference(model, {"x": x})[0]
        np.testing.assert_array_equal(got, _spec_quant(x, scale, np.float32(0), bitwidth, signed, narrow, "ROUND"))


def _qonnx_channel_bits(weight, axis: int) -> np.ndarray:
    """Per-channel bit-widths of a QONNX weight: one ``Quant`` (scalar bit-width, signed, not
    narrow) or, for mixed precisions, one ``Quant`` per group → ``Concat`` (→ ``Gather`` back
    into channel order)."""
    node = _producer(weight)
    if node.op == "Quant":
        assert node.attrs["signed"] == 1 and node.attrs["narrow"] == 0
        assert np.asarray(node.inputs[3].values).ndim == 0   # qonnx's executor runs scalars only
        return np.full(np.shape(node.inputs[0].values)[axis], int(node.inputs[3].values))
    if node.op == "Gather":
        assert node.attrs["axis"] == axis
        return _qonnx_channel_bits(node.inputs[0], axis)[np.asarray(node.inputs[1].values)]
    assert node.op == "Concat" and node.attrs["axis"] == axis
    parts = [_qonnx_channel_bits(part, axis) for part in node.inputs]
    assert len({int(p[0]) for p in parts}) == len(parts) > 1   # one Quant per precision
    return np.concatenate(parts)


@pytest.mark.parametrize("name", ["digits_cnn", "resnet8", "mobilenetv2_tiny", "transformer_tiny"])
def test_qonnx_export_matches_reference_execution(name):
    graph, model, feeds = _searched_model(name, zero_bit=True, seed=5)
    expected = run_torch(model, feeds, ["input"])[0]
    exported = model.export(format="qonnx")
    quants = [n for n in exported.nodes if n.op == "Quant"]
    assert quants and all(n.domain == QONNX_DOMAIN for n in quants)
    assert not any(n.op in ("QuantizeLinear", "DequantizeLinear") for n in exported.nodes)
    assert not any((n.domain or "") == PLINIO_DOMAIN for n in exported.nodes)
    got = _run_qonnx_reference(exported.to_onnx(), feeds)[0]
    assert np.max(np.abs(expected - got)) <= _output_step(expected)
    # Bit-widths: what the Quant nodes say is what was chosen (per channel where they differ).
    chosen = model.chosen_precisions()
    stored = json.loads(exported.metadata[BITS_METADATA_KEY])
    assert stored["format"] == "qonnx"
    nodes = {n.name: n for n in exported.nodes}
    for layer, entry in chosen.items():
        bitwidth = _qonnx_channel_bits(nodes[layer].inputs[1], model._layers[layer].axis)
        wanted = np.asarray(_exported_bits(entry["weight_bits"], stored["layers"][layer])).reshape(-1)
        kept = wanted[wanted > 0]
        if bitwidth.size == 1:
            assert set(kept.tolist()) <= {int(bitwidth[0])}
        else:
            np.testing.assert_array_equal(bitwidth[wanted > 0], kept)
        act = _producer(nodes[layer].inputs[0])
        assert act.op == "Quant" and int(np.asarray(act.inputs[3].values)) == entry["input_bits"]
        assert act.attrs["signed"] == int(entry["input_signed"]) == act.attrs["narrow"]


# -- quantization error -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet8", "tcn", "transformer_tiny"])
def test_highest_precision_changes_outputs_only_by_its_quantization_error(name):
    graph = po.load(MODELS / f"{name}.onnx")
    feeds = random_inputs(graph, batch=2, seed=7)
    reference = run_ort(graph.to_onnx(), feeds)[0]
    errors = {}
    outputs = {}
    for bits in (2, 4, 8):
        model = po.MPS(graph, w_precisions=(bits,), a_precisions=(bits,))
        model.calibrate(*_tensors(feeds))
        outputs[bits] = run_torch(model.eval(), feeds, ["input"])[0]
        errors[bits] = relative_error(reference, outputs[bits])
    assert errors[8] < errors[4] < errors[2]
    assert errors[8] <= 0.05
    # The search space at its initial logits (argmax 8 bits) is exactly 8-bit QAT.
    mixed = po.MPS(graph)
    mixed.calibrate(*_tensors(feeds))
    np.testing.assert_array_equal(run_torch(mixed.eval(), feeds, ["input"])[0], outputs[8])


def test_quantizer_error_bounds_and_ranges():
    rng = np.random.default_rng(0)
    w = torch.from_numpy((rng.standard_normal((6, 4, 3, 3)) * rng.uniform(0.1, 2, (6, 1, 1, 1))).astype(np.float32))
    for b in (2, 3, 4, 8):
        bits = torch.full((6, 1, 1, 1), float(b))
        q, s, keep = fn.weight_quant_values(w, bits, [1, 2, 3])
        assert keep.all()
        lo, hi = fn.weight_range(b)
        assert q.min() >= lo and q.max() <= hi and torch.equal(q, q.round())
        np.testing.assert_allclose(s.reshape(-1), 2 * w.abs().amax((1, 2, 3)) / (2 ** b - 1), rtol=1e-6)
        assert ((q * s - w).abs() <= s / 2 * (1 + 1e-5)).all()
    x = torch.linspace(-3, 3, 1001)
    for signed in (False, True):
        for b in (2, 4, 8):
            y, s = fn.act_fake_quant(x, torch.tensor([2.0]), b, signed)
            lo, hi = fn.act_range(b, signed)
            inside = (x >= lo * s) & (x <= hi * s)
            assert ((y - x)[inside].abs() <= s / 2 + 1e-6).all()
            assert torch.equal(y, torch.clamp(torch.round(x / s), lo, hi) * s)
    # Round half to even, as QuantizeLinear.
    y, _ = fn.act_fake_quant(torch.tensor([0.5, 1.5, 2.5]), torch.tensor([255.0]), 8, False)
    assert y.tolist() == [0.0, 2.0, 2.0]


def test_mixed_activation_gradients_are_pact():
    """The fused mixed quantizer has the gradients of Σθ_p·(Q_p(x) with PACT's straight-through)."""
    def reference(x, theta, clip, bits, signed):
        y = 0
        for p, b in enumerate(bits):
            c = clip[p].clamp_min(fn.MIN_CLIP)
            clipped = torch.clamp(x, -c if signed else torch.zeros_like(c), c)
            s = fn.act_scale(clip[p], b, signed).detach()
            value = fn.act_integers(x.detach(), s, b, signed) * s
            y = y + theta[p] * (value + (clipped - clipped.detach()))
        return y

    torch.manual_seed(0)
    for signed in (False, True):
        x = (torch.randn(4, 8, 5, 5) * 3).requires_grad_()
        theta = torch.softmax(torch.randn(3), 0).requires_grad_()
        clip = torch.tensor([2.0, 4.0, 1.0], requires_grad=True)
        y, _ = fn.MixedActQuant.apply(x, theta, clip, fn.act_plan((2, 4, 8), signed), fn.Scratch())
        grad = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, theta, clip], grad)
        want = torch.autograd.grad(reference(x, theta, clip, (2, 4, 8), signed), [x, theta, clip], grad)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


# -- the pass ---------------------------------------------------------------------------------
def test_pass_records_signedness_sharing_and_output_layers():
    graph = po.load(MODELS / "resnet8.onnx")
    searchable = po.passes.mps(graph, zero_bit=True)
    info = json.loads(searchable.metadata["plinio.mps"])
    acts = {a["tensor"]: a for a in info["activations"]}
    assert acts["input"]["signed"] is True                      # a graph input
    relu_fed = [a for a in info["activations"] if a["tensor"] != "input"]
    assert relu_fed and not any(a["signed"] for a in relu_fed)  # after ReLU (through pooling)
    assert any(len(a["layers"]) == 2 for a in relu_fed)         # residual conv + shortcut share
    layers = {layer["node"]: layer for layer in info["layers"]}
    assert len(layers) == 10 and len(info["folded_bn"]) == 7    # 9 convs + the Gemm; BN folded
    assert layers["/fc/Gemm"]["bits"] == [2, 4, 8]              # feeds the output: no 0-bit
    assert layers["/conv/Conv"]["bits"] == [0, 2, 4, 8]
    assert layers["/stack2/shortcut/Conv"]["activation"] == layers["/stack2/conv1/Conv"]["activation"]
    assert not any(n.op == "BatchNormalization" for n in searchable.nodes)
    # transformer: LayerNorm outputs are signed; only weight MatMuls/Gemm are quantized.
    info = json.loads(po.passes.mps(po.load(MODELS / "transformer_tiny.onnx")).metadata["plinio.mps"])
    assert all(a["signed"] for a in info["activations"] if "LayerNorm" in a["tensor"])
    assert len(info["layers"]) == 14 and {layer["op"] for layer in info["layers"]} == {"MatMul", "Gemm"}


def test_fold_batchnorm_keeps_outputs():
    for name in ("resnet8", "digits_cnn", "fc_autoencoder"):
        graph = po.load(MODELS / f"{name}.onnx")
        feeds = random_inputs(graph, batch=2)
        reference = run_ort(graph.to_onnx(), feeds)[0]
        folded = graph.copy()
        names = po.passes.fold_batchnorm(folded)
        assert names and not any(n.op == "BatchNormalization" for n in folded.nodes)
        assert relative_error(reference, run_ort(folded.to_onnx(), feeds)[0]) <= 1e-5


def test_pass_options_are_validated():
    graph = po.load(MODELS / "digits_cnn.onnx")
    for bad in ({"w_precisions": (1, 4)}, {"a_precisions": (0, 8)}, {"w_precisions": (16,)},
                {"zero_bit": True, "per_channel": False}, {"weight_scale": "per_row"},
                {"per_channel": True, "weight_scale": "per_tensor"}, {"sampling": "mean"},
                {"temperature": 0.0}):
        with pytest.raises(PassError):
            po.passes.mps(graph, **bad)
    with pytest.raises(PassError):
        po.passes.mps(po.passes.mps(graph))
    with pytest.raises(PassError):
        po.MPS(graph).export(format="tflite")
    with pytest.raises(PlinioOnnxError):
        build_searchable("odimo", graph)


def test_include_exclude_and_per_tensor_scales():
    graph = po.load(MODELS / "digits_cnn.onnx")
    model = po.MPS(graph, exclude=["/fc2/*"], per_channel=False, weight_scale="per_tensor",
                   w_precisions=(4, 8), a_precisions=(4, 8))
    assert "/fc2/Gemm" not in model.chosen_precisions() and len(model.chosen_precisions()) == 4
    feeds = random_inputs(graph, batch=3, seed=2)
    model.calibrate(*_tensors(feeds))
    _randomize_logits(model, 1)
    model.eval()
    expected = run_torch(model, feeds, ["input"])[0]
    exported = model.export()
    assert np.max(np.abs(expected - run_ort(exported.to_onnx(), feeds)[0])) <= _output_step(expected)
    weight_dqs = [n for n in exported.nodes if n.op == "DequantizeLinear" and isinstance(n.inputs[0], gs.Constant)
                  and np.asarray(n.inputs[0].values).ndim > 1]
    assert len(weight_dqs) == 4 and all(np.asarray(n.inputs[1].values).ndim == 0 for n in weight_dqs)
    fc2 = next(n for n in exported.nodes if n.name == "/fc2/Gemm")
    assert fc2.inputs[1].name and _producer(fc2.inputs[1]) is None  # float weight, untouched


@pytest.mark.parametrize("zero_bit", [False, True])
def test_int4_weights_where_opset_21_allows(zero_bit):
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Flatten", ["r2"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="fc", transB=1)]
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n) for n, s in
             [("w1", (8, 3, 3, 3)), ("b1", (8,)), ("w2", (6, 8, 1, 1)), ("wg", (5, 96)), ("bg", (5,))]]
    proto = helper.make_model(helper.make_graph(nodes, "int4", [x], [y], inits), opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    graph = po.load(proto)
    model = po.MPS(graph, w_precisions=(2, 4), a_precisions=(4, 8), zero_bit=zero_bit)
    feeds = random_inputs(graph, batch=2)
    model.calibrate(*_tensors(feeds))
    _randomize_logits(model, 2)
    model.eval()
    expected = run_torch(model, feeds, ["x"])[0]
    assert not any(t.data_type == TensorProto.INT4 for t in model.export().to_onnx().graph.initializer)  # default "off"
    exported = model.export(int4="auto")
    saved = exported.to_onnx()
    int4 = [t for t in saved.graph.initializer if t.data_type == TensorProto.INT4]
    assert len(int4) >= 3
    assert np.max(np.abs(expected - run_ort(saved, feeds)[0])) <= _output_step(expected)
    removed = sum(len(e["removed_channels"]) for e in json.loads(exported.metadata[BITS_METADATA_KEY])["layers"].values())
    assert (removed > 0) == zero_bit   # int4 weights are packed after slicing
    # Opset 17 keeps int8 containers with "auto"; "on" raises the model to opset 21 for INT4.
    digits = po.MPS(po.load(MODELS / "digits_cnn.onnx"), w_precisions=(4,))
    assert not any(t.data_type == TensorProto.INT4 for t in digits.export(int4="auto").to_onnx().graph.initializer)
    raised = digits.export(int4="on")
    assert raised.opset == 21
    assert sum(t.data_type == TensorProto.INT4 for t in raised.to_onnx().graph.initializer) >= 5
    digits_feeds = random_inputs(raised, batch=2)
    reference = run_torch(digits.eval(), digits_feeds, ["input"])[0]
    assert np.max(np.abs(reference - run_ort(raised.to_onnx(), digits_feeds)[0])) <= _output_step(reference)
    with pytest.raises(PassError, match="int4="):
        digits.export(int4="maybe")


# -- costs ------------------------------------------------------------------------------------
def _hand_model() -> po.Graph:
    # x[n,3,8,8] → conv (3→8, 3x3, pad 1, bias) → relu → flatten (512) → gemm (512→4, bias)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="fc", transB=1)]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in [("w", (8, 3, 3, 3)), ("b", (8,)), ("wg", (4, 512)), ("bg", (4,))]]
    proto = helper.make_model(helper.make_graph(nodes, "hand", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    return po.load(proto)


def _choose(model: po.MPS, alpha_name: str, bits_per_entry) -> None:
    """Logits whose argmax picks ``bits_per_entry`` (one per channel, or one)."""
    layer = model._layers.get(alpha_name)
    name = layer.alpha if layer else model._activations[alpha_name].alpha
    table = layer.bits if layer else model._activations[alpha_name].bits
    alpha = model.tensor(name)
    values = torch.zeros_like(alpha)
    for c, b in enumerate(np.atleast_1d(bits_per_entry)):
        if alpha.dim() == 2:
            values[table.index(int(b)), c] = 5.0
        else:
            values[table.index(int(b))] = 5.0
    with torch.no_grad():
        alpha.copy_(values)


def test_bit_costs_by_hand_and_equal_to_the_export():
    model = po.MPS(_hand_model(), zero_bit=True)
    _choose(model, "conv", [2, 2, 4, 4, 8, 8, 0, 8])   # mean 4.5 bits
    _choose(model, "fc", [4, 2, 2, 8])                  # output layer: no 0-bit
    _choose(model, "x", 8)
    _choose(model, "f", 2)
    model.eval()
    conv_weights, fc_weights = 8 * 27, 4 * 512
    size_bits = conv_weights * 4.5 + 8 * 32 + fc_weights * 4.0 + 4 * 32
    bitops = conv_weights * 64 * 4.5 * 8 + fc_weights * 4.0 * 2
    with torch.no_grad():
        assert float(model.cost_of("size_bits")) == size_bits
        assert float(model.cost) == size_bits / 8                      # default cost: bytes
        assert float(model.cost_of("bitops")) == bitops
        assert float(model.cost_of("params_bit")) == conv_weights * 4.5 + fc_weights * 4.0
        assert float(model.cost_of("params")) == po.cost.total(_hand_model())
    # The export slices the 0-bit channel out: its bias and the 64 fc columns it fed (fc at 4.0
    # bits, 2-bit inputs) are gone too, which the search cost does not credit.
    exported = model.export()
    assert bit_costs.total_of(exported, bit_costs.size_bits) == pytest.approx(size_bits - 32 - 4 * 64 * 4.0)
    assert bit_costs.total_of(exported, bit_costs.bitops) == pytest.approx(bitops - 4 * 64 * 4.0 * 2)
    stored = json.loads(exported.metadata[BITS_METADATA_KEY])["layers"]
    assert stored["conv"]["weight_bits"] == [2, 2, 4, 4, 8, 8, 8] and stored["conv"]["pruned_channels"] == 1
    assert stored["conv"]["removed_channels"] == [6]
    nodes = {n.name: n for n in exported.nodes}
    assert np.shape(_producer(nodes["conv"].inputs[1]).inputs[0].values) == (7, 3, 3, 3)
    assert np.shape(_producer(nodes["conv"].inputs[2]).inputs[0].values) == (7,)
    assert np.shape(_producer(nodes["fc"].inputs[1]).inputs[0].values) == (4, 7 * 64)
    # Float layers cost 32 bits.
    float_spec = po.cost.layer_specs(_hand_model())[0]
    assert bit_costs.size_bits(float_spec) == 8 * 27 * 32 + 8 * 32


def test_soft_cost_is_the_expected_precision_and_differentiable():
    model = po.MPS(_hand_model(), per_channel=False)
    model.train()
    theta = torch.softmax(torch.tensor([2 / 8, 4 / 8, 8 / 8]), 0)
    expected_bits = float((theta * torch.tensor([2.0, 4.0, 8.0])).sum())
    cost = model.cost_of("params_bit")
    assert float(cost.detach()) == pytest.approx((8 * 27 + 4 * 512) * expected_bits, rel=1e-6)
    cost.backward()
    # weight logits only (the logits train packed in one parameter: read each one's part)
    assert all(model.grad(layer.alpha).abs().sum() > 0 for layer in model.info.layers)
    assert all(not model.grad(act.alpha).any() for act in model.info.activations)
    # A lower temperature sharpens the choice toward the argmax.
    model.temperature = 0.05
    with torch.no_grad():
        assert float(model.cost_of("params_bit")) == pytest.approx((8 * 27 + 4 * 512) * 8, rel=1e-3)


# -- training modes ---------------------------------------------------------------------------
def test_sampling_modes_temperature_and_freeze():
    graph = po.load(MODELS / "digits_cnn.onnx")
    x = torch.from_numpy(random_inputs(graph, batch=4, seed=0)["input"])
    for sampling in ("soft", "hard", "gumbel"):
        model = po.MPS(graph, sampling=sampling, zero_bit=True)
        model.calibrate(x)
        _randomize_logits(model, 4)
        model.train()
        out = model(x)
        loss = out.square().mean() + 1e-6 * model.cost
        loss.backward()
        assert all(p.grad is not None for p in model.nas_parameters())
        assert sum(int(p.grad.abs().sum() > 0) for p in model.net_parameters()) >= 5
        with torch.no_grad():
            evaluated = model.eval()(x)
            if sampling == "hard":  # hard forward = the argmax network (training rounds x·(1/s))
                torch.testing.assert_close(model.train()(x), evaluated, rtol=1e-3, atol=1e-3)
    model = po.MPS(graph)
    model.calibrate(x)
    _randomize_logits(model, 5)
    model.temperature = 1e-3
    with torch.no_grad():
        torch.testing.assert_close(model.train()(x), model.eval()(x), rtol=1e-3, atol=1e-3)
    assert float(model.searchable_graph().initializers()["mps.temperature"].values[0]) == pytest.approx(1e-3)
    assert model.anneal(0.5) == pytest.approx(1e-3)  # not below its minimum
    assert model.anneal(0.5, minimum=1e-5) == pytest.approx(5e-4)
    model.freeze()
    assert not any(p.requires_grad for p in model.nas_parameters())
    with torch.no_grad():
        assert torch.equal(model.train()(x), model.eval()(x))  # training = exactly the export


def test_single_precision_is_plain_qat():
    graph = po.load(MODELS / "digits_cnn.onnx")
    model = build_searchable("qat", graph, "size")
    assert list(model.nas_parameters()) == []
    feeds = random_inputs(graph, batch=2)
    model.calibrate(*_tensors(feeds))
    model.train()
    model(*_tensors(feeds)).sum().backward()
    clips = [p for a, p in model.module.named_parameters() if model.module.initializer_names[a].endswith("mps_a_clip")]
    assert clips and all(p.grad is not None for p in clips)
    model.eval()
    exported = model.export()
    stored = json.loads(exported.metadata[BITS_METADATA_KEY])
    assert {e["weight_bits"] for e in stored["layers"].values()} == {8}
    assert {e["bits"] for e in stored["activations"].values()} == {8}
    expected = run_torch(model, feeds, ["input"])[0]
    assert np.max(np.abs(expected - run_ort(exported.to_onnx(), feeds)[0])) <= _output_step(expected)
    with torch.no_grad():
        assert float(model.cost) == bit_costs.total_of(exported, bit_costs.size)


# -- PIT + MPS --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["digits_cnn", "resnet8", "mobilenetv2_tiny"])
def test_pit_plus_mps_exports_what_it_evaluates_and_costs(name):
    graph = po.load(MODELS / f"{name}.onnx")
    model = build_searchable("pit+mps", graph, "size", zero_bit=True)
    assert model.pit is not None
    names = [n for _, p, held in model.module.parameter_initializers() if any(p is q for q in model.nas_parameters())
             for n in held]
    assert any(n.endswith(".pit_alpha") for n in names) and any(n.endswith(".mps_w_alpha") for n in names)
    feeds = random_inputs(graph, batch=2, seed=1)
    model.calibrate(*_tensors(feeds))
    _randomize_logits(model, 6)
    model.eval()
    expected = run_torch(model, feeds, ["input"])[0]
    exported = model.export()
    assert np.max(np.abs(expected - run_ort(exported.to_onnx(), feeds)[0])) <= _output_step(expected)
    assert not any((n.domain or "") == PLINIO_DOMAIN for n in exported.nodes)
    with torch.no_grad():
        assert float(model.cost_of("size_bits")) == bit_costs.total_of(exported, bit_costs.size_bits)
        assert float(model.cost_of("bitops")) == bit_costs.total_of(exported, bit_costs.bitops)
        params = float(model.cost_of("params"))
    assert params == po.cost.total(bit_costs._constant_weights(exported)) < po.cost.total(graph)
    assert "kept_channels" in model.architecture()


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_per_channel_and_grouped_per_layer(group):
    rng = np.random.default_rng(group)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 13, 13])
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], name="deconv", strides=[2, 2], group=group),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv")]
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in [("w", (4, 6 // group, 3, 3)), ("b", (6,)), ("w2", (3, 6, 1, 1))]]
    proto = helper.make_model(helper.make_graph(nodes, "deconv", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    graph = po.load(proto)
    model = po.MPS(graph, zero_bit=True)
    layer = model._layers["deconv"]
    # Output channels sit on axis 1 of a ConvTranspose weight; a grouped one falls back to one
    # precision and scale per layer, without the 0-bit choice (that would remove the layer).
    assert (layer.axis, layer.per_channel, 0 in layer.bits) == ((1, True, True) if group == 1 else (-1, False, False))
    feeds = random_inputs(graph, batch=2)
    model.calibrate(*_tensors(feeds))
    _randomize_logits(model, 3)
    model.eval()
    expected = run_torch(model, feeds, ["x"])[0]
    assert np.max(np.abs(expected - run_ort(model.export().to_onnx(), feeds)[0])) <= _output_step(expected)


# -- 0-bit channels are sliced out ------------------------------------------------------------
#: Zoo models whose channel groups pass only ReLU, pooling, flattening and residual adds between
#: layers: there a channel is removed exactly when every producer of its group chose 0 bits.
_CHAINS = ("digits_cnn", "fc_autoencoder", "resnet8", "tcn")


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zero_bit_channels_are_sliced_out(name):
    graph, model, feeds = _searched_model(name, zero_bit=True)
    expected = run_torch(model, feeds, [t.name for t in graph.gs.inputs])
    chosen = {node: np.atleast_1d(entry["weight_bits"]) for node, entry in model.chosen_precisions().items()}
    original = {n.name: n for n in graph.nodes}
    zeroed_params = po.cost.total(model.searchable_graph())  # what exporting zeroed channels keeps
    for fmt in ("qdq", "qonnx"):
        exported = model.export(format=fmt)
        proto = exported.to_onnx()
        onnx.checker.check_model(proto)
        got = run_ort(proto, feeds) if fmt == "qdq" else _run_qonnx_reference(proto, feeds)
        for e, g in zip(expected, got):
            assert np.max(np.abs(e - g)) <= _output_step(e), (name, fmt)
        assert po.cost.total(bit_costs._constant_weights(exported)) < zeroed_params
        stored = json.loads(exported.metadata[BITS_METADATA_KEY])["layers"]
        nodes = {n.name: n for n in exported.nodes}
        for layer, info in model._layers.items():  # every layer keeps what it did not lose
            kept = _stored_weight_shape(nodes[layer].inputs[1])[info.axis]
            assert kept == info.channels - len(stored[layer]["removed_channels"])
        for group in model.info.groups:
            removed = set(stored[group.producers[0].node]["removed_channels"])
            zero = [chosen[p.node] == 0 for p in group.producers]
            dw_zero = [chosen[dw] == 0 for dw in group.depthwise]
            assert removed <= set(np.flatnonzero(np.logical_or.reduce(zero + dw_zero)))
            for dw in dw_zero if len(group.producers) == len(group.consumers) == 1 else []:
                # producer → depthwise → consumer: a 0-bit depthwise channel is 0 whatever comes in
                assert set(np.flatnonzero(dw)) <= removed | {group.size - 1}
            if name in _CHAINS:
                wanted = np.flatnonzero(np.logical_and.reduce(zero))
                assert removed == set(wanted[:group.size - 1].tolist())
                for consumer in group.consumers:
                    width = original[consumer.node].inputs[1].shape[consumer.axis]
                    got_width = _stored_weight_shape(nodes[consumer.node].inputs[1])[consumer.axis]
                    assert got_width == width - len(removed) * consumer.inner
    assert sum(len(e["removed_channels"]) for e in stored.values()) > 0


def _stored_weight_shape(tensor) -> list[int]:
    """The shape of the weight a layer reads: stored (QDQ, QONNX one precision) or, for a QONNX
    mixed layer, its precision groups joined by a Concat (and a Gather back into channel order)."""
    source = weight_source(tensor)
    if isinstance(source, gs.Constant):
        return list(np.shape(source.values))
    producer = source.inputs[0]
    if producer.op == "Gather":
        shape = _stored_weight_shape(producer.inputs[0])
        shape[int(producer.attrs.get("axis", 0))] = len(producer.inputs[1].values)
        return shape
    assert producer.op == "Concat", producer.op
    parts = [_stored_weight_shape(part) for part in producer.inputs]
    axis = int(producer.attrs["axis"])
    return parts[0][:axis] + [sum(p[axis] for p in parts)] + parts[0][axis + 1:]


def _hand_graph(nodes, inits, x_shape, y_shape) -> po.Graph:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)
    proto = helper.make_model(helper.make_graph(nodes, "hand", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    return po.load(proto)


def _export_matches(model: po.MPS, graph: po.Graph) -> tuple[po.Graph, dict]:
    feeds = random_inputs(graph, batch=2, seed=4)
    model.eval()
    expected = run_torch(model, feeds, ["x"])[0]
    exported = model.export()
    assert np.max(np.abs(expected - run_ort(exported.to_onnx(), feeds)[0])) <= _output_step(expected)
    return exported, json.loads(exported.metadata[BITS_METADATA_KEY])["layers"]


def test_zero_bit_residual_channel_needs_both_producers_and_a_zero_sum():
    """conv_a + conv_b + k → ReLU → conv_c: channel c goes where both convs chose 0 bits and
    ReLU(k_c) is 0; a channel only one side chose 0 for, or whose shift survives, stays (zeroed)."""
    rng = np.random.default_rng(0)
    shift = np.array([0, 0, 0, -1, 0.5, 0], np.float32).reshape(1, 6, 1, 1)
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a"),
             helper.make_node("Conv", ["x", "wb", "bb"], ["b"], name="conv_b"),
             helper.make_node("Add", ["a", "b"], ["s"], name="add"),
             helper.make_node("Add", ["s", "k"], ["t"], name="shift"),
             helper.make_node("Relu", ["t"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "wc"], ["y"], name="conv_c")]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             [("wa", (6, 3, 1, 1)), ("ba", (6,)), ("wb", (6, 3, 1, 1)), ("bb", (6,)), ("wc", (2, 6, 1, 1))]]
    graph = _hand_graph(nodes, inits + [numpy_helper.from_array(shift, "k")], ["n", 3, 4, 4], ["n", 2, 4, 4])
    model = po.MPS(graph, zero_bit=True)
    _choose(model, "conv_a", [0, 0, 8, 0, 0, 8])
    _choose(model, "conv_b", [0, 8, 0, 0, 0, 8])
    _choose(model, "conv_c", 8)
    _choose(model, "x", 8)
    _choose(model, "r", 8)
    exported, stored = _export_matches(model, graph)
    assert stored["conv_a"]["removed_channels"] == stored["conv_b"]["removed_channels"] == [0, 3]
    assert stored["conv_a"]["weight_bits"] == [0, 8, 0, 8] and stored["conv_b"]["weight_bits"] == [8, 0, 0, 8]
    nodes = {n.name: n for n in exported.nodes}
    for name in ("conv_a", "conv_b"):
        ints = np.asarray(_producer(nodes[name].inputs[1]).inputs[0].values)
        assert ints.shape == (4, 3, 1, 1)
        assert [bool(row.any()) for row in ints] == [b > 0 for b in stored[name]["weight_bits"]]
    assert np.shape(_producer(nodes["conv_c"].inputs[1]).inputs[0].values) == (2, 4, 1, 1)
    assert np.asarray(nodes["shift"].inputs[1].values).reshape(-1).tolist() == [0, 0, 0.5, 0]


def test_zero_bit_depthwise_channel_is_removed_with_its_producer_row():
    """conv_p → ReLU → depthwise → ReLU → conv_c: a depthwise 0-bit channel is 0 whatever conv_p
    computes; a conv_p 0-bit channel leaves the depthwise bias, gone after ReLU only if negative."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "wp", "bp"], ["p"], name="conv_p"),
             helper.make_node("Relu", ["p"], ["rp"], name="relu_p"),
             helper.make_node("Conv", ["rp", "wd", "bd"], ["d"], name="dw", group=4, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["d"], ["rd"], name="relu_d"),
             helper.make_node("Conv", ["rd", "wc"], ["y"], name="conv_c")]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             [("wp", (4, 3, 1, 1)), ("bp", (4,)), ("wd", (4, 1, 3, 3)), ("wc", (2, 4, 1, 1))]]
    inits.append(numpy_helper.from_array(np.array([0.3, 0.7, -0.7, 0.2], np.float32), "bd"))
    graph = _hand_graph(nodes, inits, ["n", 3, 5, 5], ["n", 2, 5, 5])
    model = po.MPS(graph, zero_bit=True)
    _choose(model, "conv_p", [8, 0, 0, 8])
    _choose(model, "dw", [0, 8, 8, 8])
    _choose(model, "conv_c", 8)
    for tensor in ("x", "rp", "rd"):
        _choose(model, tensor, 8)
    exported, stored = _export_matches(model, graph)
    assert stored["conv_p"]["removed_channels"] == stored["dw"]["removed_channels"] == [0, 2]
    assert stored["conv_p"]["weight_bits"] == [0, 8] and stored["dw"]["weight_bits"] == [8, 8]
    dw = next(n for n in exported.nodes if n.name == "dw")
    assert dw.attrs["group"] == 2 and np.shape(_producer(dw.inputs[1]).inputs[0].values) == (2, 1, 3, 3)


def test_export_command_int4_and_format(tmp_path):
    from plinio_onnx.cli import main
    checkpoint = tmp_path / "search.onnx"
    po.MPS(po.load(MODELS / "digits_cnn.onnx"), w_precisions=(4,)).searchable_graph().save(checkpoint)
    outputs = {mode: tmp_path / f"out_{mode}.onnx" for mode in ("off", "on")}
    for mode, path in outputs.items():
        assert main(["export", str(checkpoint), "-o", str(path), "--int4", mode]) == 0
    counts = {mode: sum(t.data_type == TensorProto.INT4 for t in onnx.load(str(p)).graph.initializer)
              for mode, p in outputs.items()}
    assert counts["off"] == 0 and counts["on"] >= 5
    assert main(["export", str(checkpoint), "-o", str(tmp_path / "q.onnx"), "--format", "qonnx"]) == 0
    assert any(n.op_type == "Quant" for n in onnx.load(str(tmp_path / "q.onnx")).graph.node)
