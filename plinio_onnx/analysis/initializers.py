"""Who reads which initializer: the facts the loader's tie policy and the channel analysis share."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

__all__ = ["is_weight_like", "reading_slots", "shared_initializers"]


def reading_slots(g: gs.Graph) -> list[tuple[gs.Constant, list[tuple[gs.Node, int]]]]:
    """Every initializer read by a node, with its (node, input index) slots in node order."""
    slots: dict[int, tuple[gs.Constant, list[tuple[gs.Node, int]]]] = {}
    for node in g.nodes:
        for index, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant):  # (gs tensors are unhashable: keyed by identity)
                slots.setdefault(id(tensor), (tensor, []))[1].append((node, index))
    return list(slots.values())


def is_weight_like(constant: gs.Constant) -> bool:
    """A floating initializer of more than one value (a trainable weight, not a scalar)."""
    try:
        floating = np.issubdtype(np.dtype(constant.dtype), np.floating)
    except TypeError:  # bfloat16/float8: no numpy dtype, never trained here
        return False
    return floating and int(np.prod(constant.shape)) > 1


def shared_initializers(g: gs.Graph) -> dict[str, list[gs.Node]]:
    """Floating initializers read by more than one node → those nodes (what ``tied="share"``
    leaves; methods treat such a weight as coupled or unsearchable)."""
    readers: dict[str, list[gs.Node]] = {}
    for constant, slots in reading_slots(g):
        nodes = list({id(node): node for node, _ in slots}.values())
        if len(nodes) > 1 and is_weight_like(constant):
            readers[constant.name] = nodes
    return readers
