"""The few non-arithmetic operations hardware cost models need, for numbers and tensors alike.

Analytical latency models count tiles, SIMD words and buffer loads: ceilings, floors,
remainders and maxima of channel counts. On plain Python numbers (a static graph) these
functions are exact integer arithmetic; on torch tensors (effective channel counts in a PIT
search, expected bit-widths in an MPS search) they give the same value with a
straight-through gradient.

The gradient is **ours**: PLiNIO's ``FloorSTE`` / ``DivAndCeilSTE`` pass the incoming gradient
through unchanged (∂⌈x/n⌉/∂x = 1, `plinio/cost/gap8_latency.py`, `ne16_latency.py`); here a
rounding of x/n takes the gradient of x/n itself (1/n), the mean slope of the staircase, and
x mod n = x − n·⌊x/n⌋ then takes none. Values are identical.

On `plinio_onnx.cost.dual.Dual`s (a search's cost evaluated on host scalars) every function
gives the tensor form's value and gradient; `is_tensor` is true for them, so a cost model takes
its differentiable branches.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..cost import dual
from ..cost.dual import Dual


def is_tensor(*values: Any) -> bool:
    """Whether any of ``values`` is searched: a tensor or a `Dual` (module docstring)."""
    return any(isinstance(v, (torch.Tensor, Dual)) for v in values)


def _straight_through(real: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    return real + (rounded - real).detach()


def ceil_div(x: Any, n: int) -> Any:
    """⌈x / n⌉ (PLiNIO's ``FloorSTE(ch, N) = ⌊(ch + N − 1)/N⌋`` and ``DivAndCeilSTE``, equal on
    non-negative integers)."""
    if type(x) is Dual:
        real = x / n
        return dual.straight_through(real, math.ceil(real.value))
    if is_tensor(x):
        real = x / n
        return _straight_through(real, torch.ceil(real))
    if isinstance(x, int):
        return -(-x // n)
    return math.ceil(x / n)


def floor_div(x: Any, n: int) -> Any:
    """⌊x / n⌋."""
    if type(x) is Dual:
        real = x / n
        return dual.straight_through(real, math.floor(real.value))
    if is_tensor(x):
        real = x / n
        return _straight_through(real, torch.floor(real))
    if isinstance(x, int):
        return x // n
    return math.floor(x / n)


def mod(x: Any, n: int) -> Any:
    """x mod n = x − n·⌊x/n⌋ (its gradient is therefore 0: see the module docstring)."""
    return x - n * floor_div(x, n)


def at_least(x: Any, threshold: float) -> Any:
    """1 where x ≥ threshold, else 0 (a gate: no gradient)."""
    if type(x) is Dual:
        return 1.0 if x.value >= threshold else 0.0
    if is_tensor(x):
        return (x.detach() >= threshold).to(x.dtype)
    return 1 if x >= threshold else 0


def maximum(*values: Any) -> Any:
    """The largest of ``values`` (a tensor, differentiable in the largest, when any is one)."""
    if not any(isinstance(v, torch.Tensor) for v in values) and is_tensor(*values):
        return dual.maximum(values)
    if is_tensor(*values):
        tensors = [torch.as_tensor(v, dtype=torch.float64) for v in values]
        return torch.stack(torch.broadcast_tensors(*tensors)).amax(0)
    return max(values)


def clamp(x: Any, low: float, high: float) -> Any:
    """x limited to [low, high]."""
    if type(x) is Dual:
        return dual.clamp(x, low, high)
    if is_tensor(x):
        return x.clamp(low, high)
    return min(max(x, low), high)


def interpolate(table: Mapping[float, Any], x: Any) -> Any:
    """The piecewise-linear function through ``table``'s (key, value) points at ``x`` (constant
    beyond the first and last key): exact at every key, differentiable in ``x`` between keys.
    Hardware tables are defined at a few bit-widths (2, 4, 8); an MPS search passes expected
    bit-widths in between. The values may themselves be tensors."""
    keys = sorted(table)
    if not is_tensor(x) and x in table:
        return table[x]
    value = table[keys[0]]
    for left, right in zip(keys[:-1], keys[1:]):
        slope = (table[right] - table[left]) / (right - left)
        value = value + slope * clamp(x - left, 0, right - left)
    return value


def nonzero(x: Any) -> Any:
    """1 where x ≠ 0, else 0 (a gate: no gradient)."""
    if type(x) is Dual:
        return 1.0 if x.value != 0 else 0.0
    if is_tensor(x):
        return (x.detach() != 0).to(x.dtype)
    return 1 if x != 0 else 0
