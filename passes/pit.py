"""The PIT pass: make channels (and, for 1-D convolutions, receptive field and dilation) searchable.

For every prunable channel group (`plinio_onnx.analysis.channels`) whose producers are selected,
it adds a trainable ``alpha`` (one entry per channel, 1.0) and a ``PITChannelMask`` node, and
masks every consumer's weight where it reads the group (``PITMaskWeight``). For each selected
Conv1d with stride 1 and kernel > 1 it adds ``beta`` (one per tap) and ``gamma`` (one per
dilation level) and a ``PITTimeMask`` on the weight. The math is in `plinio_onnx.functions.pit`.

``channel_multiple`` N > 1 searches channels in blocks: a group's ``alpha`` has one entry per
block of N channels (`plinio_onnx.functions.pit_keep.block_index`: cut from the group's end, the
first block holding the C mod N left over) and a ``PITBlockMask`` spreads it over the channels, so
every pruned layer keeps a multiple of N channels (plus C mod N when the first block survives).
A group (or, in a group of atoms, every atom) of at most N channels is left whole. Coupled layers
(residual adds, depthwise chains, Concat parts) share their group's blocks. The block size is in
the record (`GroupRecord.block`): a checkpoint resumes with the same grouping.

Guarantee: with every mask parameter at its initial 1.0 the graph computes what it computed
before (every mask is all ones). The analysis result and the parameter names are stored in the
graph's metadata (`plinio_onnx.records.PITRecord`), so the searchable ONNX file is a complete checkpoint.
"""
from __future__ import annotations

import fnmatch
from typing import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from plinio_onnx.analysis import ChannelGroup, analyze_channels
from plinio_onnx.errors import PassError
from plinio_onnx.functions import add_functions
from plinio_onnx.functions import pit as fn
from plinio_onnx.functions import pit_keep
from plinio_onnx.functions.supernet import CHOICE
from plinio_onnx.graph import PLINIO_DOMAIN, Graph
from plinio_onnx.records import GroupRecord, PITRecord, SkippedGroup, TimeMaskRecord

from .infra import FunctionalPass, PassResult
from .shuffle import shuffles_as_gather

METADATA_KEY = PITRecord.KEY
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
MASKS = ("channels", "time", "dilation")


def _selected(name: str, op: str, include: Iterable[str] | None, exclude: Iterable[str] | None,
              op_types: Iterable[str]) -> bool:
    if op not in op_types:
        return False
    if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude))


def pit(graph: Graph, *, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
        op_types: Iterable[str] = LAYER_OPS, masks: Iterable[str] = MASKS,
        threshold: float = 0.5, grouped_convs: bool = True, channel_multiple: int = 1) -> Graph:
    """Return a searchable copy of ``graph`` with PIT masks (`PITPass`, see the module docstring).

    ``include`` / ``exclude``: fnmatch patterns on layer node names; a channel group is searched
    when all its producing layers are selected. ``masks``: any of "channels", "time",
    "dilation". ``threshold``: binarization threshold (kept means |θ| > threshold).
    ``grouped_convs``: prune grouped (not depthwise) Convs; groups left uneven are exported as
    one Conv per group. False keeps them, and the channels they touch, whole.
    ``channel_multiple``: search channels in blocks of this many (see the module docstring); 1:
    channel by channel.
    """
    return PITPass(include=include, exclude=exclude, op_types=op_types, masks=masks, threshold=threshold,
                   grouped_convs=grouped_convs, channel_multiple=channel_multiple)(graph).graph


