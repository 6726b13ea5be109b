"""The MPS pass: make the precision of weights and activations searchable (mixed-precision search).

For every selected layer (Conv, ConvTranspose, Gemm, MatMul with a constant weight) it inserts:

* ``MPSWeightQuant`` on the weight, with logits ``<layer>.mps_w_alpha`` over the weight
  precisions, one row per precision and (``per_channel=True``) one column per output channel;
* ``MPSActQuant`` on the layer's input activation, with logits ``<tensor>.mps_a_alpha`` and one
  learned clip per precision ``<tensor>.mps_a_clip``; layers that read the same tensor share it.
  The quantizer is unsigned when every value the tensor can hold is ≥ 0 (it comes from a
  ReLU-like op, possibly through pooling/reshaping), signed (symmetric) otherwise;
* ``MPSBiasQuant`` on a Conv/Gemm bias: 32-bit integers in the scale s_in·s_w.

Every quantizer reads the graph-wide temperature ``mps.temperature`` (a one-element buffer the
search can anneal). By default BatchNormalization nodes that directly follow a Conv/Gemm are
folded into it first (`fold_batchnorm`), as PLiNIO does: the exported integer layer then holds
the folded weights. Logits start at α_p = p / max P (PLiNIO), so the initial choice is the
highest precision. The math is in `plinio_onnx.functions.mps`.

Guarantees: with one precision the pass is plain quantization-aware training (QAT); at the
initial logits the searchable graph computes the input graph up to the quantization error of the
highest precision (rounding the weights and biases, clipping and rounding the activations).
Layers whose output reaches a graph output without passing another layer never get the 0-bit
(pruning) choice. With the 0-bit choice the record also holds the prunable channel groups that a
0-bit layer produces or carries (`plinio_onnx.analysis.channels`, analyzed here because quantizer
nodes would block them), so the export can slice out the channels that end up unused
(`plinio_onnx.passes.quantize`; under PIT + MPS, PIT's masks do the slicing). The record (which
tensors, which parameters) is stored in the graph's metadata (`plinio_onnx.records.MPSRecord`), so the
searchable ONNX file is a complete checkpoint.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import onnx_graphsurgeon as gs

from plinio_onnx.analysis import analyze_channels
from plinio_onnx.cost.spec import weight_source
from plinio_onnx.errors import PassError
from plinio_onnx.functions import add_functions
from plinio_onnx.functions import mps as fn
from plinio_onnx.functions import relaxation
from plinio_onnx.graph import PLINIO_DOMAIN, Graph
from plinio_onnx.records import (ActivationQuantizer, GroupRecord, Member, MPSRecord, PITRecord,
                                 QuantizedLayer, SkippedLayer)

from .infra import FunctionalPass, InPlacePass, PassResult
from .pit import _selected

METADATA_KEY = MPSRecord.KEY
TEMPERATURE = "mps.temperature"
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
DEFAULT_PRECISIONS = (2, 4, 8)
SCALES = ("per_channel", "per_tensor")
MAX_BITS = 8  # QDQ stores values in (u)int8 containers

#: Ops whose output is ≥ 0 whatever their input (ReLU-like producers of unsigned activations).
_NONNEGATIVE_OPS = {"Relu", "Sigmoid", "Softmax", "HardSigmoid", "Abs", "Exp", "Softplus"}
#: Ops whose output is ≥ 0 when their (data) inputs are.
_PASS_THROUGH_OPS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Flatten",
                     "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Resize", "Slice",
                     "Split", "Gather", "Concat", "ReduceMax", "ReduceMean", "SpaceToDepth",
                     "DepthToSpace", "Upsample"}


class MPSPass(FunctionalPass):
    """The MPS pass (module docstring); its options are those of `mps`. Requires a graph not yet
    searchable by MPS; ensures the MPS record is stored."""

    def __init__(self, **options: Any) -> None:
        self.options = options

    def requires(self, graph: Graph) -> None:
        if MPSRecord.present(graph):
            raise PassError("the graph is already searchable by MPS", file=graph.source)

    def ensures(self, graph: Graph) -> None:
        if not MPSRecord.present(graph):
            raise ValueError("no MPS record was stored")

    def call(self, graph: Graph) -> PassResult:
        return PassResult(_searchable(graph, **self.options), True)


class FoldBatchNorm(InPlacePass):
    """`fold_batchnorm` as a pass: modified when some BatchNormalization was folded."""

    def call(self, graph: Graph) -> PassResult:
        return PassResult(graph, bool(fold_batchnorm(graph)))


def mps(graph: Graph, *, w_precisions: Iterable[int] = DEFAULT_PRECISIONS,
        a_precisions: Iterable[int] = DEFAULT_PRECISIONS, per_channel: bool = True,
        weight_scale: str = "per_channel", zero_bit: bool = False, sampling: str = "softmax",
        temperature: float = 1.0, include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None, op_types: Iterable[str] = LAYER_OPS,
        clip_init: float = 6.0, fold_bn: bool = True, quantize_bias: bool = True) -> Graph:
    """Return a searchable copy of ``graph`` with MPS quantizers (`MPSPass`, module docstring).

    ``w_precisions`` / ``a_precisions``: candidate bit-widths (2…8; a single one is QAT).
    ``per_channel``: one weight precision per output channel (else per layer). ``weight_scale``:
    "per_channel" (default) or "per_tensor" min-max scales (per-tensor needs ``per_channel=False``).
    ``zero_bit``: add the 0-bit (channel pruning) choice to the weight precisions (per channel;
    including 0 in ``w_precisions`` does the same). ``sampling``: "softmax" (softmax(α/T); "soft" is
    accepted), "hard" (argmax with straight-through gradients), "gumbel" or "gumbel_hard"
    (Gumbel-softmax) in training (`plinio_onnx.functions.relaxation`); eval always uses the argmax. ``temperature``: the initial T. ``include`` / ``exclude`` / ``op_types``:
    which layers (fnmatch patterns on node names, op types). ``clip_init``: initial activation
    clip (`plinio_onnx.methods.mps.MPS.calibrate` sets clips from data). ``fold_bn``: fold
    BatchNormalization into the preceding Conv/Gemm first (skipped when the graph already holds
    other ``ai.plinio`` nodes, e.g. PIT masks: fold before those passes).
    """
    return MPSPass(w_precisions=w_precisions, a_precisions=a_precisions, per_channel=per_channel,
                   weight_scale=weight_scale, zero_bit=zero_bit, sampling=sampling, temperature=temperature,
                   include=include, exclude=exclude, op_types=op_types, clip_init=clip_init, fold_bn=fold_bn,
                   quantize_bias=quantize_bias)(graph).graph


def _searchable(graph: Graph, *, w_precisions: Iterable[int] = DEFAULT_PRECISIONS,
        a_precisions: Iterable[int] = DEFAULT_PRECISIONS, per_channel: bool = True,
        weight_scale: str = "per_channel", zero_bit: bool = False, sampling: str = "soft",
        temperature: float = 1.0, include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None, op_types: Iterable[str] = LAYER_OPS,
        clip_init: float = 6.0, fold_bn: bool = True, quantize_bias: bool = True) -> Graph:
    w_bits = _precisions(w_precisions, "w_precisions", allow_zero=True, source=graph.source)
    a_bits = _precisions(a_precisions, "a_precisions", allow_zero=False, source=graph.source)
    if zero_bit and 0 not in w_bits:
        w_bits = (0,) + w_bits
    if 0 in w_bits and not per_channel:
        raise PassError("the 0-bit (pruning) choice is per channel: use per_channel=True", file=graph.source)
    if set(w_bits) == {0}:
        raise PassError("w_precisions needs at least one non-zero bit-width", file=graph.source)
    if weight_scale not in SCALES:
        raise PassError(f"weight_scale must be one of {SCALES}, not {weight_scale!r}", file=graph.source)
    if per_channel and weight_scale == "per_tensor":
        raise PassError("a per-channel precision needs per-channel scales (weight_scale='per_channel')",
                        file=graph.source)
    if not relaxation.is_sampling(sampling):
        raise PassError(f"sampling must be one of {relaxation.SAMPLINGS}, not {sampling!r}", file=graph.source)
    sampling = relaxation.sampling_mode(sampling)
    if not temperature > 0:
        raise PassError("the temperature must be positive", file=graph.source)
    graph = graph.copy()
    has_plinio = any((n.domain or "") == PLINIO_DOMAIN for n in graph.nodes)
    folded = fold_batchnorm(graph) if fold_bn and not has_plinio else []
    # Grouped convs stay whole: slicing one rebuilds it from float weights, past its quantizer.
    groups = analyze_channels(graph, grouped_convs=False).prunable() \
        if 0 in w_bits and not PITRecord.present(graph) else []
    g = graph.gs
    op_types = tuple(op_types)
    temp = gs.Constant(TEMPERATURE, np.array([temperature], np.float32))
    outputs = {t.name for t in g.outputs}

    layers, activations, skipped = [], {}, []
    for node in list(g.nodes):
        if (node.domain or "") not in ("", "ai.onnx") or not _selected(node.name, node.op, include, exclude, op_types):
            continue
        plan = _plan_layer(node)
        if isinstance(plan, str):
            skipped.append(SkippedLayer(node=node.name, op=node.op, reason=plan))
            continue
        axis, channels = plan
        bits = w_bits if not _reaches_output(node, outputs) else tuple(b for b in w_bits if b)
        act = _activation_quantizer(g, node.inputs[0], activations, a_bits, sampling, clip_init, temp)
        layers.append(_insert_weight_quantizer(g, node, axis, channels, bits, per_channel, weight_scale,
                                               sampling, temp, act, quantize_bias))

    g.cleanup(remove_unused_graph_inputs=False).toposort()
    zero_bit_layers = {layer.node for layer in layers if 0 in layer.bits}
    MPSRecord(w_precisions=list(w_bits), a_precisions=list(a_bits), per_channel=per_channel,
              weight_scale=weight_scale, sampling=sampling, temperature=TEMPERATURE, layers=layers,
              activations=list(activations.values()), skipped=skipped, folded_bn=folded,
              groups=[GroupRecord.of(group) for group in groups if group.size > 1 and zero_bit_layers.intersection(
                  [p.node for p in group.producers] + group.depthwise)]).store(graph)
    _register_with_pit(graph, layers)
    return add_functions(graph, fn.functions())


# -- validation -------------------------------------------------------------------------------
def _precisions(values: Iterable[int], what: str, *, allow_zero: bool, source) -> tuple[int, ...]:
    bits = tuple(sorted({int(b) for b in values}))
    low = 0 if allow_zero else 2
    if not bits or any(b < low or b > MAX_BITS or b == 1 for b in bits):
        raise PassError(f"{what} must be bit-widths in {{{'0, ' if allow_zero else ''}2…{MAX_BITS}}}, "
                        f"got {list(values)}", file=source)
    return bits


# -- layers -----------------------------------------------------------------------------------
def _plan_layer(node: gs.Node) -> tuple[int, int] | str:
    """(output-channel axis of the weight or -1, output channels) or the reason to skip."""
    if len(node.inputs) < 2 or not isinstance(weight_source(node.inputs[1]), gs.Constant):
        return "the weight is not a constant"
    weight = node.inputs[1]
    if weight.shape is None or any(not isinstance(d, (int, np.integer)) for d in weight.shape):
        return "the weight shape is unknown"
    if isinstance(node.inputs[0], gs.Constant):
        return "the input is a constant"
    if weight_source(node.inputs[1]).values.dtype != np.float32:
        return "the weight is not float32"
    shape = [int(d) for d in weight.shape]
    if node.op == "Conv":
        return 0, shape[0]
    if node.op == "ConvTranspose":
        return (1, shape[1]) if int(node.attrs.get("group", 1)) == 1 else (-1, shape[1] * int(node.attrs["group"]))
    if node.op == "Gemm":
        return (0, shape[0]) if node.attrs.get("transB", 0) else (1, shape[1])
    if node.op == "MatMul":
        if len(shape) != 2:
            return "a batched (rank > 2) MatMul weight"
        return 1, shape[1]
    return f"op {node.op} is not a layer"


def _reaches_output(node: gs.Node, outputs: set[str]) -> bool:
    """Whether the layer's output reaches a graph output without passing through another layer."""
    stack, seen = [node.outputs[0]], set()
    while stack:
        tensor = stack.pop()
        if tensor.name in seen:
            continue
        seen.add(tensor.name)
        if tensor.name in outputs:
            return True
        for consumer in tensor.outputs:
            if consumer.op in LAYER_OPS and len(consumer.inputs) > 1 and consumer.inputs[0] is tensor \
                    and isinstance(weight_source(consumer.inputs[1]), gs.Constant):
                continue
            stack.extend(consumer.outputs)
    return False


