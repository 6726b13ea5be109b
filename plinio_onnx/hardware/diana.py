"""DIANA (a RISC-V SoC with a digital 16×16 systolic array for 8-bit weights and an analog
in-memory-computing array for ternary weights): latency in clock cycles.

The formulas of PLiNIO's ``diana_latency`` (`plinio/cost/diana_latency.py`, eml-eda/plinio):
8-bit weights run on the digital unit, 2-bit (ternary) weights on the analog one; activations
are 8-bit (the analog unit's 7-bit inputs are searched as 8-bit there too), so only the weight
bit-width enters the model, and a float layer counts as 8-bit.

**Ours**, beyond PLiNIO's two uniform cases (which raise for anything else): a layer whose
channels are split between the units — weight bits w̄ averaged over its channels, as an MPS
search with per-channel precisions {2, 8} gives them — has a fraction f = (8 − w̄)/6 of its
output channels on the analog unit and the rest on the digital one; the units run in parallel,
so the layer takes max(analog(f·C_out), digital((1 − f)·C_out)) (ODiMO's view of DIANA,
arXiv 2306.05060, with an exact maximum). At w̄ = 8 and w̄ = 2 this is PLiNIO's number. The
analog array only runs dense convolutions (groups = 1), so grouped layers stay digital.
"""
from __future__ import annotations

from typing import Any

import torch

from .. import host
from ..cost import LayerSpec
from ..cost.dual import value_of
from .layer import Planar, bits_or, planar
from .rounding import at_least, ceil_div, clamp, is_tensor, maximum

ANALOG_BITS, DIGITAL_BITS = 2, 8
CLOCK_HZ = 260e06               # _analog_cycles(clock_freq=260e06)
OX_UNROLLS = (1, 2, 4, 8)       # ComputeOxUnrollSTE


def diana_latency(spec: LayerSpec) -> Any:
    """Cycles of one layer on DIANA (0 for layers the model does not describe)."""
    layer = planar(spec)
    if layer is None:
        return 0
    bits = bits_or(spec.weight_bits, DIGITAL_BITS)
    if not is_tensor(bits) and not ANALOG_BITS <= bits <= DIGITAL_BITS:
        raise ValueError(f"layer {spec.name!r}: DIANA runs {ANALOG_BITS}-bit (analog) and "
                         f"{DIGITAL_BITS}-bit (digital) weights, not {bits}")
    dense = not layer.depthwise and layer.groups == 1
    if not is_tensor(bits) and (bits == DIGITAL_BITS or not dense):
        return _digital_cycles(layer, layer.out_channels) * layer.repeats
    if not is_tensor(bits) and bits == ANALOG_BITS:
        return _analog_cycles(layer, layer.out_channels) * layer.repeats
    analog = clamp((DIGITAL_BITS - bits) / (DIGITAL_BITS - ANALOG_BITS), 0, 1) if dense else 0
    on_analog = layer.out_channels * analog
    return maximum(_analog_cycles(layer, on_analog),
                   _digital_cycles(layer, layer.out_channels - on_analog)) * layer.repeats


def diana_digital_latency(spec: LayerSpec) -> Any:
    """Cycles of ``spec``'s ``out_channels`` output channels on DIANA's digital unit alone (8-bit
    weights; ``out_channels`` may be an expected count, a tensor): one accelerator of ODiMO's
    default pair (`plinio_onnx.methods.accelerators`)."""
    layer = planar(spec)
    if layer is None:
        return 0
    return _digital_cycles(layer, layer.out_channels) * layer.repeats


def diana_analog_latency(spec: LayerSpec) -> Any:
    """Cycles of ``spec``'s ``out_channels`` output channels on DIANA's analog unit alone
    (ternary weights); the array only runs dense layers, so a grouped one raises ValueError."""
    layer = planar(spec)
    if layer is None:
        return 0
    if layer.depthwise or layer.groups != 1:
        raise ValueError(f"layer {spec.name!r}: DIANA's analog unit runs only dense (groups = 1) layers")
    return _analog_cycles(layer, layer.out_channels) * layer.repeats


