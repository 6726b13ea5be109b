"""Channel dependency analysis: which channels must be pruned together, and where they live.

Every layer (Conv, ConvTranspose, Gemm, MatMul with a constant weight) *produces* a channel
space on its output. A forward walk carries, for every tensor, a `ChannelMap`: the axis that holds
channels, the segments of channel spaces along it (Concat stacks several), and how many features
each channel occupies there (``inner`` > 1 after a Flatten into a dense layer). Ops meet these maps
through one rule each (a registry, as for the loader): pass-through ops keep the map, residual
``Add``/``Mul`` *unite* the spaces of their inputs (one shared mask), ``Concat`` stacks segments,
a depthwise Conv carries its input space through, a layer *consumes* the map on its input.

The result is a list of `ChannelGroup`s (united spaces) with everything that must be sliced
together: producers' output channels, per-channel constants (BN, biases, PRelu slopes), depthwise
convs, Reshape constants that spell a flattened width, and consumers' input channels.
Anything a rule does not understand marks the groups it touches *unprunable* with the reason —
an unknown pattern costs a pruning opportunity, never a wrong graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import PLINIO_DOMAIN, Graph
from .initializers import shared_initializers


# -- records --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    space: int      # channel space id (before union)
    size: int       # channels


@dataclass(frozen=True)
class ChannelMap:
    axis: int                       # non-negative axis of the channels
    segments: tuple[Segment, ...]
    inner: int = 1                  # features per channel along the axis

    @property
    def width(self) -> int:
        return sum(s.size for s in self.segments) * self.inner


@dataclass
class Producer:
    node: str
    weight: str        # initializer name
    axis: int          # output-channel axis of the weight
    bias: str | None   # initializer name of a [C] bias, if any
    channels: list[int] | None = None  # group channel of each local channel (None: the same)


@dataclass
class Consumer:
    node: str
    weight: str        # initializer name
    axis: int          # input-feature axis of the weight
    offset: int        # first feature of this segment along that axis
    inner: int         # features per channel
    groups: int = 1    # a grouped Conv: each output group reads its own slice of the input
    channels: list[int] | None = None


@dataclass
class Member:
    """A per-channel constant to slice with the group: ``tensor`` along ``axis`` from ``offset``,
    as read by ``node``."""
    node: str
    tensor: str
    axis: int
    offset: int = 0
    channels: list[int] | None = None


@dataclass
class ReshapeWidth:
    """A constant Reshape target whose entry ``index`` spells a flattened width of
    ``per_channel`` features per channel of this group."""
    node: str
    index: int
    per_channel: int
    channels: list[int] | None = None


@dataclass
class Permutation:
    """A channel ``Gather`` (a channel shuffle) inside the group: output channel m is input channel
    ``indices[m]``; ``channels_in`` / ``channels_out`` give the group channel of each position."""
    node: str
    channels_in: list[int] | None = None
    channels_out: list[int] | None = None


@dataclass
class ChannelCut:
    """A Split or Slice of the channel axis reading, from ``offset`` on its input, channels of
    this group; after pruning its split sizes / bounds count the kept channels only."""
    node: str
    axis: int
    offset: int
    channels: list[int] | None = None


@dataclass
class GroupedConv:
    """A grouped Conv that prunes like a dense one: output group k reads input channels
    [k·C_in/g, (k+1)·C_in/g). ``inputs`` / ``output`` locate each of its input / output channels
    as (analysis group, channel) arrays, so costs can count every conv group's kept channels."""
    node: str
    groups: int
    input_groups: list[int]
    input_channels: list[int]
    output_group: int | None
    output_channels: list[int]


@dataclass
class ChannelGroup:
    """Channels pruned together: one shared mask of ``size`` entries."""
    id: int
    size: int
    producers: list[Producer] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    members: list[Member] = field(default_factory=list)
    depthwise: list[str] = field(default_factory=list)     # depthwise Conv nodes carrying it
    reshapes: list[ReshapeWidth] = field(default_factory=list)
    permutations: list[Permutation] = field(default_factory=list)
    cuts: list[ChannelCut] = field(default_factory=list)
    # Channels that are only ever pruned together with... nothing: a partition of the group's
    # channels such that every part of it some layer or Split holds is a union of atoms. Each
    # atom keeps one channel alive, so no layer loses all its channels. Empty: one atom.
    atoms: list[list[int]] = field(default_factory=list)
    unprunable: list[str] = field(default_factory=list)    # reasons
    outputs: list[str] = field(default_factory=list)       # graph outputs it reaches

    @property
    def prunable(self) -> bool:
        return not self.unprunable and bool(self.producers) and bool(self.consumers)

    @property
    def name(self) -> str:
        return self.producers[0].node if self.producers else f"group{self.id}"


@dataclass
class ChannelAnalysis:
    groups: list[ChannelGroup]
    # layer node -> [(group id, features per channel, group channels read or None: all of them)]
    layer_inputs: dict[str, list[tuple[int, int, list[int] | None]]]
    layer_output: dict[str, int]                   # producer node -> group id (all its channels)
    grouped: dict[str, GroupedConv] = field(default_factory=dict)
    # producer node -> (group id, group channels) for a producer of part of a group
    layer_output_part: dict[str, tuple[int, list[int]]] = field(default_factory=dict)
    # activation MatMul (attention) -> [(group id, its channels or None)] along a batch axis: its
    # rows scale with the kept channels (heads)
    layer_rows: dict[str, list[tuple[int, list[int] | None]]] = field(default_factory=dict)

    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def group(self, gid: int) -> ChannelGroup:
        return self.groups[gid]


def _compose(first: np.ndarray | None, then: np.ndarray | None) -> np.ndarray | None:
    """The map i -> then[first[i]] (None stands for the identity)."""
    if first is None:
        return then
    if then is None:
        return first
    return then[first]


def _atoms(size: int, images: list[np.ndarray]) -> list[list[int]]:
    """Partition range(size) by which of ``images`` hold each channel (see `ChannelGroup.atoms`)."""
    member = np.zeros((size, len(images)), dtype=bool)
    for k, image in enumerate(images):
        member[image, k] = True
    _, label = np.unique(member, axis=0, return_inverse=True)
    label = label.reshape(-1)
    order = sorted(set(label.tolist()), key=lambda lab: int(np.flatnonzero(label == lab)[0]))
    return [np.flatnonzero(label == lab).tolist() for lab in order] if len(order) > 1 else []