def nonnegative(tensor: gs.Tensor, depth: int = 32) -> bool:
    """Whether every value of ``tensor`` is ≥ 0 by construction (ReLU-like producers)."""
    if isinstance(tensor, gs.Constant):
        return bool(np.all(np.asarray(tensor.values) >= 0))
    if depth == 0 or not tensor.inputs:
        return False
    producer = tensor.inputs[0]
    if (producer.domain or "") not in ("", "ai.onnx"):
        return False
    if producer.op in _NONNEGATIVE_OPS:
        return True
    if producer.op == "Clip":
        low = producer.inputs[1] if len(producer.inputs) > 1 and producer.inputs[1].name else None
        if low is None:
            return "min" in producer.attrs and float(producer.attrs["min"]) >= 0
        return isinstance(low, gs.Constant) and float(np.asarray(low.values).reshape(-1)[0]) >= 0
    if producer.op in _PASS_THROUGH_OPS:
        data = producer.inputs if producer.op == "Concat" else producer.inputs[:1]
        return all(nonnegative(t, depth - 1) for t in data)
    if producer.op in ("Mul", "Add", "Max", "Min"):
        return all(nonnegative(t, depth - 1) for t in producer.inputs) if producer.op != "Max" \
            else any(nonnegative(t, depth - 1) for t in producer.inputs)
    return False


