"""Inputs on which no rounding tie of a QDQ model's quantizers can move its outputs.

``QuantizeLinear`` rounds x / scale to the nearest integer. Where that quotient lies within a
hair of k + 0.5, which way it rounds depends on the last bits of x, and those depend on the order
in which a runtime sums a convolution or a LayerNorm: two correct runtimes may then pick codes
one step apart, and one flipped code of a 2-bit activation moves an output by half its range.
The deployment contract ("one quantization step of the output") holds for inputs without such a
tie; with one, the difference is the runtimes' float rounding, not the compiler or the file.

`tie_free_feeds` draws the usual random inputs (`plinio_onnx.data.random_inputs`), finds in
ONNX Runtime's unfused run (every node as written: the reference semantics of QDQ) every value a
``QuantizeLinear`` reads within ``margin`` steps of a rounding boundary whose two codes both lie
inside the quantizer's integer type (`near_ties`), and rounds all of those the other way
(`tie_effect`: a nudge added before each such quantizer, zero elsewhere). A draw is refused when
that moves some output by more than ``allowed`` of its quantization step — most near-ties sit in
8-bit feature maps, where one flip moves nothing visible, and refusing every draw with one would
refuse every draw of a convolutional network. A refused draw is replaced by seed ``seed + 1``, …,
for at most ``tries`` draws, so the choice is deterministic; `TieError` names the seeds when none
is found.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from plinio_onnx.data import random_inputs
from plinio_onnx.graph import Graph
from plinio_onnx.runtime import ort_session

# steps of a quantizer: ten times the closest tie seen to flip between runtimes (1e-5, a
# LayerNorm output), far above float32's last bit at the small quotients of low-bit codes
DEFAULT_MARGIN = 1e-4
DEFAULT_TRIES = 16
DEFAULT_ALLOWED = 0.5   # of an output's quantization step, half of what the tests allow


class TieError(RuntimeError):
    """No draw within the allowed seeds is free of near-ties."""


@dataclass(frozen=True)
class NearTie:
    """Values of one quantizer's input within the margin of a rounding boundary."""

    quantizer: str          # the QuantizeLinear node's name
    count: int              # how many values
    distance: float         # the closest one's distance from the boundary, in steps


