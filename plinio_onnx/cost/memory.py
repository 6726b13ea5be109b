"""Peak activation memory: the most bytes of activations live at once over the execution order
(what an MCU's RAM must hold while the model runs; weights live in flash and are not counted).

Liveness follows TensorFlow Lite Micro's memory planner (`GreedyMemoryPlanner`: a buffer lives
from the step that writes it to the last step that reads it; no op works in place): nodes run in
the graph's (topological) order; a graph input is live from the start, a graph output to the end;
while a node runs, its inputs and its outputs are all live. View ops (Reshape, Flatten, Squeeze,
Unsqueeze, Identity, Dropout) and ``ai.plinio`` nodes on activations (search masks and
quantizers, gone after export) write no buffer of their own: their output is the same buffer as
their input, which then lives until the last reader of either. The peak is the exact figure of
that schedule on a static graph; a real arena can need more (fragmentation), never less.

The peak is a whole-graph cost, not a per-layer one: `MemoryPlan.peak` takes per-tensor
effective channel counts (axis 1) and bit-widths, numbers or tensors, so it is differentiable in
PIT masks and MPS bit-widths (through the step that holds the peak). In a search::

    loss = task_loss + strength * po.cost.peak_memory_of(model, bits=8) / budget_bytes

`peak_memory_of` reads the effective channels (and MPS's activation bits) off a searchable model.
On a SuperNet it is the supernet's own memory: every branch runs, so every branch is counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import onnx_graphsurgeon as gs
import torch

from ..errors import PlinioOnnxError

#: Ops whose output is a view of their (first) input: no buffer of their own.
VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"})
FLOAT_BITS = 32


@dataclass
class Buffer:
    """One activation buffer: the tensor that writes it and the views that share it."""

    tensors: list[str]          # owner first, then its views in order
    elements: int               # per inference (batch 1)
    start: int                  # first step it is live
    end: int                    # last step it is live


@dataclass
class MemoryPlan:
    """The buffers of a graph and when each is live; `peak` prices them."""

    steps: list[str]                                    # node names, in execution order
    buffers: list[Buffer]
    channels: dict[str, int] = field(default_factory=dict)  # static axis-1 size of every tensor

    def sizes(self, channels: Mapping[str, Any] | None = None, bits: "Mapping[str, Any] | Any" = FLOAT_BITS,
              default_bits: Any = FLOAT_BITS) -> list[Any]:
        """Bytes of every buffer. ``channels``: effective axis-1 size by tensor name (a buffer
        scales by the first of its tensors given); ``bits``: one bit-width for all, or bits by
        tensor name (a buffer takes the last of its tensors given — a quantizer's view is what
        the deployed producer writes), others at ``default_bits``."""
        channels = channels or {}
        per_tensor = isinstance(bits, Mapping)
        out = []
        for buffer in self.buffers:
            elements: Any = buffer.elements
            for name in buffer.tensors:
                if name in channels:
                    elements = elements * channels[name] / self.channels[name]
                    break
            width = default_bits
            if per_tensor:
                given = [bits[name] for name in buffer.tensors if name in bits]
                width = given[-1] if given else default_bits
            else:
                width = bits
            out.append(elements * width / 8)
        return out

    def live_bytes(self, channels: Mapping[str, Any] | None = None, bits: "Mapping[str, Any] | Any" = FLOAT_BITS,
                   default_bits: Any = FLOAT_BITS) -> list[Any]:
        """Bytes live at each step (while node ``steps[i]`` runs)."""
        sizes = self.sizes(channels, bits, default_bits)
        starting: dict[int, list[int]] = {}
        ending: dict[int, list[int]] = {}
        for index, buffer in enumerate(self.buffers):
            starting.setdefault(buffer.start, []).append(index)
            ending.setdefault(buffer.end, []).append(index)
        totals, live = [], 0
        for step in range(max(len(self.steps), 1)):
            for index in starting.get(step, ()):
                live = live + sizes[index]
            totals.append(live)
            for index in ending.get(step, ()):
                live = live - sizes[index]
        return totals

    def peak(self, channels: Mapping[str, Any] | None = None, bits: "Mapping[str, Any] | Any" = FLOAT_BITS,
             default_bits: Any = FLOAT_BITS) -> Any:
        """The peak activation memory in bytes (a tensor when any input is one)."""
        totals = self.live_bytes(channels, bits, default_bits)
        if any(isinstance(t, torch.Tensor) for t in totals):
            device = next(t for t in totals if isinstance(t, torch.Tensor)).device
            return torch.stack([torch.as_tensor(t, dtype=torch.float64, device=device) for t in totals]).max()
        return max(totals)

    def live_at(self, step: int) -> list[str]:
        """The buffers (by owning tensor) live while ``steps[step]`` runs."""
        return [b.tensors[0] for b in self.buffers if b.start <= step <= b.end]


def memory_plan(graph) -> MemoryPlan:
    """The activation buffers of ``graph`` (a `plinio_onnx.Graph`) and their lifetimes."""
    g: gs.Graph = graph.gs
    source = graph.source or "model"
    buffers: list[Buffer] = []
    owner: dict[str, int] = {}
    static_channels: dict[str, int] = {}

    batch = {d for t in g.inputs if t.shape and not isinstance(t.shape[0], (int, np.integer)) for d in t.shape[:1]}

    def new_buffer(tensor: gs.Tensor, start: int, node: gs.Node | None) -> None:
        elements, channels = _static_size(tensor, node, source, batch)
        owner[tensor.name] = len(buffers)
        static_channels[tensor.name] = channels
        buffers.append(Buffer([tensor.name], elements, start, start))

    for tensor in g.inputs:
        if not isinstance(tensor, gs.Constant):
            new_buffer(tensor, 0, None)
    steps: list[str] = []
    for node in g.nodes:
        readers = [t for t in node.inputs if t.name in owner]
        if not readers:
            continue  # constants only (weights, masks of weights): not an activation
        step = len(steps)
        steps.append(node.name)
        for tensor in readers:
            buffers[owner[tensor.name]].end = step
        outputs = [t for t in node.outputs if t.name]
        if _is_view(node) and node.inputs[0].name in owner and outputs:
            # an ai.plinio node's other outputs (a quantizer's scale) are no activations
            view, outputs = outputs[0], ([] if _is_plinio(node) else outputs[1:])
            index = owner[node.inputs[0].name]
            owner[view.name] = index
            buffers[index].tensors.append(view.name)
            static_channels[view.name] = _view_channels(view, static_channels[node.inputs[0].name])
        for tensor in outputs:
            new_buffer(tensor, step, node)
    last = max(len(steps) - 1, 0)
    for tensor in g.outputs:
        if tensor.name in owner:
            buffers[owner[tensor.name]].end = last
    return MemoryPlan(steps, buffers, static_channels)


def peak_memory(graph, channels: Mapping[str, Any] | None = None, bits: "Mapping[str, Any] | Any" = FLOAT_BITS,
                default_bits: Any = FLOAT_BITS) -> Any:
    """Peak activation memory of ``graph`` (a `plinio_onnx.Graph` or a `MemoryPlan`) in bytes,
    at ``bits`` per element (32: float; 8 for an int8 deployment), optionally with effective
    channel counts / bit-widths by tensor name (see `MemoryPlan.sizes`)."""
    plan = graph if isinstance(graph, MemoryPlan) else memory_plan(graph)
    return plan.peak(channels, bits, default_bits)


def _is_plinio(node: gs.Node) -> bool:
    from ..graph import PLINIO_DOMAIN
    return (node.domain or "") == PLINIO_DOMAIN


def _is_view(node: gs.Node) -> bool:
    return _is_plinio(node) or ((node.domain or "") in ("", "ai.onnx") and node.op in VIEW_OPS)


def _static_size(tensor: gs.Tensor, node: gs.Node | None, source: str, batch: set) -> tuple[int, int]:
    """(elements at batch 1, axis-1 size) of ``tensor``: a symbolic first dim, or a dim named as
    a graph input's symbolic first dim (``batch``), is the batch."""
    shape = tensor.shape
    where = f"{source}: tensor {tensor.name!r}" + (f" (output of node {node.name!r}, {node.op})" if node else "")
    if shape is None:
        raise PlinioOnnxError(f"{where} has no known shape; peak memory needs static shapes")
    dims = [1 if not isinstance(d, (int, np.integer)) and (i == 0 or d in batch) else d for i, d in enumerate(shape)]
    if any(not isinstance(d, (int, np.integer)) for d in dims):
        raise PlinioOnnxError(f"{where} has a symbolic dimension beyond the batch ({list(shape)}); "
                              "peak memory needs static shapes")
    elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
    return elements, int(dims[1]) if len(dims) >= 2 else elements


