"""A cost model summed over a searchable model's effective specs on host scalars, in one
autograd node (`DualCost`).

The effective specs of a search hold 0-dim float64 tensors (`plinio_onnx.cost.dual`). On the
host, `DualCost.total` gathers them all (each tensor once, however many specs hold it), reads
their values back with one op (stack, then ``tolist``), runs the cost model on copies of the
specs that hold `Dual`s in their place, and returns the sum through `_DualSum`: one autograd
node over the stacked tensors the cost reached (the others get no gradient, as in the tensor
form), whose backward is the incoming gradient times the partials.

Any cost model is tried — the built-in ones, a hardware profile's, an ODiMO accelerator's, a
user's. When it cannot run on `Dual`s (it raises, e.g. on a comparison or ``float()`` of a
searched value, or returns a tensor or something that is not a number) it is remembered as
tensor-only and the caller runs the tensor form, now and from then on; so is a spec holding a
tensor that is not a 0-dim float64 one, for that call. On a device (`plinio_onnx.host`) nothing
is read back: the tensor form runs. A cost model that falls back has run once more on the
`Dual`s (mind side effects).
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import torch

from .. import host
from .dual import Dual
from .spec import LayerSpec

__all__ = ["DualCost"]


#: What may hold a tensor: a tensor, or a container of them (``extra``'s values).
_HOLDERS = (torch.Tensor, dict, list, tuple)


class _Unsupported(Exception):
    """A spec holds a tensor a `Dual` cannot stand for (not 0-dim float64)."""


class _Leaves:
    """The 0-dim tensors found in specs, each once, and the `Dual` standing for each."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.duals: list[Dual] = []
        self._index: dict[int, int] = {}

    def dual(self, tensor: torch.Tensor) -> Dual:
        index = self._index.get(id(tensor))
        if index is None:
            if tensor.dim() != 0 or tensor.dtype != torch.float64:
                raise _Unsupported
            index = self._index[id(tensor)] = len(self.tensors)
            self.tensors.append(tensor)
            self.duals.append(Dual(0.0, {index: 1.0}))   # its value: once all are read
        return self.duals[index]

    def substitute(self, value: Any) -> Any:
        """``value`` with its tensors replaced by `Dual`s (containers copied only when they hold
        one; the value itself when none)."""
        if isinstance(value, torch.Tensor):
            return self.dual(value)
        if isinstance(value, dict):
            changed = None
            for key, item in value.items():
                if isinstance(item, _HOLDERS):
                    new = self.substitute(item)
                    if new is not item:
                        if changed is None:
                            changed = dict(value)
                        changed[key] = new
            return value if changed is None else changed
        if isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, _HOLDERS):
                    break
            else:
                return value
            items = [self.substitute(item) for item in value]
            if all(a is b for a, b in zip(items, value)):
                return value
            if type(value) is not list and type(value) is not tuple:
                raise _Unsupported   # (a container type it cannot rebuild)
            return type(value)(items)
        return value

    def spec(self, spec: LayerSpec) -> LayerSpec:
        changes = None
        for name, value in vars(spec).items():
            if isinstance(value, _HOLDERS):
                new = self.substitute(value)
                if new is not value:
                    if changes is None:
                        changes = {}
                    changes[name] = new
        if changes is None:
            return spec
        changed = object.__new__(type(spec))   # a shallow copy (copy.copy, replace: far slower)
        changed.__dict__.update(vars(spec))
        changed.__dict__.update(changes)
        return changed


class _DualSum(torch.autograd.Function):
    """The cost (computed on the host) as a function of the stacked leaves: one node."""

    @staticmethod
    def forward(ctx, leaves: torch.Tensor, value: float, partials: list[float]) -> torch.Tensor:
        ctx.partials = partials
        return torch.tensor(value, dtype=torch.float64)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return grad * torch.tensor(ctx.partials, dtype=torch.float64), None, None


class DualCost:
    """One searchable model's dual evaluation of its cost models (module docstring); remembers
    the cost models that are tensor-only."""

    def __init__(self) -> None:
        self._tensor_only: dict[int, Callable] = {}   # id → the cost model (kept: ids stay unique)

    def tensor_only(self, fn: Callable) -> bool:
        """Whether ``fn`` was found not to run on `Dual`s."""
        return self._tensor_only.get(id(fn)) is fn

    def total(self, fn: Callable[[LayerSpec], Any], specs: Sequence[LayerSpec]) -> torch.Tensor | None:
        """``fn`` summed over ``specs`` (float64, differentiable in the specs' tensors), or None
        when the tensor form must run (module docstring)."""
        if self.tensor_only(fn):
            return None
        leaves = _Leaves()
        try:
            dual_specs = [leaves.spec(spec) for spec in specs]
        except _Unsupported:
            return None
        tensors = leaves.tensors
        if any(not host.runs_on_host(t) for t in tensors):
            return None
        if tensors:
            with torch.no_grad():   # the values: one op, one read
                values = torch.stack(tensors).tolist()
            for dual, value in zip(leaves.duals, values):
                dual.value = value
        summed = self._sum(fn, dual_specs, len(tensors))
        if summed is None:
            self._tensor_only[id(fn)] = fn
            return None
        value, partials, reached = summed
        # As the tensor form: a function of the leaves the cost reached (the others get no
        # gradient, not a zero one), differentiable when one of them requires grad.
        used = sorted(key for key in reached if tensors[key].requires_grad) if torch.is_grad_enabled() else ()
        if not used:
            return torch.tensor(value, dtype=torch.float64)
        stacked = torch.stack([tensors[key] for key in used])
        return _DualSum.apply(stacked, value, [partials[key] for key in used])

    @staticmethod
    def _sum(fn: Callable, specs: list[LayerSpec], leaves: int) -> tuple[float, list[float], set] | None:
        """(Σ fn(spec), its partials per leaf, the leaves it depends on); None when ``fn`` does
        not run on `Dual`s."""
        value, partials, reached = 0.0, [0.0] * leaves, set()
        try:
            for spec in specs:
                term = fn(spec)
                if type(term) is Dual:
                    value = value + term.value
                    for key, d in term.partials.items():
                        partials[key] += d
                    reached.update(term.partials)
                elif isinstance(term, numbers.Real):
                    value = value + term
                else:   # a tensor (the model used torch), or not a number
                    return None
        except Exception:  # noqa: BLE001 - whatever a cost model raises on Duals, the tensor form decides
            return None
        return float(value), partials, reached
