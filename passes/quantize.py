"""Finalize MPS: pick every quantizer's argmax precision and write deployable quantization.

``format="qdq"`` (default): standard ONNX ``QuantizeLinear`` / ``DequantizeLinear``.

* Weights are stored already quantized: an int8 initializer (int4 when the graph's opset is
  ≥ 21 and every channel uses ≤ 4 bits; sub-8-bit values sit in int8 restricted to their range)
  with per-axis (or per-tensor) scales, then ``DequantizeLinear`` → the layer.
* Biases: int32 in the scale s_in·s_w, then ``DequantizeLinear`` (what ONNX Runtime's QDQ
  fusion expects of a Conv/Gemm bias).
* Activations: ``QuantizeLinear`` (uint8 unsigned / int8 signed, zero point 0) →
  ``Clip`` to the chosen range where it is narrower than the container → ``DequantizeLinear``.

``format="qonnx"``: QONNX ``Quant`` nodes (domain ``qonnx.custom_op.general``) with inputs
(x, scale, zeropt, bitwidth) and attributes signed / narrow / rounding_mode="ROUND" as FINN and
hls4ml read them; weights and biases stay float initializers (pruned channels zeroed) under a
``Quant`` node with per-channel scales; a layer whose channels chose different bit-widths gets a
per-channel ``bitwidth`` tensor (the spec allows scale, zero point and bit-width tensors).

Channels that chose 0 bits are pruned by zeroing: their weights and bias are 0, so the channel
outputs exactly 0 (slicing them out would need the channel analysis; PIT does that).

The numbers come from the same torch functions the searchable module evaluates with, so the
exported model computes what the module computes in eval mode. The chosen bit-widths are also
written, as JSON, to the model's ``metadata_props`` under ``mps.bit_widths``.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from plinio_onnx.errors import PassError
from plinio_onnx.finalize import finalizer
from plinio_onnx.functions import mps as fn
from plinio_onnx.graph import Graph

from .mps import METADATA_KEY

FORMATS = ("qdq", "qonnx")
QONNX_DOMAIN = "qonnx.custom_op.general"
BITS_METADATA_KEY = "mps.bit_widths"


@finalizer(order=30)
def fold_quantizers(graph: Graph, **options) -> Graph:
    """Replace the MPS quantizers of ``graph`` in place (see the module docstring); returns it.

    Options: ``format`` ("qdq" | "qonnx"), ``int4`` (default True: int4 weights where the
    opset allows them)."""
    record = graph.metadata.get(METADATA_KEY)
    if record is None:
        return graph
    fmt = str(options.get("format", "qdq") or "qdq").lower()
    if fmt not in FORMATS:
        raise PassError(f"unknown quantized format {fmt!r}; choose from {FORMATS}", file=graph.source)
    info = json.loads(record)
    g = graph.gs
    nodes = {n.name: n for n in g.nodes}
    int4 = fmt == "qdq" and graph.opset >= 21 and bool(options.get("int4", True))
    chosen = {"format": fmt, "layers": {}, "activations": {}}

    act_scales: dict[str, torch.Tensor] = {}
    for act in info["activations"]:
        node = nodes[act["node"]]
        p = int(np.argmax(_values(node.inputs[1])))
        bits, signed = int(act["bits"][p]), bool(act["signed"])
        scale = fn.act_scale(torch.from_numpy(_values(node.inputs[2])[p:p + 1].copy()), bits, signed)
        act_scales[act["tensor"]] = scale
        chosen["activations"][act["tensor"]] = {"bits": bits, "signed": signed}
        x, y = node.inputs[0], node.outputs[0]
        _detach(node)
        if fmt == "qdq":
            _act_qdq(g, x, y, float(scale[0]), bits, signed, act["node"])
        else:
            _quant_node(g, x, y, np.float32(scale[0]), bits, signed, narrow=signed, name=act["node"])

    for layer in info["layers"]:
        wq = nodes[layer["weight_quant"]]
        weight = wq.inputs[0]
        if not isinstance(weight, gs.Constant):
            raise PassError("the quantized weight is not a constant at export (a mask left over?)",
                            file=graph.source, node=layer["node"], op=layer["op"])
        w = torch.from_numpy(np.array(weight.values, np.float32))
        bits = fn.chosen_weight_bits(_values(wq.inputs[1]), layer["bits"])      # [C] or scalar
        broadcast = fn.broadcast_bits(torch.from_numpy(np.asarray(bits, np.float32)), w.dim(),
                                      layer["axis"] if layer["per_channel"] else -1)
        q, s, keep = fn.weight_quant_values(w, broadcast, layer["reduce_axes"])
        keep_channels = _per_channel(keep, layer)
        s_dq = torch.where(keep, s, torch.ones_like(s))                          # pruned: q = 0
        layer_bits = np.asarray(bits).reshape(-1).astype(int)
        entry = {"weight_bits": int(layer_bits[0]) if layer_bits.size == 1 else [int(b) for b in layer_bits],
                 "input_bits": chosen["activations"][layer["activation"]]["bits"],
                 "input_signed": chosen["activations"][layer["activation"]]["signed"]}
        out = wq.outputs[0]
        _detach(wq)
        if fmt == "qdq":
            _weight_qdq(g, layer, q, s_dq, out, int4 and int(layer_bits.max()) <= 4)
        else:
            kept_bits = [int(b) for b in layer_bits if b > 0]
            bw = _qonnx_bitwidth(layer_bits, kept_bits, layer, w.dim())
            zeroed = torch.where(keep, w, torch.zeros_like(w))
            _quant_node(g, gs.Constant(f"{layer['weight']}.quant_float_{layer['node']}", zeroed.numpy()), out,
                        s_dq.numpy().astype(np.float32), bw, True, narrow=False, name=wq.name)

        if layer["bias_quant"]:
            bq = nodes[layer["bias_quant"]]
            bias = bq.inputs[0]
            if not isinstance(bias, gs.Constant):
                raise PassError("the quantized bias is not a constant at export", file=graph.source,
                                node=layer["node"], op=layer["op"])
            b = torch.from_numpy(np.array(bias.values, np.float32))
            s_in = act_scales[layer["activation"]]
            s_w = torch.where(keep, s, torch.zeros_like(s)).reshape(-1)
            bq_int, sb = fn.bias_integers(b, s_in, s_w)
            zero = sb.expand_as(b) <= 0
            ints = torch.where(zero, torch.zeros_like(bq_int), bq_int.expand_as(b))
            sb_dq = s_in * s_dq.reshape(-1)                                      # = s_in·s_w where kept
            out = bq.outputs[0]
            _detach(bq)
            if fmt == "qdq":
                _bias_qdq(g, layer, ints, sb_dq, out)
            else:
                b_zeroed = torch.where(zero, torch.zeros_like(b), b)
                _quant_node(g, gs.Constant(f"{layer['bias']}.quant_float_{layer['node']}", b_zeroed.numpy()),
                            out, sb_dq.expand_as(b).numpy().astype(np.float32) if sb_dq.numel() > 1
                            else np.float32(sb_dq.reshape(-1)[0]), 32, True, narrow=False, name=bq.name)
            entry["bias_bits"] = 32
        entry["pruned_channels"] = int((~keep_channels).sum())
        chosen["layers"][layer["node"]] = entry

    if fmt == "qonnx" and not any(d.domain == QONNX_DOMAIN for d in _import_domains(g)):
        g.import_domains = _import_domains(g) + [onnx.helper.make_opsetid(QONNX_DOMAIN, 1)]
    g.cleanup(remove_unused_graph_inputs=False).toposort()
    del graph.metadata[METADATA_KEY]
    graph.metadata[BITS_METADATA_KEY] = json.dumps(chosen)
    return graph


# -- helpers ----------------------------------------------------------------------------------
def _values(tensor: gs.Tensor) -> np.ndarray:
    return np.asarray(tensor.values)


def _detach(node: gs.Node) -> None:
    node.inputs.clear()
    node.outputs.clear()


def _import_domains(g: gs.Graph) -> list:
    domains = getattr(g, "import_domains", None)
    if domains:
        return list(domains)
    return [onnx.helper.make_opsetid("", g.opset)]


def _per_channel(keep: torch.Tensor, layer: dict) -> np.ndarray:
    """Channel keep mask ([C] booleans) from the broadcast keep tensor."""
    flat = keep.reshape(-1).numpy()
    return np.resize(flat, layer["channels"]) if flat.size != layer["channels"] else flat


def _act_qdq(g: gs.Graph, x: gs.Tensor, y: gs.Tensor, scale: float, bits: int, signed: bool, name: str) -> None:
    dtype = np.int8 if signed else np.uint8
    lo, hi = fn.act_range(bits, signed)
    info = np.iinfo(dtype)
    s = gs.Constant(f"{name}/scale", np.array(scale, np.float32))
    zp = gs.Constant(f"{name}/zero_point", np.array(0, dtype))
    q = gs.Variable(f"{name}/q", dtype=dtype)
    g.nodes.append(gs.Node("QuantizeLinear", name=f"{name}/quantize", inputs=[x, s, zp], outputs=[q]))
    if lo > info.min or hi < info.max:
        clipped = gs.Variable(f"{name}/q_clip", dtype=dtype)
        g.nodes.append(gs.Node("Clip", name=f"{name}/clip", outputs=[clipped],
                               inputs=[q, gs.Constant(f"{name}/q_min", np.array(lo, dtype)),
                                       gs.Constant(f"{name}/q_max", np.array(hi, dtype))]))
        q = clipped
    g.nodes.append(gs.Node("DequantizeLinear", name=f"{name}/dequantize", inputs=[q, s, zp], outputs=[y]))


def _weight_qdq(g: gs.Graph, layer: dict, q: torch.Tensor, scale: torch.Tensor, out: gs.Tensor, int4: bool) -> None:
    base = f"{layer['weight']}.{'int4' if int4 else 'int8'}_{layer['node']}"
    values = q.numpy().astype(np.int8)
    per_axis = layer["scale_axis"] >= 0
    s = scale.reshape(-1).numpy().astype(np.float32) if per_axis else np.array(float(scale.reshape(-1)[0]), np.float32)
    if int4:
        ints = _int4_constant(base, values)
        zp = _int4_constant(f"{base}/zero_point", np.zeros(s.shape, np.int8))
    else:
        ints = gs.Constant(base, values)
        zp = gs.Constant(f"{base}/zero_point", np.zeros(s.shape, np.int8))
    attrs = {"axis": int(layer["scale_axis"])} if per_axis else {}
    g.nodes.append(gs.Node("DequantizeLinear", name=f"{layer['node']}/weight_dequantize", attrs=attrs,
                           inputs=[ints, gs.Constant(f"{base}/scale", s), zp], outputs=[out]))


def _int4_constant(name: str, values: np.ndarray) -> gs.Constant:
    """An INT4 initializer (onnx packs two values per byte) holding ``values`` in [-8, 7]."""
    from onnx_graphsurgeon.ir.tensor import LazyValues
    packed = onnx.helper.pack_float32_to_4bit(values.reshape(-1).astype(np.float32), signed=True)
    tensor = onnx.helper.make_tensor(name, onnx.TensorProto.INT4, list(values.shape), packed.tobytes(), raw=True)
    return _PackedConstant(name, LazyValues(tensor))


class _PackedConstant(gs.Constant):
    """A constant whose ONNX type numpy lacks (INT4): reading ``values`` gives an int8 copy and
    keeps the packed tensor, so the graph still exports it as INT4 (onnx-graphsurgeon would
    otherwise replace it by the int8 array it loaded)."""

    @property
    def values(self):
        from onnx_graphsurgeon.ir.tensor import LazyValues
        return self._values.load() if isinstance(self._values, LazyValues) else self._values

    @values.setter
    def values(self, values) -> None:
        self._values = values


def _bias_qdq(g: gs.Graph, layer: dict, ints: torch.Tensor, scale: torch.Tensor, out: gs.Tensor) -> None:
    base = f"{layer['bias']}.int32_{layer['node']}"
    values = ints.numpy().astype(np.int32)
    if scale.numel() > 1:
        s = scale.reshape(-1).numpy().astype(np.float32)
        attrs = {"axis": 0}
    else:
        s = np.array(float(scale.reshape(-1)[0]), np.float32)
        attrs = {}
    g.nodes.append(gs.Node("DequantizeLinear", name=f"{layer['node']}/bias_dequantize", attrs=attrs,
                           inputs=[gs.Constant(base, values), gs.Constant(f"{base}/scale", s),
                                   gs.Constant(f"{base}/zero_point", np.zeros(s.shape, np.int32))],
                           outputs=[out]))


def _qonnx_bitwidth(layer_bits: np.ndarray, kept_bits: list[int], layer: dict, rank: int):
    """A scalar bit-width when every kept channel agrees, else a per-channel tensor (pruned
    channels, whose values are 0, take the smallest kept bit-width)."""
    if len(set(kept_bits)) <= 1:
        return int(kept_bits[0]) if kept_bits else int(min(b for b in layer["bits"] if b > 0))
    filled = np.where(layer_bits > 0, layer_bits, min(kept_bits)).astype(np.float32)
    shape = [1] * rank
    shape[layer["axis"]] = -1
    return filled.reshape(shape)


def _quant_node(g: gs.Graph, x: gs.Tensor, y: gs.Tensor, scale, bits, signed: bool, *, narrow: bool,
                name: str) -> None:
    """QONNX ``Quant(x, scale, zeropt, bitwidth)``: y = (clamp(round(x/s + z), min, max) − z)·s."""
    scale = np.asarray(scale, np.float32)
    bitwidth = np.asarray(bits, np.float32)
    inputs = [x, gs.Constant(f"{name}/quant_scale", scale),
              gs.Constant(f"{name}/quant_zeropt", np.array(0.0, np.float32)),
              gs.Constant(f"{name}/quant_bitwidth", bitwidth)]
    g.nodes.append(gs.Node("Quant", name=f"{name}/quant", domain=QONNX_DOMAIN, inputs=inputs, outputs=[y],
                           attrs={"signed": int(signed), "narrow": int(narrow), "rounding_mode": "ROUND"}))