def _activation_quantizer(g: gs.Graph, tensor: gs.Tensor, activations: dict, bits: tuple[int, ...],
                          sampling: str, clip_init: float, temp: gs.Constant) -> ActivationQuantizer:
    """The quantizer of ``tensor`` (one per tensor, shared by the layers reading it)."""
    if tensor.name in activations:
        return activations[tensor.name]
    base = tensor.name
    signed = not nonnegative(tensor)
    alpha = gs.Constant(f"{base}.mps_a_alpha", np.array([b / max(bits) for b in bits], np.float32))
    clip = gs.Constant(f"{base}.mps_a_clip", np.full(len(bits), clip_init, np.float32))
    quantized = gs.Variable(f"{base}.mps_q", dtype=np.float32, shape=tensor.shape)
    scale = gs.Variable(f"{base}.mps_scale", dtype=np.float32, shape=[1])
    node = gs.Node(fn.ACT_QUANT, name=f"{base}/mps_act_quant", domain=PLINIO_DOMAIN,
                   attrs={"bits": list(bits), "signed": int(signed), "sampling": sampling},
                   inputs=[tensor, alpha, clip, temp], outputs=[quantized, scale])
    g.nodes.append(node)
    record = ActivationQuantizer(tensor=base, node=node.name, output=quantized.name, scale=scale.name,
                                 alpha=alpha.name, clip=clip.name, bits=list(bits), signed=signed, layers=[])
    activations[base] = record
    return record