def _constants(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The values of ``proto``'s initializers and Constant nodes, by name."""
    values = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    return values


def _quantizer_inputs(proto: onnx.ModelProto, feeds: dict) -> list[tuple[onnx.NodeProto, np.ndarray, list]]:
    """Each QuantizeLinear node with the values its inputs hold on ``feeds``: x, then scale and
    zero point (those computed in the graph read from ONNX Runtime's unfused run)."""
    quantizers = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    values = {**_constants(proto), **feeds}
    computed = list(dict.fromkeys(name for node in quantizers for name in node.input if name and name not in values))
    if computed:
        probed = onnx.ModelProto()
        probed.CopyFrom(proto)
        outputs = {o.name for o in probed.graph.output}
        probed.graph.output.extend(onnx.ValueInfoProto(name=name) for name in computed if name not in outputs)
        values.update(zip(computed, ort_session(probed, optimize=False).run(computed, feeds)))
    return [(node, values[node.input[0]], [values[name] for name in node.input[1:] if name]) for node in quantizers]


def tie_distance(x: np.ndarray, scale: np.ndarray, zero_point: "np.ndarray | None", axis: int = 1) -> np.ndarray:
    """Each value's distance, in steps, from the nearest rounding boundary of
    ``QuantizeLinear(x, scale, zero_point)`` (per-axis scales along ``axis``); ``inf`` where both
    codes around that boundary saturate to the same end of the integer type."""
    x = np.asarray(x, np.float32)
    scale = np.asarray(scale, np.float32)
    dtype = np.asarray(zero_point).dtype if zero_point is not None else np.dtype(np.uint8)
    zp = np.asarray(zero_point if zero_point is not None else 0, np.float64)
    scale, zp = _along(scale, x.ndim, axis), _along(zp, x.ndim, axis)
    quotient = (x / scale).astype(np.float64)   # in float32, as QuantizeLinear divides
    below = np.floor(quotient)
    distance = np.abs(quotient - below - 0.5)
    info = np.iinfo(dtype)
    inside = (below + zp >= info.min) & (below + 1 + zp <= info.max)
    return np.where(inside, distance, np.inf)


def near_ties(proto: onnx.ModelProto, feeds: dict, margin: float = DEFAULT_MARGIN) -> list[NearTie]:
    """The quantizers of ``proto`` whose input on ``feeds`` lies within ``margin`` steps of a
    rounding boundary (nothing for a model without QuantizeLinear)."""
    found = []
    for node, x, params in _quantizer_inputs(proto, feeds):
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        distance = tie_distance(x, params[0], params[1] if len(params) > 1 else None, axis)
        close = distance < margin
        if close.any():
            found.append(NearTie(node.name, int(close.sum()), float(distance.min())))
    return found


def _nudged(proto: onnx.ModelProto, feeds: dict, margin: float) -> "onnx.ModelProto | None":
    """``proto`` with each near-tie value (`near_ties`) pushed to the other side of its rounding
    boundary by an Add before its quantizer (exactly zero elsewhere); None without near-ties."""
    nudged = onnx.ModelProto()
    nudged.CopyFrom(proto)
    nodes = {n.name: n for n in nudged.graph.node}
    any_tie = False
    for node, x, params in _quantizer_inputs(proto, feeds):
        if x.dtype != np.float32:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        zero_point = params[1] if len(params) > 1 else None
        close = tie_distance(x, params[0], zero_point, axis) < margin
        if not close.any():
            continue
        scale = np.broadcast_to(_along(np.asarray(params[0], np.float32), x.ndim, axis), x.shape)
        quotient = x / scale
        below = np.floor(quotient)
        rounded_up = np.round(quotient) > below       # QuantizeLinear rounds half to even
        target = ((below + np.where(rounded_up, 0.25, 0.75)) * scale).astype(np.float32)
        nudge = np.where(close, target - x, 0).astype(np.float32)
        name = f"{node.name}/tie_nudge"
        nudged.graph.initializer.append(onnx.numpy_helper.from_array(nudge, name))
        nudged.graph.node.append(onnx.helper.make_node("Add", [node.input[0], name], [f"{name}_out"], name=name))
        nodes[node.name].input[0] = f"{name}_out"
        any_tie = True
    if not any_tie:
        return None
    return _sorted(nudged)


def _along(values: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """A per-axis parameter shaped to broadcast along ``axis`` of a rank-``rank`` tensor."""
    if values.ndim == 1 and values.size > 1:
        shape = [1] * rank
        shape[axis % rank] = values.size
        return values.reshape(shape)
    return values


def _sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its nodes in topological order (the nudges were appended last)."""
    ready = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        runnable = [n for n in pending if all(i in ready for i in n.input)]
        if not runnable:
            raise ValueError("the model's nodes have no topological order")
        for node in runnable:
            ordered.append(node)
            ready.update(node.output)
        pending = [n for n in pending if n not in runnable]
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return model


def tie_effect(proto: onnx.ModelProto, feeds: dict, margin: float = DEFAULT_MARGIN) -> float:
    """How far rounding every near-tie of ``feeds`` (`near_ties`) the other way moves the
    outputs of ``proto`` in ONNX Runtime, in quantization steps of each output (range / 255, as
    the deployment tests measure); 0 without near-ties."""
    nudged = _nudged(proto, feeds, margin)
    if nudged is None:
        return 0.0
    expected = ort_session(proto, optimize=False).run(None, feeds)
    moved = ort_session(nudged, optimize=False).run(None, feeds)
    steps = []
    for reference, other in zip(expected, moved):
        step = max(float(reference.max() - reference.min()), 1e-6) / 255
        steps.append(float(np.max(np.abs(reference.astype(np.float64) - other))) / step)
    return max(steps)


def tie_free_feeds(proto: onnx.ModelProto, seed: int, batch: int, *, margin: float = DEFAULT_MARGIN,
                   tries: int = DEFAULT_TRIES, allowed: float = DEFAULT_ALLOWED) -> dict:
    """`random_inputs` for ``proto`` at the first of seeds ``seed`` … ``seed + tries − 1`` whose
    near-ties (`near_ties`, within ``margin`` steps), all rounded the other way, move no output
    by more than ``allowed`` of its quantization step (`tie_effect`); a model without quantizers
    takes seed ``seed``. `TieError` when every draw moves one more."""
    graph = Graph(gs.import_onnx(proto))
    effects = []
    for attempt in range(seed, seed + tries):
        feeds = random_inputs(graph, batch=batch, seed=attempt)
        effects.append(tie_effect(proto, feeds, margin))
        if effects[-1] <= allowed:
            return feeds
    raise TieError(f"seeds {seed}..{seed + tries - 1} at batch {batch}: rounding the values within {margin:g} "
                   f"steps of a boundary the other way moves an output by {min(effects):.2f} steps or more "
                   f"(allowed {allowed:g})")
