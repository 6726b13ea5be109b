"""Peak activation memory against hand computation on small hand-built graphs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import plinio_onnx as po
from plinio_onnx.errors import PlinioOnnxError

from _util import MODELS, random_architecture


def _model(nodes, inputs, outputs, weights) -> po.Graph:
    inits = [onnx.numpy_helper.from_array(np.full(shape, 0.1, np.float32), name) for name, shape in weights.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs], inits)
    return po.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _conv(x, w, y, k=1):
    return helper.make_node("Conv", [x, w], [y], name=y + "_conv", pads=[k // 2] * 4, kernel_shape=[k, k])


def test_chain():
    # x 4·8·8 = 256 → conv 4→8 (a 512) → relu (b 512) → conv 8→2 (y 128)
    g = _model([_conv("x", "w1", "a", 3), helper.make_node("Relu", ["a"], ["b"], name="relu"), _conv("b", "w2", "y")],
               [("x", [1, 4, 8, 8])], [("y", [1, 2, 8, 8])], {"w1": (8, 4, 3, 3), "w2": (2, 8, 1, 1)})
    plan = po.cost.memory_plan(g)
    # step 0: x + a = 768; step 1: a + b = 1024 (x read last at step 0); step 2: b + y = 640
    assert plan.live_bytes(bits=8) == [768, 1024, 640]
    assert po.cost.peak_memory(g) == 1024 * 4 and po.cost.peak_memory(g, bits=8) == 1024
    assert plan.live_at(1) == ["a", "b"]


def test_residual_branch_keeps_its_input_alive():
    # x 4·4·4 = 64 → conv 4→16 (a 256) → relu (r 256) → conv 16→4 (c 64) → s = x + c (64)
    g = _model([_conv("x", "w1", "a"), helper.make_node("Relu", ["a"], ["r"], name="relu"), _conv("r", "w2", "c"),
                helper.make_node("Add", ["x", "c"], ["s"], name="add")],
               [("x", [1, 4, 4, 4])], [("s", [1, 4, 4, 4])], {"w1": (16, 4, 1, 1), "w2": (4, 16, 1, 1)})
    # x stays live until the Add: step 0 x+a 320, step 1 x+a+r 576, step 2 x+r+c 384, step 3 x+c+s 192
    assert po.cost.memory_plan(g).live_bytes(bits=8) == [320, 576, 384, 192]
    assert po.cost.peak_memory(g) == 576 * 4


def _concat_graph() -> po.Graph:
    # x 4·4·4 = 64; branch A: conv 4→8 (a 128) → relu (a2 128); branch B: conv 4→8 (b 128);
    # c = concat(a2, b) (256) → conv 16→2 (y 32)
    return _model([_conv("x", "wa", "a"), helper.make_node("Relu", ["a"], ["a2"], name="relu"), _conv("x", "wb", "b"),
                   helper.make_node("Concat", ["a2", "b"], ["c"], name="concat", axis=1), _conv("c", "wc", "y")],
                  [("x", [1, 4, 4, 4])], [("y", [1, 2, 4, 4])], {"wa": (8, 4, 1, 1), "wb": (8, 4, 1, 1), "wc": (2, 16, 1, 1)})


def test_concat_holds_both_branches():
    plan = po.cost.memory_plan(_concat_graph())
    assert plan.steps == ["a_conv", "b_conv", "relu", "concat", "y_conv"]  # the loaded graph's order
    # step 0 convA: x + a = 192; step 1 convB: x + a + b = 320 (a waits while branch B runs);
    # step 2 relu: a + b + a2 = 384 (b waits for the Concat); step 3 concat: b + a2 + c = 512;
    # step 4 convC: c + y = 288
    assert plan.live_bytes(bits=8) == [192, 320, 384, 512, 288]
    assert po.cost.peak_memory(plan, bits=8) == 512


def test_effective_channels_and_bits_are_differentiable():
    plan = po.cost.memory_plan(_concat_graph())
    kept = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)  # a2 keeps 4 of 8 channels
    channels = {"a": kept, "a2": kept, "c": kept + 8}
    # step 3: b 128 + a2 4·16 + c 12·16 = 384 elements; step 2: a 64 + b 128 + a2 64 = 256
    peak = plan.peak(channels, bits=8)
    peak.backward()
    assert float(peak.detach()) == 384 and float(kept.grad) == 16 + 16
    bits = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    peak = plan.peak(bits={"c": bits}, default_bits=8)   # c at 6 bits: step 3 128 + 128 + 256·6/8
    peak.backward()
    assert float(peak.detach()) == 448 and float(bits.grad) == 256 / 8


def test_views_share_their_input_buffer_and_shapes_are_required():
    # x 1·2·2 = 4 → conv 1→4 (a 16) → flatten (f = a) → gemm 16→2 (y 2)
    g = _model([_conv("x", "w", "a"), helper.make_node("Flatten", ["a"], ["f"], name="flatten"),
                helper.make_node("Gemm", ["f", "wf"], ["y"], name="fc", transB=1)],
               [("x", [1, 1, 2, 2])], [("y", [1, 2])], {"w": (4, 1, 1, 1), "wf": (2, 16)})
    plan = po.cost.memory_plan(g)
    assert [b.tensors for b in plan.buffers] == [["x"], ["a", "f"], ["y"]]
    assert plan.live_bytes(bits=8) == [20, 16, 18]
    g.gs.tensors()["a"].shape = None
    with pytest.raises(PlinioOnnxError, match="'a'.*no known shape"):
        po.cost.memory_plan(g)


def test_pit_peak_memory_follows_the_masks_and_equals_the_export():
    model = po.PIT(MODELS / "digits_cnn.onnx")
    full = po.cost.peak_memory(po.load(MODELS / "digits_cnn.onnx"))
    assert float(po.cost.peak_memory_of(model).detach()) == full
    random_architecture(model, 0, logits=(), masks=(".pit_alpha",), below=0.5)
    peak = po.cost.peak_memory_of(model)
    peak.backward()
    assert float(peak.detach()) == po.cost.peak_memory(model.export()) < full
    # the peak is while bn2 runs (conv2's output and bn2's): only conv2's channels move it
    assert float(model.grad("/conv2/Conv.pit_alpha").abs().sum()) > 0
    assert float(model.grad("/conv1/Conv.pit_alpha").abs().sum()) == 0


def test_mps_peak_memory_follows_the_activation_bits():
    model = po.MPS(MODELS / "digits_cnn.onnx", w_precisions=(2, 4, 8), a_precisions=(2, 4, 8))
    peak = po.cost.peak_memory_of(model, bits=8)
    peak.backward()
    # the peak is while conv2's ReLU runs: conv2's output and the ReLU's, both written (fused,
    # requantized) at the bits of the quantizer after the pool that follows
    grad = model.grad("/pool/MaxPool_output_0.mps_a_alpha")
    assert grad is not None and float(grad.abs().sum()) > 0
    model.eval()  # the argmax: 8 bits everywhere at the initial logits, as a uniform int8 model
    assert float(po.cost.peak_memory_of(model, bits=8).detach()) == \
        po.cost.peak_memory(po.load(MODELS / "digits_cnn.onnx"), bits=8)
    with torch.no_grad():
        model.tensor("/pool/MaxPool_output_0.mps_a_alpha").copy_(torch.tensor([1.0, 0.0, 0.0]))  # 2 bits
    # conv2's output and its ReLU at 2 bits: 2·32·64·2/8 = 1024 bytes; conv2's step holds its
    # input (16·64 at 8 bits) and its output (32·64 at 2 bits) = 1536; the peak moves to conv1's
    # ReLU: conv1's output and the ReLU's, 16·64 each at 8 bits = 2048
    assert float(po.cost.peak_memory_of(model, bits=8).detach()) == 2 * 16 * 64


def test_the_batch_dim_is_found_by_name_wherever_it_sits():
    # x [batch, 4]; two Unsqueeze views [1, batch, 4]; Concat → [2, batch, 4] (SuperNet stacks its
    # candidates so): x 4 + the stack 8 = 12 elements while the Concat runs
    nodes = [helper.make_node("Unsqueeze", ["x", "axes"], [f"u{i}"], name=f"unsqueeze{i}") for i in (0, 1)]
    nodes.append(helper.make_node("Concat", ["u0", "u1"], ["s"], name="stack", axis=0))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, "batch", 4])],
                              [onnx.numpy_helper.from_array(np.array([0], np.int64), "axes")])
    g = po.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert po.cost.memory_plan(g).live_bytes(bits=8) == [4, 4, 12]
