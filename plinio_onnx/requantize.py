"""Back from on-device fine-tuning to a standard QDQ model.

A QDQ model fine-tuned with ONNX Runtime's training API exports (``Module.export_model_for_
inferencing``) an inference model whose quantizers are ORT's training op ``FakeQuant`` (see
`plinio_onnx.training_graph`). `requantize` writes it back in the form the QDQ export has, which
every ONNX runtime reads and ONNX Runtime fuses into integer kernels:

* a weight or bias chain ``W → Div(s) → FakeQuant(1, 0, range) [→ Max → Min] → Mul(s)``
  becomes the int8 (int32 for a bias's range) initializer ``clamp(round(W / s))`` under a
  (per-channel) ``DequantizeLinear(s)``: the same values, since the chain computed exactly
  these integers times ``s``;
* an activation ``FakeQuant(s, z, low, high)`` becomes ``QuantizeLinear(s, z)`` (uint8 for a
  non-negative range, else int8) → ``Clip(low, high)`` where the range is narrower than the
  container → ``DequantizeLinear(s, z)``.

So the QDQ model computes exactly what the fine-tuned model computed.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import PlinioOnnxError
from .graph import Graph
from .load import load

def holds_fake_quantizers(model: "str | os.PathLike | onnx.ModelProto") -> bool:
    """Whether ``model`` has FakeQuant nodes (a fine-tuned QDQ model's inference export); False
    for what cannot be read (the loader then says why)."""
    try:
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    except Exception:
        return False
    return any(node.op_type == "FakeQuant" for node in proto.graph.node)


def requantize(model: "str | os.PathLike | onnx.ModelProto | Graph") -> Graph:
    """A fine-tuned inference model with FakeQuant quantizers → the standard QDQ `Graph`."""
    graph = load(model, canonicalize=False)
    g = graph.gs
    for node in [n for n in g.nodes if n.op == "FakeQuant"]:
        if node.outputs[1:] and node.outputs[1].outputs:
            raise PlinioOnnxError("the FakeQuant mask output is read; not an inference model",
                                  file=graph.source, node=node.name, op=node.op)
        producer = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        if producer is not None and producer.op == "Div" and isinstance(producer.inputs[0], gs.Constant):
            _requantize_weight(graph, producer, node)
        else:
            _requantize_activation(graph, node)
    g.cleanup().toposort()
    g.import_domains = [onnx.helper.make_opsetid("", graph.opset)]
    return graph


def _requantize_weight(graph: Graph, div: gs.Node, fake_quant: gs.Node) -> None:
    weight, scale = div.inputs[0], div.inputs[1]
    low, high = int(fake_quant.attrs["quant_min"]), int(fake_quant.attrs["quant_max"])
    rounded = np.clip(np.rint(np.asarray(weight.values, np.float32) / np.asarray(scale.values, np.float32)),
                      low, high)
    chain, node = [div, fake_quant], fake_quant
    while True:
        readers = list(node.outputs[0].outputs)
        if len(readers) != 1:
            raise PlinioOnnxError("a weight's fake quantizer must end in one Mul by its scale",
                                  file=graph.source, node=node.name, op=node.op)
        node = readers[0]
        chain.append(node)
        if node.op in ("Max", "Min"):   # per-channel bit-widths
            bound = np.asarray(node.inputs[1].values)
            rounded = np.maximum(rounded, bound) if node.op == "Max" else np.minimum(rounded, bound)
            continue
        if node.op == "Mul" and node.inputs[1] is scale:
            break
        raise PlinioOnnxError("a weight's fake quantizer must end in one Mul by its scale",
                              file=graph.source, node=node.name, op=node.op)
    scales = np.asarray(scale.values, np.float32)
    axis = next((i for i, n in enumerate(scales.shape) if n > 1), None)
    flat = scales.reshape(-1) if axis is not None else scales.reshape(())
    dtype = np.int8 if low >= -128 and high <= 127 else np.int32
    name = weight.name[:-len(".float")] if weight.name.endswith(".float") else f"{weight.name}.{np.dtype(dtype).name}"
    out = node.outputs[0]
    for step in chain:
        step.inputs.clear()
        step.outputs.clear()
    graph.gs.nodes.append(gs.Node(
        "DequantizeLinear", f"{div.name}.dequantize",
        inputs=[gs.Constant(name, rounded.astype(dtype)), gs.Constant(f"{name}/scale", flat),
                gs.Constant(f"{name}/zero_point", np.zeros(flat.shape, dtype))],
        outputs=[out], attrs={"axis": axis} if axis is not None else {}))


def _requantize_activation(graph: Graph, fake_quant: gs.Node) -> None:
    x, scale, zero = fake_quant.inputs[:3]
    low, high = int(fake_quant.attrs["quant_min"]), int(fake_quant.attrs["quant_max"])
    container = np.uint8 if low >= 0 and high <= 255 else np.int8
    info = np.iinfo(container)
    if low < info.min or high > info.max:
        raise PlinioOnnxError(f"integer range [{low}, {high}] does not fit 8 bits",
                              file=graph.source, node=fake_quant.name, op=fake_quant.op)
    # the quantizer's name before fine-tuning (prepare_for_training appended ".fake_quant")
    base = fake_quant.name.removesuffix(".fake_quant").removesuffix("/quantize")
    out = fake_quant.outputs[0]
    zero_c = gs.Constant(f"{base}/zero_point", np.asarray(np.asarray(zero.values).reshape(()), container))
    scale_c = gs.Constant(f"{base}/scale", np.asarray(scale.values, np.float32).reshape(()))
    fake_quant.inputs.clear()
    fake_quant.outputs.clear()
    q = gs.Variable(f"{base}/q", dtype=container, shape=x.shape)
    graph.gs.nodes.append(gs.Node("QuantizeLinear", f"{base}/quantize", inputs=[x, scale_c, zero_c], outputs=[q]))
    if (low, high) != (info.min, info.max):
        clipped = gs.Variable(f"{base}/q_clip", dtype=container, shape=x.shape)
        graph.gs.nodes.append(gs.Node(
            "Clip", f"{base}/clip", inputs=[q, gs.Constant(f"{base}/q_min", np.asarray(low, container)),
                                           gs.Constant(f"{base}/q_max", np.asarray(high, container))],
            outputs=[clipped]))
        q = clipped
    graph.gs.nodes.append(gs.Node("DequantizeLinear", f"{base}/dequantize", inputs=[q, scale_c, zero_c],
                                  outputs=[out]))
