"""MPIC (a mixed-precision RISC-V core with 2/4/8-bit SIMD dot products): latency in clock
cycles and energy in joules, both depending on the activation and weight bit-widths.

The model of PLiNIO's ``mpic_latency`` and ``mpic_energy`` (`plinio/cost/mpic_latency.py`,
`plinio/cost/mpic_energy.py`, eml-eda/plinio), after Ottavi et al., "A Mixed-Precision RISC-V
Processor for Extreme-Edge DNN Inference" (arXiv 2010.04073): cycles = ops × cycles per MAC,
ops being PLiNIO's ``ops`` (MACs plus one add per output for the bias), and the cycles per MAC
read from a table over (input bits, weight bits).

**Ours**: between the table's bit-widths (an MPS search passes expected bit-widths) the table is
interpolated linearly, first along the weight bits, then along the input bits, so the cost is
differentiable in both and exact at every table point; a float layer counts as 8×8 bits; every
layer kind is costed (PLiNIO's model covers Conv1d/2d and Linear; a 3-D or transposed conv and
an activation×activation MatMul, whose second operand is an activation, cost their ops too).
"""
from __future__ import annotations

from typing import Any

from ..cost import LayerSpec, ops
from .layer import bits_or
from .rounding import interpolate

#: Cycles per MAC by input-activation bits, then weight bits (mpic_latency.py, _mpic_lut)
CYCLES_PER_MAC = {
    2: {0: 0.0, 2: 1 / 6.5, 4: 1 / 4.0, 8: 1 / 2.2},
    4: {0: 0.0, 2: 1 / 3.9, 4: 1 / 3.5, 8: 1 / 2.1},
    8: {0: 0.0, 2: 1 / 2.5, 4: 1 / 2.3, 8: 1 / 2.1},
}
FREQUENCY_HZ = 250e6                                  # mpic_energy.py, _FREQUENCY
MEAN_POWER_W = (5.30 + 5.39 + 5.46 + 5.38) / 4 * 1e-3  # mpic_energy.py, _MEAN_POWER
DEFAULT_BITS = 8


def cycles_per_mac(input_bits: Any, weight_bits: Any) -> Any:
    """The LUT at (input bits, weight bits), interpolated between its points."""
    rows = {a: interpolate(row, weight_bits) for a, row in CYCLES_PER_MAC.items()}
    return interpolate(rows, input_bits)


def mpic_latency(spec: LayerSpec) -> Any:
    """Cycles of one layer on MPIC: ops × cycles per MAC at the layer's bit-widths."""
    input_bits = bits_or(spec.input_bits, DEFAULT_BITS)
    weight_bits = input_bits if spec.kind == "matmul" else bits_or(spec.weight_bits, DEFAULT_BITS)
    return ops(spec) * cycles_per_mac(input_bits, weight_bits)


def mpic_energy(spec: LayerSpec) -> Any:
    """Joules of one layer on MPIC: cycles / 250 MHz × the mean measured power, 5.3825 mW
    (mpic_energy.py, _energy_from_cycles_mpic)."""
    return mpic_latency(spec) / FREQUENCY_HZ * MEAN_POWER_W