def _ox_unroll(ch_out: Any, ch_in: Any, k_x: Any, k_y: Any) -> int:
    """ComputeOxUnrollSTE: the largest output-row unrolling u ∈ {1, 2, 4, 8} with u·C_out ≤ 512
    and (u + k_x − 1)·max(64, C_in)·k_y ≤ 1152 (1 when none fits). Piecewise constant, so no
    gradient (ours; PLiNIO hands the incoming gradient to C_out)."""
    counted = next((v for v in (ch_out, ch_in, k_x, k_y) if isinstance(v, torch.Tensor)), None)
    if counted is not None and not host.runs_on_host(counted):
        return _ox_unroll_on_device(ch_out, ch_in, k_x, k_y, counted)
    # (numbers, Duals' values, or host tensors read back)
    ch_out, ch_in, k_x, k_y = (value_of(v) for v in (ch_out, ch_in, k_x, k_y))
    fitting = [u for u in OX_UNROLLS if u * ch_out <= 512 and (u + k_x - 1) * max(64.0, ch_in) * k_y <= 1152]
    return max(fitting, default=1)


def _ox_unroll_on_device(ch_out: Any, ch_in: Any, k_x: Any, k_y: Any, like: torch.Tensor) -> torch.Tensor:
    """`_ox_unroll` as a float64 tensor on ``like``'s device, decided there (no host read)."""
    ch_out, ch_in, k_x, k_y = (v.detach().to(torch.float64) if is_tensor(v)
                               else torch.full((), float(v), dtype=torch.float64, device=like.device)
                               for v in (ch_out, ch_in, k_x, k_y))
    unroll = torch.ones((), dtype=torch.float64, device=like.device)
    for u in sorted(OX_UNROLLS):   # the largest that fits wins
        fits = (u * ch_out <= 512) & ((u + k_x - 1) * ch_in.clamp_min(64.0) * k_y <= 1152)
        unroll = torch.where(fits, float(u), unroll)
    return unroll


def _analog_cycles(layer: Planar, ch_out: Any) -> Any:
    """diana_latency.py, _analog_cycles:
    comp = ⌈C_out/512⌉·⌈C_in/128⌉·out_x·out_y / ox_unroll, weights = 4·2·C_in·k_x·k_y,
    latency = [C_out ≥ 1]·weights + comp·70 / (10⁹ / 260 MHz)."""
    ch_in = layer.in_channels
    unroll = _ox_unroll(ch_out, ch_in, layer.k_x, layer.k_y)
    cycles_comp = ceil_div(ch_out, 512) * ceil_div(ch_in, 128) * layer.out_x * layer.out_y / unroll
    cycles_weights = 4 * 2 * ch_in * layer.k_x * layer.k_y
    cycles_comp_norm = cycles_comp * 70 / (1000000000 / CLOCK_HZ)
    return at_least(ch_out, 1) * cycles_weights + cycles_comp_norm


def _digital_cycles(layer: Planar, ch_out: Any) -> Any:
    """diana_latency.py, _digital_cycles (a 16×16 PE systolic array):
    cycles = ⌈(C_out/groups)/16⌉·C_in·⌈out_x/16⌉·out_y·k_x·k_y,
    load/store = out_x·out_y·(C_out + C_in)/8, latency = [C_out ≥ 1]·load/store + cycles."""
    ch_in = layer.in_channels
    per_group = ch_out if not layer.depthwise and layer.groups == 1 else ch_out / layer.groups
    cycles = (ceil_div(per_group, 16) * ch_in * ceil_div(layer.out_x, 16) * layer.out_y
              * layer.k_x * layer.k_y)
    load_store = layer.out_x * layer.out_y * (ch_out + ch_in) / 8
    return at_least(ch_out, 1) * load_store + cycles
