"""Finalize MPS: pick every quantizer's argmax precision and write deployable quantization.

The pass `FoldQuantizers` (``fold_quantizers``) runs, on a searchable MPS graph:

1. the argmax precisions and the numbers to store (`plinio_onnx.passes.precision`);
2. with 0-bit choices, the plan of the channels to cut (`plinio_onnx.passes.zero_bit`);
3. one writer replaces every quantizer: ``format="qdq"`` (default) standard ONNX
   ``QuantizeLinear`` / ``DequantizeLinear`` (`plinio_onnx.passes.qdq`), ``format="qonnx"``
   QONNX ``Quant`` nodes (`plinio_onnx.passes.qonnx`);
4. the zero-bit slicing pass cuts the planned channels out of what the writer stored;
5. the writer finishes (int4 packing, the QONNX domain).

The chosen bit-widths are also written, as JSON, to the model's ``metadata_props`` under
``mps.bit_widths`` (`plinio_onnx.records.BitWidths`): per layer the bits of its exported
channels, the output channels sliced out (``removed_channels``) and how many channels chose
0 bits (``pruned_channels``).
"""
from __future__ import annotations

import numpy as np

from plinio_onnx.errors import PassError
from plinio_onnx.graph import Graph
from plinio_onnx.heap import release_free_memory
from plinio_onnx.records import BitWidths, LayerBits, MPSRecord, PITRecord, SuperNetRecord

from .infra import ConsumingPass
from .precision import choose_activation, choose_layer, detach, per_channel_keep
from .qdq import INT4_MODES, QDQWriter, int4_mode, raise_opset_for_int4
from .qonnx import QONNX_DOMAIN, QONNXWriter
from .zero_bit import SliceZeroBitChannels, ZeroBitPlan, plan_zero_bit

__all__ = ["BITS_METADATA_KEY", "FORMATS", "INT4_MODES", "FoldQuantizers", "QONNX_DOMAIN", "fold_quantizers"]

FORMATS = ("qdq", "qonnx")
BITS_METADATA_KEY = BitWidths.KEY


class FoldQuantizers(ConsumingPass):
    """Replace the MPS quantizers by QDQ or QONNX at their argmax precisions (module docstring).

    Requires the PIT masks pruned and the SuperNet choices picked first (the quantized weights
    must be constants)."""

    record = MPSRecord

    def __init__(self, format: str | None = "qdq", int4: "str | bool" = "off") -> None:
        self.format = str(format or "qdq").lower()
        self.int4 = int4_mode(int4)

    def requires(self, graph: Graph) -> None:
        if MPSRecord.present(graph) and (PITRecord.present(graph) or SuperNetRecord.present(graph)):
            raise PassError("prune the PIT channels and pick the SuperNet branches before folding quantizers",
                            file=graph.source)

    def apply(self, graph: Graph, info: MPSRecord) -> None:
        if self.format not in FORMATS:
            raise PassError(f"unknown quantized format {self.format!r}; choose from {FORMATS}", file=graph.source)
        g, nodes, acts, layers = _chosen(graph, info)
        if self.format == "qdq" and self.int4 == "on" and graph.opset < 21 and \
                any(int(np.asarray(c.bits).max()) <= 4 for c in layers.values()):
            raise_opset_for_int4(graph)
            g, nodes, acts, layers = _chosen(graph, info)
        int4 = self.int4 == "on" or (self.int4 == "auto" and graph.opset >= 21)
        writer = QDQWriter(int4=int4) if self.format == "qdq" else QONNXWriter()
        plan = plan_zero_bit(g, nodes, info, layers, acts)
        chosen = _write(g, nodes, info, acts, layers, writer, plan)
        SliceZeroBitChannels(plan)(graph)
        writer.finish(g)
        g.cleanup(remove_unused_graph_inputs=False).toposort()
        chosen.store(graph)


def _chosen(graph: Graph, info: MPSRecord) -> tuple:
    """(sorted gs graph, nodes by name, chosen activations, chosen layers)."""
    g = graph.gs.toposort()
    nodes = {n.name: n for n in g.nodes}
    acts = {act.tensor: choose_activation(nodes[act.node], act) for act in info.activations}
    layers = {}
    for layer in info.layers:
        layers[layer.node] = choose_layer(graph, nodes, layer, acts[layer.activation])
        # a layer's float temporaries, freed, are rarely the size the next layer asks for: the
        # heap would grow by most of them over a model of many small layers (DenseNet-121)
        release_free_memory()
    return g, nodes, acts, layers


def _write(g, nodes: dict, info: MPSRecord, acts: dict, layers: dict, writer, plan: ZeroBitPlan) -> BitWidths:
    """Every quantizer through ``writer``; returns the chosen bit-widths."""
    chosen = BitWidths(format=writer.format)
    for act in info.activations:
        bits, signed, scale = acts[act.tensor]
        chosen.activations[act.tensor] = {"bits": bits, "signed": signed}
        node = nodes[act.node]
        x, y = node.inputs[0], node.outputs[0]
        detach(node)
        writer.activation(g, x, y, scale, bits, signed, act.node)
    for layer in info.layers:
        c = layers[layer.node]
        layer_bits = np.asarray(c.bits).reshape(-1).astype(int)
        removed = plan.removed.get(layer.node, [])
        exported_bits = np.delete(layer_bits, removed)
        act = chosen.activations[layer.activation]
        wq = nodes[layer.weight_quant]
        out = wq.outputs[0]
        detach(wq)
        writer.weight(g, layer, c, out, wq.name)
        bias_bits = None
        if c.bias is not None:
            bq = nodes[layer.bias_quant]
            out = bq.outputs[0]
            detach(bq)
            writer.bias(g, layer, c, out, bq.name)
            bias_bits = 32
        chosen.layers[layer.node] = LayerBits(
            weight_bits=int(layer_bits[0]) if layer_bits.size == 1 else [int(b) for b in exported_bits],
            input_bits=act["bits"], input_signed=act["signed"], bias_bits=bias_bits,
            pruned_channels=int((~per_channel_keep(c.keep, layer)).sum()),
            removed_channels=[int(i) for i in removed])
    return chosen


def fold_quantizers(graph: Graph, **options) -> Graph:
    """Replace the MPS quantizers of ``graph`` in place (`FoldQuantizers`); returns it.

    Options: ``format`` ("qdq" | "qonnx"), ``int4`` ("off" default, "auto", "on": see
    `plinio_onnx.passes.qdq`); others are ignored."""
    return FoldQuantizers(format=options.get("format", "qdq"), int4=options.get("int4", "off"))(graph).graph