def _inverse_into(source: np.ndarray, target: np.ndarray, size: int) -> np.ndarray:
    """The map that sends source[i] to target[i], for ``source`` covering range(size)."""
    link = np.empty(size, dtype=np.int64)
    link[source] = target
    return link


# -- the walk -------------------------------------------------------------------------------
class _Walk:
    def __init__(self, graph: gs.Graph, grouped_convs: bool = True) -> None:
        self.graph = graph
        self.grouped_convs = grouped_convs
        self.maps: dict[str, ChannelMap] = {}
        self.parent: list[int] = []
        # link[s]: s's channel i is its parent's channel link[s][i] (None: the same index)
        self.link: list[np.ndarray | None] = []
        self.sizes: list[int] = []
        self.grouped: list[tuple[gs.Node, int, ChannelMap | None, int]] = []
        self.permutes: list[tuple[str, int, int]] = []   # (Gather node, input space, output space)
        self.layer_rows: dict[str, list[int]] = {}       # activation MatMul -> spaces of its batch axis
        self.spaces: list[ChannelGroup] = []
        self.layer_inputs: dict[str, list[tuple[int, int]]] = {}
        self.layer_output: dict[str, int] = {}

    # union-find over channel spaces; a link may permute channels (a channel shuffle)
    def new_space(self, size: int) -> int:
        sid = len(self.parent)
        self.parent.append(sid)
        self.link.append(None)
        self.sizes.append(size)
        self.spaces.append(ChannelGroup(id=sid, size=size))
        return sid

    def find(self, sid: int) -> int:
        return self.find_map(sid)[0]

    def find_map(self, sid: int) -> tuple[int, np.ndarray | None]:
        """(root, map): channel i of space ``sid`` is channel map[i] of the root (None: i)."""
        path = []
        while self.parent[sid] != sid:
            path.append(sid)
            sid = self.parent[sid]
        root = sid
        for s in reversed(path):  # compress, composing the links on the way
            parent = self.parent[s]
            if parent != root:
                self.link[s] = _compose(self.link[s], self.link[parent])
                self.parent[s] = root
        return root, (self.link[path[0]] if path else None)

    def unite(self, a: int, b: int, perm: np.ndarray | None = None) -> None:
        """Tie channel i of space ``b`` to channel perm[i] (None: i) of space ``a``; ``perm`` is
        injective, so ``b`` may be a part of ``a`` (a Split output, a segment of a Concat)."""
        (ra, ma), (rb, mb) = self.find_map(a), self.find_map(b)
        if perm is None and self.sizes[a] != self.sizes[b]:
            self.block_space(ra, "united with a channel space of another size")
            self.block_space(rb, "united with a channel space of another size")
            return
        n_b = self.sizes[b]
        via_a = _compose(perm, ma)                             # b's channels as channels of ra
        via_a = np.arange(n_b) if via_a is None else via_a
        in_rb = np.arange(n_b) if mb is None else mb           # b's channels as channels of rb
        if np.unique(via_a).size != n_b or np.unique(in_rb).size != n_b:
            # A space already cut into blocks (attention heads) met channel by channel.
            self.block_space(ra, "channels tied both one by one and in blocks")
            self.block_space(rb, "channels tied both one by one and in blocks")
            return
        if ra == rb:
            if not np.array_equal(via_a, in_rb):
                self.block_space(ra, "channels re-routed onto other channels of the same group")
            return
        size_a, size_b = self.sizes[ra], self.sizes[rb]
        if n_b == size_b:       # b covers rb: hang rb below ra
            self._hang(rb, ra, _inverse_into(in_rb, via_a, size_b))
        elif n_b == size_a:     # b's image covers ra: hang ra below rb
            self._hang(ra, rb, _inverse_into(via_a, in_rb, size_a))
        else:                   # partial overlap: a new root holds ra's channels, then rb's others
            root = self.new_space(size_a + size_b - n_b)
            link_b = np.empty(size_b, dtype=np.int64)
            link_b[in_rb] = via_a
            rest = np.setdiff1d(np.arange(size_b), in_rb)
            link_b[rest] = size_a + np.arange(rest.size)
            self._hang(ra, root, np.arange(size_a))
            self._hang(rb, root, link_b)

    def coarsen(self, sid: int, block: int) -> int | None:
        """A new space whose channel h is the block [h·block, (h+1)·block) of space ``sid``'s
        channels (attention heads: Q/K/V features split per head); ``sid``'s whole group then
        prunes in blocks. None when ``sid`` is only part of its group."""
        root, cmap = self.find_map(sid)
        size = self.sizes[sid]
        if self.sizes[root] != size or size % block or (cmap is not None and np.unique(cmap).size != size):
            return None
        blocks = self.new_space(size // block)
        position = np.arange(size) if cmap is None else np.argsort(cmap)   # root channel -> sid's
        self.parent[root] = blocks
        self.link[root] = position // block
        return blocks

    def _hang(self, child: int, root: int, link: np.ndarray) -> None:
        self.parent[child] = root
        identity = link.size == self.sizes[root] and np.array_equal(link, np.arange(link.size))
        self.link[child] = None if identity else link

    def space(self, sid: int) -> ChannelGroup:
        return self.spaces[self.find(sid)]

    def block_space(self, sid: int, reason: str) -> None:
        self.spaces[sid].unprunable.append(reason)

    def block(self, cmap: ChannelMap | None, reason: str) -> None:
        if cmap is not None:
            for seg in cmap.segments:
                self.block_space(seg.space, reason)

    def block_inputs(self, node: gs.Node, reason: str) -> None:
        for tensor in node.inputs:
            self.block(self.maps.get(tensor.name), f"{node.op} {node.name!r}: {reason}")

    # driving
    def run(self) -> ChannelAnalysis:
        for node in self.graph.nodes:
            if (node.domain or "") == PLINIO_DOMAIN:
                rule = _PLINIO_RULES.get(node.op)
                if rule is None:
                    # A searchable function (quantizer, mask) may mix or re-route channels.
                    self.block_inputs(node, "read by a searchable ai.plinio function")
                else:
                    rule(self, node)
                continue
            rule = _RULES.get(node.op) if (node.domain or "") in ("", "ai.onnx") else None
            if rule is None:
                self.block_inputs(node, "op not understood by the channel analysis")
                continue
            rule(self, node)
        for tensor in self.graph.outputs:
            cmap = self.maps.get(tensor.name)
            if cmap is not None:
                for seg in cmap.segments:
                    self.spaces[seg.space].outputs.append(tensor.name)
        self._block_shared_initializers()
        return self._merge()

    def _block_shared_initializers(self) -> None:
        """A weight several layers read (``load(..., tied="share")``) is sliced once for all of
        them, so its channels are not pruned (one reader's mask would cut the others' rows)."""
        shared = shared_initializers(self.graph)
        if not shared:
            return
        for sid, space in enumerate(self.spaces):
            names = [p.weight for p in space.producers] + [p.bias for p in space.producers] + \
                [c.weight for c in space.consumers] + [m.tensor for m in space.members]
            for name in dict.fromkeys(n for n in names if n in shared):
                readers = ", ".join(repr(node.name) for node in shared[name])
                self.block_space(sid, f"initializer {name!r} is shared by {readers}")

    def _merge(self) -> ChannelAnalysis:
        roots: dict[int, ChannelGroup] = {}
        parts: dict[int, list[np.ndarray]] = {}
        for sid, space in enumerate(self.spaces):
            root, cmap = self.find_map(sid)
            group = roots.setdefault(root, ChannelGroup(id=-1, size=self.sizes[root]))
            if self.sizes[sid] < self.sizes[root]:
                parts.setdefault(root, []).append(cmap)
            for name in ("producers", "consumers", "members", "reshapes", "cuts"):
                items = getattr(space, name)
                if cmap is not None:  # a permuted space: say which group channel each one is
                    items = [replace(item, channels=cmap.tolist()) for item in items]
                getattr(group, name).extend(items)
            for name in ("depthwise", "unprunable", "outputs"):
                getattr(group, name).extend(getattr(space, name))
        for root, images in parts.items():
            roots[root].atoms = _atoms(self.sizes[root], images)
        for node, source, target in self.permutes:
            (root, map_in), (_, map_out) = self.find_map(source), self.find_map(target)
            roots[root].permutations.append(Permutation(
                node, None if map_in is None else map_in.tolist(),
                None if map_out is None else map_out.tolist()))
        groups = []
        renumber = {}
        for root, group in roots.items():
            if group.outputs:
                group.unprunable.append(f"feeds graph output {group.outputs[0]!r}")
            if not group.producers and not group.consumers:
                continue
            group.id = len(groups)
            renumber[root] = group.id
            groups.append(group)
        layer_inputs = {}
        for node, segs in self.layer_inputs.items():
            located = [self._part(s, renumber) for s, _ in segs]
            layer_inputs[node] = [(gid, inner, part) for (gid, part), (_, inner) in zip(located, segs)
                                  if gid is not None]
        layer_output, layer_output_part = {}, {}
        for node, sid in self.layer_output.items():
            gid, part = self._part(sid, renumber)
            if gid is not None and part is None:
                layer_output[node] = gid
            elif gid is not None:
                layer_output_part[node] = (gid, part)
        grouped = {}
        for node, groups_, cmap, out_sid in self.grouped:
            in_groups, in_channels = self._locate(cmap.segments if cmap else (), renumber)
            out_groups, out_channels = self._locate((Segment(out_sid, self.sizes[out_sid]),), renumber)
            out_group = out_groups[0] if out_groups and out_groups[0] >= 0 else None
            grouped[node.name] = GroupedConv(node.name, groups_, in_groups, in_channels, out_group, out_channels)
        layer_rows = {node: [self._part(sid, renumber) for sid in spaces]
                      for node, spaces in self.layer_rows.items()}
        layer_rows = {node: parts for node, parts in layer_rows.items() if all(g is not None for g, _ in parts)}
        return ChannelAnalysis(groups, layer_inputs, layer_output, grouped, layer_output_part, layer_rows)

    def _part(self, sid: int, renumber: dict[int, int]) -> tuple[int | None, list[int] | None]:
        """(group, its channels that space ``sid`` holds — None when all of them)."""
        root, cmap = self.find_map(sid)
        if root not in renumber:
            return None, None
        whole = self.sizes[sid] == self.sizes[root]
        return renumber[root], (None if whole else cmap.tolist())

    def _locate(self, segments, renumber: dict[int, int]) -> tuple[list[int], list[int]]:
        """(group, channel) of every channel along ``segments``; group -1 for channels outside
        every analysis group (they never change)."""
        gids, channels = [], []
        for seg in segments:
            root, cmap = self.find_map(seg.space)
            gids.extend([renumber.get(root, -1)] * seg.size)
            channels.extend(range(seg.size) if cmap is None else cmap.tolist())
        return gids, channels

    # helpers for rules
    def produce(self, node: gs.Node, tensor: gs.Tensor, size: int, axis: int, producer: Producer | None,
                reason: str | None = None) -> int:
        sid = self.new_space(size)
        if producer is not None:
            self.spaces[sid].producers.append(producer)
        if reason:
            self.block_space(sid, reason)
        self.maps[tensor.name] = ChannelMap(axis, (Segment(sid, size),))
        self.layer_output[node.name] = sid
        return sid

    def consume(self, node: gs.Node, cmap: ChannelMap | None, weight: str, axis: int) -> None:
        if cmap is None:
            return
        offset = 0
        record = []
        for seg in cmap.segments:
            self.spaces[seg.space].consumers.append(Consumer(node.name, weight, axis, offset, cmap.inner))
            record.append((seg.space, cmap.inner))
            offset += seg.size * cmap.inner
        self.layer_inputs[node.name] = record


def _rank(tensor: gs.Tensor) -> int | None:
    return None if tensor.shape is None else len(tensor.shape)


def _static(tensor: gs.Tensor) -> np.ndarray | None:
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


def _is_const(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant)


# -- rules ----------------------------------------------------------------------------------
_RULES: dict[str, Callable[[_Walk, gs.Node], None]] = {}


def channel_rule(*ops: str):
    def decorate(fn):
        for op in ops:
            _RULES[op] = fn
        return fn
    return decorate


@channel_rule("Relu", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu", "Celu", "HardSigmoid",
              "HardSwish", "Softplus", "Softsign", "Gelu", "Mish", "Erf", "Abs", "Neg", "Sqrt",
              "Exp", "Log", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos",
              "Identity", "Dropout", "Cast", "ThresholdedRelu", "Shrink", "Not",
              "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool")
def _pass_through(walk: _Walk, node: gs.Node) -> None:
    cmap = walk.maps.get(node.inputs[0].name)
    if cmap is not None and node.outputs:
        if node.op in ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
                       "GlobalLpPool") and (cmap.axis != 1 or cmap.inner != 1):
            walk.block(cmap, f"{node.op} {node.name!r} pools over the channel axis")
            return
        walk.maps[node.outputs[0].name] = cmap


