"""The accelerators ODiMO maps channels onto, and the latency of a layer split among them.

    from plinio_onnx.methods.accelerators import Accelerator    # also po.odimo.Accelerator
    npu = Accelerator("npu", weight_bits=4, act_bits=8, latency=my_npu_cycles)

An `Accelerator` names one compute unit: the weight precision it runs, the activation precision
its inputs have, its latency model (a cost model: a function of a `LayerSpec` whose
``out_channels`` is the number of channels mapped onto the unit — an expected, fractional count
during a search — written with arithmetic only so it stays differentiable) and whether it runs
only dense layers. `DEFAULT_ACCELERATORS` is the paper's pair on DIANA
(`plinio_onnx.hardware.diana`): an 8-bit digital systolic array and a ternary analog
in-memory-computing array (searched as 2-bit, as PLiNIO does; its 7-bit inputs are searched as
8-bit, as the paper and PLiNIO do).

`ParallelLatency` is ODiMO's layer cost: the accelerators run their channels in parallel, so a
layer takes the **maximum** of their latencies (``reduction="max"``, exact, its gradient goes to
the slowest unit; ``"softmax"`` is PLiNIO's smooth form softmax(c)·c), plus an optional
data-movement term. ``ParallelLatency.of_graph`` is the same cost read off a whole graph: an
exported one, whose split layers (``<layer>/odimo/<unit>``, `plinio_onnx.passes.odimo_split`)
it joins again through the ``odimo.mapping`` metadata, or a float one (each layer whole on the
first unit) — what a latency target of `optimize` is judged on.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ..cost import LayerSpec, dual
from ..cost.bits import quantized_specs
from ..errors import PlinioOnnxError
from ..graph import Graph
from ..hardware.diana import diana_analog_latency, diana_digital_latency
from ..hardware.rounding import is_tensor
from ..passes.odimo_split import MAPPING_KEY

__all__ = ["ANALOG", "Accelerator", "CHANNELS_KEY", "DEFAULT_ACCELERATORS", "DIGITAL", "ParallelLatency",
           "mapped_specs"]

#: `LayerSpec.extra` key of an ODiMO layer's channel counts: {accelerator name: count}.
CHANNELS_KEY = "odimo_channels"
REDUCTIONS = ("max", "softmax")


@dataclass(frozen=True)
class Accelerator:
    """One compute unit of a multi-accelerator platform (module docstring)."""

    name: str
    weight_bits: int
    act_bits: int
    latency: Callable[[LayerSpec], Any]
    dense_only: bool = False   # runs only groups = 1 layers (grouped convs go elsewhere)


#: DIANA's digital unit: 8-bit weights and activations, a 16×16 systolic array.
DIGITAL = Accelerator("digital", weight_bits=8, act_bits=8, latency=diana_digital_latency)
#: DIANA's analog unit: ternary weights (2-bit in the search and the export), dense layers only.
ANALOG = Accelerator("analog", weight_bits=2, act_bits=8, latency=diana_analog_latency, dense_only=True)
DEFAULT_ACCELERATORS = (DIGITAL, ANALOG)


@dataclass(frozen=True)
class ParallelLatency:
    """A layer's latency when its channels run on ``accelerators`` in parallel (module docstring).

    It reads the channel counts a searchable ODiMO model puts in ``spec.extra[CHANNELS_KEY]``; a
    spec without them (a plain or exported graph) runs whole on the accelerator whose weight
    precision it has, else on the first one. ``data_movement(spec, counts)``: an extra term, e.g.
    the cost of gathering the sub-layers' outputs."""

    accelerators: tuple[Accelerator, ...] = DEFAULT_ACCELERATORS
    reduction: str = "max"
    data_movement: Callable[[LayerSpec, Mapping[str, Any]], Any] | None = None
    #: The accelerators' latency unit (DIANA's models: clock cycles), for reports and targets.
    unit: str = "cycles"

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise PlinioOnnxError(f"reduction must be one of {REDUCTIONS}, not {self.reduction!r}")
        if not self.accelerators:
            raise PlinioOnnxError("ParallelLatency needs at least one accelerator")
        object.__setattr__(self, "_units", {a.name: a for a in self.accelerators})

    @property
    def __name__(self) -> str:  # the cost's name in reports and `SearchableModel.costs`
        return "latency"

    def __call__(self, spec: LayerSpec) -> Any:
        counts = spec.extra.get(CHANNELS_KEY)
        if counts is None:
            counts = {self._whole(spec).name: spec.out_channels}
        units = self._units
        costs = []
        for name, channels in counts.items():
            if name not in units:
                raise PlinioOnnxError(f"layer {spec.name!r}: no latency model for accelerator {name!r}")
            unit = units[name]
            on_unit = copy.copy(spec)   # `LayerSpec.with_` without dataclasses.replace's cost
            on_unit.out_channels, on_unit.weight_bits, on_unit.input_bits = channels, unit.weight_bits, unit.act_bits
            costs.append(unit.latency(on_unit))
        value = self._reduce(costs)
        if self.data_movement is not None:
            value = value + self.data_movement(spec, counts)
        return value

    def of_graph(self, graph: Graph) -> float:
        """The latency of a (float or exported) ``graph``: its layers as `mapped_specs` gives them,
        each split layer again one layer whose units run in parallel."""
        return float(sum(float(self(spec)) for spec in mapped_specs(graph)))

    def _whole(self, spec: LayerSpec) -> Accelerator:
        matching = [a for a in self.accelerators if spec.weight_bits is not None
                    and not is_tensor(spec.weight_bits) and a.weight_bits == spec.weight_bits]
        return matching[0] if matching else self.accelerators[0]

    def _reduce(self, costs: list) -> Any:
        if not any(isinstance(c, torch.Tensor) for c in costs):
            if not is_tensor(*costs) and (self.reduction == "max" or len(costs) == 1):
                return max(costs)
            # Duals (a search's cost on host scalars): torch's value and gradient; or numbers
            if self.reduction == "max":
                return dual.maximum(costs)
            reduced = dual.softmax_expectation(costs)
            return reduced if is_tensor(*costs) else reduced.value
        # (numbers filled in on the tensors' device: no host-to-device copy, no mixed devices)
        device = next(c for c in costs if isinstance(c, torch.Tensor)).device
        stacked = torch.stack([c.to(torch.float64).reshape(()) if isinstance(c, torch.Tensor)
                               else torch.full((), float(c), dtype=torch.float64, device=device) for c in costs])
        if self.reduction == "max":
            return stacked.amax()
        return torch.dot(torch.softmax(stacked, 0), stacked)


