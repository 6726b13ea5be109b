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
hls4ml read them; weights and biases stay float initializers (0-bit channels zeroed) under a
``Quant`` node with per-channel scales; a layer whose channels chose different bit-widths gets a
per-channel ``bitwidth`` tensor (the spec allows scale, zero point and bit-width tensors).

Channels that chose 0 bits are pruned. Their weights and bias are 0, so a layer outputs a constant
0 there; where that leaves a channel exactly 0 wherever a layer reads it (`_unused_channels`
follows it through BN, bias and residual adds, activations and activation quantizers; a
depthwise conv's 0-bit channel counts too), the channel is sliced out with
`plinio_onnx.passes.prune.slice_groups` and the channel groups the MPS pass recorded: producers'
rows, biases, scales, zero points and bit-widths, per-channel constants, depthwise convs,
consumers' input columns, Reshape widths. The stored integers are sliced, so no scale changes.
A 0-bit channel whose value is not 0 downstream (a BN shift before a Sigmoid, a residual partner
that did not choose 0 bits), the last channel of a group, groups that reach a graph output and
PIT + MPS (PIT's masks slice there) keep their zeroed weights.

The numbers come from the same torch functions the searchable module evaluates with, so the
exported model computes what the module computes in eval mode. The chosen bit-widths are also
written, as JSON, to the model's ``metadata_props`` under ``mps.bit_widths``: per layer the bits
of its exported channels, the output channels sliced out (``removed_channels``) and how many
channels chose 0 bits (``pruned_channels``).
"""
from __future__ import annotations

import json
import math
from functools import reduce
from typing import NamedTuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from plinio_onnx.cost.spec import weight_source
from plinio_onnx.errors import PassError
from plinio_onnx.finalize import finalizer
from plinio_onnx.functions import mps as fn
from plinio_onnx.graph import Graph

from .mps import METADATA_KEY
from .prune import slice_groups

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
    g = graph.gs.toposort()
    nodes = {n.name: n for n in g.nodes}
    int4 = fmt == "qdq" and graph.opset >= 21 and bool(options.get("int4", True))
    chosen = {"format": fmt, "layers": {}, "activations": {}}

    acts = {act["tensor"]: _act_choice(nodes[act["node"]], act) for act in info["activations"]}
    layers = {layer["node"]: _layer_choice(graph, nodes, layer, acts[layer["activation"]])
              for layer in info["layers"]}
    act_nodes = {act["node"]: acts[act["tensor"]] for act in info["activations"]}
    selections = []
    for group in info.get("groups", []):
        unused = np.flatnonzero(_unused_channels(g, nodes, group, layers, act_nodes))
        if unused.size:
            selections.append((group, unused))
    removed = _removed_outputs(selections, info["layers"])

    for act in info["activations"]:
        bits, signed, scale = acts[act["tensor"]]
        chosen["activations"][act["tensor"]] = {"bits": bits, "signed": signed}
        node = nodes[act["node"]]
        x, y = node.inputs[0], node.outputs[0]
        _detach(node)
        if fmt == "qdq":
            _act_qdq(g, x, y, float(scale[0]), bits, signed, act["node"])
        else:
            _quant_node(g, x, y, np.float32(scale[0]), bits, signed, narrow=signed, name=act["node"])

    packed = []  # int4 DequantizeLinear nodes, packed once sliced
    for layer in info["layers"]:
        c = layers[layer["node"]]
        layer_bits = np.asarray(c.bits).reshape(-1).astype(int)
        exported_bits = np.delete(layer_bits, removed.get(layer["node"], []))
        act = chosen["activations"][layer["activation"]]
        entry = {"weight_bits": int(layer_bits[0]) if layer_bits.size == 1 else [int(b) for b in exported_bits],
                 "input_bits": act["bits"], "input_signed": act["signed"]}
        wq = nodes[layer["weight_quant"]]
        out = wq.outputs[0]
        _detach(wq)
        if fmt == "qdq":
            small = int4 and int(layer_bits.max()) <= 4
            dq = _weight_qdq(g, layer, c.q, c.s_dq, out, small)
            if small:
                packed.append(dq)
        else:
            kept_bits = [int(b) for b in layer_bits if b > 0]
            bw = _qonnx_bitwidth(layer_bits, kept_bits, layer, c.w.dim())
            zeroed = torch.where(c.keep, c.w, torch.zeros_like(c.w))
            _quant_node(g, gs.Constant(f"{layer['weight']}.quant_float_{layer['node']}", zeroed.numpy()), out,
                        c.s_dq.numpy().astype(np.float32), bw, True, narrow=False, name=wq.name)

        if c.bias is not None:
            b, ints, sb_dq, zero = c.bias
            bq = nodes[layer["bias_quant"]]
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
        entry["pruned_channels"] = int((~_per_channel(c.keep, layer)).sum())
        entry["removed_channels"] = [int(i) for i in removed.get(layer["node"], [])]
        chosen["layers"][layer["node"]] = entry

    if selections:
        quantized = {layer["node"]: layer for layer in info["layers"]}
        nodes = {n.name: n for n in g.nodes}
        slice_groups(graph, [(_exported_record(group, nodes, quantized), unused) for group, unused in selections])
    for dq in packed:
        dq.inputs[0] = _int4_constant(dq.inputs[0].name, np.asarray(dq.inputs[0].values))
        dq.inputs[2] = _int4_constant(dq.inputs[2].name, np.asarray(dq.inputs[2].values))
    if fmt == "qonnx" and not any(d.domain == QONNX_DOMAIN for d in _import_domains(g)):
        g.import_domains = _import_domains(g) + [onnx.helper.make_opsetid(QONNX_DOMAIN, 1)]
    g.cleanup(remove_unused_graph_inputs=False).toposort()
    del graph.metadata[METADATA_KEY]
    graph.metadata[BITS_METADATA_KEY] = json.dumps(chosen)
    return graph


# -- the chosen numbers -----------------------------------------------------------------------
class _Layer(NamedTuple):
    """A quantized layer at its argmax precisions, as the torch module computes it in eval."""
    bits: np.ndarray               # chosen weight bits: [C] or a scalar
    w: torch.Tensor                # float weight
    q: torch.Tensor                # weight integers (0 where 0 bits)
    s_dq: torch.Tensor             # scales to dequantize q with (1 where 0 bits)
    keep: torch.Tensor             # bits > 0, broadcast like the scales
    bias: tuple | None             # (b, integers, scales, zeroed) of a quantized bias
    bias_value: np.ndarray | None  # [C] what the layer adds to each channel (None: unknown)


def _act_choice(node: gs.Node, act: dict) -> tuple[int, bool, torch.Tensor]:
    """(bits, signed, scale) of an activation quantizer's argmax precision."""
    p = int(np.argmax(_values(node.inputs[1])))
    bits, signed = int(act["bits"][p]), bool(act["signed"])
    return bits, signed, fn.act_scale(torch.from_numpy(_values(node.inputs[2])[p:p + 1].copy()), bits, signed)


def _layer_choice(graph: Graph, nodes: dict, layer: dict, act: tuple) -> _Layer:
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
    s_dq = torch.where(keep, s, torch.ones_like(s))                          # pruned: q = 0
    node = nodes[layer["node"]]
    has_bias = len(node.inputs) > 2 and bool(node.inputs[2].name)
    bias, bias_value = None, (None if has_bias else np.zeros(layer["channels"]))
    if layer["bias_quant"]:
        bq = nodes[layer["bias_quant"]]
        if not isinstance(bq.inputs[0], gs.Constant):
            raise PassError("the quantized bias is not a constant at export", file=graph.source,
                            node=layer["node"], op=layer["op"])
        b = torch.from_numpy(np.array(bq.inputs[0].values, np.float32))
        s_in = act[2]
        s_w = torch.where(keep, s, torch.zeros_like(s)).reshape(-1)
        bq_int, sb = fn.bias_integers(b, s_in, s_w)
        zero = sb.expand_as(b) <= 0
        ints = torch.where(zero, torch.zeros_like(bq_int), bq_int.expand_as(b))
        bias = (b, ints, s_in * s_dq.reshape(-1), zero)                      # = s_in·s_w where kept
        bias_value = (ints * sb.expand_as(b)).numpy().astype(np.float64)
    return _Layer(np.asarray(bits), w, q, s_dq, keep, bias, bias_value)


# -- unused channels ---------------------------------------------------------------------------
#: Ops that leave a channel holding one constant everywhere at that constant.
_UNIFORM_OPS = {"Identity", "Dropout", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
                "Slice", "Gather", "Split", "Expand", "Tile", "Resize", "Upsample", "MaxPool",
                "GlobalMaxPool", "GlobalAveragePool", "ReduceMean", "ReduceMax", "ReduceMin"}
#: Ops that map a channel of zeros to zeros (other constants: unknown).
_ZERO_OPS = {"AveragePool", "LpPool", "GlobalLpPool", "ReduceSum", "ReduceL1", "ReduceL2",
             "ReduceSumSquare", "ReduceProd", "Cast", "Gelu", "Mish", "Selu", "Elu", "Celu", "Sin",
             "Floor", "Ceil", "Round", "Sign", "ThresholdedRelu", "PRelu", "Shrink"}
#: Element-wise functions evaluated on a channel's constant (continuous: float32 stays close).
_UNARY = {"Relu": lambda x: np.maximum(x, 0.0), "Neg": np.negative, "Abs": np.abs, "Tanh": np.tanh,
          "Exp": np.exp, "Sqrt": np.sqrt, "Erf": np.vectorize(math.erf, otypes=[float]),
          "Sigmoid": lambda x: 1 / (1 + np.exp(-x)), "Softplus": lambda x: np.logaddexp(0.0, x),
          "Softsign": lambda x: x / (1 + np.abs(x)), "HardSwish": lambda x: x * np.clip(x / 6 + 0.5, 0, 1)}
_ARITHMETIC = {"Add": np.add, "Sum": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
               "Max": np.maximum, "Min": np.minimum}


def _unused_channels(g: gs.Graph, nodes: dict, group: dict, layers: dict[str, _Layer],
                     act_nodes: dict) -> np.ndarray:
    """Channels of ``group`` that every layer reading them sees as exactly 0 (bool [size]):
    removing them changes nothing. One channel of each atom (of the whole group) always stays.

    Along the tensors that carry the group, each group channel's value is tracked while it is
    one constant everywhere (NaN: unknown): a layer outputs its quantized bias (0) on the channels
    whose weights chose 0 bits, and a depthwise conv also where its input is 0; the value then
    goes through BatchNormalization, bias adds, residual adds (0 only where both sides are 0),
    activations and the activation quantizers (rounding small values to 0)."""
    size = int(group["size"])
    unknown = np.full(size, np.nan)
    producers = {p["node"]: p for p in group["producers"]}
    consumers = {c["node"] for c in group["consumers"]}
    members: dict[tuple[str, str], list[dict]] = {}
    for member in group["members"]:
        members.setdefault((member["node"], member["tensor"]), []).append(member)
    values: dict[str, np.ndarray] = {}
    for node in g.nodes:
        inputs = [values.get(t.name) for t in node.inputs]
        layer = layers.get(node.name)
        if node.name in producers:
            out = unknown if layer is None else _layer_output(layer.bits, layer.bias_value, None,
                                                              producers[node.name], size)
        elif node.name in group["depthwise"]:
            entries = members.get((node.name, weight_source(node.inputs[1]).name), [])
            bits, bias = (layer.bits, layer.bias_value) if layer else (None, _float_bias(node))
            out = _layer_output(bits, bias, inputs[0], entries[0], size) if len(entries) == 1 else unknown
        elif node.name in consumers or all(v is None for v in inputs):
            continue
        else:
            out = _propagate(node, inputs, members, unknown, act_nodes)
        if out is not None:
            for tensor in node.outputs if node.op == "Split" else node.outputs[:1]:
                values[tensor.name] = out
    unused = np.ones(size, dtype=bool)
    read = [c for c in group["consumers"] if c["node"] in nodes]
    for consumer in read:
        value, channels = values.get(nodes[consumer["node"]].inputs[0].name), _channels(consumer, size)
        unused[channels] &= False if value is None else value[channels] == 0
    for atom in group.get("atoms") or [np.arange(size)]:
        if unused[atom].all():
            unused[atom[-1]] = False
    return unused if read else np.zeros(size, dtype=bool)


def _channels(record: dict, size: int) -> np.ndarray:
    """The group channel at each of a record's own positions (no ``channels``: the same index)."""
    channels = record.get("channels")
    return np.arange(size) if channels is None else np.asarray(channels, dtype=np.int64)


def _float_bias(node: gs.Node) -> np.ndarray | None:
    """The bias of a float (unquantized) conv: zeros without one, None when not a constant."""
    if len(node.inputs) < 3 or not node.inputs[2].name:
        return np.zeros(int(node.inputs[1].shape[0]))
    return np.asarray(node.inputs[2].values, np.float64) if isinstance(node.inputs[2], gs.Constant) else None


def _layer_output(bits: np.ndarray | None, bias: np.ndarray | None, x: np.ndarray | None, record: dict,
                  size: int) -> np.ndarray:
    """A layer's output per group channel: its ``bias`` alone where its weights chose 0 bits or
    (depthwise) where its input ``x`` is 0, else unknown. ``record`` places the group's channels
    among the layer's (offset, channels)."""
    out = np.full(size, np.nan)
    if bias is None:
        return out
    channels = _channels(record, size)
    index = record.get("offset", 0) + np.arange(channels.size)
    alone = np.zeros(channels.size, dtype=bool) if bits is None else np.broadcast_to(bits == 0, bias.shape)[index]
    if x is not None:
        alone = alone | (x[channels] == 0)
    out[channels] = np.where(alone, bias[index], np.nan)
    return out


def _propagate(node: gs.Node, inputs: list, members: dict, unknown: np.ndarray, act_nodes: dict):
    """The channel values of ``node``'s output (None: the output carries no channels)."""
    op, x = node.op, inputs[0]
    if (node.domain or "") not in ("", "ai.onnx"):
        if op == fn.ACT_QUANT and node.name in act_nodes and x is not None:
            bits, signed, scale = act_nodes[node.name]
            lo, hi = fn.act_range(bits, signed)
            r = x / float(scale[0])
            tie = np.abs(r - np.floor(r) - 0.5) < 1e-3   # float32 may round either way
            return np.where(tie, np.nan, np.clip(np.round(r), lo, hi) * float(scale[0]))
        return unknown
    if op in ("Shape", "Size"):
        return None
    if x is None and op != "Concat" and op not in _ARITHMETIC:
        return unknown   # only a shape or a parameter carries the channels
    if op in _UNIFORM_OPS:
        return x
    if op in _ZERO_OPS:
        return np.where(x == 0, 0.0, np.nan)
    if op in _UNARY:
        with np.errstate(all="ignore"):
            return _UNARY[op](x)
    if op == "HardSigmoid":
        return np.clip(float(node.attrs.get("alpha", 0.2)) * x + float(node.attrs.get("beta", 0.5)), 0.0, 1.0)
    if op == "LeakyRelu":
        return np.where(x < 0, float(node.attrs.get("alpha", 0.01)) * x, x)
    if op == "Clip":
        bounds = [_scalar(node.inputs[i]) if len(node.inputs) > i and node.inputs[i].name else default
                  for i, default in ((1, node.attrs.get("min", -np.inf)), (2, node.attrs.get("max", np.inf)))]
        return unknown if None in bounds else np.clip(x, *bounds)
    if op == "Pad":
        mode = node.attrs.get("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        value = _scalar(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else 0.0
        return x if mode != "constant" else np.where(x == value, x, np.nan)
    if op == "Concat":
        carried = [v for v in inputs if v is not None]
        return np.where(np.all([v == carried[0] for v in carried], axis=0), carried[0], np.nan)
    if op == "BatchNormalization":
        params = [_constant_channels(node, i, members, unknown.size) for i in range(1, 5)]
        if any(p is None for p in params):
            return unknown
        scale, bias, mean, var = params
        return (x - mean) / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5))) * scale + bias
    if op in _ARITHMETIC:
        operands = [v if v is not None else _constant_channels(node, i, members, unknown.size)
                    for i, v in enumerate(inputs)]
        known = [v for v in operands if v is not None]
        if op == "Mul":   # 0 times anything (finite) is 0
            zero = reduce(np.logical_or, [np.equal(v, 0) for v in known])
            return np.where(zero, 0.0, reduce(np.multiply, known) if len(known) == len(operands) else np.nan)
        if len(known) < len(operands):
            return unknown
        with np.errstate(divide="ignore", invalid="ignore"):
            result = reduce(_ARITHMETIC[op], operands)
        return np.where(np.isfinite(result), result, np.nan)
    return unknown