@channel_rule("Clip")
def _clip(walk: _Walk, node: gs.Node) -> None:
    cmap = walk.maps.get(node.inputs[0].name)
    if cmap is None:
        return
    if any(t.name and not _is_const(t) for t in node.inputs[1:]):
        walk.block(cmap, f"Clip {node.name!r} has run-time bounds")
        return
    walk.maps[node.outputs[0].name] = cmap


def _per_channel_params(walk: _Walk, node: gs.Node, cmap: ChannelMap, indices: range) -> bool:
    """Register inputs ``indices`` ([C] constants) as members; False (and block) otherwise."""
    if cmap.axis != 1 or cmap.inner != 1:
        walk.block(cmap, f"{node.op} {node.name!r} normalizes another axis than the channels")
        return False
    for i in indices:
        if i < len(node.inputs) and node.inputs[i].name:
            if not _is_const(node.inputs[i]):
                walk.block(cmap, f"{node.op} {node.name!r} has run-time per-channel parameters")
                return False
    _add_members(walk, node, cmap, [(i, 0) for i in indices if i < len(node.inputs) and node.inputs[i].name])
    return True


def _add_members(walk: _Walk, node: gs.Node, cmap: ChannelMap, inputs: list[tuple[int, int]]) -> None:
    """Record constant inputs (index, axis) of ``node`` as sliced with every segment of ``cmap``.

    Members of a multi-segment map are recorded on each segment's space with the same tensor;
    slicing at finalize uses the concatenated keep indices."""
    offset = 0
    for seg in cmap.segments:
        for i, axis in inputs:
            walk.spaces[seg.space].members.append(Member(node.name, node.inputs[i].name, axis, offset))
        offset += seg.size


