"""`LayerSpec`: what a cost model needs to know of one layer, read off the graph.

A layer is a node with a weight: Conv, ConvTranspose, Gemm, or MatMul (a MatMul between two
activations, as in attention, is a layer without parameters). Extraction is a registry by op
type, so supporting a new layer kind is one function.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs


@dataclass
class LayerSpec:
    """One layer, under PyTorch-style names. Counts are per inference (batch 1).

    ``in_channels`` / ``out_channels`` / ``kernel_size`` may be replaced by differentiable tensors
    (effective values selected by search masks); cost models must only use arithmetic on them.
    """

    name: str
    op: str                      # ONNX op type
    kind: str                    # "conv", "conv_transpose", "linear", "matmul"
    in_channels: Any             # input features seen by one output channel group, times groups
    out_channels: Any
    kernel_size: Any = 1         # product of kernel dims (Σ of kept taps under PIT)
    groups: int = 1
    bias: bool = False
    output_positions: int = 1    # output spatial positions (conv) or rows (linear/matmul) per sample
    weight: str | None = None    # ONNX name of the weight initializer
    depthwise: bool = False      # groups == in == out (groups then follow the channels)
    weight_bits: Any = None      # bits per weight (mean over channels); None: float32
    input_bits: Any = None       # bits per input activation; None: float32
    extra: dict = field(default_factory=dict)

    def with_(self, **changes: Any) -> "LayerSpec":
        return replace(self, **changes)


_EXTRACTORS: dict[str, Callable[[gs.Node], LayerSpec | None]] = {}


def layer_extractor(*op_types: str):
    def decorate(fn):
        for op in op_types:
            _EXTRACTORS[op] = fn
        return fn
    return decorate


def layer_specs(graph) -> list[LayerSpec]:
    """Every costed layer of ``graph`` (a `plinio_onnx.Graph`), in topological order."""
    graph.gs.toposort()
    specs = []
    for node in graph.gs.nodes:
        extract = _EXTRACTORS.get(node.op) if (node.domain or "") in ("", "ai.onnx") else None
        spec = extract(node) if extract else None
        if spec is not None:
            specs.append(spec)
    return specs


def _static_positions(shape, first_spatial: int) -> int:
    if shape is None:
        return 1
    dims = shape[first_spatial:]
    if any(not isinstance(d, (int, np.integer)) for d in dims):
        raise ValueError("symbolic spatial size")
    return int(math.prod(int(d) for d in dims))


def _spatial_dims(shape, first_spatial: int) -> list[int] | None:
    """The static spatial dims of an output (hardware models tile rows and columns); None if unknown."""
    if shape is None or any(not isinstance(d, (int, np.integer)) for d in shape[first_spatial:]):
        return None
    return [int(d) for d in shape[first_spatial:]]


def _const(tensor: gs.Tensor) -> np.ndarray | None:
    tensor = weight_source(tensor)
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


def weight_source(tensor: gs.Tensor) -> gs.Tensor:
    """The tensor behind a weight input, looking through ``ai.plinio`` masks and quantizers
    (whose first input is the weight they transform) and through the DequantizeLinear / QONNX
    Quant of a stored quantized weight, so searchable and quantized graphs cost like the original."""
    from ..graph import PLINIO_DOMAIN
    while not isinstance(tensor, gs.Constant) and tensor.inputs and tensor.inputs[0].inputs:
        producer = tensor.inputs[0]
        transforms = (producer.domain or "") == PLINIO_DOMAIN or \
            (producer.op in ("DequantizeLinear", "Quant") and isinstance(producer.inputs[0], gs.Constant))
        if not transforms:
            break
        tensor = producer.inputs[0]
    return tensor


@layer_extractor("Conv")
def _conv(node: gs.Node) -> LayerSpec | None:
    weight = node.inputs[1]
    if weight.shape is None:
        return None
    c_out, c_in_per_group, *kernel = (int(d) for d in weight.shape)
    groups = int(node.attrs.get("group", 1))
    has_bias = len(node.inputs) > 2 and bool(node.inputs[2].name)
    return LayerSpec(name=node.name, op=node.op, kind="conv", in_channels=c_in_per_group * groups,
                     out_channels=c_out, kernel_size=int(math.prod(kernel)), groups=groups,
                     bias=has_bias, output_positions=_static_positions(node.outputs[0].shape, 2),
                     weight=weight_source(weight).name,
                     depthwise=groups > 1 and groups == c_out == c_in_per_group * groups,
                     extra={"kernel_shape": kernel,
                            "dilations": list(node.attrs.get("dilations", [1] * len(kernel))),
                            "output_shape": _spatial_dims(node.outputs[0].shape, 2)})


@layer_extractor("ConvTranspose")
def _conv_transpose(node: gs.Node) -> LayerSpec | None:
    weight = node.inputs[1]
    if weight.shape is None:
        return None
    c_in, c_out_per_group, *kernel = (int(d) for d in weight.shape)
    groups = int(node.attrs.get("group", 1))
    has_bias = len(node.inputs) > 2 and bool(node.inputs[2].name)
    # Every input position scatters into K outputs: MACs = C_in·(C_out/g)·K·(input positions).
    return LayerSpec(name=node.name, op=node.op, kind="conv_transpose", in_channels=c_in,
                     out_channels=c_out_per_group * groups, kernel_size=int(math.prod(kernel)),
                     groups=groups, bias=has_bias,
                     output_positions=_static_positions(node.inputs[0].shape, 2),
                     weight=weight_source(weight).name, extra={"kernel_shape": kernel})


@layer_extractor("Gemm")
def _gemm(node: gs.Node) -> LayerSpec | None:
    b = node.inputs[1]
    if b.shape is None:
        return None
    k, n = (int(d) for d in b.shape)
    if node.attrs.get("transB", 0):
        k, n = n, k
    has_bias = len(node.inputs) > 2 and bool(node.inputs[2].name)
    return LayerSpec(name=node.name, op=node.op, kind="linear", in_channels=k, out_channels=n,
                     bias=has_bias, weight=weight_source(b).name if _const(b) is not None else None)


@layer_extractor("MatMul")
def _matmul(node: gs.Node) -> LayerSpec | None:
    a, b = node.inputs
    if a.shape is None or b.shape is None or len(b.shape) < 2:
        return None
    k, n = b.shape[-2], b.shape[-1]
    if not isinstance(k, (int, np.integer)) or not isinstance(n, (int, np.integer)):
        return None
    weighted = _const(b) is not None and len(b.shape) == 2
    # Rows per sample: all of A's dims but the batch (first) and the contracted (last) one;
    # a 2-D activation MatMul B contributes its own batch dims.
    rows = _static_positions(a.shape[:-1], 1) if len(a.shape) > 2 else 1
    if not weighted:
        rows *= _static_positions(b.shape[:-2], 1) if len(b.shape) > 2 and len(a.shape) < len(b.shape) else 1
    return LayerSpec(name=node.name, op=node.op, kind="linear" if weighted else "matmul",
                     in_channels=int(k), out_channels=int(n), output_positions=rows,
                     bias=weighted and _bias_add(node, int(n)) is not None,
                     weight=weight_source(b).name if weighted else None)


def _bias_add(node: gs.Node, width: int) -> gs.Node | None:
    """The ``Add`` of a constant [width] vector right after a MatMul (a linear layer's bias)."""
    consumers = node.outputs[0].outputs
    if len(consumers) != 1 or consumers[0].op != "Add":
        return None
    add = consumers[0]
    other = [t for t in add.inputs if t is not node.outputs[0]]
    if len(other) == 1 and isinstance(other[0], gs.Constant) and tuple(other[0].shape) == (width,):
        return add
    return None
