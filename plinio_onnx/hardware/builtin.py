"""The built-in hardware profiles: PLiNIO's published analytical models and the SIMD-MCU template."""
from __future__ import annotations

from .diana import diana_latency
from .gap8 import gap8_latency
from .mpic import mpic_energy, mpic_latency
from .ne16 import ne16_latency
from .profile import HardwareProfile
from .simd import SimdMcu

PLINIO = "eml-eda/plinio, plinio/cost/"


def builtin_profiles() -> dict[str, HardwareProfile]:
    """A fresh table of the built-in profiles by name."""
    profiles = (
        HardwareProfile(
            "gap8", gap8_latency, channel_multiple=4, weight_bits=(8,), activation_bits=(8,),
            description="GAP8, 8 RISC-V cores with PULP-NN int8 kernels: im2col + 4×2 matmul tiles",
            source=PLINIO + "gap8_latency.py"),
        HardwareProfile(
            "ne16", ne16_latency, channel_multiple=16, weight_bits=(2, 4, 8), activation_bits=(8,),
            description="NE16 (GAP9's neural engine): 3×3 / 1×1 passes over 3×3×32 output tiles, "
                        "16-channel input tiles, bit-serial 2–8-bit weights, 8-bit activations",
            source=PLINIO + "ne16_latency.py"),
        HardwareProfile(
            "diana", diana_latency, channel_multiple=16, weight_bits=(2, 8), activation_bits=(8,),
            description="DIANA: 16×16 digital systolic array (8-bit weights) beside an analog "
                        "in-memory array (ternary weights, searched as 2-bit); channels split run in parallel",
            source=PLINIO + "diana_latency.py"),
        HardwareProfile(
            "mpic", mpic_latency, energy=mpic_energy, channel_multiple=1, weight_bits=(2, 4, 8),
            activation_bits=(2, 4, 8),
            description="MPIC, a mixed-precision RISC-V core: ops × cycles/MAC by (input, weight) "
                        "bits; energy at 250 MHz, 5.38 mW",
            source=PLINIO + "mpic_latency.py, mpic_energy.py (Ottavi et al., arXiv 2010.04073)"),
        HardwareProfile(
            "simd-mcu", SimdMcu(), channel_multiple=SimdMcu().channel_block, weight_bits=SimdMcu().bits,
            activation_bits=SimdMcu().bits,
            description="generic SIMD microcontroller (plinio_onnx.hardware.SimdMcu, every parameter a "
                        "field): the template for your own target",
            source="plinio_onnx/hardware/simd.py"),
    )
    return {profile.name: profile for profile in profiles}
