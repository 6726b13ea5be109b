"""`hardware_costs`: a model's per-layer modelled latency (and energy) on a hardware profile."""
from __future__ import annotations

from ..errors import PlinioOnnxError
from .profile import HardwareProfile
from .registry import get


def hardware_costs(graph, hardware: "str | HardwareProfile") -> dict:
    """JSON-ready costs of ``graph`` (a `plinio_onnx.Graph`) on ``hardware``: ``layers`` (name,
    op, latency and, where the profile has one, energy, each layer at its own bit-widths — a
    quantized model's stored ones, a float layer at the profile's default precision) and the
    totals ``latency`` and ``energy`` (None without an energy model), with their units."""
    from ..cost.bits import quantized_specs

    profile = get(hardware)
    latency = profile.cost("latency")
    energy = profile.cost("energy") if profile.has_energy else None
    layers = []
    for spec in quantized_specs(graph):
        try:
            row = {"name": spec.name, "op": spec.op, "latency": float(latency(spec))}
            if energy is not None:
                row["energy"] = float(energy(spec))
        except ValueError as err:  # a layer the model cannot cost (symbolic sizes, bit-widths)
            raise PlinioOnnxError(f"{graph.source or 'model'}: node {spec.name!r} ({spec.op}) on "
                                  f"{profile.name}: {err}") from None
        layers.append(row)
    return {"hardware": profile.name, "source": profile.source, "channel_multiple": profile.channel_multiple,
            "default_bits": profile.default_bits, "latency_unit": profile.latency_unit,
            "energy_unit": profile.energy_unit if energy is not None else None, "layers": layers,
            "latency": sum(row["latency"] for row in layers),
            "energy": sum(row["energy"] for row in layers) if energy is not None else None}
