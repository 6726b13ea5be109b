"""`Dual`: a forward-mode dual number — a float value and its partial derivatives with respect
to a few numbered leaves — on which a cost model runs instead of 0-dim tensors.

A search's effective spec holds 0-dim tensors (expected bit-widths, effective channel counts,
channels per accelerator). A cost model run on them builds dozens of tiny autograd nodes per
layer; run on `Dual`s, the same Python arithmetic computes the same float64 value (each
elementary operation is the same IEEE double operation torch does on a CPU scalar, in the same
order) and carries the gradient along by hand, so the whole cost is one autograd node
(`plinio_onnx.cost.dual_cost`).

A `Dual` supports +, −, ·, /, integer and real powers and ``abs`` with numbers and other
`Dual`s — what a cost model written with arithmetic needs. It never turns into a number
implicitly: comparisons, ``bool``, ``float``, ``int``, ``math`` and torch functions raise
``TypeError`` (a cost model that branches on a searched value, or reads it as a float, would
lose its gradient), and the caller then runs the tensor form. Rounding, gates, maxima and clamps
are the helpers below (`plinio_onnx.hardware.rounding` dispatches to them): each gives torch's
value and torch's gradient, ties of a maximum included.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

__all__ = ["Dual", "clamp", "maximum", "softmax_expectation", "straight_through", "value_of"]


def _number(other: Any) -> "int | float | None":
    """``other`` as a plain number, or None when it is not one (a `Dual`, a tensor, …)."""
    kind = type(other)
    if kind is float or kind is int:
        return other
    if isinstance(other, numbers.Real):   # numpy scalars, bool, Fraction
        return float(other)
    return None


def _scaled(partials: dict, factor: float) -> dict:
    return {key: d * factor for key, d in partials.items()}


def _combined(first: dict, a: float, second: dict, b: float) -> dict:
    """first·a + second·b, key by key."""
    out = {key: d * a for key, d in first.items()}
    for key, d in second.items():
        out[key] = out[key] + d * b if key in out else d * b
    return out


class Dual:
    """``value`` (float) with ``partials`` {leaf index: ∂value/∂leaf} (module docstring).

    Partials dictionaries are shared between results and never changed in place."""

    __slots__ = ("value", "partials")
    __array_ufunc__ = None   # numpy scalars defer to the reflected operators

    def __init__(self, value: float, partials: dict) -> None:
        self.value = value
        self.partials = partials

    def __repr__(self) -> str:
        return f"Dual({self.value!r}, {self.partials!r})"

    # -- arithmetic (torch's order of operations: each result rounds as torch's does) ----------
    def __add__(self, other):
        kind = type(other)
        if kind is float or kind is int:
            return Dual(self.value + other, self.partials)
        if kind is Dual:
            partials = dict(self.partials)
            for key, d in other.partials.items():
                partials[key] = partials[key] + d if key in partials else d
            return Dual(self.value + other.value, partials)
        n = _number(other)
        return NotImplemented if n is None else Dual(self.value + n, self.partials)

    __radd__ = __add__

    def __neg__(self):
        return Dual(-self.value, _scaled(self.partials, -1.0))

    def __pos__(self):
        return self

    def __sub__(self, other):
        if type(other) is Dual:
            return Dual(self.value - other.value, _combined(self.partials, 1.0, other.partials, -1.0))
        n = _number(other)
        return NotImplemented if n is None else Dual(self.value - n, self.partials)

    def __rsub__(self, other):
        n = _number(other)
        return NotImplemented if n is None else Dual(n - self.value, _scaled(self.partials, -1.0))

    def __mul__(self, other):
        kind = type(other)
        if kind is float or kind is int:
            return Dual(self.value * other, {key: d * other for key, d in self.partials.items()})
        if kind is Dual:
            return Dual(self.value * other.value,
                        _combined(self.partials, other.value, other.partials, self.value))
        n = _number(other)
        return NotImplemented if n is None else Dual(self.value * n, _scaled(self.partials, n))

    __rmul__ = __mul__

    def __truediv__(self, other):
        kind = type(other)
        if kind is float or kind is int:
            return Dual(self.value / other, {key: d / other for key, d in self.partials.items()})
        if kind is Dual:
            b = other.value
            return Dual(self.value / b, _combined(self.partials, 1.0 / b, other.partials, -self.value / (b * b)))
        n = _number(other)
        if n is None:
            return NotImplemented
        return Dual(self.value / n, {key: d / n for key, d in self.partials.items()})

    def __rtruediv__(self, other):
        n = _number(other)
        if n is None:
            return NotImplemented
        inverse = 1.0 / self.value      # torch: ``n / t`` is ``t.reciprocal() * n``
        return Dual(inverse * n, _scaled(self.partials, -(inverse * inverse) * n))

    def __pow__(self, exponent):
        e = _number(exponent)
        if e is None:
            return NotImplemented
        v = self.value
        if e == 0:   # (still a function of self, with a zero gradient, as torch's)
            return Dual(1.0, _scaled(self.partials, 0.0))
        value = _torch_pow(v, e)
        return Dual(value, _scaled(self.partials, e * _torch_pow(v, e - 1)))

    def __abs__(self):
        v = self.value
        sign = 1.0 if v > 0 else -1.0 if v < 0 else 0.0
        return Dual(abs(v), _scaled(self.partials, sign))

    # -- no implicit number (module docstring) -------------------------------------------------
    def _refuse(self, *args):
        raise TypeError("a Dual (a searched quantity of a cost model) has no truth value, order or float "
                        "value: write the cost model with arithmetic and plinio_onnx.hardware.rounding")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = _refuse
    __hash__ = None


def _torch_pow(v: float, e: float) -> float:
    """``torch.pow`` of a CPU float64 scalar: its special exponents are products and roots."""
    if e == 1:
        return v
    if e == 2:
        return v * v
    if e == 3:
        return v * v * v
    if e == 0.5:
        return math.sqrt(v)
    if e == -1:
        return 1.0 / v
    if e == -2:
        return 1.0 / (v * v)
    return v ** e


def value_of(x: Any) -> float:
    """The float value of a number, a `Dual` or a tensor (a tensor's is read back to the host)."""
    if type(x) is Dual:
        return x.value
    if hasattr(x, "detach"):
        return float(x.detach())
    return float(x)


def straight_through(real: Dual, rounded: float) -> Dual:
    """``real + (rounded − real).detach()``: the rounded value, ``real``'s gradient."""
    return Dual(real.value + (rounded - real.value), real.partials)


def clamp(x: Dual, low: float, high: float) -> Dual:
    """``torch.clamp``: min(max(x, low), high); the gradient passes where low ≤ x ≤ high (0
    elsewhere: still a function of x, as the tensor's result still is)."""
    v = x.value
    inside = low <= v <= high
    return Dual(float(min(max(v, low), high)), x.partials if inside else _scaled(x.partials, 0.0))


def maximum(values: Iterable[Any]) -> Dual:
    """The largest of ``values`` (numbers and `Dual`s) as ``torch.amax`` of them stacked: the
    gradient is split evenly among all tied maxima (numbers included, whose share is lost)."""
    values = list(values)
    plain = [v.value if type(v) is Dual else float(v) for v in values]
    top = max(plain)
    tied = [v for v, p in zip(values, plain) if p == top]
    share = 1.0 / len(tied)   # torch: grad / count, then through each tied entry
    partials: dict = {key: 0.0 for v in values if type(v) is Dual for key in v.partials}
    for v in tied:
        if type(v) is Dual:
            for key, d in v.partials.items():
                partials[key] = partials[key] + d * share
    return Dual(top, partials)


def softmax_expectation(values: Iterable[Any]) -> Dual:
    """softmax(c)·c over ``values`` (numbers and `Dual`s), as ``torch.dot(torch.softmax(c, 0),
    c)`` computes it (exp(c − max) / Σ, then the dot); ∂/∂cᵢ = pᵢ·(1 + cᵢ − value)."""
    values = list(values)
    plain = [v.value if type(v) is Dual else float(v) for v in values]
    top = max(plain)
    exps = [math.exp(c - top) for c in plain]
    total = 0.0
    for e in exps:
        total += e
    inverse = 1 / total
    probs = [e * inverse for e in exps]
    value = 0.0
    for p, c in zip(probs, plain):
        value += p * c
    partials: dict = {}
    for v, p, c in zip(values, probs, plain):
        if type(v) is Dual:
            scale = p * (1.0 + c - value)
            for key, d in v.partials.items():
                partials[key] = partials[key] + d * scale if key in partials else d * scale
    return Dual(value, partials)