def _view_channels(view: gs.Tensor, source_channels: int) -> int:
    shape = view.shape
    if shape is None or len(shape) < 2 or not isinstance(shape[1], (int, np.integer)):
        return source_channels  # e.g. an ai.plinio node's output without an inferred shape
    return int(shape[1])


# -- searchable models ------------------------------------------------------------------------
def searched_sizes(model) -> tuple[dict[str, Any], dict[str, Any]]:
    """(effective channels, activation bits) by tensor name of a searchable model (`po.PIT`,
    `po.MPS`, `po.SuperNet`): every layer's output carries its effective output channels, which
    flow on in proportion through the ops after it (Concat along the channels sums them); a
    quantized layer's input carries its (expected) input bits, and so do the tensors its producer
    layer writes through fused ops (`FUSED_OPS`): an integer deployment requantizes there."""
    g: gs.Graph = model.graph.gs
    nodes = {node.name: node for node in g.nodes}
    channels: dict[str, Any] = {}
    bits: dict[str, Any] = {}
    layer_out = {}
    for spec in model.specs:
        eff = model.effective_spec(spec)
        node = nodes.get(spec.name)
        if node is None:
            continue
        layer_out[node.outputs[0].name] = eff.out_channels
        if eff.input_bits is not None:
            _producer_chain_bits(node.inputs[0], eff.input_bits, bits)
    for node in g.nodes:
        for tensor in node.outputs:
            if tensor.name in layer_out:
                channels[tensor.name] = layer_out[tensor.name]
        out = node.outputs[0] if node.outputs else None
        if out is None or out.name in channels or _axis1(out) is None:
            continue
        tracked = [t for t in node.inputs if t.name in channels]
        if not tracked:
            continue
        if node.op == "Concat" and _concat_axis(node, out) == 1:
            channels[out.name] = sum(channels.get(t.name, _axis1(t) or 0) for t in node.inputs)
        elif _axis1(tracked[0]):
            channels[out.name] = _axis1(out) * channels[tracked[0].name] / _axis1(tracked[0])
    return channels, bits