def _insert_weight_quantizer(g: gs.Graph, node: gs.Node, axis: int, channels: int, bits: tuple[int, ...],
                             per_channel: bool, weight_scale: str, sampling: str, temp: gs.Constant,
                             act: ActivationQuantizer, quantize_bias: bool) -> QuantizedLayer:
    tensors = g.tensors()
    weight = node.inputs[1]
    rank = len(weight.shape)
    channel_choice = per_channel and axis >= 0 and len(bits) > 1  # one precision: nothing to choose
    if not channel_choice:  # 0 bits prunes channels, never a whole layer
        bits = tuple(b for b in bits if b)
    scale_axis = axis if (weight_scale == "per_channel" and axis >= 0) else -1
    reduce_axes = [a for a in range(rank) if a != scale_axis]
    init = np.array([b / max(bits) for b in bits], np.float32)
    alpha_values = np.repeat(init[:, None], channels, axis=1) if channel_choice else init
    alpha = gs.Constant(f"{node.name}.mps_w_alpha", alpha_values)
    quantized = gs.Variable(f"{node.name}/mps_w", dtype=np.float32, shape=list(weight.shape))
    w_scale = gs.Variable(f"{node.name}/mps_w_scale", dtype=np.float32,
                          shape=[channels if scale_axis >= 0 else 1])
    wq = gs.Node(fn.WEIGHT_QUANT, name=f"{node.name}/mps_weight_quant", domain=PLINIO_DOMAIN,
                 attrs={"bits": list(bits), "axis": int(axis if channel_choice or scale_axis >= 0 else -1),
                        "reduce_axes": reduce_axes, "sampling": sampling},
                 inputs=[weight, alpha, temp], outputs=[quantized, w_scale])
    g.nodes.append(wq)
    node.inputs[1] = quantized

    node.inputs[0] = tensors[act.output]
    act.layers.append(node.name)

    bias_quant, bias_name = None, None
    bias = _bias_input(node, channels) if quantize_bias else None
    if bias is not None:
        out = gs.Variable(f"{node.name}/mps_b", dtype=np.float32, shape=list(bias.shape))
        bq = gs.Node(fn.BIAS_QUANT, name=f"{node.name}/mps_bias_quant", domain=PLINIO_DOMAIN,
                     inputs=[bias, tensors[act.scale], w_scale], outputs=[out])
        g.nodes.append(bq)
        node.inputs[2] = out
        bias_quant, bias_name = bq.name, weight_source(bias).name
    return QuantizedLayer(node=node.name, op=node.op, weight=weight_source(weight).name, weight_quant=wq.name,
                          alpha=alpha.name, bits=list(bits), per_channel=channel_choice, axis=int(axis),
                          scale_axis=int(scale_axis), reduce_axes=reduce_axes, channels=int(channels),
                          activation=act.tensor, bias_quant=bias_quant, bias=bias_name)