def mapped_specs(graph: Graph) -> list[LayerSpec]:
    """The layers of ``graph`` (`plinio_onnx.cost.bits.quantized_specs`) with every layer that
    the ODiMO export split (``odimo.mapping``'s ``layers``) joined again: one spec under the
    layer's name, its sub-layers' output channels together and the channels of each unit in
    ``extra[CHANNELS_KEY]`` — what the searchable model's cost saw. A graph without the
    metadata: its layers as they are."""
    specs = quantized_specs(graph)
    layers = json.loads(graph.metadata.get(MAPPING_KEY, "{}")).get("layers", {})
    part_of = {part: (layer, entry["accelerator"]) for layer, parts in layers.items() if len(parts) > 1
               for part, entry in parts.items()}
    joined: dict[str, LayerSpec] = {}
    out: list[LayerSpec] = []
    for spec in specs:
        if spec.name not in part_of:
            out.append(spec)
            continue
        layer, unit = part_of[spec.name]
        first = joined.get(layer)
        if first is None:
            joined[layer] = spec.with_(name=layer, extra={**spec.extra, CHANNELS_KEY: {unit: spec.out_channels}})
            out.append(joined[layer])
        else:
            first.extra[CHANNELS_KEY][unit] = spec.out_channels
            first.out_channels = first.out_channels + spec.out_channels
    return out
