"""`ModelCost`: a cost of a whole searchable model rather than a sum over its layers.

Most cost models are functions of one layer (`plinio_onnx.cost.LayerSpec`) summed over a model.
Some are not: the peak activation memory is a maximum over the execution order, and a search
under several targets judges "the worst of its costs, each against its bound". Such a cost is a
`ModelCost`; every searchable model's ``cost_of`` accepts it like a per-layer one::

    memory = po.cost.PeakMemory(bits=8)
    model.cost_of(memory)                                         # bytes, differentiable
    po.regularizers.Constraint({memory: "50%"})(model)            # a memory target

Its ``__name__`` names it in regularizers and reports.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

__all__ = ["ModelCost", "PeakMemory", "WorstRatio"]


class ModelCost:
    """A cost computed from the whole model: ``of(model)`` → a float64 tensor (differentiable
    where the model's effective sizes are). ``fn(model)`` computes it; ``name`` names it."""

    def __init__(self, fn: Callable[[Any], Any], name: str) -> None:
        self.fn = fn
        self.__name__ = name

    def of(self, model: Any) -> torch.Tensor:
        """The cost of ``model``'s current architecture."""
        return torch.as_tensor(self.fn(model), dtype=torch.float64)

    def __repr__(self) -> str:
        return f"ModelCost({self.__name__})"


class PeakMemory(ModelCost):
    """The peak activation memory in bytes (`plinio_onnx.cost.peak_memory_of`): activations at
    ``bits`` per element where the model does not choose them (32: float; a quantizing search's
    chosen activation bits where it has them)."""

    def __init__(self, bits: int = 32) -> None:
        from .memory import peak_memory_of

        self.bits = int(bits)
        super().__init__(lambda model: peak_memory_of(model, bits=self.bits), "peak_memory")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PeakMemory) and other.bits == self.bits

    def __hash__(self) -> int:
        return hash(("peak_memory", self.bits))


class WorstRatio(ModelCost):
    """``max_i C_i / B_i`` over several costs ``C_i`` (per-layer or `ModelCost`s) and their
    bounds ``B_i``: ≤ 1 exactly when every cost is within its bound. A search hook that drives
    one cost to a bound (re-keep down to a floor, prune down to a target) drives all of them
    with it: to 1.0."""

    def __init__(self, bounds: Mapping[Any, float]) -> None:
        self.bounds = {cost: float(bound) for cost, bound in bounds.items()}
        super().__init__(self._worst, "worst_ratio")

    def _worst(self, model: Any) -> torch.Tensor:
        ratios = [model.cost_of(cost) / bound for cost, bound in self.bounds.items()]
        return torch.stack([torch.as_tensor(r, dtype=torch.float64) for r in ratios]).max()