def _bias_input(node: gs.Node, channels: int) -> gs.Tensor | None:
    """The constant [C] bias a Conv/ConvTranspose/Gemm adds (Gemm only with alpha = beta = 1)."""
    if node.op not in ("Conv", "ConvTranspose", "Gemm") or len(node.inputs) < 3 or not node.inputs[2].name:
        return None
    if node.op == "Gemm" and (float(node.attrs.get("alpha", 1.0)) != 1.0 or float(node.attrs.get("beta", 1.0)) != 1.0):
        return None
    bias = node.inputs[2]
    source = weight_source(bias)
    if not isinstance(source, gs.Constant) or tuple(np.asarray(source.values).shape) != (channels,) \
            or source.values.dtype != np.float32:
        return None
    return bias


def _register_with_pit(graph: Graph, layers: list[QuantizedLayer]) -> None:
    """With PIT masks in the graph, per-channel logits are sliced with the channels PIT prunes:
    they are recorded as members of the PIT channel group of their layer's output."""
    info = PITRecord.of(graph)
    if info is None:
        return
    groups = {group.id: group for group in info.groups}
    changed = False
    for layer in layers:
        gid, channels = info.layer_output.get(layer.node), None
        if gid is None and layer.node in info.layer_output_part:
            gid, channels = info.layer_output_part[layer.node]  # the layer holds part of it
        if layer.per_channel and gid is not None and gid in groups:
            groups[gid].members.append(Member(node=layer.node, tensor=layer.alpha, axis=1, offset=0,
                                              channels=None if channels is None else list(channels)))
            changed = True
    if changed:
        info.store(graph)