def _scalar(tensor: gs.Tensor) -> float | None:
    return float(np.asarray(tensor.values).reshape(-1)[0]) \
        if isinstance(tensor, gs.Constant) and np.asarray(tensor.values).size == 1 else None


def _constant_channels(node: gs.Node, index: int, members: dict, size: int) -> np.ndarray | float | None:
    """A constant input's value per group channel (a scalar broadcasts); None otherwise."""
    tensor = node.inputs[index]
    if not isinstance(tensor, gs.Constant):
        return None
    entries = members.get((node.name, tensor.name), [])
    values = np.asarray(tensor.values, np.float64)
    if len(entries) == 1:
        entry, out = entries[0], np.full(size, np.nan)
        channels = _channels(entry, size)
        out[channels] = np.take(values, entry["offset"] + np.arange(channels.size), axis=entry["axis"]).reshape(-1)
        return out
    return float(values.reshape(-1)[0]) if values.size == 1 and not entries else None


def _removed_outputs(selections: list, layers: list[dict]) -> dict[str, np.ndarray]:
    """Output channels each quantized layer loses (as a producer or a depthwise member)."""
    by_node = {layer["node"]: layer for layer in layers}
    removed: dict[str, set] = {}
    for group, unused in selections:
        records = group["producers"] + [m for m in group["members"] if m["node"] in by_node
                                        and m["tensor"] == by_node[m["node"]]["weight"]
                                        and m["axis"] == by_node[m["node"]]["axis"]]
        for record in records:
            if record["node"] in by_node:
                local = np.flatnonzero(np.isin(_channels(record, group["size"]), unused))
                removed.setdefault(record["node"], set()).update((record.get("offset", 0) + local).tolist())
    return {node: np.array(sorted(channels), dtype=np.int64) for node, channels in removed.items()}


