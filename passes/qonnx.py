"""The QONNX writer: MPS quantizers at their chosen precisions as QONNX ``Quant`` nodes.

``Quant`` (domain ``qonnx.custom_op.general``) has inputs (x, scale, zeropt, bitwidth) and
attributes signed / narrow / rounding_mode="ROUND", as FINN, hls4ml and qonnx's executor read
them. What is written, and why:

* Weights: a float initializer holding the already quantized values q·s (0-bit channels 0)
  under a ``Quant`` node with per-channel (or per-tensor) scales, so the node reproduces them
  exactly whatever rounding its reader uses. A layer whose kept channels share one precision
  gets a scalar ``bitwidth``. A layer whose channels chose different precisions gets one
  ``Quant`` per precision group (the group's channels, its scales, a scalar bit-width), then
  ``Concat`` on the channel axis and, unless the groups are already in channel order, a
  ``Gather`` that puts every channel back in place: qonnx's executor (and FINN) only run a
  scalar ``bitwidth``, although the QONNX spec allows a tensor.
* Biases: float initializers holding the int32-quantized values round(b / (s_in·s_w))·s_in·s_w
  (no ``Quant``): what the quantized bias is, and what hls4ml folds into its layers.
* Activations, graph inputs included: ``Quant(x, s, 0, bits)``, scalar scale and bit-width,
  signed inputs narrow (as the torch quantizers compute).

Every tensor this writer adds is named after its node (``NODE/quant_scale`` …), so names are
unique in the graph; qonnx's renaming (``Quant_0_param0`` …) then finds no clashes either.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from plinio_onnx.records import QuantizedLayer

from .precision import ChosenLayer

QONNX_DOMAIN = "qonnx.custom_op.general"


class QONNXWriter:
    """Writes one quantized graph's QONNX ``Quant`` nodes (module docstring)."""

    format = "qonnx"

    def __init__(self) -> None:
        self._mixed: list[tuple[gs.Node, int]] = []   # weight Quants with per-channel bits, split in `finish`

    def activation(self, g: gs.Graph, x: gs.Tensor, y: gs.Tensor, scale: torch.Tensor, bits: int,
                   signed: bool, name: str) -> None:
        _quant_node(g, x, y, np.float32(scale[0]), bits, signed, narrow=signed, name=name)

    def weight(self, g: gs.Graph, layer: QuantizedLayer, chosen: ChosenLayer, out: gs.Tensor, name: str) -> None:
        layer_bits = np.asarray(chosen.bits).reshape(-1).astype(int)
        kept_bits = [int(b) for b in layer_bits if b > 0]
        bitwidth = _bitwidth(layer_bits, kept_bits, layer, chosen.w.dim())
        values = torch.where(chosen.keep, chosen.q * chosen.s_dq, torch.zeros_like(chosen.w))
        node = _quant_node(g, gs.Constant(f"{layer.weight}.quant_float_{layer.node}", values.numpy()), out,
                           chosen.s_dq.numpy().astype(np.float32), bitwidth, True, narrow=False, name=name)
        if np.ndim(bitwidth):
            self._mixed.append((node, layer.axis))

    def bias(self, g: gs.Graph, layer: QuantizedLayer, chosen: ChosenLayer, out: gs.Tensor, name: str) -> None:
        _, ints, scale, _ = chosen.bias
        values = (ints * scale.reshape(-1).expand_as(ints)).numpy().astype(np.float32)
        stored = gs.Constant(f"{layer.bias}.quantized_{layer.node}", values)
        for reader in list(out.outputs):
            reader.inputs[reader.inputs.index(out)] = stored

    def finish(self, g: gs.Graph) -> None:
        """Split the mixed-precision weight quantizers (after any channel slicing) and import
        the QONNX domain."""
        for node, axis in self._mixed:
            _split_by_precision(g, node, axis)
        domains = list(g.import_domains) if getattr(g, "import_domains", None) else \
            [onnx.helper.make_opsetid("", g.opset)]
        if not any(d.domain == QONNX_DOMAIN for d in domains):
            g.import_domains = domains + [onnx.helper.make_opsetid(QONNX_DOMAIN, 1)]


def _bitwidth(layer_bits: np.ndarray, kept_bits: list[int], layer: QuantizedLayer, rank: int):
    """A scalar bit-width when every kept channel agrees, else a per-channel tensor (pruned
    channels, whose values are 0, take the smallest kept bit-width)."""
    if len(set(kept_bits)) <= 1:
        return int(kept_bits[0]) if kept_bits else int(min(b for b in layer.bits if b > 0))
    filled = np.where(layer_bits > 0, layer_bits, min(kept_bits)).astype(np.float32)
    shape = [1] * rank
    shape[layer.axis] = -1
    return filled.reshape(shape)


def _split_by_precision(g: gs.Graph, node: gs.Node, axis: int) -> None:
    """One scalar-bit-width ``Quant`` per precision group of ``node``'s channels on ``axis``,
    concatenated, then gathered back into channel order (module docstring)."""
    weight, scale, zeropt, bitwidth = node.inputs
    bits = np.asarray(bitwidth.values).reshape(-1)
    values, scales = np.asarray(weight.values), np.asarray(scale.values)
    per_channel_scale = scales.ndim > 0 and scales.shape[axis] == bits.size > 1
    parts, order = [], []
    for b in np.unique(bits):
        index = np.flatnonzero(bits == b)
        tag = f"{node.name}/bits{int(b)}"
        part = gs.Variable(f"{tag}/weight", dtype=np.float32)
        _quant_node(g, gs.Constant(f"{weight.name}.bits{int(b)}", np.take(values, index, axis=axis)), part,
                    np.take(scales, index, axis=axis) if per_channel_scale else scales, int(b), True,
                    narrow=bool(node.attrs["narrow"]), name=tag)
        parts.append(part)
        order.extend(index.tolist())
    out = node.outputs[0]
    node.outputs.clear()
    node.inputs.clear()
    g.nodes.remove(node)
    if order == sorted(order):
        g.nodes.append(gs.Node("Concat", name=f"{node.name}/concat", attrs={"axis": axis}, inputs=parts, outputs=[out]))
        return
    grouped = gs.Variable(f"{node.name}/grouped", dtype=np.float32)
    g.nodes.append(gs.Node("Concat", name=f"{node.name}/concat", attrs={"axis": axis}, inputs=parts, outputs=[grouped]))
    back = gs.Constant(f"{node.name}/channel_order", np.argsort(np.asarray(order)).astype(np.int64))
    g.nodes.append(gs.Node("Gather", name=f"{node.name}/regroup", attrs={"axis": axis}, inputs=[grouped, back],
                           outputs=[out]))


def _quant_node(g: gs.Graph, x: gs.Tensor, y: gs.Tensor, scale, bits, signed: bool, *, narrow: bool,
                name: str) -> gs.Node:
    """QONNX ``Quant(x, scale, zeropt, bitwidth)``: y = (clamp(round(x/s + z), min, max) − z)·s."""
    scale = np.asarray(scale, np.float32)
    bitwidth = np.asarray(bits, np.float32)
    inputs = [x, gs.Constant(f"{name}/quant_scale", scale),
              gs.Constant(f"{name}/quant_zeropt", np.array(0.0, np.float32)),
              gs.Constant(f"{name}/quant_bitwidth", bitwidth)]
    node = gs.Node("Quant", name=f"{name}/quant", domain=QONNX_DOMAIN, inputs=inputs, outputs=[y],
                   attrs={"signed": int(signed), "narrow": int(narrow), "rounding_mode": "ROUND"})
    g.nodes.append(node)
    return node
