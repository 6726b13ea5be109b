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

import numpy as np
import onnx_graphsurgeon as gs

from plinio_onnx.errors import PassError
from plinio_onnx.functions import pit as fn
from plinio_onnx.functions import pit_keep
from plinio_onnx.graph import PLINIO_DOMAIN, Graph
from plinio_onnx.records import Permutation, PITRecord, SuperNetRecord, TimeMaskRecord

from .infra import ConsumingPass
from .shuffle import gathers_as_shuffles

PIT_FUNCTIONS = (fn.CHANNEL_MASK, fn.BLOCK_MASK, fn.MASK_WEIGHT, fn.TIME_MASK)


class PruneChannels(ConsumingPass):
    """Apply the PIT masks (module docstring). Requires the SuperNet choices picked first: the
    groups whose readers all sat in dropped branches are then recognised by their missing masks."""

    record = PITRecord

    def requires(self, graph: Graph) -> None:
        if PITRecord.present(graph) and SuperNetRecord.present(graph):
            raise PassError("pick the SuperNet branches (pick_branches) before pruning PIT channels",
                            file=graph.source)

    def apply(self, graph: Graph, info: PITRecord) -> None:
        _prune(graph, info)


def prune_channels(graph: Graph, **options) -> Graph:
    """Apply the PIT masks of ``graph`` in place (`PruneChannels`); returns ``graph``."""
    return PruneChannels()(graph).graph


def _prune(graph: Graph, info: PITRecord) -> None:
    threshold = info.threshold
    tensors = graph.gs.tensors()
    selections = []
    for group in info.groups:
        if any(name not in tensors for name in group.alpha):
            continue  # its readers were all in SuperNet branches that were not picked
        keep = pit_keep.group_keep(lambda name: tensors[name].values, group, threshold)
        selections.append((group, np.setdiff1d(np.arange(group.size), keep)))
    # Kernels first: a grouped Conv that slicing splits into one Conv per group copies them.
    nodes = {n.name: n for n in graph.gs.nodes}
    for entry in info.time:
        if entry.node in nodes:
            _shrink_kernel(nodes[entry.node], tensors, entry, threshold)
    slice_groups(graph, selections)

    _bypass_plinio_nodes(graph.gs)
    gathers_as_shuffles(graph.gs)


def slice_groups(graph: Graph, selections) -> None:
    """Remove channels from ``graph`` in place: ``selections`` pairs a channel group record
    (`plinio_onnx.records.GroupRecord`) with the group's channel
    indices to remove. Every coupled tensor loses them: producers' weight rows and biases,
    per-channel members, consumers' input features, constant Reshape widths; depthwise ``group``
    attributes follow. Records of nodes that are no longer in the graph (a SuperNet branch that
    was not picked) are skipped."""
    g = graph.gs
    tensors = g.tensors()
    nodes = {n.name: n for n in g.nodes}
    keep_masks: dict[tuple[str, int], np.ndarray] = {}
    grouped_inputs: dict[str, np.ndarray] = {}   # grouped Conv -> kept input channels
    cut_inputs: dict[tuple[str, int], np.ndarray] = {}   # (Split / Slice, axis) -> kept inputs

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
        for producer in group.producers:
            local = _local(producer, pruned)
            drop(producer.node, producer.weight, producer.axis, local)
            if producer.bias:
                drop(producer.node, producer.bias, 0, local)
        for member in group.members:
            drop(member.node, member.tensor, member.axis, member.offset + _local(member, pruned))
        for consumer in group.consumers:
            inner = consumer.inner
            local = _local(consumer, pruned)
            features = (consumer.offset + local[:, None] * inner + np.arange(inner)[None, :]).reshape(-1)
            if consumer.groups > 1 and consumer.node in nodes:
                node = nodes[consumer.node]
                width = int(_weight_constant(node).values.shape[1]) * consumer.groups
                grouped_inputs.setdefault(node.name, np.ones(width, dtype=bool))[features] = False
            else:
                drop(consumer.node, consumer.weight, consumer.axis, features)
        for reshape in group.reshapes:
            if reshape.node not in nodes:
                continue
            shape = nodes[reshape.node].inputs[1]
            values = np.array(shape.values)
            values[reshape.index] -= _local(reshape, pruned).size * reshape.per_channel
            _replace_constant(g, nodes[reshape.node], 1, values)
        for cut in group.cuts:
            node = nodes.get(cut.node)
            if node is not None:
                width = int(node.inputs[0].shape[cut.axis])
                kept = cut_inputs.setdefault((node.name, cut.axis), np.ones(width, dtype=bool))
                kept[cut.offset + _local(cut, pruned)] = False
        for permutation in group.permutations:
            if permutation.node in nodes:
                _reindex_gather(g, nodes[permutation.node], permutation, pruned)

    for (name, axis), kept in cut_inputs.items():
        _recut(g, nodes[name], axis, kept)

    for node in list(g.nodes):
        if _is_grouped_conv(node):
            _slice_grouped_conv(g, node, keep_masks, grouped_inputs.get(node.name))

    for (name, axis), mask in keep_masks.items():
        tensor = tensors[name]
        tensor.values = np.compress(mask, np.asarray(tensor.values), axis=axis)

    for group, pruned in selections:
        for dw in group.depthwise:
            if dw in nodes:
                node = nodes[dw]
                node.attrs["group"] = int(_weight_constant(node).values.shape[0])


