"""Channel shuffles as channel permutations, and back.

A channel shuffle (ShuffleNet) is spelled Reshape ``[N, g, C/g, ...]`` → Transpose (axes 1, 2) →
Reshape ``[N, C, ...]``: output channel m is input channel (m mod g)·C/g + ⌊m/g⌋. The reshapes
split the channel axis, which the channel analysis cannot follow, and once channels are pruned
unevenly the surviving channels no longer form a g × C/g grid. So the PIT pass first rewrites
every shuffle as one ``Gather`` of the channel axis with that permutation (the analysis ties the
channels on both sides through it; finalize re-indexes it), and finalize turns every such Gather
whose surviving permutation is again a shuffle back into the three-op form compilers expect.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

SUFFIX = "/channel_shuffle"


def shuffle_indices(channels: int, groups: int) -> np.ndarray:
    """Input channel of every output channel of a shuffle of ``channels`` in ``groups``."""
    m = np.arange(channels)
    return (m % groups) * (channels // groups) + m // groups


def shuffles_as_gather(g: gs.Graph) -> int:
    """Rewrite every Reshape–Transpose–Reshape channel shuffle of ``g`` in place; returns how many."""
    count = 0
    for first in list(g.nodes):
        pattern = _shuffle_at(first)
        if pattern is None:
            continue
        last, groups = pattern
        x, out = first.inputs[0], last.outputs[0]
        channels = int(x.shape[1])
        last.outputs.clear()
        g.nodes.append(gs.Node("Gather", name=f"{last.name}{SUFFIX}", attrs={"axis": 1},
                               inputs=[x, gs.Constant(f"{last.name}{SUFFIX}_indices",
                                                      shuffle_indices(channels, groups))],
                               outputs=[out]))
        count += 1
    if count:
        g.cleanup(remove_unused_graph_inputs=False).toposort()
    return count


def _shuffle_at(first: gs.Node) -> tuple[gs.Node, int] | None:
    """(last Reshape, groups) when ``first`` starts a channel shuffle, else None."""
    if first.op != "Reshape" or (first.domain or "") not in ("", "ai.onnx") or not first.outputs:
        return None
    x, split = first.inputs[0], first.outputs[0]
    if x.shape is None or split.shape is None or len(split.shape) != len(x.shape) + 1 or len(x.shape) < 3:
        return None
    dims = list(x.shape)
    groups, per_group = split.shape[1], split.shape[2]
    if not all(isinstance(d, (int, np.integer)) for d in (dims[1], groups, per_group)) \
            or groups * per_group != dims[1] or groups < 2 or per_group < 2 \
            or list(split.shape[3:]) != dims[2:] or len(split.outputs) != 1:
        return None
    transpose = split.outputs[0]
    rank = len(split.shape)
    if transpose.op != "Transpose" or list(transpose.attrs.get("perm", [])) != [0, 2, 1] + list(range(3, rank)):
        return None
    mid = transpose.outputs[0]
    if len(mid.outputs) != 1 or mid.outputs[0].op != "Reshape":
        return None
    last = mid.outputs[0]
    merged = last.outputs[0].shape
    if merged is None or len(merged) != len(dims) or list(merged[1:]) != dims[1:]:
        return None
    return last, int(groups)


def gathers_as_shuffles(g: gs.Graph) -> None:
    """Turn the Gathers `shuffles_as_gather` wrote back into shuffles where they still are one
    (static spatial sizes); the rest stay a channel Gather, which computes the same."""
    for node in list(g.nodes):
        if node.op != "Gather" or not node.name.endswith(SUFFIX) or not isinstance(node.inputs[1], gs.Constant):
            continue
        x, out = node.inputs[0], node.outputs[0]
        indices = np.asarray(node.inputs[1].values)
        channels = indices.size
        dims = None if x.shape is None else list(x.shape)
        if dims is None or not all(isinstance(d, (int, np.integer)) for d in dims[2:]):
            continue
        groups = next((k for k in range(2, channels // 2 + 1) if channels % k == 0
                       and np.array_equal(indices, shuffle_indices(channels, k))), None)
        if groups is None:
            continue
        base = node.name[:-len(SUFFIX)]
        spatial = [int(d) for d in dims[2:]]
        split = gs.Variable(f"{base}/split", dtype=out.dtype)
        swapped = gs.Variable(f"{base}/swapped", dtype=out.dtype)
        node.outputs.clear()
        g.nodes.extend([
            gs.Node("Reshape", name=f"{base}/shuffle_split",
                    inputs=[x, gs.Constant(f"{base}/shuffle_split_shape",
                                           np.array([0, groups, channels // groups] + spatial, np.int64))],
                    outputs=[split]),
            gs.Node("Transpose", name=f"{base}/shuffle_transpose", attrs={"perm": [0, 2, 1] + list(range(3, len(dims) + 1))},
                    inputs=[split], outputs=[swapped]),
            gs.Node("Reshape", name=base,
                    inputs=[swapped, gs.Constant(f"{base}/shuffle_merge_shape",
                                                 np.array([0, channels] + spatial, np.int64))],
                    outputs=[out]),
        ])
    g.cleanup(remove_unused_graph_inputs=False).toposort()