def _exported_record(group: dict, nodes: dict, layers: dict[str, dict]) -> dict:
    """``group`` with every quantized layer's weight and bias replaced by the constants the export
    wrote for them (values, and on output channels also scales, zero points, bit-widths), so
    `slice_groups` cuts exactly those."""
    record = dict(group, producers=[], members=[], consumers=[])
    for producer in group["producers"]:
        node = nodes.get(producer["node"])
        if producer["node"] not in layers or node is None:
            record["producers"].append(producer)
            continue
        record["members"] += _stored(node, 1, producer, producer["axis"], outputs=True)
        if producer["bias"]:
            record["members"] += _stored(node, 2, producer, 0, outputs=True)
    for member in group["members"]:
        layer, node = layers.get(member["node"]), nodes.get(member["node"])
        index = None if layer is None or node is None else {layer["weight"]: 1, layer["bias"]: 2}.get(member["tensor"])
        record["members"] += [member] if index is None else _stored(node, index, member, member["axis"], outputs=True)
    for consumer in group["consumers"]:
        node = nodes.get(consumer["node"])
        if consumer["node"] in layers and node is not None:
            consumer = dict(consumer, weight=_stored(node, 1, consumer, consumer["axis"], outputs=False)[0]["tensor"])
        record["consumers"].append(consumer)
    return record