@channel_rule("BatchNormalization", "InstanceNormalization")
def _batch_norm(walk: _Walk, node: gs.Node) -> None:
    cmap = walk.maps.get(node.inputs[0].name)
    if cmap is None:
        return
    if any(o.name for o in node.outputs[1:]):
        walk.block(cmap, f"{node.op} {node.name!r} exposes training statistics")
        return
    if _per_channel_params(walk, node, cmap, range(1, len(node.inputs))):
        walk.maps[node.outputs[0].name] = cmap


@channel_rule("PRelu")
def _prelu(walk: _Walk, node: gs.Node) -> None:
    _elementwise(walk, node)


def _broadcast_axis(tensor: gs.Tensor, out_rank: int, axis: int) -> int | None:
    """The axis of ``tensor`` aligned with output ``axis`` under numpy broadcasting, or None."""
    rank = _rank(tensor)
    if rank is None:
        return None
    shift = out_rank - rank
    return axis - shift if axis - shift >= 0 else -1  # -1: the tensor lacks that axis


@channel_rule("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "Where",
              "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod")
def _elementwise(walk: _Walk, node: gs.Node) -> None:
    out = node.outputs[0]
    maps = [(i, walk.maps.get(t.name)) for i, t in enumerate(node.inputs)]
    carried = [(i, m) for i, m in maps if m is not None]
    if not carried:
        return
    out_rank = _rank(out)
    if out_rank is None:
        walk.block_inputs(node, "unknown rank")
        return
    # Align every carried map to the output's axes.
    aligned = [ChannelMap(cmap.axis + out_rank - _rank(node.inputs[i]), cmap.segments, cmap.inner)
               for i, cmap in carried]
    reference = aligned[0]
    if any(m.axis != reference.axis or m.inner != reference.inner or m.width != reference.width
           for m in aligned):
        walk.block_inputs(node, "inputs carry channels differently")
        return
    if all([s.size for s in m.segments] == [s.size for s in reference.segments] for m in aligned):
        for m in aligned[1:]:
            for a, b in zip(m.segments, reference.segments):
                walk.unite(b.space, a.space)
    else:
        # Segments cut differently (a Concat added to a single layer's output): one new space for
        # the whole width, every segment tied to its stretch of it.
        total = sum(seg.size for seg in reference.segments)
        whole = walk.new_space(total)
        for m in aligned:
            offset = 0
            for seg in m.segments:
                walk.unite(whole, seg.space, offset + np.arange(seg.size))
                offset += seg.size
        reference = ChannelMap(reference.axis, (Segment(whole, total),), reference.inner)
    width = reference.width
    members = []
    for i, tensor in enumerate(node.inputs):
        if walk.maps.get(tensor.name) is not None:
            continue
        axis = _broadcast_axis(tensor, out_rank, reference.axis)
        if axis is None:
            walk.block_inputs(node, f"unknown shape of {tensor.name!r}")
            return
        size = 1 if axis < 0 else tensor.shape[axis]
        if size == 1:
            continue  # broadcast along the channels: every channel sees the same value
        if _is_const(tensor) and size == width and reference.inner == 1 and \
                all(d == 1 for j, d in enumerate(tensor.shape) if j != axis):
            members.append((i, axis))
            continue
        walk.block_inputs(node, f"input {tensor.name!r} varies along the channels and is not a "
                                "per-channel constant")
        return
    _add_members(walk, node, reference, members)
    walk.maps[out.name] = reference


@channel_rule("Concat")
def _concat(walk: _Walk, node: gs.Node) -> None:
    out = node.outputs[0]
    rank = _rank(out)
    axis = int(node.attrs.get("axis", 0))
    if rank is None:
        walk.block_inputs(node, "unknown rank")
        return
    axis = axis + rank if axis < 0 else axis
    maps = [walk.maps.get(t.name) for t in node.inputs]
    if any(m is not None and m.axis != axis for m in maps):
        # Concat along another axis: all inputs must carry the same channels.
        first = next(m for m in maps if m is not None)
        if all(m is not None and m.axis == first.axis and m.inner == first.inner
               and [s.size for s in m.segments] == [s.size for s in first.segments] for m in maps):
            for m in maps[1:]:
                for a, b in zip(m.segments, first.segments):
                    walk.unite(a.space, b.space)
            walk.maps[out.name] = first
        else:
            walk.block_inputs(node, "concatenates along another axis than the channels")
        return
    if not any(maps):
        return
    segments: list[Segment] = []
    inner = None
    for tensor, cmap in zip(node.inputs, maps):
        if cmap is None:
            # A segment from outside any layer (e.g. the graph input): fixed channels.
            if tensor.shape is None or not isinstance(tensor.shape[axis], (int, np.integer)):
                walk.block_inputs(node, "an input of unknown width")
                return
            sid = walk.new_space(int(tensor.shape[axis]))
            walk.block_space(sid, "not produced by a layer")
            segments.append(Segment(sid, int(tensor.shape[axis])))
            this_inner = 1
        else:
            segments.extend(cmap.segments)
            this_inner = cmap.inner
        if inner is None:
            inner = this_inner
        elif inner != this_inner:
            walk.block_inputs(node, "concatenates flattened and unflattened channels")
            return
    walk.maps[out.name] = ChannelMap(axis, tuple(segments), inner or 1)