def check_channel_multiple(value, *, source: str | None = None) -> int:
    """``value`` as a channel multiple (a positive integer); a clear error otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise PassError(f"channel_multiple must be a positive integer (1: channel by channel), got {value!r}",
                        file=source)
    return int(value)


class PITPass(FunctionalPass):
    """The PIT pass (module docstring; options as `pit`). Requires a graph without ai.plinio
    nodes other than SuperNet Choices; ensures the PIT record is stored."""

    def __init__(self, *, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                 op_types: Iterable[str] = LAYER_OPS, masks: Iterable[str] = MASKS,
                 threshold: float = 0.5, grouped_convs: bool = True, channel_multiple: int = 1) -> None:
        self.include, self.exclude, self.op_types = include, exclude, tuple(op_types)
        self.masks, self.threshold, self.grouped_convs = tuple(masks), threshold, grouped_convs
        self.channel_multiple = check_channel_multiple(channel_multiple)

    def requires(self, graph: Graph) -> None:
        # SuperNet Choices may stay (PIT then searches channels inside and around their branches);
        # PIT masks or MPS quantizers already there may not.
        if any((n.domain or "") == PLINIO_DOMAIN and n.op != CHOICE for n in graph.nodes):
            raise PassError("the graph already holds ai.plinio nodes; run PIT on the original model "
                            "(or on a SuperNet searchable graph)", file=graph.source)

    def ensures(self, graph: Graph) -> None:
        if not PITRecord.present(graph):
            raise ValueError("no PIT record was stored")

    def call(self, graph: Graph) -> PassResult:
        unknown = set(self.masks) - set(MASKS)
        if unknown:
            raise PassError(f"unknown PIT masks {sorted(unknown)}; choose from {MASKS}", file=graph.source)
        return PassResult(_searchable(graph, self.include, self.exclude, self.op_types, self.masks,
                                      self.threshold, self.grouped_convs, self.channel_multiple), True)


def _searchable(graph: Graph, include, exclude, op_types: tuple[str, ...], masks: tuple[str, ...],
                threshold: float, grouped_convs: bool, block: int = 1) -> Graph:
    graph = graph.copy()
    g = graph.gs
    shuffles_as_gather(g)
    analysis = analyze_channels(graph, grouped_convs=grouped_convs)
    nodes = {n.name: n for n in g.nodes}

    searched, skipped = [], []
    if "channels" in masks:
        for group in analysis.groups:
            reason = _skip_reason(group, nodes, include, exclude, op_types, block)
            if reason:
                skipped.append(SkippedGroup(group=group.name, size=group.size, reason=reason))
                continue
            searched.append(_insert_channel_mask(g, group, nodes, threshold, block))

    time_layers = []
    if "time" in masks or "dilation" in masks:
        for node in list(g.nodes):
            if node.op == "Conv" and _selected(node.name, node.op, include, exclude, op_types):
                entry = _insert_time_mask(g, node, "time" in masks, "dilation" in masks, threshold)
                if entry:
                    time_layers.append(entry)

    g.cleanup(remove_unused_graph_inputs=False).toposort()
    PITRecord(threshold=threshold, groups=searched, time=time_layers, skipped=skipped,
              layer_inputs=analysis.layer_inputs,
              layer_output=analysis.layer_output, group_sizes=[grp.size for grp in analysis.groups],
              layer_output_part=analysis.layer_output_part, layer_rows=analysis.layer_rows,
              grouped=analysis.grouped).store(graph)
    return add_functions(graph, fn.functions())


def _skip_reason(group: ChannelGroup, nodes, include, exclude, op_types, block: int = 1) -> str | None:
    if group.unprunable:
        return group.unprunable[0]
    if not group.producers:
        return "not produced by a layer"
    if not group.consumers:
        return "no layer reads it"
    if group.size < 2 or (group.atoms and all(len(atom) < 2 for atom in group.atoms)):
        return "a single channel"
    if block > 1 and max(len(atom) for atom in group.atoms or [range(group.size)]) <= block:
        return f"at most {block} channels (the channel multiple): kept whole"
    for producer in group.producers:
        node = nodes[producer.node]
        if not _selected(node.name, node.op, include, exclude, op_types):
            return f"layer {node.name!r} is not selected"
    return None


def _mask_node(g: gs.Graph, prefix: str, node: str, channels: int, block: int, threshold: float,
               mask: gs.Variable) -> str:
    """A mask parameter ``prefix``.pit_alpha for ``channels`` channels (one entry per block of
    ``block``) and the node computing their mask ``mask``; returns the parameter's name."""
    alpha = gs.Constant(f"{prefix}.pit_alpha", np.ones(pit_keep.block_count(channels, block), np.float32))
    attrs = {"threshold": float(threshold)}
    if block == 1:
        g.nodes.append(gs.Node(fn.CHANNEL_MASK, name=node, domain=PLINIO_DOMAIN,
                               attrs=attrs, inputs=[alpha], outputs=[mask]))
    else:
        blocks = gs.Constant(f"{prefix}.pit_blocks", pit_keep.block_index(channels, block))
        g.nodes.append(gs.Node(fn.BLOCK_MASK, name=node.replace("pit_channel_mask", "pit_block_mask"),
                               domain=PLINIO_DOMAIN, attrs=attrs, inputs=[alpha, blocks], outputs=[mask]))
    return alpha.name