#: Ops an integer deployment fuses into the layer before them: they write at the bits of the
#: quantizer after them (conv → ReLU → pool → requantize is one kernel writing 8-bit outputs).
FUSED_OPS = frozenset({"Relu", "Clip", "LeakyRelu", "MaxPool", "AveragePool", "GlobalAveragePool",
                       "GlobalMaxPool", "BatchNormalization"}) | VIEW_OPS


def _producer_chain_bits(tensor: gs.Tensor, width: Any, bits: dict[str, Any]) -> None:
    """``width`` bits for ``tensor`` and, back through the fused ops that produce it (each read
    by nothing else), for the tensors they read, up to the layer that writes them."""
    while tensor is not None and tensor.name not in bits:
        bits[tensor.name] = width
        producer = tensor.inputs[0] if tensor.inputs else None
        if producer is None or not (_is_plinio(producer) or producer.op in FUSED_OPS):
            return
        source = producer.inputs[0] if producer.inputs else None
        if source is None or len(source.outputs) != 1:
            return
        tensor = source


def peak_memory_of(model, bits: Any = FLOAT_BITS) -> Any:
    """The peak activation memory (bytes) of a searchable model's current architecture, a
    differentiable tensor: effective channels from its masks, MPS's activation bit-widths
    where it has them and ``bits`` elsewhere (32: float; 8 for an int8 deployment)."""
    channels, act_bits = searched_sizes(model)
    return memory_plan(model.graph).peak(channels, act_bits, default_bits=bits)


def _axis1(tensor: gs.Tensor) -> int | None:
    shape = tensor.shape
    if shape is None or len(shape) < 2 or not isinstance(shape[1], (int, np.integer)):
        return None
    return int(shape[1])


def _concat_axis(node: gs.Node, out: gs.Tensor) -> int:
    axis = int(node.attrs.get("axis", 0))
    return axis + len(out.shape) if axis < 0 else axis