def _spatial_only(walk: _Walk, node: gs.Node, axes: list[int] | None, rank: int, cmap: ChannelMap) -> bool:
    if axes is None or cmap.axis in [a + rank if a < 0 else a for a in axes]:
        walk.block(cmap, f"{node.op} {node.name!r} acts on the channel axis")
        return False
    return True


@channel_rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1",
              "ReduceProd", "ReduceSumSquare", "ReduceLogSumExp")
def _reduce(walk: _Walk, node: gs.Node) -> None:
    cmap = walk.maps.get(node.inputs[0].name)
    if cmap is None:
        return
    rank = _rank(node.inputs[0])
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
        value = _static(node.inputs[1])
        axes = None if value is None else [int(a) for a in value.reshape(-1)]
    if rank is None or not _spatial_only(walk, node, axes, rank, cmap):
        if rank is None:
            walk.block(cmap, "unknown rank")
        return
    if cmap.inner != 1:
        walk.block(cmap, f"{node.op} {node.name!r} reduces flattened channels")
        return
    axes = sorted(a + rank if a < 0 else a for a in axes)
    keep = int(node.attrs.get("keepdims", 1))
    axis = cmap.axis if keep else cmap.axis - sum(a < cmap.axis for a in axes)
    walk.maps[node.outputs[0].name] = ChannelMap(axis, cmap.segments, cmap.inner)


@channel_rule("Pad")
def _pad(walk: _Walk, node: gs.Node) -> None:
    cmap = walk.maps.get(node.inputs[0].name)
    if cmap is None:
        return
    pads = node.attrs.get("pads")
    if pads is None and len(node.inputs) > 1:
        value = _static(node.inputs[1])
        pads = None if value is None else [int(p) for p in value.reshape(-1)]
    rank = _rank(node.inputs[0])
    if pads is None or rank is None or (len(node.inputs) > 3 and node.inputs[3].name):
        walk.block(cmap, f"Pad {node.name!r} with run-time pads or axes")
        return
    if pads[cmap.axis] or pads[cmap.axis + rank]:
        walk.block(cmap, f"Pad {node.name!r} pads the channel axis")
        return
    walk.maps[node.outputs[0].name] = cmap


@channel_rule("Resize", "Upsample")
def _resize(walk: _Walk, node: gs.Node) -> None:
    cmap = walk.maps.get(node.inputs[0].name)
    if cmap is None:
        return
    in_shape, out_shape = node.inputs[0].shape, node.outputs[0].shape
    if in_shape is None or out_shape is None or cmap.inner != 1 or \
            in_shape[cmap.axis] != out_shape[cmap.axis] or \
            any(i != o for k, (i, o) in enumerate(zip(in_shape, out_shape)) if k < cmap.axis):
        walk.block(cmap, f"{node.op} {node.name!r} may resize the channel axis")
        return
    walk.maps[node.outputs[0].name] = cmap


@channel_rule("Transpose")
def _transpose(walk: _Walk, node: gs.Node) -> None:
    cmap = walk.maps.get(node.inputs[0].name)
    if cmap is None:
        return
    rank = _rank(node.inputs[0])
    perm = node.attrs.get("perm") or (list(reversed(range(rank))) if rank is not None else None)
    if perm is None:
        walk.block(cmap, "unknown rank")
        return
    walk.maps[node.outputs[0].name] = ChannelMap(list(perm).index(cmap.axis), cmap.segments, cmap.inner)


def _dims(tensor: gs.Tensor) -> list | None:
    return None if tensor.shape is None else list(tensor.shape)


def _prod(dims) -> int | None:
    if any(not isinstance(d, (int, np.integer)) for d in dims):
        return None
    return int(math.prod(int(d) for d in dims))


def _reshape_like(walk: _Walk, node: gs.Node, in_dims: list, out_dims: list, cmap: ChannelMap) -> ChannelMap | None:
    """Map channels through a reshape that keeps the batch axis: either the channel axis survives
    whole (possibly moved) or it is flattened with everything after it into the last axis."""
    if not in_dims or not out_dims or cmap.axis == 0:
        return None
    pre = _prod(in_dims[1:cmap.axis])
    post = _prod(in_dims[cmap.axis + 1:])
    if pre is None or post is None:
        return None
    for b in range(1, len(out_dims)):
        if _prod(out_dims[1:b]) != pre:
            continue
        if out_dims[b] == in_dims[cmap.axis] and _prod(out_dims[b + 1:]) == post:
            return ChannelMap(b, cmap.segments, cmap.inner)
        if b == len(out_dims) - 1 and out_dims[b] == in_dims[cmap.axis] * post:
            return ChannelMap(b, cmap.segments, cmap.inner * post)
    return None


@channel_rule("Flatten")
def _flatten(walk: _Walk, node: gs.Node) -> None:
    cmap = walk.maps.get(node.inputs[0].name)
    if cmap is None:
        return
    mapped = None
    if int(node.attrs.get("axis", 1)) == 1:
        mapped = _reshape_like(walk, node, _dims(node.inputs[0]), _dims(node.outputs[0]), cmap)
    if mapped is None:
        walk.block(cmap, f"Flatten {node.name!r} mixes the channel axis into the batch")
        return
    walk.maps[node.outputs[0].name] = mapped


def _shape_template(tensor: gs.Tensor) -> list | None:
    """A Reshape target as a list of ints, with 'B' for run-time batch sizes, or None."""
    value = _static(tensor)
    if value is not None:
        return [int(v) for v in value.reshape(-1)]
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or producer.op != "Concat":
        return None
    out: list = []
    for part in producer.inputs:
        value = _static(part)
        if value is not None:
            out.extend(int(v) for v in value.reshape(-1))
        elif _is_batch_dim(part):
            out.append("B")
        else:
            return None
    return out


def _is_batch_dim(tensor: gs.Tensor) -> bool:
    """Unsqueeze(Gather(Shape(x), 0)): x's batch size, as exporters spell x.view(x.size(0), ...)."""
    node = tensor.inputs[0] if tensor.inputs else None
    if node is not None and node.op == "Unsqueeze":
        tensor = node.inputs[0]
        node = tensor.inputs[0] if tensor.inputs else None
    if node is None or node.op not in ("Gather", "Slice"):
        return False
    if node.op == "Gather":
        index = _static(node.inputs[1])
        if index is None or int(index.reshape(-1)[0]) != 0:
            return False
    else:
        starts, ends = _static(node.inputs[1]), _static(node.inputs[2])
        if starts is None or ends is None or int(starts[0]) != 0 or int(ends[0]) != 1:
            return False
    shape = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    return shape is not None and shape.op == "Shape"


