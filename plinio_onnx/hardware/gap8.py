"""GAP8 (GreenWaves, 8 RISC-V cores, PULP-NN int8 kernels): latency in clock cycles.

The formulas of PLiNIO's ``gap8_latency`` (`plinio/cost/gap8_latency.py`, eml-eda/plinio),
written for this package's `LayerSpec` (see `plinio_onnx.hardware.layer` for 1-D and linear
layers). The model does not depend on bit-widths: GAP8 runs int8.
"""
from __future__ import annotations

from typing import Any

from ..cost import LayerSpec
from .layer import planar
from .rounding import ceil_div


def gap8_latency(spec: LayerSpec) -> Any:
    """Cycles of one layer on GAP8 (0 for layers the model does not describe)."""
    layer = planar(spec)
    if layer is None:
        return 0
    if layer.linear:
        # gap8_latency.py, _gap8_latency_linear: ⌈C_in/2⌉·⌈C_out/4⌉
        return ceil_div(layer.in_channels, 2) * ceil_div(layer.out_channels, 4) * layer.repeats
    kernel = layer.k_x * layer.k_y
    if layer.depthwise:
        # gap8_latency.py, _gap8_latency_conv2d_dw: 4·⌈C_out/4⌉·out_x·out_y·k_x·k_y
        return 4 * ceil_div(layer.out_channels, 4) * layer.out_x * layer.out_y * kernel
    # gap8_latency.py, _gap8_latency_conv2d_generic (parallel over output columns):
    #   iterations = ⌈out_x/2⌉·⌈out_y/8⌉, im2col = k_x·k_y·C_in·2,
    #   matmul = ⌈C_out/4⌉·(5 + ⌈k_x·k_y·C_in/4⌉·(6 + 8) + 10), latency = iterations·(im2col + matmul).
    # A grouped conv (ours): C_in is what one output channel reads, C_in/groups.
    ch_in = layer.in_channels if layer.groups == 1 else layer.in_channels / layer.groups
    iterations = ceil_div(layer.out_x, 2) * ceil_div(layer.out_y, 8)
    im2col = kernel * ch_in * 2
    matmul = ceil_div(layer.out_channels, 4) * (5 + ceil_div(kernel * ch_in, 4) * (6 + 8) + 10)
    return iterations * (im2col + matmul)
