"""NE16 (GreenWaves GAP9's neural engine, 8-bit activations, 2–8-bit weights bit-serially):
latency in clock cycles.

The model of PLiNIO's ``ne16_latency`` (`plinio/cost/ne16_latency.py`, eml-eda/plinio:
``Ne16PerfModel`` with its default settings, no normalization shift or bias, 32-bit
normalization scale, and ``Ne16PerfModel_generalized``, which runs a k_x×k_y kernel as 3×3 and
1×1 passes). Input activations are 8-bit on NE16, so only the weight bit-width enters the
model (a float layer counts as 8-bit weights); a 0-bit (pruned) layer costs 0.
"""
from __future__ import annotations

from typing import Any

from ..cost import LayerSpec
from .layer import Planar, bits_or, planar
from .rounding import ceil_div, floor_div, is_tensor, mod, nonzero

# Ne16PerfModel's constants (ne16_latency.py)
INPUT_BUFFER = (5, 5, 16)      # rows, columns, channels of an input tile
OUTPUT_BUFFER = (3, 3, 32)     # rows, columns, channels of an output tile
FIFO_LATENCY = 6
MULTIPLIER_COUNT = 4
MEMORY_THROUGHPUT = 256        # bits per cycle
INPUT_BITS = OUTPUT_BITS = 8
NORM_QUANT_BITS = 32


def ne16_latency(spec: LayerSpec) -> Any:
    """Cycles of one layer on NE16 (0 for layers the model does not describe)."""
    layer = planar(spec)
    if layer is None:
        return 0
    weight_bits = bits_or(spec.weight_bits, 8)
    if not is_tensor(weight_bits) and weight_bits == 0:
        return 0  # _ne16_latency_conv2d_generic: a 0-bit layer is gone
    # Ne16PerfModel_generalized: n_3x3 = ⌊k_x/3⌋·⌊k_y/3⌋ passes of 3×3 and
    # n_1x1 = (k_x mod 3)·k_y + (k_y mod 3)·k_x − (k_x mod 3)·(k_y mod 3) passes of 1×1.
    n_3x3 = floor_div(layer.k_x, 3) * floor_div(layer.k_y, 3)
    n_1x1 = (mod(layer.k_x, 3) * layer.k_y + mod(layer.k_y, 3) * layer.k_x
             - mod(layer.k_x, 3) * mod(layer.k_y, 3))
    total = (n_3x3 * _pass_latency(layer, 3, weight_bits) + n_1x1 * _pass_latency(layer, 1, weight_bits))
    return total * layer.repeats


def _pass_latency(layer: Planar, kernel: int, weight_bits: Any) -> Any:
    """``Ne16PerfModel.latency`` of one k×k pass over the layer (H_o, W_o, K_o, K_i)."""
    is_1x1 = kernel == 1 and not layer.depthwise
    is_dw = kernel == 3 and layer.depthwise
    # load_latency: 10 + 3·3·⌈16·8/256⌉ (1×1) or FIFO + 5·5·⌈16·8/256⌉
    if is_1x1:
        load = 10 + OUTPUT_BUFFER[0] * OUTPUT_BUFFER[1] * ceil_div(INPUT_BUFFER[2] * INPUT_BITS, MEMORY_THROUGHPUT)
    else:
        load = FIFO_LATENCY + INPUT_BUFFER[0] * INPUT_BUFFER[1] * ceil_div(INPUT_BUFFER[2] * INPUT_BITS,
                                                                           MEMORY_THROUGHPUT)
    update_idx = 2
    # streamout_latency: 3 + 3·3·⌈32·8/256⌉ + 1
    streamout = 3 + OUTPUT_BUFFER[0] * OUTPUT_BUFFER[1] * ceil_div(OUTPUT_BUFFER[2] * OUTPUT_BITS,
                                                                   MEMORY_THROUGHPUT) + 1

    def weight_offset(k):      # weight_offset_latency
        return FIFO_LATENCY + k if is_dw else FIFO_LATENCY

    def matrixvec(k):          # matrixvec_latency: bit-serial over the weight bits, except 1×1
        return FIFO_LATENCY + k if is_1x1 else FIFO_LATENCY + k * weight_bits

    def normquant(k):          # normquant_latency: shift and bias off, scale 9 + ⌈k·(32/8)/4⌉
        return 9 + ceil_div(k * (NORM_QUANT_BITS // 8), MULTIPLIER_COUNT)

    n_in = ceil_div(layer.in_channels, INPUT_BUFFER[2])
    if is_dw:
        def iteration(k):
            return load + weight_offset(k) + matrixvec(k) + update_idx + normquant(k) + streamout
    else:
        def iteration(k):
            return n_in * (load + weight_offset(None) + matrixvec(k) + update_idx) + normquant(k) + streamout

    k_body = INPUT_BUFFER[2] if is_dw else OUTPUT_BUFFER[2]
    n_body = floor_div(layer.out_channels, k_body)
    k_rem = mod(layer.out_channels, k_body)
    n_spatial = ceil_div(layer.out_x, OUTPUT_BUFFER[0]) * ceil_div(layer.out_y, OUTPUT_BUFFER[1])
    return n_spatial * (n_body * iteration(k_body) + nonzero(k_rem) * iteration(k_rem))