def _insert_channel_mask(g: gs.Graph, group: ChannelGroup, nodes, threshold: float, block: int = 1) -> GroupRecord:
    base = group.name
    mask = gs.Variable(f"{base}.pit_mask", dtype=np.float32, shape=[group.size])
    if not group.atoms:
        alphas = [_mask_node(g, base, f"{base}/pit_channel_mask", group.size, block, threshold, mask)]
    else:
        # One mask parameter per atom (each keeps a channel alive), gathered into channel order.
        pieces, alphas = [], []
        for k, atom in enumerate(group.atoms):
            piece = gs.Variable(f"{base}.atom{k}.pit_mask", dtype=np.float32, shape=[len(atom)])
            alphas.append(_mask_node(g, f"{base}.atom{k}", f"{base}/pit_channel_mask{k}", len(atom), block, threshold,
                                      piece))
            pieces.append(piece)
        stacked = gs.Variable(f"{base}.pit_atoms", dtype=np.float32, shape=[group.size])
        order = np.argsort(np.concatenate([np.asarray(atom) for atom in group.atoms])).astype(np.int64)
        g.nodes.append(gs.Node("Concat", name=f"{base}/pit_atoms", attrs={"axis": 0}, inputs=pieces,
                               outputs=[stacked]))
        g.nodes.append(gs.Node("Gather", name=f"{base}/pit_order", attrs={"axis": 0},
                               inputs=[stacked, gs.Constant(f"{base}.pit_order", order)], outputs=[mask]))
    for k, consumer in enumerate(group.consumers):
        node = nodes[consumer.node]
        weight = node.inputs[1]
        channels = np.arange(group.size) if consumer.channels is None else np.asarray(consumer.channels)
        width = int(weight.shape[consumer.axis]) * consumer.groups
        index = np.full(width, group.size, dtype=np.int64)
        span = channels.size * consumer.inner
        index[consumer.offset:consumer.offset + span] = np.repeat(channels, consumer.inner)
        shape = np.ones(len(weight.shape), dtype=np.int64)
        if consumer.groups > 1:
            # Grouped Conv: output row o reads input channel (o // rows per group)·width/g + j.
            rows, per_group = int(weight.shape[0]), int(weight.shape[1])
            first = (np.arange(rows) // (rows // consumer.groups)) * per_group
            index = index[first[:, None] + np.arange(per_group)[None, :]].reshape(-1)
            shape[:2] = (rows, per_group)
        else:
            shape[consumer.axis] = -1
        masked = gs.Variable(f"{consumer.node}/pit_w{group.id}_{k}", dtype=weight.dtype, shape=weight.shape)
        g.nodes.append(gs.Node(fn.MASK_WEIGHT, name=f"{consumer.node}/pit_mask_{group.id}_{k}",
                               domain=PLINIO_DOMAIN,
                               inputs=[weight, mask, gs.Constant(f"{consumer.node}/pit_index_{group.id}_{k}", index),
                                       gs.Constant(f"{consumer.node}/pit_shape_{group.id}_{k}", shape)],
                               outputs=[masked]))
        node.inputs[1] = masked
    return GroupRecord.of(group, alphas, block)  # one mask parameter, or one per atom


def _insert_time_mask(g: gs.Graph, node: gs.Node, time: bool, dilation: bool,
                      threshold: float) -> TimeMaskRecord | None:
    weight = node.inputs[1]
    if weight.shape is None or len(weight.shape) != 3:
        return None
    kernel = int(weight.shape[2])
    if kernel < 2 or any(s != 1 for s in node.attrs.get("strides", [1])):
        return None
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
        return None  # explicit pads are needed to re-align a shortened kernel
    levels = pit_keep.dilation_levels(kernel) if dilation else 1
    # An unsearched mask is one always-kept entry: a buffer (not trainable) that broadcasts.
    beta = gs.Constant(f"{node.name}.pit_beta", np.ones(kernel if time else 1, np.float32))
    gamma = gs.Constant(f"{node.name}.pit_gamma", np.ones(levels, np.float32))
    gmap = pit_keep.gamma_map(kernel)[:, :levels] if dilation else np.ones((kernel, 1), np.int64)
    masked = gs.Variable(f"{node.name}/pit_wt", dtype=weight.dtype, shape=weight.shape)
    g.nodes.append(gs.Node(fn.TIME_MASK, name=f"{node.name}/pit_time_mask", domain=PLINIO_DOMAIN,
                           attrs={"threshold": float(threshold)},
                           inputs=[weight, beta, gamma, gs.Constant(f"{node.name}.pit_gamma_map", gmap)],
                           outputs=[masked]))
    node.inputs[1] = masked
    return TimeMaskRecord(node=node.name, kernel=kernel, beta=beta.name, gamma=gamma.name,
                          search_time=time, search_dilation=dilation,
                          dilation=int(node.attrs.get("dilations", [1])[0]),
                          pads=[int(p) for p in node.attrs.get("pads", [0, 0])])
