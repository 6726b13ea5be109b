"""A generic SIMD microcontroller: the template for your own target's latency (and energy) model.

Integer kernels on MCUs (CMSIS-NN on Arm Cortex-M, PULP-NN on RISC-V) pack several narrow
operands into one register and retire one SIMD dot product per instruction, compute a block of
output channels at a time, and spend a fixed amount per output (requantization, store) and per
layer (call, tiling set-up). `SimdMcu` is that model with every number a field:

    cycles = ⌈C_out / block⌉·block · (C_in/groups)·K · positions · cycles_per_instruction / lanes(bits)
             + C_out · positions · output_cycles + layer_cycles

where lanes(b) = register_bits // b for each bit-width b the core has SIMD instructions for (a
layer's operands are unpacked to the wider of its weight and input bits), interpolated linearly
in between (an MPS search passes expected bit-widths). Measure two or three layers on your
board, fit the fields, and hand the instance to a `HardwareProfile`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..cost import LayerSpec, macs
from .layer import bits_or
from .rounding import ceil_div, interpolate, maximum


@dataclass(frozen=True)
class SimdMcu:
    """Cycles of one layer on a SIMD microcontroller (a cost model: call it on a `LayerSpec`).
    The defaults describe a 32-bit core with 2/4/8-bit SIMD dot products (e.g. a RISC-V core
    with XpulpNN-style extensions); ``energy_per_cycle`` in joules makes `energy` available."""

    register_bits: int = 32               # SIMD register width
    bits: tuple[int, ...] = (2, 4, 8)     # operand bit-widths with SIMD dot products
    cycles_per_instruction: float = 1.0   # cycles of one SIMD dot-product instruction
    channel_block: int = 4                # output channels one kernel call computes together
    output_cycles: float = 4.0            # per output element: requantization and store
    layer_cycles: float = 200.0           # per layer: call and tiling set-up
    float_bits: int = 8                   # the precision a float (unquantized) layer runs at
    energy_per_cycle: float | None = None  # joules per cycle (active power / clock)

    def cycles_per_mac(self, bits: Any) -> Any:
        """Cycles per MAC at operand width ``bits``: cycles_per_instruction / lanes."""
        table = {b: self.cycles_per_instruction / (self.register_bits // b) for b in self.bits}
        return interpolate(table, bits)

    def __call__(self, spec: LayerSpec) -> Any:
        input_bits = bits_or(spec.input_bits, self.float_bits)
        weight_bits = input_bits if spec.kind == "matmul" else bits_or(spec.weight_bits, self.float_bits)
        blocked = ceil_div(spec.out_channels, self.channel_block) * self.channel_block
        mac_cycles = macs(spec.with_(out_channels=blocked)) * self.cycles_per_mac(maximum(input_bits, weight_bits))
        return mac_cycles + spec.out_channels * spec.output_positions * self.output_cycles + self.layer_cycles

    def energy(self, spec: LayerSpec) -> Any:
        """Joules of one layer: cycles × ``energy_per_cycle``."""
        if self.energy_per_cycle is None:
            raise ValueError("this SimdMcu has no energy_per_cycle")
        return self(spec) * self.energy_per_cycle