@channel_rule("Reshape")
def _reshape(walk: _Walk, node: gs.Node) -> None:
    cmap = walk.maps.get(node.inputs[0].name)
    if cmap is None:
        return
    mapped = _reshape_like(walk, node, _dims(node.inputs[0]), _dims(node.outputs[0]), cmap)
    template = _shape_template(node.inputs[1])
    if mapped is None and template is not None and _split_heads(walk, node, cmap, template):
        return
    if mapped is None or template is None or len(template) != len(node.outputs[0].shape):
        walk.block(cmap, f"Reshape {node.name!r} splits or merges the channel axis")
        return
    entry = template[mapped.axis]
    if entry not in (-1, 0):
        if not _is_const(node.inputs[1]) or len(cmap.segments) != 1:
            walk.block(cmap, f"Reshape {node.name!r} spells the channel width in a run-time shape")
            return
        walk.spaces[cmap.segments[0].space].reshapes.append(
            ReshapeWidth(node.name, mapped.axis, mapped.inner))
    walk.maps[node.outputs[0].name] = mapped


def _split_heads(walk: _Walk, node: gs.Node, cmap: ChannelMap, template: list) -> bool:
    """Reshape ``[..., H·d, ...] → [..., H, d, ...]`` (multi-head attention): the channels become
    H blocks of d, pruned a whole block (head) at a time; the head axis carries the map."""
    in_dims, out_dims = _dims(node.inputs[0]), _dims(node.outputs[0])
    axis = cmap.axis
    if in_dims is None or out_dims is None or len(out_dims) != len(in_dims) + 1 or axis == 0 \
            or len(cmap.segments) != 1 or cmap.inner != 1 or len(template) != len(out_dims):
        return False
    heads, block = out_dims[axis], out_dims[axis + 1]
    if not all(isinstance(d, (int, np.integer)) for d in (heads, block, in_dims[axis])) or heads < 2 or block < 2 \
            or heads * block != in_dims[axis] or out_dims[1:axis] != in_dims[1:axis] \
            or out_dims[axis + 2:] != in_dims[axis + 1:] or template[axis + 1] != block \
            or template[axis] == 0 or (template[axis] != -1 and not _is_const(node.inputs[1])):
        return False
    space = walk.coarsen(cmap.segments[0].space, int(block))
    if space is None:
        return False
    if template[axis] != -1:
        walk.spaces[space].reshapes.append(ReshapeWidth(node.name, axis, 1))
    walk.maps[node.outputs[0].name] = ChannelMap(axis, (Segment(space, int(heads)),))
    return True


@channel_rule("Shape")
def _shape(walk: _Walk, node: gs.Node) -> None:
    cmap = walk.maps.get(node.inputs[0].name)
    if cmap is None:
        return
    # Reading the batch size is harmless; reading the channel count would change after pruning.
    for consumer in node.outputs[0].outputs:
        if consumer.op == "Gather":
            index = _static(consumer.inputs[1])
            if index is not None and index.size == 1 and int(index.reshape(-1)[0]) != cmap.axis \
                    and int(index.reshape(-1)[0]) != cmap.axis - len(node.inputs[0].shape):
                continue
        walk.block(cmap, f"Shape {node.name!r} reads the channel count")
        return


@channel_rule("Slice", "Gather", "Split", "Squeeze", "Unsqueeze", "Expand", "Tile", "Softmax", "LogSoftmax")
def _axis_op(walk: _Walk, node: gs.Node) -> None:
    """Ops on some axes: fine when they leave the channel axis alone, else unprunable."""
    cmap = walk.maps.get(node.inputs[0].name)
    if cmap is None:
        return
    rank_in, rank_out = _rank(node.inputs[0]), _rank(node.outputs[0])
    if rank_in is None or rank_out is None:
        walk.block(cmap, "unknown rank")
        return
    axes = _axes_of(node, rank_in)
    if node.op == "Gather" and axes == [cmap.axis] and _permutes_channels(walk, node, cmap):
        return
    if node.op in ("Split", "Slice") and axes is not None and cmap.axis in axes and _cuts_channels(walk, node, cmap):
        return
    if node.op in ("Softmax", "LogSoftmax", "Slice", "Gather", "Split"):
        if axes is None or cmap.axis in axes:
            walk.block(cmap, f"{node.op} {node.name!r} acts on the channel axis")
            return
        if node.op == "Gather":
            index_rank = _rank(node.inputs[1])
            if index_rank is None:
                walk.block(cmap, "unknown rank")
                return
            axis = cmap.axis if cmap.axis < axes[0] else cmap.axis + index_rank - 1
        else:
            axis = cmap.axis
        for out in node.outputs:
            walk.maps[out.name] = ChannelMap(axis, cmap.segments, cmap.inner)
        return
    if node.op in ("Expand", "Tile"):
        in_shape, out_shape = node.inputs[0].shape, node.outputs[0].shape
        shift = rank_out - rank_in
        if out_shape is None or out_shape[cmap.axis + shift] != in_shape[cmap.axis]:
            walk.block(cmap, f"{node.op} {node.name!r} repeats the channel axis")
            return
        walk.maps[node.outputs[0].name] = ChannelMap(cmap.axis + shift, cmap.segments, cmap.inner)
        return
    # Squeeze / Unsqueeze
    if axes is None:
        walk.block(cmap, f"{node.op} {node.name!r} with run-time axes")
        return
    if node.op == "Squeeze":
        if cmap.axis in axes:
            walk.block(cmap, "squeezes the channel axis")
            return
        axis = cmap.axis - sum(a < cmap.axis for a in axes)
    else:
        axes_out = sorted(a + rank_out if a < 0 else a for a in axes)
        axis = cmap.axis
        for a in axes_out:
            if a <= axis:
                axis += 1
    walk.maps[node.outputs[0].name] = ChannelMap(axis, cmap.segments, cmap.inner)


