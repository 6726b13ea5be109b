"""Zero-bit channel slicing: cut out the channels whose weights chose 0 bits, where that changes nothing.

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

Two steps, because the channel values are followed through the searchable graph while the
slicing cuts the constants a writer stored: `plan_zero_bit` (on the searchable graph, before the
quantizers are written) and the pass `SliceZeroBitChannels` (on the written graph).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import reduce

import numpy as np
import onnx_graphsurgeon as gs

from plinio_onnx.cost.spec import weight_source
from plinio_onnx.functions import mps as fn
from plinio_onnx.graph import Graph
from plinio_onnx.records import GroupRecord, Member, MPSRecord, Producer, QuantizedLayer

from .infra import InPlacePass, PassResult
from .precision import ChosenActivation, ChosenLayer
from .prune import slice_groups


@dataclass
class ZeroBitPlan:
    """The channels to cut: (group, its unused channels) pairs, and the output channels every
    quantized layer loses (recorded in the export's ``mps.bit_widths``)."""

    selections: list[tuple[GroupRecord, np.ndarray]]
    removed: dict[str, np.ndarray]
    layers: list[QuantizedLayer]


def plan_zero_bit(g: gs.Graph, nodes: dict, info: MPSRecord, layers: dict[str, ChosenLayer],
                  activations: dict[str, ChosenActivation]) -> ZeroBitPlan:
    """Which channels of the MPS record's groups are exactly 0 wherever a layer reads them, at the
    chosen precisions (``layers`` by node, ``activations`` by tensor), on the searchable graph."""
    act_nodes = {act.node: activations[act.tensor] for act in info.activations}
    selections = []
    for group in info.groups:
        unused = np.flatnonzero(_unused_channels(g, nodes, group, layers, act_nodes))
        if unused.size:
            selections.append((group, unused))
    return ZeroBitPlan(selections, _removed_outputs(selections, info.layers), info.layers)


class SliceZeroBitChannels(InPlacePass):
    """Slice the planned channels out of a graph whose quantizers are written (QDQ or QONNX):
    the constants the writer stored for each quantized layer are cut, never recomputed."""

    def __init__(self, plan: ZeroBitPlan) -> None:
        self.plan = plan

    def call(self, graph: Graph) -> PassResult:
        if not self.plan.selections:
            return PassResult(graph, False)
        quantized = {layer.node: layer for layer in self.plan.layers}
        nodes = {n.name: n for n in graph.gs.nodes}
        slice_groups(graph, [(_exported_record(group, nodes, quantized), unused)
                             for group, unused in self.plan.selections])
        return PassResult(graph, True)


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


def _unused_channels(g: gs.Graph, nodes: dict, group: GroupRecord, layers: dict[str, ChosenLayer],
                     act_nodes: dict) -> np.ndarray:
    """Channels of ``group`` that every layer reading them sees as exactly 0 (bool [size]):
    removing them changes nothing. One channel of each atom (of the whole group) always stays.

    Along the tensors that carry the group, each group channel's value is tracked while it is
    one constant everywhere (NaN: unknown): a layer outputs its quantized bias (0) on the channels
    whose weights chose 0 bits, and a depthwise conv also where its input is 0; the value then
    goes through BatchNormalization, bias adds, residual adds (0 only where both sides are 0),
    activations and the activation quantizers (rounding small values to 0)."""
    size = int(group.size)
    unknown = np.full(size, np.nan)
    producers = {p.node: p for p in group.producers}
    consumers = {c.node for c in group.consumers}
    members: dict[tuple[str, str], list[dict]] = {}
    for member in group.members:
        members.setdefault((member.node, member.tensor), []).append(member)
    values: dict[str, np.ndarray] = {}
    for node in g.nodes:
        inputs = [values.get(t.name) for t in node.inputs]
        layer = layers.get(node.name)
        if node.name in producers:
            out = unknown if layer is None else _layer_output(layer.bits, layer.bias_value, None,
                                                              producers[node.name], size)
        elif node.name in group.depthwise:
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
    read = [c for c in group.consumers if c.node in nodes]
    for consumer in read:
        value, channels = values.get(nodes[consumer.node].inputs[0].name), _channels(consumer, size)
        unused[channels] &= False if value is None else value[channels] == 0
    for atom in group.atoms or [np.arange(size)]:
        if unused[atom].all():
            unused[atom[-1]] = False
    return unused if read else np.zeros(size, dtype=bool)


def _offset(record) -> int:
    """Where a record's channels start along its axis (a producer's at 0)."""
    return 0 if isinstance(record, Producer) else record.offset


def _channels(record, size: int) -> np.ndarray:
    """The group channel at each of a record's own positions (no ``channels``: the same index)."""
    channels = record.channels
    return np.arange(size) if channels is None else np.asarray(channels, dtype=np.int64)


def _float_bias(node: gs.Node) -> np.ndarray | None:
    """The bias of a float (unquantized) conv: zeros without one, None when not a constant."""
    if len(node.inputs) < 3 or not node.inputs[2].name:
        return np.zeros(int(node.inputs[1].shape[0]))
    return np.asarray(node.inputs[2].values, np.float64) if isinstance(node.inputs[2], gs.Constant) else None


def _layer_output(bits: np.ndarray | None, bias: np.ndarray | None, x: np.ndarray | None, record,
                  size: int) -> np.ndarray:
    """A layer's output per group channel: its ``bias`` alone where its weights chose 0 bits or
    (depthwise) where its input ``x`` is 0, else unknown. ``record`` places the group's channels
    among the layer's (offset, channels)."""
    out = np.full(size, np.nan)
    if bias is None:
        return out
    channels = _channels(record, size)
    index = _offset(record) + np.arange(channels.size)
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
        out[channels] = np.take(values, entry.offset + np.arange(channels.size), axis=entry.axis).reshape(-1)
        return out
    return float(values.reshape(-1)[0]) if values.size == 1 and not entries else None


def _removed_outputs(selections: list, layers: list[QuantizedLayer]) -> dict[str, np.ndarray]:
    """Output channels each quantized layer loses (as a producer or a depthwise member)."""
    by_node = {layer.node: layer for layer in layers}
    removed: dict[str, set] = {}
    for group, unused in selections:
        records = group.producers + [m for m in group.members if m.node in by_node
                                        and m.tensor == by_node[m.node].weight
                                        and m.axis == by_node[m.node].axis]
        for record in records:
            if record.node in by_node:
                local = np.flatnonzero(np.isin(_channels(record, group.size), unused))
                removed.setdefault(record.node, set()).update((_offset(record) + local).tolist())
    return {node: np.array(sorted(channels), dtype=np.int64) for node, channels in removed.items()}


def _exported_record(group: GroupRecord, nodes: dict, layers: dict[str, QuantizedLayer]) -> GroupRecord:
    """``group`` with every quantized layer's weight and bias replaced by the constants the export
    wrote for them (values, and on output channels also scales, zero points, bit-widths), so
    `slice_groups` cuts exactly those."""
    record = replace(group, producers=[], members=[], consumers=[])
    for producer in group.producers:
        node = nodes.get(producer.node)
        if producer.node not in layers or node is None:
            record.producers.append(producer)
            continue
        record.members += _stored(node, 1, producer, producer.axis, outputs=True)
        if producer.bias:
            record.members += _stored(node, 2, producer, 0, outputs=True)
    for member in group.members:
        layer, node = layers.get(member.node), nodes.get(member.node)
        index = None if layer is None or node is None else {layer.weight: 1, layer.bias: 2}.get(member.tensor)
        record.members += [member] if index is None else _stored(node, index, member, member.axis, outputs=True)
    for consumer in group.consumers:
        node = nodes.get(consumer.node)
        if consumer.node in layers and node is not None:
            consumer = replace(consumer, weight=_stored(node, 1, consumer, consumer.axis, outputs=False)[0].tensor)
        record.consumers.append(consumer)
    return record


def _stored(node: gs.Node, index: int, record, axis: int, *, outputs: bool) -> list[Member]:
    """Member records (placed as ``record``) for what input ``index`` of ``node`` is stored as:
    the constant behind its DequantizeLinear / Quant (or the input itself) on ``axis`` and, when
    slicing ``outputs`` channels, every parameter of that node holding one entry per channel."""
    tensor = node.inputs[index]
    quant = tensor.inputs[0] if tensor.inputs else None
    data = tensor if quant is None else quant.inputs[0]
    place = {"node": node.name, "offset": _offset(record), "channels": record.channels}
    records = [Member(**place, tensor=data.name, axis=axis)]
    channels = np.shape(data.values)[axis]
    for param in quant.inputs[1:] if quant is not None and outputs and channels > 1 else []:
        shape = list(np.shape(param.values))
        if int(np.prod(shape)) == channels:
            records.append(Member(**place, tensor=param.name, axis=shape.index(channels)))
    return records