def _local(record, pruned: np.ndarray) -> np.ndarray:
    """The record's own positions of the group channels ``pruned`` (permuted spaces map them)."""
    channels = record.channels
    return pruned if channels is None else np.flatnonzero(np.isin(np.asarray(channels), pruned))


def _recut(g: gs.Graph, node: gs.Node, axis: int, kept: np.ndarray) -> None:
    """A Split / Slice of channels after pruning: the same cut, counting kept channels only."""
    before = np.concatenate([[0], np.cumsum(kept)])
    if node.op == "Split":
        bounds = np.concatenate([[0], np.cumsum([int(out.shape[axis]) for out in node.outputs])])
        sizes = np.array([before[b] - before[a] for a, b in zip(bounds[:-1], bounds[1:])], np.int64)
        node.attrs.pop("num_outputs", None)
        node.attrs.pop("split", None)
        if len(node.inputs) > 1 and node.inputs[1].name:
            _replace_constant(g, node, 1, sizes)
        else:
            node.inputs.append(gs.Constant(f"{node.name}/split_pruned", sizes))
        return
    rank = len(node.inputs[0].shape)
    starts, ends = np.array(node.inputs[1].values), np.array(node.inputs[2].values)
    axes = (np.array(node.inputs[3].values).reshape(-1) % rank if len(node.inputs) > 3 and node.inputs[3].name
            else np.arange(starts.size))
    k = int(np.flatnonzero(axes == axis)[0])
    begin, end, _ = slice(int(starts[k]), int(ends[k])).indices(kept.size)  # as Slice clamps
    starts[k], ends[k] = before[begin], before[end]
    _replace_constant(g, node, 1, starts)
    _replace_constant(g, node, 2, ends)


def _reindex_gather(g: gs.Graph, node: gs.Node, permutation: Permutation, pruned: np.ndarray) -> None:
    """A channel Gather after pruning: every kept output channel, from where its input now is."""
    indices = np.asarray(node.inputs[1].values).astype(np.int64)
    size = indices.size
    channels_in = np.arange(size) if permutation.channels_in is None else np.asarray(permutation.channels_in)
    channels_out = np.arange(size) if permutation.channels_out is None else np.asarray(permutation.channels_out)
    kept_in = np.flatnonzero(~np.isin(channels_in, pruned))
    kept_out = np.flatnonzero(~np.isin(channels_out, pruned))
    _replace_constant(g, node, 1, np.searchsorted(kept_in, indices[kept_out] % size).astype(np.int64))