def _permutes_channels(walk: _Walk, node: gs.Node, cmap: ChannelMap) -> bool:
    """A Gather of distinct channels (a channel shuffle, see `plinio_onnx.passes.shuffle`, or a
    selection): the output is a new space tied to the input's channels it picks, so both are
    pruned together and finalize re-indexes the Gather."""
    indices = _static(node.inputs[1])
    if indices is None or indices.ndim != 1 or len(cmap.segments) != 1 or cmap.inner != 1:
        return False
    size = cmap.segments[0].size
    picked = np.asarray(indices, dtype=np.int64) % size
    if picked.size == 0 or np.unique(picked).size != picked.size:
        return False
    target = walk.new_space(picked.size)
    walk.unite(cmap.segments[0].space, target, picked)
    walk.permutes.append((node.name, cmap.segments[0].space, target))
    walk.maps[node.outputs[0].name] = ChannelMap(cmap.axis, (Segment(target, picked.size),))
    return True


def _cuts_channels(walk: _Walk, node: gs.Node, cmap: ChannelMap) -> bool:
    """Split / Slice (step 1) of the channel axis: every output carries, as new spaces tied to
    the input's, the stretch of channels it takes (segment by segment)."""
    if cmap.inner != 1:
        return False
    width = sum(seg.size for seg in cmap.segments)
    ranges = _split_ranges(node, width) if node.op == "Split" else _slice_range(node, cmap.axis, width)
    if ranges is None or len(ranges) != len(node.outputs):
        return False
    offset = 0
    for seg in cmap.segments:
        walk.spaces[seg.space].cuts.append(ChannelCut(node.name, cmap.axis, offset))
        offset += seg.size
    for out, (begin, end) in zip(node.outputs, ranges):
        segments, offset = [], 0
        for seg in cmap.segments:
            lo, hi = max(begin, offset), min(end, offset + seg.size)
            if lo < hi:
                part = walk.new_space(hi - lo)
                walk.unite(seg.space, part, np.arange(lo - offset, hi - offset))
                segments.append(Segment(part, hi - lo))
            offset += seg.size
        if not segments:
            return False
        walk.maps[out.name] = ChannelMap(cmap.axis, tuple(segments))
    return True


