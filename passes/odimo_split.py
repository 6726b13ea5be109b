"""Finalize ODiMO: split every mapped layer into one sub-layer per accelerator it uses.

For each layer of the `ODiMORecord`, with the argmax accelerator of every output channel (what
the searchable module evaluates in eval mode):

* channels of accelerator k are regrouped into a sub-layer ``<layer>/odimo/<accelerator>``: the
  same op and attributes, the weight rows (and bias entries) of those channels, and its own MPS
  weight (and bias) quantizer whose logits are the channels' columns — so `FoldQuantizers`,
  which runs next, quantizes it at the accelerator's precision exactly as the whole layer was;
* the sub-layers read the layer's (shared) quantized input, and a ``Concat`` on the channel
  axis joins their outputs in the regrouped order. Consumers see the original order again: when
  every reader is a dense Conv reached through channel-wise ops only (ReLU, pooling, the
  per-tensor activation quantizer), its weight's input channels are permuted instead (exact: the
  per-output-channel weight scales do not change); otherwise a ``Gather`` on the channel axis
  (``<layer>/odimo/restore_order``) restores the order (neither when the regrouped order already
  is the original one);
* an accelerator no channel chose gets no sub-layer; a layer on one accelerator stays whole
  (its name unchanged).

Which node runs where is written for deployment tools to the model's ``metadata_props`` under
``odimo.mapping`` (JSON, kept in the deployable file; `MAPPING_KEY`): ``accelerators`` (name →
weight and activation bits), ``nodes`` (every mapped node → its accelerator) and ``layers``
(original layer → its sub-layers, each with its accelerator and original output channels).
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from plinio_onnx.cost.spec import weight_source
from plinio_onnx.errors import PassError
from plinio_onnx.functions import mps as fn
from plinio_onnx.graph import PLINIO_DOMAIN, Graph
from plinio_onnx.records import MappedLayer, MPSRecord, ODiMORecord, QuantizedLayer

from .infra import ConsumingPass
from .precision import detach

__all__ = ["MAPPING_KEY", "SplitAccelerators", "split_accelerators"]

MAPPING_KEY = "odimo.mapping"


class SplitAccelerators(ConsumingPass):
    """One sub-layer per used accelerator, joined in the original channel order (module
    docstring). Runs before `FoldQuantizers` (it leaves MPS quantizers for it to fold)."""

    record = ODiMORecord

    def apply(self, graph: Graph, info: ODiMORecord) -> None:
        mps = MPSRecord.of(graph)
        if mps is None:
            raise PassError("an ODiMO graph without its MPS record", file=graph.source)
        g = graph.gs
        nodes = {n.name: n for n in g.nodes}
        tensors = g.tensors()
        quantized = {layer.node: layer for layer in mps.layers}
        renamed: dict[str, list[QuantizedLayer]] = {}
        mapping = {"accelerators": {a.name: {"weight_bits": a.weight_bits, "act_bits": a.act_bits}
                                    for a in info.accelerators}, "nodes": {}, "layers": {}}
        for mapped in info.layers:
            layer = quantized[mapped.node]
            alpha = np.asarray(tensors[layer.alpha].values)
            choice = np.argmax(alpha, axis=0) if mapped.per_channel else \
                np.full(layer.channels, int(np.argmax(alpha)))
            used = [k for k in range(len(mapped.accelerators)) if (choice == k).any()]
            if len(used) == 1:
                parts = {mapped.node: (mapped.accelerators[used[0]], list(range(layer.channels)))}
            else:
                parts, renamed[mapped.node] = _split(graph, nodes, tensors, layer, mapped, choice, used)
            mapping["layers"][mapped.node] = {name: {"accelerator": acc, "channels": [int(c) for c in channels]}
                                              for name, (acc, channels) in parts.items()}
            mapping["nodes"].update({name: acc for name, (acc, _) in parts.items()})
        _update_record(mps, renamed).store(graph)
        g.cleanup(remove_unused_graph_inputs=False).toposort()
        graph.metadata[MAPPING_KEY] = json.dumps(mapping)


def split_accelerators(graph: Graph, **options) -> Graph:
    """Split the mapped layers of ``graph`` in place (`SplitAccelerators`); returns ``graph``."""
    return SplitAccelerators()(graph).graph


def _split(graph: Graph, nodes: dict, tensors: dict, layer: QuantizedLayer, mapped: MappedLayer,
           choice: np.ndarray, used: list[int]) -> tuple[dict, list[QuantizedLayer]]:
    """Replace ``layer`` by its sub-layers, a Concat and (if needed) a Gather; returns
    ({sub-layer: (accelerator, channels)}, the sub-layers' quantizer records)."""
    g = graph.gs
    node, wq = nodes[layer.node], nodes[layer.weight_quant]
    bq = nodes[layer.bias_quant] if layer.bias_quant else None
    weight = weight_source(wq.inputs[0])
    if not isinstance(weight, gs.Constant):
        raise PassError("the weight is not a constant at export", file=graph.source, node=layer.node, op=layer.op)
    weights, alpha = np.asarray(weight.values), np.asarray(tensors[layer.alpha].values)
    parts, records, outputs, order = {}, [], [], []
    for k in used:
        accelerator = mapped.accelerators[k]
        channels = np.flatnonzero(choice == k)
        name = f"{layer.node}/odimo/{accelerator}"
        w = gs.Constant(f"{layer.weight}.{accelerator}_{layer.node}", np.take(weights, channels, axis=layer.axis))
        a = gs.Constant(f"{layer.node}.{accelerator}.mps_w_alpha", np.ascontiguousarray(alpha[:, channels]))
        w_out = gs.Variable(f"{name}/mps_w", dtype=np.float32)
        w_scale = gs.Variable(f"{name}/mps_w_scale", dtype=np.float32)
        sub_wq = gs.Node(fn.WEIGHT_QUANT, name=f"{name}/mps_weight_quant", domain=PLINIO_DOMAIN,
                         attrs=dict(wq.attrs), inputs=[w, a, wq.inputs[2]], outputs=[w_out, w_scale])
        inputs, bias_quant, bias_name = [node.inputs[0], w_out], None, None
        if bq is not None:
            b = gs.Constant(f"{layer.bias}.{accelerator}_{layer.node}",
                            np.asarray(weight_source(bq.inputs[0]).values)[channels])
            b_out = gs.Variable(f"{name}/mps_b", dtype=np.float32)
            g.nodes.append(gs.Node(fn.BIAS_QUANT, name=f"{name}/mps_bias_quant", domain=PLINIO_DOMAIN,
                                   inputs=[b, bq.inputs[1], w_scale], outputs=[b_out]))
            inputs.append(b_out)
            bias_quant, bias_name = f"{name}/mps_bias_quant", b.name
        elif len(node.inputs) > 2 and node.inputs[2].name:
            inputs.append(_sliced_bias(graph, node, layer, accelerator, channels))
        out = gs.Variable(f"{name}/output", dtype=np.float32)
        g.nodes.extend([sub_wq, gs.Node(node.op, name=name, attrs=dict(node.attrs), inputs=inputs, outputs=[out])])
        outputs.append(out)
        order.extend(channels.tolist())
        parts[name] = (accelerator, channels)
        records.append(replace(layer, node=name, weight=w.name, weight_quant=sub_wq.name, alpha=a.name,
                               channels=int(channels.size), bias_quant=bias_quant, bias=bias_name))
    result = node.outputs[0]
    for dead in (node, wq, bq):
        if dead is not None:
            detach(dead)
    axis = mapped.channel_axis
    restore = np.argsort(np.asarray(order)).astype(np.int64)
    if np.array_equal(restore, np.arange(restore.size)) or _fold_into_consumers(g, result, np.asarray(order)):
        g.nodes.append(gs.Node("Concat", name=f"{layer.node}/odimo/concat", attrs={"axis": axis},
                               inputs=outputs, outputs=[result]))
    else:
        joined = gs.Variable(f"{layer.node}/odimo/joined", dtype=np.float32)
        g.nodes.append(gs.Node("Concat", name=f"{layer.node}/odimo/concat", attrs={"axis": axis},
                               inputs=outputs, outputs=[joined]))
        g.nodes.append(gs.Node("Gather", name=f"{layer.node}/odimo/restore_order", attrs={"axis": axis},
                               inputs=[joined, gs.Constant(f"{layer.node}/odimo/order", restore)],
                               outputs=[result]))
    return parts, records


def _fold_into_consumers(g: gs.Graph, tensor: gs.Tensor, order: np.ndarray) -> bool:
    """Permute the input channels of every layer that reads ``tensor`` (position j then holds
    original channel ``order[j]``), when each path to them runs through channel-wise ops only
    and each of them is a dense Conv whose float weight nothing else reads; False (nothing
    changed) otherwise, and the caller restores the order with a Gather."""
    outputs = {id(t) for t in g.outputs}
    weights, stack, seen = [], [tensor], set()
    while stack:
        current = stack.pop()
        if id(current) in outputs:
            return False
        for consumer in current.outputs:
            if id(consumer) in seen:
                continue
            seen.add(id(consumer))
            if consumer.inputs[0] is not current or any(current is t for t in consumer.inputs[1:]):
                return False
            if consumer.op in _CHANNEL_WISE and (consumer.domain or "") in ("", "ai.onnx") \
                    or consumer.op == fn.ACT_QUANT and (consumer.domain or "") == PLINIO_DOMAIN:
                if any(t.outputs for t in consumer.outputs[1:]) and consumer.op != fn.ACT_QUANT:
                    return False     # MaxPool's indices; the act quantizer's second output is its scale
                stack.append(consumer.outputs[0])
                continue
            weight = _dense_conv_weight(consumer)
            if weight is None:
                return False
            weights.append(weight)
    for weight in {id(w): w for w in weights}.values():
        weight.values = np.ascontiguousarray(np.take(np.asarray(weight.values), order, axis=1))
    return bool(weights)


#: Ops that act on every channel alike (no per-channel constants): a permutation passes through.
_CHANNEL_WISE = {"Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LeakyRelu", "Sigmoid",
                 "Tanh", "HardSwish", "HardSigmoid", "Identity"}


def _dense_conv_weight(node: gs.Node) -> gs.Constant | None:
    """The float weight constant of a dense Conv (directly or through its MPS weight quantizer)
    when only that Conv reads it; None otherwise."""
    if node.op != "Conv" or (node.domain or "") not in ("", "ai.onnx") or int(node.attrs.get("group", 1)) != 1:
        return None
    weight = node.inputs[1]
    if not isinstance(weight, gs.Constant) and weight.inputs and weight.inputs[0].op == fn.WEIGHT_QUANT:
        if len(weight.outputs) != 1:
            return None
        weight = weight.inputs[0].inputs[0]
    return weight if isinstance(weight, gs.Constant) and len(weight.outputs) == 1 else None


def _sliced_bias(graph: Graph, node: gs.Node, layer: QuantizedLayer, accelerator: str,
                 channels: np.ndarray) -> gs.Tensor:
    """An unquantized bias for a sub-layer: its channels' entries (a broadcast one as it is)."""
    bias = weight_source(node.inputs[2])
    if not isinstance(bias, gs.Constant):
        raise PassError("the bias is not a constant at export", file=graph.source, node=layer.node, op=layer.op)
    values = np.asarray(bias.values)
    if values.ndim == 0 or values.shape[-1] != layer.channels:
        return bias
    return gs.Constant(f"{bias.name}.{accelerator}_{layer.node}", np.take(values, channels, axis=-1))


def _update_record(mps: MPSRecord, renamed: dict[str, list[QuantizedLayer]]) -> MPSRecord:
    """The MPS record with every split layer replaced by its sub-layers."""
    layers = []
    for layer in mps.layers:
        layers.extend(renamed.get(layer.node, [layer]))
    for act in mps.activations:
        act.layers = [name for node in act.layers for name in
                      ([r.node for r in renamed[node]] if node in renamed else [node])]
    return replace(mps, layers=layers)
