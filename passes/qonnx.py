"""The QONNX writer: MPS quantizers at their chosen precisions as QONNX ``Quant`` nodes.

``Quant`` (domain ``qonnx.custom_op.general``) has inputs (x, scale, zeropt, bitwidth) and
attributes signed / narrow / rounding_mode="ROUND", as FINN and hls4ml read them. Weights and
biases stay float initializers (0-bit channels zeroed) under a ``Quant`` node with per-channel
scales; a layer whose channels chose different bit-widths gets a per-channel ``bitwidth`` tensor
(the spec allows scale, zero point and bit-width tensors).
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
    """Writes one quantized graph's QONNX ``Quant`` nodes."""

    format = "qonnx"

    def activation(self, g: gs.Graph, x: gs.Tensor, y: gs.Tensor, scale: torch.Tensor, bits: int,
                   signed: bool, name: str) -> None:
        _quant_node(g, x, y, np.float32(scale[0]), bits, signed, narrow=signed, name=name)

    def weight(self, g: gs.Graph, layer: QuantizedLayer, chosen: ChosenLayer, out: gs.Tensor, name: str) -> None:
        layer_bits = np.asarray(chosen.bits).reshape(-1).astype(int)
        kept_bits = [int(b) for b in layer_bits if b > 0]
        bitwidth = _bitwidth(layer_bits, kept_bits, layer, chosen.w.dim())
        zeroed = torch.where(chosen.keep, chosen.w, torch.zeros_like(chosen.w))
        _quant_node(g, gs.Constant(f"{layer.weight}.quant_float_{layer.node}", zeroed.numpy()), out,
                    chosen.s_dq.numpy().astype(np.float32), bitwidth, True, narrow=False, name=name)

    def bias(self, g: gs.Graph, layer: QuantizedLayer, chosen: ChosenLayer, out: gs.Tensor, name: str) -> None:
        b, _, scale, zero = chosen.bias
        b_zeroed = torch.where(zero, torch.zeros_like(b), b)
        _quant_node(g, gs.Constant(f"{layer.bias}.quant_float_{layer.node}", b_zeroed.numpy()), out,
                    scale.expand_as(b).numpy().astype(np.float32) if scale.numel() > 1
                    else np.float32(scale.reshape(-1)[0]), 32, True, narrow=False, name=name)

    def finish(self, g: gs.Graph) -> None:
        """Import the QONNX domain."""
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


def _quant_node(g: gs.Graph, x: gs.Tensor, y: gs.Tensor, scale, bits, signed: bool, *, narrow: bool,
                name: str) -> None:
    """QONNX ``Quant(x, scale, zeropt, bitwidth)``: y = (clamp(round(x/s + z), min, max) − z)·s."""
    scale = np.asarray(scale, np.float32)
    bitwidth = np.asarray(bits, np.float32)
    inputs = [x, gs.Constant(f"{name}/quant_scale", scale),
              gs.Constant(f"{name}/quant_zeropt", np.array(0.0, np.float32)),
              gs.Constant(f"{name}/quant_bitwidth", bitwidth)]
    g.nodes.append(gs.Node("Quant", name=f"{name}/quant", domain=QONNX_DOMAIN, inputs=inputs, outputs=[y],
                           attrs={"signed": int(signed), "narrow": int(narrow), "rounding_mode": "ROUND"}))
