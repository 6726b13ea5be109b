"""`tie_free.py`: near-ties found where they are, flipped the way ONNX Runtime does not round
them, and draws refused exactly when such a flip moves an output visibly."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from plinio_onnx.data import random_inputs
from plinio_onnx.graph import Graph
from tie_free import TieError, near_ties, tie_distance, tie_effect, tie_free_feeds


def _quantize_model(scale: float) -> onnx.ModelProto:
    """y = DequantizeLinear(QuantizeLinear(x, scale, uint8 0)) on x: [batch, 4]."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="quantize"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dequantize")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
                              [onnx.numpy_helper.from_array(np.array(scale, np.float32), "s"),
                               onnx.numpy_helper.from_array(np.array(0, np.uint8), "z")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_tie_distance_in_steps_and_saturated_ties_ignored():
    x = np.array([0.5, 0.25, 1.49999, 255.5, -3.5, 2.0], np.float32)
    distance = tie_distance(x, np.float32(1.0), np.uint8(0))
    assert distance[:3] == pytest.approx([0.0, 0.25, 1e-5], abs=1e-6)
    assert np.isinf(distance[3:5]).all()        # 255 | 256 and -4 | -3 both saturate in uint8
    assert distance[5] == 0.5
    per_axis = tie_distance(np.full((1, 2, 1), 1.0, np.float32), np.array([2.0, 4.0], np.float32),
                            np.zeros(2, np.int8), axis=1)
    assert per_axis.ravel() == pytest.approx([0.0, 0.25])


def test_near_ties_and_their_effect_on_a_quantizer():
    model = _quantize_model(0.5)
    feeds = {"x": np.array([[0.25 + 1e-6, 0.1, 1.0, -0.3]], np.float32)}   # 0.5 + 2e-6 steps
    [tie] = near_ties(model, feeds, 1e-4)
    assert (tie.quantizer, tie.count) == ("quantize", 1) and tie.distance < 1e-5
    assert near_ties(model, feeds, 1e-6) == []
    # rounding 0.25 + 1e-6 down instead of up moves that output by one code, 0.5, of a range of 1
    assert tie_effect(model, feeds, 1e-4) == pytest.approx(0.5 / (1.0 / 255), rel=1e-5)
    assert tie_effect(model, feeds, 1e-6) == 0.0


def test_tie_free_feeds_takes_the_first_draw_whose_ties_move_nothing():
    model = _quantize_model(0.05)
    margin = 0.02    # wide: some draws hold a value this close to a boundary, some do not
    graph = Graph(gs.import_onnx(model))
    effects = [tie_effect(model, random_inputs(graph, batch=2, seed=s), margin) for s in range(0, 16)]
    first = next(i for i, e in enumerate(effects) if e <= 0.5)
    assert first > 0, "seed 0 should be refused for this test to mean something"
    feeds = tie_free_feeds(model, 0, 2, margin=margin)
    np.testing.assert_array_equal(feeds["x"], random_inputs(graph, batch=2, seed=first)["x"])
    with pytest.raises(TieError, match=r"seeds 0\.\.3 at batch 2"):
        tie_free_feeds(model, 0, 2, margin=0.5, tries=4)


def test_the_transformer_draw_openvino_rounded_differently_is_replaced(exports):
    export = exports.get("transformer_tiny", "pit+mps", "qdq")
    proto = export.proto
    seed3 = random_inputs(Graph(gs.import_onnx(proto)), batch=2, seed=3)
    assert tie_effect(proto, seed3) > 1.0     # a 2-bit LayerNorm code 1e-5 of a step from a tie
    feeds = tie_free_feeds(proto, 3, 2)
    assert tie_effect(proto, feeds) <= 0.5
    assert not np.array_equal(feeds[proto.graph.input[0].name], seed3[proto.graph.input[0].name])