# -- BatchNormalization folding ---------------------------------------------------------------
def fold_batchnorm(graph: Graph) -> list[str]:
    """Fold every BatchNormalization that directly follows a Conv/ConvTranspose/Gemm (whose
    output nothing else reads) into that layer's weight and bias, in place; returns the folded
    BN node names. In eval mode the graph computes what it computed before (up to rounding):
    W' = W·γ/√(σ²+ε) per output channel, b' = (b − μ)·γ/√(σ²+ε) + β."""
    g = graph.gs
    outputs = {id(t) for t in g.outputs}
    folded = []
    for bn in list(g.nodes):
        if bn.op != "BatchNormalization" or (bn.domain or "") not in ("", "ai.onnx"):
            continue
        x = bn.inputs[0]
        if len(x.inputs) != 1 or len(x.outputs) != 1 or id(x) in outputs:
            continue
        if any(t.name for t in bn.outputs[1:]):
            continue
        layer = x.inputs[0]
        params = bn.inputs[1:5]
        if layer.op not in ("Conv", "ConvTranspose", "Gemm") or (layer.domain or "") not in ("", "ai.onnx") \
                or not all(isinstance(t, gs.Constant) for t in params):
            continue
        plan = _plan_layer(layer)
        if isinstance(plan, str) or plan[0] < 0 or not isinstance(layer.inputs[1], gs.Constant):
            continue
        axis, channels = plan
        if layer.op == "Gemm" and (float(layer.attrs.get("alpha", 1.0)) != 1.0 or float(layer.attrs.get("beta", 1.0)) != 1.0):
            continue
        has_bias = len(layer.inputs) > 2 and bool(layer.inputs[2].name)
        if has_bias and (not isinstance(layer.inputs[2], gs.Constant)
                         or tuple(np.asarray(layer.inputs[2].values).shape) != (channels,)):
            continue
        gamma, beta, mean, var = (np.asarray(t.values, np.float64) for t in params)
        factor = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        weight = np.asarray(layer.inputs[1].values, np.float64)
        shape = [1] * weight.ndim
        shape[axis] = -1
        new_weight = (weight * factor.reshape(shape)).astype(np.float32)
        bias = np.asarray(layer.inputs[2].values, np.float64) if has_bias else np.zeros(channels)
        new_bias = ((bias - mean) * factor + beta).astype(np.float32)
        layer.inputs[1] = gs.Constant(f"{layer.name}.weight_bn_folded", new_weight)
        bias_const = gs.Constant(f"{layer.name}.bias_bn_folded", new_bias)
        if len(layer.inputs) > 2:
            layer.inputs[2] = bias_const
        else:
            layer.inputs.append(bias_const)
        layer.outputs = [bn.outputs[0]]
        bn.outputs.clear()
        bn.inputs.clear()
        folded.append(bn.name)
    if folded:
        g.cleanup(remove_unused_graph_inputs=False).toposort()
    return folded