def _stored(node: gs.Node, index: int, record: dict, axis: int, *, outputs: bool) -> list[dict]:
    """Member records (placed as ``record``) for what input ``index`` of ``node`` is stored as:
    the constant behind its DequantizeLinear / Quant (or the input itself) on ``axis`` and, when
    slicing ``outputs`` channels, every parameter of that node holding one entry per channel."""
    tensor = node.inputs[index]
    quant = tensor.inputs[0] if tensor.inputs else None
    data = tensor if quant is None else quant.inputs[0]
    place = {"node": node.name, "offset": record.get("offset", 0), "channels": record.get("channels")}
    records = [dict(place, tensor=data.name, axis=axis)]
    channels = np.shape(data.values)[axis]
    for param in quant.inputs[1:] if quant is not None and outputs and channels > 1 else []:
        shape = list(np.shape(param.values))
        if int(np.prod(shape)) == channels:
            records.append(dict(place, tensor=param.name, axis=shape.index(channels)))
    return records


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


def _weight_qdq(g: gs.Graph, layer: dict, q: torch.Tensor, scale: torch.Tensor, out: gs.Tensor, int4: bool) -> gs.Node:
    """The weight's DequantizeLinear, with int8 integers (``int4``: packed once channels are sliced)."""
    base = f"{layer['weight']}.{'int4' if int4 else 'int8'}_{layer['node']}"
    per_axis = layer["scale_axis"] >= 0
    s = scale.reshape(-1).numpy().astype(np.float32) if per_axis else np.array(float(scale.reshape(-1)[0]), np.float32)
    attrs = {"axis": int(layer["scale_axis"])} if per_axis else {}
    dq = gs.Node("DequantizeLinear", name=f"{layer['node']}/weight_dequantize", attrs=attrs, outputs=[out],
                 inputs=[gs.Constant(base, q.numpy().astype(np.int8)), gs.Constant(f"{base}/scale", s),
                         gs.Constant(f"{base}/zero_point", np.zeros(s.shape, np.int8))])
    g.nodes.append(dq)
    return dq


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