def _slice_grouped_conv(g: gs.Graph, node: gs.Node, keep_masks: dict, in_keep: np.ndarray | None) -> None:
    """Slice a grouped Conv's output rows and its groups' input columns. Groups left with equal
    counts stay one grouped Conv; uneven ones become one Conv per group on a Slice of the input,
    concatenated: exactly what the masked grouped Conv computed, with no zero weights kept."""
    weight = _weight_constant(node)
    values = np.asarray(weight.values)
    groups = int(node.attrs["group"])
    out_keep = keep_masks.pop((weight.name, 0), np.ones(values.shape[0], dtype=bool))
    bias = node.inputs[2] if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) else None
    if bias is not None:
        keep_masks.pop((bias.name, 0), None)
    in_keep = np.ones(values.shape[1] * groups, dtype=bool) if in_keep is None else in_keep
    if out_keep.all() and in_keep.all():
        return
    per_out, per_in = values.shape[0] // groups, values.shape[1]
    rows = [k * per_out + np.flatnonzero(out_keep[k * per_out:(k + 1) * per_out]) for k in range(groups)]
    cols = [np.flatnonzero(in_keep[k * per_in:(k + 1) * per_in]) for k in range(groups)]
    bias_values = None if bias is None else np.asarray(bias.values)
    if len({r.size for r in rows}) == 1 and len({c.size for c in cols}) == 1 and cols[0].size:
        node.inputs[1] = gs.Constant(f"{weight.name}_pruned",
                                     np.concatenate([values[r][:, c] for r, c in zip(rows, cols)]))
        if bias is not None:
            node.inputs[2] = gs.Constant(f"{bias.name}_pruned", bias_values[out_keep])
        return
    x, out = node.inputs[0], node.outputs[0]
    starts = np.concatenate([[0], np.cumsum([c.size for c in cols])])
    parts = []
    for k in range(groups):
        if rows[k].size == 0:
            continue  # a group with no output left reads nothing
        name = f"{node.name}/group{k}"
        if cols[k].size:
            begin, end, kernel = starts[k], starts[k + 1], values[rows[k]][:, cols[k]]
        else:  # every input of this group is gone: its outputs are the bias alone
            begin, end = 0, 1
            kernel = np.zeros((rows[k].size, 1) + values.shape[2:], values.dtype)
        piece = gs.Variable(f"{name}/input", dtype=x.dtype)
        g.nodes.append(gs.Node("Slice", name=f"{name}/slice", inputs=[
            x, gs.Constant(f"{name}/starts", np.array([begin], np.int64)),
            gs.Constant(f"{name}/ends", np.array([end], np.int64)),
            gs.Constant(f"{name}/axes", np.array([1], np.int64))], outputs=[piece]))
        inputs = [piece, gs.Constant(f"{name}/W", np.ascontiguousarray(kernel))]
        if bias is not None:
            inputs.append(gs.Constant(f"{name}/B", bias_values[rows[k]]))
        result = gs.Variable(f"{name}/output", dtype=out.dtype)
        g.nodes.append(gs.Node("Conv", name=name, attrs={**node.attrs, "group": 1}, inputs=inputs, outputs=[result]))
        parts.append(result)
    node.outputs.clear()
    if len(parts) == 1:
        parts[0].inputs[0].outputs = [out]
    else:
        g.nodes.append(gs.Node("Concat", name=f"{node.name}/concat", attrs={"axis": 1}, inputs=parts, outputs=[out]))


def _replace_constant(g: gs.Graph, node: gs.Node, index: int, values: np.ndarray) -> None:
    old = node.inputs[index]
    if len(old.outputs) > 1:  # shared: give this node its own copy
        node.inputs[index] = gs.Constant(f"{old.name}_{node.name}", values)
    else:
        old.values = values


def _weight_constant(node: gs.Node) -> gs.Constant | None:
    """The initializer behind a layer's weight input, through any PIT mask nodes (None for a
    run-time weight)."""
    tensor = node.inputs[1]
    while not isinstance(tensor, gs.Constant):
        if not tensor.inputs or not tensor.inputs[0].inputs:
            return None
        tensor = tensor.inputs[0].inputs[0]
    return tensor


def _is_grouped_conv(node: gs.Node) -> bool:
    """A grouped Conv the channel analysis prunes (not depthwise: more than one input per group)."""
    if node.op != "Conv" or int(node.attrs.get("group", 1)) < 2:
        return False
    weight = _weight_constant(node)
    return weight is not None and weight.values.shape[1] > 1


def _shrink_kernel(node: gs.Node, tensors, entry: TimeMaskRecord, threshold: float) -> None:
    """Export a masked Conv1d with the surviving taps only (`pit_keep.kernel_plan`)."""
    weight = _weight_constant(node)
    taps = pit_keep.tap_mask(tensors[entry.beta].values, tensors[entry.gamma].values, threshold)
    plan = pit_keep.kernel_plan(taps, entry.dilation, tuple(entry.pads))
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
