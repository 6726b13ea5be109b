"""Bit-level cost models (mixed precision): model size and bit-operations.

They read ``spec.weight_bits`` (bits per weight, the mean over a layer's channels; a 0-bit,
pruned channel counts 0) and ``spec.input_bits`` (bits per input activation); ``None`` means a
float32 layer (32 bits). Under MPS both are differentiable expectations over the precision
choices (exact integers in eval, where the choice is the argmax), so these costs train the
logits and, in eval, equal the cost of the exported model (with the 0-bit choice, a bound from
above: the export also removes the biases and the readers' input columns of the channels it
slices away):

* ``size_bits``: weights × weight bits + biases × 32 (biases are 32-bit integers or floats);
* ``size`` (bytes) = ``size_bits`` / 8; ``params_bit``: weights × weight bits (PLiNIO, no bias);
* ``bitops``: MACs × weight bits × input bits (an activation×activation MatMul: input bits²).

`quantized_specs` reads the layers of an exported (QDQ or QONNX) model with the bit-widths it
stores, so the same functions cost a deployable file.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .models import _weights, macs
from ..records import BitWidths
from .spec import LayerSpec, layer_specs

FLOAT_BITS = 32
BIAS_BITS = 32
#: Where `plinio_onnx.passes.quantize` writes the chosen bit-widths of an exported model.
BITS_METADATA_KEY = BitWidths.KEY


def _bits(value: Any) -> Any:
    return FLOAT_BITS if value is None else value


def params_bit(spec: LayerSpec) -> Any:
    """Weight bits (PLiNIO's ``params_bit``; biases not counted)."""
    if spec.kind == "matmul":
        return 0
    return _weights(spec) * _bits(spec.weight_bits)


def size_bits(spec: LayerSpec) -> Any:
    """Model size in bits: weights at their bit-widths plus 32-bit biases."""
    if spec.kind == "matmul":
        return 0
    return params_bit(spec) + (spec.out_channels * BIAS_BITS if spec.bias else 0)


def size(spec: LayerSpec) -> Any:
    """Model size in bytes (``size_bits`` / 8)."""
    return size_bits(spec) / 8


def bitops(spec: LayerSpec) -> Any:
    """Bit-operations: MACs × weight bits × input bits (PLiNIO's ``ops_bit``, bias adds aside)."""
    weight_bits = _bits(spec.input_bits if spec.kind == "matmul" else spec.weight_bits)
    return macs(spec) * weight_bits * _bits(spec.input_bits)


ops_bit = bitops

#: Bit-level cost models reachable by name (merged into ``po.cost.BY_NAME``).
BY_NAME = {"size": size, "size_bits": size_bits, "params_bit": params_bit, "bitops": bitops,
           "ops_bit": ops_bit}


# -- exported models --------------------------------------------------------------------------
def quantized_specs(graph) -> list[LayerSpec]:
    """The layers of an exported quantized model (`plinio_onnx.Graph`), with ``weight_bits`` and
    ``input_bits`` filled from its ``mps.bit_widths`` metadata (float layers: None).

    Quantized weights (``DequantizeLinear`` / QONNX ``Quant`` of constants) are read as the
    constants they compute, so every layer is found with its static shape."""
    record = BitWidths.of(graph)
    chosen = record.layers if record is not None else {}
    specs = layer_specs(_constant_weights(graph))
    out = []
    for spec in specs:
        entry = chosen.get(spec.name)
        if entry is not None:
            weight_bits = float(np.mean(entry.weight_bits))
            spec = spec.with_(weight_bits=int(weight_bits) if weight_bits.is_integer() else weight_bits,
                              input_bits=int(entry.input_bits))
        out.append(spec)
    return out


def total_of(graph, cost=size) -> float:
    """Sum of a bit-level ``cost`` over the layers of an exported model (see `quantized_specs`)."""
    return float(sum(float(cost(spec)) for spec in quantized_specs(graph)))


def _constant_weights(graph):
    """A copy of ``graph`` where dequantized constants are plain float initializers."""
    import onnx_graphsurgeon as gs

    from ..graph import Graph

    copy = Graph(gs.import_onnx(graph.to_onnx(check=False)), source=graph.source, metadata=graph.metadata)
    g = copy.gs
    for node in list(g.nodes):
        if node.op not in ("DequantizeLinear", "Quant") or not all(
                isinstance(t, gs.Constant) for t in node.inputs if t.name):
            continue
        values = _dequantize(node)
        if values is None:
            continue
        out = node.outputs[0]
        const = gs.Constant(out.name + ".dequantized", values.astype(np.float32))
        for consumer in list(out.outputs):
            consumer.inputs = [const if t is out else t for t in consumer.inputs]
        node.outputs.clear()
    g.cleanup(remove_unused_graph_inputs=False).toposort()
    return copy


def _dequantize(node) -> np.ndarray | None:
    data = np.asarray(node.inputs[0].values)
    scale = np.asarray(node.inputs[1].values, np.float64)
    zero = np.asarray(node.inputs[2].values, np.float64) if len(node.inputs) > 2 and node.inputs[2].name else 0.0
    if node.op == "DequantizeLinear":
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * data.ndim
            shape[int(node.attrs.get("axis", 1))] = -1
            scale = scale.reshape(shape)
            zero = np.reshape(zero, shape) if np.ndim(zero) else zero
        return (data.astype(np.float64) - zero) * scale
    return data.astype(np.float64)  # a QONNX Quant of a constant: its shape is what matters here
