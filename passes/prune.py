"""Finalize PIT: binarize the masks, slice every coupled tensor, shrink kernels, drop the masks.

For every searched channel group, the kept channels are those whose |alpha| is above the
threshold (the last always). Producers lose output channels (weight rows, bias), per-channel
constants (BN, bias adds, PRelu slopes, depthwise weights) lose the same entries, consumers lose
the input features those channels occupy, constant Reshape widths shrink, depthwise ``group``
attributes follow. Masked 1-D kernels keep their surviving taps with the dilation they imply.
The ``ai.plinio`` PIT nodes and parameters disappear; the masked module's eval output is what the
pruned graph computes, because masks sit where consumers read (nothing a pruned channel emits
reaches a survivor).
"""
from __future__ import annotations

import json
import numpy as np
import onnx_graphsurgeon as gs

from plinio_onnx.finalize import finalizer
from plinio_onnx.functions import pit as fn
from plinio_onnx.graph import PLINIO_DOMAIN, Graph

from .pit import METADATA_KEY

PIT_FUNCTIONS = (fn.CHANNEL_MASK, fn.MASK_WEIGHT, fn.TIME_MASK)


@finalizer(order=20)
def prune_channels(graph: Graph, **options) -> Graph:
    """Apply the PIT masks of ``graph`` in place (see the module docstring); returns ``graph``."""
    record = graph.metadata.get(METADATA_KEY)
    if record is None:
        return graph
    info = json.loads(record)
    threshold = float(info["threshold"])
    tensors = graph.gs.tensors()
    selections = []
    for group in info["groups"]:
        keep = fn.channel_keep(tensors[group["alpha"]].values, threshold)
        selections.append((group, np.setdiff1d(np.arange(group["size"]), keep)))
    slice_groups(graph, selections)

    nodes = {n.name: n for n in graph.gs.nodes}
    for entry in info["time"]:
        if entry["node"] in nodes:
            _shrink_kernel(nodes[entry["node"]], tensors, entry, threshold)

    _bypass_plinio_nodes(graph.gs)
    del graph.metadata[METADATA_KEY]
    return graph


def slice_groups(graph: Graph, selections) -> None:
    """Remove channels from ``graph`` in place: ``selections`` pairs a channel group record (as
    the PIT pass stores it, `plinio_onnx.analysis.ChannelGroup` fields) with the group's channel
    indices to remove. Every coupled tensor loses them: producers' weight rows and biases,
    per-channel members, consumers' input features, constant Reshape widths; depthwise ``group``
    attributes follow. Records of nodes that are no longer in the graph (a SuperNet branch that
    was not picked) are skipped."""
    g = graph.gs
    tensors = g.tensors()
    nodes = {n.name: n for n in g.nodes}
    keep_masks: dict[tuple[str, int], np.ndarray] = {}

    def drop(node: str, tensor: str, axis: int, positions: np.ndarray) -> None:
        if node not in nodes or tensor not in tensors:
            return
        values = tensors[tensor].values
        key = (tensor, axis)
        if key not in keep_masks:
            keep_masks[key] = np.ones(values.shape[axis], dtype=bool)
        keep_masks[key][positions] = False

    for group, pruned in selections:
        pruned = np.asarray(pruned, dtype=np.int64)
        if pruned.size == 0:
            continue
        for producer in group["producers"]:
            drop(producer["node"], producer["weight"], producer["axis"], pruned)
            if producer["bias"]:
                drop(producer["node"], producer["bias"], 0, pruned)
        for member in group["members"]:
            drop(member["node"], member["tensor"], member["axis"], member["offset"] + pruned)
        for consumer in group["consumers"]:
            inner = consumer["inner"]
            features = (consumer["offset"] + pruned[:, None] * inner + np.arange(inner)[None, :]).reshape(-1)
            drop(consumer["node"], consumer["weight"], consumer["axis"], features)
        for reshape in group["reshapes"]:
            if reshape["node"] not in nodes:
                continue
            shape = nodes[reshape["node"]].inputs[1]
            values = np.array(shape.values)
            values[reshape["index"]] -= pruned.size * reshape["per_channel"]
            _replace_constant(g, nodes[reshape["node"]], 1, values)

    for (name, axis), mask in keep_masks.items():
        tensor = tensors[name]
        tensor.values = np.compress(mask, np.asarray(tensor.values), axis=axis)

    for group, pruned in selections:
        for dw in group["depthwise"]:
            if dw in nodes:
                node = nodes[dw]
                node.attrs["group"] = int(_weight_constant(node).values.shape[0])


def _replace_constant(g: gs.Graph, node: gs.Node, index: int, values: np.ndarray) -> None:
    old = node.inputs[index]
    if len(old.outputs) > 1:  # shared: give this node its own copy
        node.inputs[index] = gs.Constant(f"{old.name}_{node.name}", values)
    else:
        old.values = values


def _weight_constant(node: gs.Node) -> gs.Constant:
    """The initializer behind a layer's weight input, through any PIT mask nodes."""
    tensor = node.inputs[1]
    while not isinstance(tensor, gs.Constant):
        tensor = tensor.inputs[0].inputs[0]
    return tensor


def _shrink_kernel(node: gs.Node, tensors, entry: dict, threshold: float) -> None:
    """Export a masked Conv1d with the surviving taps only (`fn.kernel_plan`)."""
    weight = _weight_constant(node)
    taps = fn.tap_mask(tensors[entry["beta"]].values, tensors[entry["gamma"]].values, threshold)
    plan = fn.kernel_plan(taps, entry["dilation"], tuple(entry["pads"]))
    values = np.asarray(weight.values)
    zero = np.zeros_like(values[:, :, :1])
    weight.values = np.ascontiguousarray(np.concatenate(
        [values[:, :, j:j + 1] if j is not None else zero for j in plan.taps], axis=2))
    node.attrs["kernel_shape"] = [len(plan.taps)]
    node.attrs["dilations"] = [plan.dilation]
    node.attrs["pads"] = list(plan.pads)


def _bypass_plinio_nodes(g: gs.Graph) -> None:
    """Remove the PIT nodes: masked weights become the (sliced) weights themselves."""
    for node in g.nodes:
        if (node.domain or "") != PLINIO_DOMAIN or node.op not in PIT_FUNCTIONS:
            continue
        if node.op in (fn.MASK_WEIGHT, fn.TIME_MASK):
            source, result = node.inputs[0], node.outputs[0]
            for consumer in list(result.outputs):
                consumer.inputs = [source if t is result else t for t in consumer.inputs]
        node.inputs.clear()
        node.outputs.clear()
    g.cleanup(remove_unused_graph_inputs=False).toposort()
