"""The argmax precisions of a searchable MPS graph and the numbers a quantized export writes.

Shared by the QDQ writer (`plinio_onnx.passes.qdq`), the QONNX writer (`plinio_onnx.passes.qonnx`)
and the zero-bit channel slicing (`plinio_onnx.passes.zero_bit`). The numbers come from the same
torch functions the searchable module evaluates with (`plinio_onnx.functions.mps`), so the
exported model computes what the module computes in eval mode.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx_graphsurgeon as gs
import torch

from plinio_onnx.errors import PassError
from plinio_onnx.functions import mps as fn
from plinio_onnx.graph import Graph
from plinio_onnx.heap import release_free_memory
from plinio_onnx.records import ActivationQuantizer, QuantizedLayer


class ChosenActivation(NamedTuple):
    """An activation quantizer at its argmax precision."""
    bits: int
    signed: bool
    scale: torch.Tensor            # [1]


class ChosenLayer(NamedTuple):
    """A quantized layer at its argmax precisions, as the torch module computes it in eval."""
    bits: np.ndarray               # chosen weight bits: [C] or a scalar
    w: torch.Tensor                # float weight (the graph's array where it is float32)
    q: torch.Tensor                # weight integers, int8 (0 where 0 bits)
    s_dq: torch.Tensor             # scales to dequantize q with (1 where 0 bits)
    keep: torch.Tensor             # bits > 0, broadcast like the scales
    bias: tuple | None             # (b, integers, scales, zeroed) of a quantized bias
    bias_value: np.ndarray | None  # [C] what the layer adds to each channel (None: unknown)


def values(tensor: gs.Tensor) -> np.ndarray:
    return np.asarray(tensor.values)


def choose_activation(node: gs.Node, act: ActivationQuantizer) -> ChosenActivation:
    """(bits, signed, scale) of an activation quantizer's argmax precision."""
    p = int(np.argmax(values(node.inputs[1])))
    bits, signed = int(act.bits[p]), bool(act.signed)
    return ChosenActivation(bits, signed,
                            fn.act_scale(torch.from_numpy(values(node.inputs[2])[p:p + 1].copy()), bits, signed))


def choose_layer(graph: Graph, nodes: dict, layer: QuantizedLayer, act: ChosenActivation) -> ChosenLayer:
    """A layer's weight (and bias) at its argmax precisions."""
    wq = nodes[layer.weight_quant]
    weight = wq.inputs[0]
    if not isinstance(weight, gs.Constant):
        raise PassError("the quantized weight is not a constant at export (a mask left over?)",
                        file=graph.source, node=layer.node, op=layer.op)
    w = _read_only_tensor(weight.values)
    bits = fn.chosen_weight_bits(values(wq.inputs[1]), layer.bits)          # [C] or scalar
    broadcast = fn.broadcast_bits(torch.from_numpy(np.asarray(bits, np.float32)), w.dim(),
                                  layer.axis if layer.per_channel else -1)
    q, s, keep = _weight_integers(w, broadcast, layer)
    s_dq = torch.where(keep, s, torch.ones_like(s))                          # pruned: q = 0
    node = nodes[layer.node]
    has_bias = len(node.inputs) > 2 and bool(node.inputs[2].name)
    bias, bias_value = None, (None if has_bias else np.zeros(layer.channels))
    if layer.bias_quant:
        bq = nodes[layer.bias_quant]
        if not isinstance(bq.inputs[0], gs.Constant):
            raise PassError("the quantized bias is not a constant at export", file=graph.source,
                            node=layer.node, op=layer.op)
        b = torch.from_numpy(np.array(bq.inputs[0].values, np.float32))
        s_in = act.scale
        s_w = torch.where(keep, s, torch.zeros_like(s)).reshape(-1)
        bq_int, sb = fn.bias_integers(b, s_in, s_w)
        zero = sb.expand_as(b) <= 0
        ints = torch.where(zero, torch.zeros_like(bq_int), bq_int.expand_as(b))
        bias = (b, ints, s_in * s_dq.reshape(-1), zero)                      # = s_in·s_w where kept
        bias_value = (ints * sb.expand_as(b)).numpy().astype(np.float64)
    return ChosenLayer(np.asarray(bits), w, q, s_dq, keep, bias, bias_value)


#: Weight entries quantized at once at export: the quantizer's float temporaries (several times
#: the block) stay a few MB however big a layer is (a VGG/AlexNet classifier holds most weights).
_BLOCK_ENTRIES = 1 << 20


def _weight_integers(w: torch.Tensor, bits: torch.Tensor, layer: QuantizedLayer
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fn.weight_quant_values` of ``w`` with q as int8 (2–8 bits fit: every layer's integers
    are held until the writers store them, a quarter of the weights rather than a float copy).
    With per-channel scales, computed in blocks of channels: each channel's scale reduces over
    its own entries only, so the values are those of one call."""
    axis = layer.scale_axis
    channels = w.shape[axis] if axis >= 0 else 1
    sliced = bits.dim() == w.dim() and axis >= 0 and bits.shape[axis] == channels > 1
    blockable = axis >= 0 and axis not in layer.reduce_axes and \
        all(size == 1 for a, size in enumerate(bits.shape) if a != axis or not sliced)
    if not blockable or w.numel() <= _BLOCK_ENTRIES:
        q, s, keep = fn.weight_quant_values(w, bits, layer.reduce_axes)
        q = q.to(torch.int8)
        if w.numel() >= _BLOCK_ENTRIES // 2:
            release_free_memory()   # the temporaries: the heap does not reuse them in place
        return q, s, keep
    step = max(1, _BLOCK_ENTRIES * channels // w.numel())
    q = torch.empty(w.shape, dtype=torch.int8)       # made first: the blocks' temporaries reuse
    s = keep = None                                   # one another's memory, around it
    for start in range(0, channels, step):
        size = min(step, channels - start)
        q_block, s_block, keep_block = fn.weight_quant_values(
            w.narrow(axis, start, size), bits.narrow(axis, start, size) if sliced else bits, layer.reduce_axes)
        if s is None:
            s = s_block.new_empty(s_block.shape[:axis] + (channels,) + s_block.shape[axis + 1:])
            keep = keep_block.new_empty(keep_block.shape[:axis] + (channels,) + keep_block.shape[axis + 1:]) \
                if sliced else keep_block
        q.narrow(axis, start, size).copy_(q_block)
        s.narrow(axis, start, size).copy_(s_block)
        if sliced:
            keep.narrow(axis, start, size).copy_(keep_block)
        del q_block, s_block, keep_block
        release_free_memory()
    return q, s, keep


def _read_only_tensor(array) -> torch.Tensor:
    """A float32 tensor of ``array`` that shares its memory where it can (the export only reads
    it; a copy of every weight at once would double the export's peak memory)."""
    array = np.asarray(array)
    if array.dtype != np.float32 or not array.flags.writeable:  # torch wraps writable arrays only
        array = np.array(array, np.float32)
    return torch.from_numpy(array)


def per_channel_keep(keep: torch.Tensor, layer: QuantizedLayer) -> np.ndarray:
    """Channel keep mask ([C] booleans) from the broadcast keep tensor."""
    flat = keep.reshape(-1).numpy()
    return np.resize(flat, layer.channels) if flat.size != layer.channels else flat


def detach(node: gs.Node) -> None:
    node.inputs.clear()
    node.outputs.clear()
