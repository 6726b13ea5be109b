"""What `optimize` may constrain: the target kinds, their cost models, and the `Budget` of each
target given — its absolute value, the input model's cost, the least cost the method reaches.

============  ======================================  ===============================  ==========
kind          cost model                              a percentage is of               methods
============  ======================================  ===============================  ==========
``params``    `plinio_onnx.cost.params`               the input model's parameters     pruning
``macs``      `plinio_onnx.cost.macs`                 the input model's MACs           pruning
``size``      `plinio_onnx.cost.size` (bytes)         the float32 model's bytes;       all but qat
                                                      ``"25%int8"``: of uniform int8
``latency``   the ``--hardware`` profile's latency    the input model on that profile  all but qat
              (odimo: its accelerators' parallel      (odimo: all on its first unit)
              latency; no ``--hardware``)
``memory``    `plinio_onnx.cost.PeakMemory` (bytes)   the input model's peak           pit, mps,
                                                                                       pit+mps
============  ======================================  ===============================  ==========

Sizes count weights at their bit-widths and biases at 32 bits (a float model: 4 bytes a
parameter). Peak memory counts float32 activations for the float methods and, for the
quantizing ones, the activation bit-widths they choose (8 bits where they choose none).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..cost import BY_NAME, PeakMemory, layer_specs, peak_memory
from ..cost import bits as bit_costs
from ..errors import PlinioOnnxError
from ..graph import Graph
from .methods import Method

__all__ = ["Budget", "COST_OF_TARGET", "HARDWARE_COSTS", "MEMORY_COST", "QUANTIZING", "REGULARIZERS",
           "TARGET_KINDS", "budgets", "cost_ref", "exported_cost", "format_cost", "method_for_targets",
           "method_target_kinds", "parse_amount", "resolve_target", "within_target"]

TARGET_KINDS = ("params", "macs", "size", "latency", "memory")
#: The cost model (a name) each target kind constrains.
COST_OF_TARGET = {"params": "params", "macs": "macs", "size": "size", "latency": "latency", "memory": "peak_memory"}
#: Costs that a hardware profile (``--hardware``) defines.
HARDWARE_COSTS = ("latency", "energy")
MEMORY_COST = "peak_memory"
REGULARIZERS = ("linear", "constraint", "duccio")
#: The methods that choose bit-widths, and the targets a quantizer-only search can move.
QUANTIZING = ("mps", "qat", "pit+mps")
_BIT_LEVEL = ("size", "latency", "memory")
UNITS = {"params": "params", "macs": "MACs", "size": "bytes", "memory": "bytes"}


def parse_amount(value: "int | float | str | None", base: float, *, what: str) -> float | None:
    """``1234``, ``"1234"``, ``"1.2e4"``, ``"12k"`` or ``"50%"`` (of ``base``) → an absolute number."""
    if value is None:
        return None
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        number = float(value)
    else:
        text = str(value).strip().replace(",", "").replace("_", "")
        match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([%kKmMgG]?)", text)
        if not match:
            raise PlinioOnnxError(f"{what}: {value!r} is not a number or a percentage like '50%'")
        number = float(match.group(1))
        unit = match.group(2).lower()
        if unit == "%":
            if not 0 < number <= 100:
                raise PlinioOnnxError(f"{what}: a percentage must be in (0, 100], got {value!r}")
            number = base * number / 100.0
        elif unit:
            number *= {"k": 1e3, "m": 1e6, "g": 1e9}[unit]
    if not math.isfinite(number) or number <= 0:
        raise PlinioOnnxError(f"{what}: must be positive, got {value!r}")
    return number


def method_target_kinds(method: Method) -> tuple[str, ...]:
    """The target kinds ``method`` can move: every kind for a pruning search, the bit-level ones
    (size, latency, memory) for mixed precision alone, none for uniform int8 QAT."""
    if method.name == "qat":
        return ()
    if method.name == "odimo":
        # ODiMO moves channels between accelerators: it moves its own parallel latency (on the
        # accelerators' models, never --hardware's); parameters and MACs stay.
        return ("latency",)
    if method.name == "mps":
        return _BIT_LEVEL
    if method.name.startswith("supernet"):
        # A supernet's peak memory holds every branch (they all run in the search), not the
        # exported argmax network's: a memory target could not be judged.
        return tuple(kind for kind in TARGET_KINDS if kind != "memory")
    if method.name == "pit+mps" or method.supports_targets:
        return TARGET_KINDS
    return ()


def method_for_targets(method: Method, targets: dict) -> Method:
    """The method a run with ``targets`` searches: ``mps`` under a target also has the 0-bit
    choice (a channel pruned), as PLiNIO's joint pruning and mixed precision has — with 2, 4 and
    8 bits alone no byte budget below the all-2-bit model (about 26 % of uniform int8) could be
    met, nor one near it without every layer at 2 bits. Other methods search as they are."""
    if method.name != "mps" or not targets:
        return method
    return replace(method, options={**method.options, "w_precisions": ZERO_BIT_PRECISIONS, "zero_bit": True})


#: The weight precisions of ``mps`` under a target (0: the channel is pruned).
ZERO_BIT_PRECISIONS = (0, 2, 4, 8)


def cost_ref(name: str, *, method: Method, profile: Any = None, custom: Any = None) -> Any:
    """The cost model called ``name`` for a run of ``method``: a built-in one, the hardware
    ``profile``'s latency or energy, the peak memory (a `plinio_onnx.cost.ModelCost`), or
    ``custom`` (a user's callable, name "custom")."""
    if name == "custom":
        return custom
    if name in BY_NAME:
        return BY_NAME[name]
    if name in method.costs:   # the method's own, before a profile's (ODiMO's parallel latency)
        return method.costs[name]()
    if name in HARDWARE_COSTS:
        if profile is None:
            raise PlinioOnnxError(f"the {name} cost needs --hardware NAME")
        return profile.cost(name)
    if name == MEMORY_COST:
        return PeakMemory(bits=8 if method.name in QUANTIZING else 32)
    raise PlinioOnnxError(f"unknown cost model {name!r}")


def graph_cost(graph: Graph, ref: Any) -> float:
    """``ref`` on a float (or exported quantized) graph: per-layer costs summed, as floats (a
    latency or a byte count need not be an integer); the peak memory of the whole graph."""
    if isinstance(ref, PeakMemory):
        return float(peak_memory(graph, bits=ref.bits))
    if hasattr(ref, "of_graph"):   # a cost that reads the graph whole (ODiMO's split layers joined)
        return float(ref.of_graph(graph))
    return float(sum(float(ref(spec)) for spec in bit_costs.quantized_specs(graph)))


def exported_cost(graph: Graph, ref: Any, searched: float) -> float:
    """The cost of the exported ``graph``. Per-layer costs are read off the file (bit-widths
    from its metadata); the peak memory of a quantized export is the searched model's (its
    QDQ nodes are no buffers of their own in a deployment), ``searched``."""
    if isinstance(ref, PeakMemory) and ref.bits != 32:
        return float(searched)
    return graph_cost(graph, ref)


def resolve_target(kind: str, given: Any, base: float, int8_base: float | None = None) -> float:
    """The absolute target of ``kind`` given as ``given`` (a number, ``"12k"``, ``"50%"`` of
    ``base``; a size also ``"25%int8"``, of ``int8_base``)."""
    what = f"--target-{kind}"
    if kind == "size" and isinstance(given, str) and given.strip().lower().endswith("int8"):
        text = given.strip()[:-4].strip()
        if not text.endswith("%"):
            raise PlinioOnnxError(f"{what}: {given!r}: 'int8' follows a percentage, e.g. '25%int8'")
        return parse_amount(text, int8_base, what=what)
    return parse_amount(given, base, what=what)


@dataclass
class Budget:
    """One target of a run: its ``kind``, the cost model ``ref``, the target ``value``
    (absolute) and as ``given``, the input model's cost ``base``, and the least cost the method
    reaches (``min_reachable``; None when unknown)."""

    kind: str
    ref: Any
    given: str
    value: float
    base: float
    min_reachable: float | None = None
    unit: str = ""

    @property
    def reachable(self) -> bool:
        """Whether the least reachable architecture meets the target (True when unknown)."""
        return self.min_reachable is None or within_target(self.min_reachable, self.value)

    def to_json(self) -> dict:
        return {"kind": self.kind, "value": self.value, "given": self.given, "base": self.base,
                "min_reachable": self.min_reachable, "unit": self.unit}


def budgets(targets: dict, graph: Graph, method: Method, refs: dict, profile: Any = None, *,
            refuse: bool = True) -> list[Budget]:
    """The `Budget` of every target (``{kind: as given}``) on the input ``graph``; ``refs``: the
    cost model of every kind. A target below what ``method`` can reach fails here, before any
    training (``refuse=False``: it is only known, by `Budget.reachable`)."""
    out = []
    for kind, given in targets.items():
        ref = refs[kind]
        base = graph_cost(graph, ref)
        int8 = None
        if kind == "size":
            int8 = float(sum(float(bit_costs.size(spec.with_(weight_bits=8))) for spec in layer_specs(graph)))
        unit = (UNITS.get(kind) or getattr(ref, "unit", "")
                or (getattr(profile, "latency_unit", "") if profile is not None else ""))
        out.append(Budget(kind, ref, str(given), resolve_target(kind, given, base, int8), base, unit=unit))
    _min_reachable(out, graph, method)
    if refuse:
        _refuse_unreachable(out, method)
    return out


def _min_reachable(found: list[Budget], graph: Graph, method: Method) -> None:
    """Fill ``min_reachable`` (one throw-away model at the cheapest architecture)."""
    if not found:
        return
    model = method.build(graph, "params")
    model.eval()   # the discrete cost: argmax precisions, binarized masks (what export writes)
    first = model.min_cost(found[0].ref)
    if first is None:
        return
    for budget in found:
        budget.min_reachable = first if budget is found[0] else float(model.cost_of(budget.ref).detach())


def _refuse_unreachable(found: list[Budget], method: Method) -> None:
    """A target below the least reachable architecture fails here, naming both."""
    for budget in found:
        if not budget.reachable:
            multiple = int(method.options.get("channel_multiple", 1) or 1)
            hint = (f"; a smaller --channel-multiple (now {multiple}) reaches further" if multiple > 1 else "")
            raise PlinioOnnxError(f"target {budget.kind} {format_cost(budget.value)} {budget.unit} "
                                  f"({budget.value / budget.base:.0%} of the input's) is below the smallest "
                                  f"architecture {method.name} can reach ({format_cost(budget.min_reachable)} "
                                  f"{budget.unit}, {budget.min_reachable / budget.base:.0%}: "
                                  f"{method.model_class.cheapest_architecture}{hint})")


def format_cost(value: float) -> str:
    """A cost for a message or a report: counts with thousands separators, small non-integer
    costs (a latency in seconds, ~1e-5) to 4 significant digits rather than "0"."""
    return f"{value:,.0f}" if abs(value) >= 1000 or float(value).is_integer() else f"{value:.4g}"


def within_target(cost: float, target: float) -> bool:
    """Whether ``cost`` meets the (positive) ``target``, up to float rounding — a relative
    tolerance: an absolute one (1e-6) would be 5 % of a 20 µs latency target."""
    return float(cost) <= float(target) * (1 + 1e-9)
