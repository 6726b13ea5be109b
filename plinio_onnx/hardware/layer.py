"""What the analytical hardware models read of a `LayerSpec`: a planar (2-D) view of the layer.

PLiNIO's models are written for ``nn.Conv2d`` (kernel (k_x, k_y), output (out_x, out_y) =
``output_shape[2:]``, i.e. rows then columns) and ``nn.Linear``. An ONNX layer is mapped onto
that view once, here:

* a 2-D Conv: its kernel and output dims as they are;
* a 1-D Conv (**ours**; PLiNIO's gap8/ne16/diana models cost ``nn.Conv1d`` as 0): a 2-D one of
  height 1, kernel (1, K) and output (1, L), as MCU kernel libraries run it; K is the effective
  kernel a PIT time mask leaves;
* a linear layer (Gemm, MatMul with a constant weight): a 1×1 conv on a 1×1 output, repeated for
  each of its ``output_positions`` rows (**ours**: PLiNIO's ``nn.Linear`` has one row);
* anything else (3-D Conv, ConvTranspose, activation×activation MatMul): no planar view; the
  models cost it 0, as PLiNIO's ``default_behavior='zero'`` does for unmatched layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..cost import LayerSpec


@dataclass(frozen=True)
class Planar:
    """A layer seen as a 2-D convolution (PLiNIO's names)."""

    in_channels: Any
    out_channels: Any
    k_x: Any             # kernel rows
    k_y: Any             # kernel columns
    out_x: int           # output rows
    out_y: int           # output columns
    groups: Any
    depthwise: bool
    linear: bool
    bias: bool
    repeats: int = 1     # rows of a linear layer: the layer runs this many times


def planar(spec: LayerSpec) -> Planar | None:
    """``spec`` as a 2-D convolution, or None when no planar view exists (cost 0)."""
    if spec.kind == "linear":
        return Planar(spec.in_channels, spec.out_channels, 1, 1, 1, 1, 1, False, True, spec.bias,
                      repeats=int(spec.output_positions))
    if spec.kind != "conv":
        return None
    kernel = spec.extra.get("kernel_shape")
    rank = len(kernel) if kernel is not None else None
    groups = spec.out_channels if spec.depthwise else spec.groups
    if rank == 1:
        return Planar(spec.in_channels, spec.out_channels, 1, spec.kernel_size, 1,
                      int(spec.output_positions), groups, spec.depthwise, False, spec.bias)
    if rank == 2:
        output = spec.extra.get("output_shape")
        if output is None:
            raise ValueError(f"layer {spec.name!r} ({spec.op}): its output rows and columns are not "
                             "known (static shapes are needed for a hardware latency model)")
        return Planar(spec.in_channels, spec.out_channels, int(kernel[0]), int(kernel[1]),
                      int(output[0]), int(output[1]), groups, spec.depthwise, False, spec.bias)
    return None


def bits_or(value: Any, default: int) -> Any:
    """A spec's bit-width, or ``default`` for a float (None) one: a float model is costed at the
    precision the hardware would run it."""
    return default if value is None else value