def _split_ranges(node: gs.Node, width: int) -> list[tuple[int, int]] | None:
    sizes = None
    if len(node.inputs) > 1 and node.inputs[1].name:
        value = _static(node.inputs[1])
        if value is None:
            return None
        sizes = [int(v) for v in value.reshape(-1)]
    elif "split" in node.attrs:
        sizes = [int(v) for v in node.attrs["split"]]
    else:
        parts = int(node.attrs.get("num_outputs", len(node.outputs)))
        chunk = -(-width // parts)
        sizes = [min(chunk, width - k * chunk) for k in range(parts)]
    if sum(sizes) != width or any(size <= 0 for size in sizes):
        return None
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _slice_range(node: gs.Node, axis: int, width: int) -> list[tuple[int, int]] | None:
    values = [_static(t) if i < len(node.inputs) and t.name else None
              for i, t in enumerate(node.inputs[1:5], start=1)]
    starts, ends = values[0], values[1]
    axes = values[2] if len(values) > 2 and values[2] is not None else None
    steps = values[3] if len(values) > 3 else None
    if starts is None or ends is None or (len(node.inputs) > 3 and node.inputs[3].name and axes is None) \
            or (len(node.inputs) > 4 and node.inputs[4].name and steps is None):
        return None
    rank = _rank(node.inputs[0])
    axes = list(range(starts.size)) if axes is None else [int(a) % rank for a in axes.reshape(-1)]
    k = axes.index(axis)
    if steps is not None and int(steps.reshape(-1)[k]) != 1:
        return None
    begin, end, _ = slice(int(starts.reshape(-1)[k]), int(ends.reshape(-1)[k])).indices(width)
    return [(begin, end)] if end > begin else None


def _axes_of(node: gs.Node, rank: int) -> list[int] | None:
    if node.op in ("Softmax", "LogSoftmax"):
        return [int(node.attrs.get("axis", -1)) % rank]
    if node.op in ("Gather", "Split"):
        return [int(node.attrs.get("axis", 0)) % rank]
    if node.op == "Slice":
        if len(node.inputs) > 3 and node.inputs[3].name:
            value = _static(node.inputs[3])
            return None if value is None else [int(a) % rank for a in value.reshape(-1)]
        starts = _static(node.inputs[1]) if len(node.inputs) > 1 else None
        return None if starts is None else list(range(starts.size))
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
        value = _static(node.inputs[1])
        axes = None if value is None else [int(a) for a in value.reshape(-1)]
    if axes is None:
        return None
    if node.op == "Squeeze":
        return [a % rank for a in axes]
    return list(axes)


# -- searchable functions ---------------------------------------------------------------------
_PLINIO_RULES: dict[str, Callable[[_Walk, gs.Node], None]] = {}


def _choice(walk: _Walk, node: gs.Node) -> None:
    """SuperNet ``Choice(candidates, logits, T)``: the branches arrive stacked on a new leading axis
    (Unsqueeze + Concat, which already united their channels); the mix keeps each channel where it
    is, like a residual Add, so the output carries the united channels one axis lower."""
    cmap = walk.maps.get(node.inputs[0].name)
    if cmap is None:
        return
    if cmap.axis == 0:
        walk.block(cmap, f"Choice {node.name!r} chooses along the channel axis")
        return
    walk.maps[node.outputs[0].name] = ChannelMap(cmap.axis - 1, cmap.segments, cmap.inner)


_PLINIO_RULES["Choice"] = _choice


# -- layers ---------------------------------------------------------------------------------
def _bias_name(node: gs.Node, index: int, width: int) -> str | None:
    if len(node.inputs) <= index or not node.inputs[index].name:
        return None
    bias = node.inputs[index]
    return bias.name if _is_const(bias) and int(np.asarray(bias.values).size) == width else None


@channel_rule("Conv")
def _conv(walk: _Walk, node: gs.Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    cmap = walk.maps.get(x.name)
    out = node.outputs[0]
    if not _is_const(w):
        walk.block(cmap, f"Conv {node.name!r} has a run-time weight")
        return
    c_out, c_in_group = w.shape[0], w.shape[1]
    groups = int(node.attrs.get("group", 1))
    c_in = c_in_group * groups
    if cmap is not None and (cmap.axis != 1 or cmap.inner != 1):
        walk.block(cmap, f"Conv {node.name!r} reads channels on another axis")
        cmap = None
    if groups == 1:
        walk.consume(node, cmap, w.name, axis=1)
        walk.produce(node, out, c_out, 1, Producer(node.name, w.name, 0, _bias_name(node, 2, c_out)))
        return
    if groups == c_in == c_out and cmap is not None:
        # Depthwise: output channel c reads only input channel c; it carries the input's channels.
        for seg in cmap.segments:
            walk.spaces[seg.space].depthwise.append(node.name)
        _add_members(walk, node, cmap, [(1, 0)] + ([(2, 0)] if _bias_name(node, 2, c_out) else []))
        walk.layer_inputs[node.name] = [(seg.space, 1) for seg in cmap.segments]
        if len(cmap.segments) == 1:
            walk.layer_output[node.name] = cmap.segments[0].space
        walk.maps[out.name] = cmap
        return
    if walk.grouped_convs and c_in_group > 1 and c_out // groups > 1:
        # Each output group reads its own input slice: prunable on both sides; uneven groups are
        # exported as one Conv per group (`plinio_onnx.passes.prune`).
        if cmap is not None:
            offset, record = 0, []
            for seg in cmap.segments:
                walk.spaces[seg.space].consumers.append(Consumer(node.name, w.name, 1, offset, 1, groups))
                record.append((seg.space, 1))
                offset += seg.size
            walk.layer_inputs[node.name] = record
        sid = walk.produce(node, out, c_out, 1, Producer(node.name, w.name, 0, _bias_name(node, 2, c_out)))
        walk.grouped.append((node, groups, cmap, sid))
        return
    reason = f"grouped Conv {node.name!r} (groups={groups}) is kept whole"
    walk.block(cmap, reason)
    walk.produce(node, out, c_out, 1, Producer(node.name, w.name, 0, _bias_name(node, 2, c_out)), reason=reason)


@channel_rule("ConvTranspose")
def _conv_transpose(walk: _Walk, node: gs.Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    cmap = walk.maps.get(x.name)
    groups = int(node.attrs.get("group", 1))
    if not _is_const(w) or groups != 1:
        walk.block(cmap, f"ConvTranspose {node.name!r} (run-time weight or groups) is kept whole")
        reason = "grouped or run-time ConvTranspose"
        walk.produce(node, node.outputs[0], int(node.outputs[0].shape[1]) if node.outputs[0].shape else 0,
                     1, None, reason=reason)
        return
    c_out = int(w.shape[1])
    if cmap is not None and (cmap.axis != 1 or cmap.inner != 1):
        walk.block(cmap, f"ConvTranspose {node.name!r} reads channels on another axis")
        cmap = None
    walk.consume(node, cmap, w.name, axis=0)
    walk.produce(node, node.outputs[0], c_out, 1, Producer(node.name, w.name, 1, _bias_name(node, 2, c_out)))


@channel_rule("Gemm")
def _gemm(walk: _Walk, node: gs.Node) -> None:
    a, b = node.inputs[0], node.inputs[1]
    cmap = walk.maps.get(a.name)
    if not _is_const(b) or node.attrs.get("transA", 0):
        walk.block_inputs(node, "Gemm with a run-time weight or transposed input")
        if node.outputs[0].shape is not None and isinstance(node.outputs[0].shape[1], (int, np.integer)):
            walk.produce(node, node.outputs[0], int(node.outputs[0].shape[1]), 1, None,
                         reason="Gemm with a run-time weight")
        return
    trans_b = bool(node.attrs.get("transB", 0))
    n = int(b.shape[0] if trans_b else b.shape[1])
    if cmap is not None and cmap.axis != 1:
        walk.block(cmap, f"Gemm {node.name!r} reads channels on another axis")
        cmap = None
    walk.consume(node, cmap, b.name, axis=1 if trans_b else 0)
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        c = node.inputs[2]
        size = int(np.asarray(c.values).size) if _is_const(c) else -1
        if size == n and float(node.attrs.get("beta", 1.0)) != 0.0:
            bias = c.name
        elif size != 1:
            walk.produce(node, node.outputs[0], n, 1, None, reason=f"Gemm {node.name!r} has a 2-D C")
            return
    walk.produce(node, node.outputs[0], n, 1, Producer(node.name, b.name, 0 if trans_b else 1, bias))


@channel_rule("MatMul")
def _matmul(walk: _Walk, node: gs.Node) -> None:
    a, b = node.inputs
    cmap = walk.maps.get(a.name)
    rank = _rank(a)
    if _is_const(b) and _rank(b) == 2 and rank is not None:
        if cmap is not None and cmap.axis != rank - 1:
            walk.block(cmap, f"MatMul {node.name!r} reads channels on another axis")
            cmap = None
        walk.consume(node, cmap, b.name, axis=0)
        walk.produce(node, node.outputs[0], int(b.shape[1]), _rank(node.outputs[0]) - 1,
                     Producer(node.name, b.name, 1, None))
        return
    if not _batched_matmul(walk, node):
        walk.block_inputs(node, "MatMul between activations reads channels along a contracted axis")


def _batched_matmul(walk: _Walk, node: gs.Node) -> bool:
    """MatMul between activations whose channels lie on a batch axis (attention heads: Q·Kᵀ and
    scores·V per head): the heads of both inputs are tied and carried to the output."""
    ranks = [_rank(t) for t in node.inputs]
    out_rank = _rank(node.outputs[0])
    if None in ranks or out_rank is None:
        return False
    carried = [(t, ChannelMap(m.axis + out_rank - r, m.segments, m.inner))
               for t, r in zip(node.inputs, ranks) if (m := walk.maps.get(t.name)) is not None]
    if not carried:
        return True
    reference = carried[0][1]
    if reference.axis >= out_rank - 2 or reference.inner != 1:
        return False
    for _, m in carried[1:]:
        if m.axis != reference.axis or m.inner != 1 or [s.size for s in m.segments] != [s.size for s in reference.segments]:
            return False
    for tensor, rank in zip(node.inputs, ranks):  # an input without heads must broadcast over them
        if walk.maps.get(tensor.name) is None:
            axis = reference.axis - (out_rank - rank)
            if axis >= 0 and (tensor.shape is None or tensor.shape[axis] != 1):
                return False
    for _, m in carried[1:]:
        for a, b in zip(m.segments, reference.segments):
            walk.unite(b.space, a.space)
    walk.maps[node.outputs[0].name] = reference
    walk.layer_rows[node.name] = [seg.space for seg in reference.segments]
    return True


def analyze_channels(graph: Graph, *, grouped_convs: bool = True) -> ChannelAnalysis:
    """Channel groups of ``graph`` (canonical, as `load` returns it); see the module docstring.
    ``grouped_convs=False`` keeps grouped (not depthwise) Convs whole."""
    graph.gs.toposort()
    return _Walk(graph.gs, grouped_convs).run()
