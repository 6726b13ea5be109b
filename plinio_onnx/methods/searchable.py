"""`SearchableModel`: what PIT, MPS and SuperNet share — a generated module plus its searchable graph."""
from __future__ import annotations

import abc
import copy
import math
import numbers
import os
from fractions import Fraction
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import torch

from ..cost import BY_NAME, LayerSpec, ModelCost, layer_specs
from ..cost.dual_cost import DualCost
from ..errors import PlinioOnnxError
from ..finalize import finalize
from ..graph import Graph
from ..heap import release_free_memory
from .. import host
from ..load import load
from ..sync import sync, unshare
from ..to_torch import to_torch
from .search_hooks import SearchHooks
from ..to_torch.builder import ModulePass

CostFn = Callable[[LayerSpec], object]


def as_graph(model: "str | os.PathLike | onnx.ModelProto | Graph") -> Graph:
    """The graph of ``model``, owned by the searchable model: a `Graph` is copied with its
    weights (the model trains them in place: `to_torch`'s ``share_weights``)."""
    return model.copy(weights=True) if isinstance(model, Graph) else load(model)


def as_cost(cost: "CostFn | str", named: "Mapping[str, CostFn] | None" = None) -> CostFn:
    """A cost model from itself or its name: one of ``named`` (a model's named costs) first, then
    a built-in one."""
    if isinstance(cost, str):
        if named and cost in named:
            return named[cost]
        if cost not in BY_NAME:
            choices = sorted(set(BY_NAME) | set(named or ()))
            raise PlinioOnnxError(f"unknown cost model {cost!r}; choose from {choices}")
        return BY_NAME[cost]
    if not callable(cost):
        raise PlinioOnnxError(f"a cost model is a function of a LayerSpec or its name, got {cost!r}")
    return cost


def named_costs(cost: "CostFn | str | Mapping[str, CostFn | str]") -> dict[str, CostFn]:
    """``{name: cost model}`` from one cost model (named after itself) or a mapping of them."""
    if isinstance(cost, Mapping):
        if not cost or not all(isinstance(name, str) and name for name in cost):
            raise PlinioOnnxError("named costs: give a non-empty mapping {name: cost model}, "
                                  "e.g. {'params': po.cost.params, 'latency': my_latency}")
        return {name: as_cost(fn) for name, fn in cost.items()}
    fn = as_cost(cost)
    return {cost if isinstance(cost, str) else getattr(fn, "__name__", "cost"): fn}


class SearchableModel(torch.nn.Module, SearchHooks, abc.ABC):
    """A searchable ``graph`` and the torch ``module`` generated from it.

    Subclasses say which parameters are architecture parameters (`_is_nas_parameter`) and how a
    layer's spec changes with them (`effective_spec`). ``model(x)`` runs the module; ``.cost`` is
    the differentiable cost; ``.export(path)`` syncs, finalizes and saves.
    """

    #: The rewrites of the generated module that the method trains with (`to_torch`'s ``passes``).
    module_passes: Sequence[ModulePass] = ()
    #: Whether `cost_of` evaluates a cost model on host scalars (`plinio_onnx.cost.dual_cost`:
    #: the same value and gradient, one autograd node); False: always on the specs' tensors.
    dual_cost: bool = True

    def __init__(self, graph: Graph, cost: "CostFn | str | Mapping[str, CostFn | str]") -> None:
        super().__init__()
        self.graph = graph
        # the module trains the graph's own arrays: the weights are held once
        self.module = to_torch(graph, passes=self.module_passes, share_weights=True)
        #: The named costs (``cost={"params": ..., "latency": ...}``; one cost: named after itself).
        self.costs = named_costs(cost)
        #: The primary cost model: the first named cost, what `.cost` computes.
        self.cost_model = next(iter(self.costs.values()))
        self.specs = layer_specs(graph)
        self._onnx_to_attr = {onnx_name: attr for attr, onnx_name in self.module.initializer_names.items()}
        release_free_memory()  # loading and the passes' transient copies of the weights

    # -- running ------------------------------------------------------------------------------
    def forward(self, *inputs: torch.Tensor):
        return self.module(*inputs)

    def tensor(self, onnx_name: str) -> torch.Tensor:
        """The tensor of initializer ``onnx_name``: its parameter or buffer, or its view into a packed
        parameter (reads, in-place writes and autograd all reach the packed values)."""
        return self.module.initializer(self._onnx_to_attr[onnx_name])

    def grad(self, onnx_name: str) -> torch.Tensor | None:
        """The gradient of initializer ``onnx_name`` (its part of a packed parameter's)."""
        return self.module.initializer_grad(self._onnx_to_attr[onnx_name])

    # -- parameters ---------------------------------------------------------------------------
    @abc.abstractmethod
    def _is_nas_parameter(self, onnx_name: str) -> bool:
        """Whether initializer ``onnx_name`` is an architecture parameter of this method."""

    def nas_parameters(self) -> Iterator[torch.nn.Parameter]:
        """Architecture parameters (masks, logits): for the search optimizer. (Masks a module
        reads together may be one packed parameter: `tensor` gives each one's view.)"""
        for _, param, names in self.module.parameter_initializers():
            if self._holds_nas(names):
                yield param

    def net_parameters(self) -> Iterator[torch.nn.Parameter]:
        """Network weights: everything that is not an architecture parameter."""
        for _, param, names in self.module.parameter_initializers():
            if not self._holds_nas(names):
                yield param

    def _holds_nas(self, names: list[str]) -> bool:
        return bool(names) and all(self._is_nas_parameter(name) for name in names)

    # -- cost ---------------------------------------------------------------------------------
    def effective_spec(self, spec: LayerSpec) -> LayerSpec:
        return spec

    def effective_specs(self) -> list[LayerSpec]:
        """`effective_spec` of every layer (a method may compute them together)."""
        return [self.effective_spec(spec) for spec in self.specs]

    def cost_fn(self, cost: "CostFn | str") -> CostFn:
        """The cost model ``cost`` names: one of `costs`, else a built-in one (or ``cost`` itself)."""
        return as_cost(cost, self.costs)

    def cost_of(self, cost: "CostFn | str | ModelCost") -> torch.Tensor:
        """``cost`` (a cost model, or the name of one of `costs` or of a built-in one) summed over
        all layers at the current architecture (differentiable); a `ModelCost` (peak memory)
        computed on the whole model."""
        if isinstance(cost, ModelCost):
            return cost.of(self)
        fn = self.cost_fn(cost)
        specs = self.effective_specs()
        if self.dual_cost:   # on the host: one autograd node (`plinio_onnx.cost.dual_cost`)
            dual = self.__dict__.get("_dual_cost")
            if dual is None:
                dual = self.__dict__["_dual_cost"] = DualCost()
            total = dual.total(fn, specs)
            if total is not None:
                return total
        total = torch.zeros((), dtype=torch.float64)
        for spec in specs:
            total = total + fn(spec)
        return total

    @property
    def cost(self) -> torch.Tensor:
        """The primary cost — the cost model given at construction, or the first of the named
        ones — summed over layers (differentiable). Several named costs are not summed: their
        units differ (parameters, seconds, bytes); weigh them with a `plinio_onnx.regularizers`."""
        return self.cost_of(self.cost_model)

    # -- export -------------------------------------------------------------------------------
    def searchable_graph(self) -> Graph:
        """The searchable graph with the trained values (a checkpoint: save it to resume)."""
        return sync(self.graph, self.module)

    def export(self, path: "str | os.PathLike | None" = None, **options) -> Graph:
        """Finalize the current architecture into a deployable graph; save it when ``path`` is
        given. ``options`` go to the finalizers (e.g. ``format="qdq"``)."""
        deployable = finalize(self.searchable_graph(), **options)
        release_free_memory()  # the finalizers' transient copies (e.g. quantized integers)
        if path is not None:  # written from the arrays it still shares with the module
            deployable.save(path)
            release_free_memory()
        return unshare(deployable, self.module)  # (copies, once the transients are gone)


# -- compiled costs ---------------------------------------------------------------------------
def _accumulate(terms: dict, mono: tuple, coef) -> None:
    """terms[mono] += coef, dropping the monomial when it cancels."""
    total = terms.get(mono, 0) + coef
    if total:
        terms[mono] = total
    else:
        terms.pop(mono, None)


class Sym:
    """A polynomial with exact rational coefficients over named variables (effective channel
    counts, kernel sizes): what a cost model returns when a spec holds `Sym`s instead of tensors.

    Only +, -, ·, / by a number and integer powers are defined; anything else (comparisons,
    ``float()``, ``abs``, numpy or torch functions) raises ``TypeError``, so a cost model that is
    not a polynomial in the searched quantities is found out, not mis-compiled."""

    __slots__ = ("terms",)
    __array_ufunc__ = None  # numpy defers to the reflected operators (and its functions fail)

    def __init__(self, terms: dict) -> None:
        self.terms = terms  # monomial (sorted tuple of variable keys, repeated by power) -> Fraction

    @staticmethod
    def var(key) -> "Sym":
        return Sym({(key,): Fraction(1)})

    @staticmethod
    def _coerce(value) -> "Sym | None":
        if isinstance(value, Sym):
            return value
        if isinstance(value, numbers.Rational):
            return Sym({(): Fraction(int(value.numerator), int(value.denominator))} if value else {})
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            number = float(value)
            if number != number or number in (float("inf"), float("-inf")):
                return None
            return Sym({(): Fraction(number)} if number else {})
        return None

    def __add__(self, other):
        other = Sym._coerce(other)
        if other is None:
            return NotImplemented
        terms = dict(self.terms)
        for mono, coef in other.terms.items():
            _accumulate(terms, mono, coef)
        return Sym(terms)

    __radd__ = __add__

    def __neg__(self):
        return Sym({mono: -coef for mono, coef in self.terms.items()})

    def __pos__(self):
        return self

    def __sub__(self, other):
        other = Sym._coerce(other)
        return NotImplemented if other is None else self + (-other)

    def __rsub__(self, other):
        other = Sym._coerce(other)
        return NotImplemented if other is None else other + (-self)

    def __mul__(self, other):
        other = Sym._coerce(other)
        if other is None:
            return NotImplemented
        terms: dict = {}
        for m1, c1 in self.terms.items():
            for m2, c2 in other.terms.items():
                _accumulate(terms, tuple(sorted(m1 + m2, key=repr)), c1 * c2)
        return Sym(terms)

    __rmul__ = __mul__

    def __truediv__(self, other):
        if isinstance(other, Sym) or not isinstance(other, numbers.Real) or isinstance(other, bool) or not other:
            return NotImplemented
        inverse = Sym._coerce(other)
        if inverse is None:
            return NotImplemented
        (value,) = inverse.terms.values()
        return self * Sym({(): 1 / value})

    def __pow__(self, power):
        if not isinstance(power, numbers.Integral) or isinstance(power, bool) or power < 0:
            return NotImplemented
        result = Sym({(): Fraction(1)})
        for _ in range(int(power)):
            result = result * self
        return result

    def _refuse(self, *args):
        raise TypeError("a compiled cost model must be a polynomial in the searched quantities")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __float__ = __int__ = _refuse
    __hash__ = None


class CompiledCost:
    """A cost model summed over a model's layers as one polynomial in the searched quantities
    (``keys``), evaluated on the vector x of their values (then a 1) by a few array ops — a
    gather, a product, a dot — and differentiated by hand as cheaply."""

    def __init__(self, polynomial: Sym, order: Callable | None = None) -> None:
        constant = polynomial.terms.get((), Fraction(0))
        monomials = [(mono, coef) for mono, coef in polynomial.terms.items() if mono]
        keys: list = []
        for mono, _ in monomials:
            for key in mono:
                if key not in keys:
                    keys.append(key)
        if order is not None:
            keys.sort(key=order)
        self.keys = tuple(keys)
        self.constant = constant
        # Σ coef·Π x as (Σ numerator·Π x) / denominator: exact while the numerators' sum is an
        # integer below 2^53 (every cost model that counts), rounded once otherwise.
        denominator = math.lcm(1, *(coef.denominator for _, coef in monomials))
        self.denominator = denominator
        # x carries a trailing 1 that pads the monomials of lower degree
        self.degree = max((len(mono) for mono, _ in monomials), default=0)
        self._monomials = [[keys.index(k) for k in mono] for mono, _ in monomials]
        self._numerators = [int(coef * denominator) for _, coef in monomials]
        self.positions, self.size = list(range(len(keys))), len(keys) + 1
        self._device: dict = {}

    def bind(self, positions, size: int) -> "CompiledCost":
        """This cost reading key i at ``x[positions[i]]`` of an ``x`` of ``size`` entries whose
        last is 1."""
        bound = copy.copy(self)
        bound.positions, bound.size, bound._device = list(positions), int(size), {}
        return bound

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_device"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._device = {}

    def _arrays(self):
        """(index [monomials, degree] into x, the same flat, the other factors of every factor,
        numerators) as numpy arrays."""
        if "numpy" not in self._device:
            one, degree = self.size - 1, self.degree
            rows = [[self.positions[i] for i in mono] + [one] * (degree - len(mono)) for mono in self._monomials]
            index = np.array(rows, dtype=np.int64).reshape(len(rows), degree)
            # ∂/∂x: factor d of a monomial is multiplied by its other factors.
            others = np.array([[row[j] for j in range(degree) if j != d] for row in rows for d in range(degree)]
                              if degree > 1 else [[one]], dtype=np.int64)
            self._device["numpy"] = (index, index.reshape(-1), others, np.array(self._numerators, dtype=np.float64))
        return self._device["numpy"]

    def _tensors(self, device):
        if device not in self._device:
            self._device[device] = tuple(torch.as_tensor(a, device=device) for a in self._arrays())
        return self._device[device]

    def value_np(self, x: np.ndarray) -> float:
        """The cost at ``x`` (numpy float64 [value of each key…, 1])."""
        if not self.keys:
            return float(self.constant)
        index, _, _, numerators = self._arrays()
        return float(self._total(x, index, numerators))

    def _total(self, x, index, numerators):
        """The polynomial at ``x`` (numpy or torch alike)."""
        factors = x[index]
        total = (factors.prod(1) if self.degree > 1 else factors[:, 0]) @ numerators
        if self.denominator != 1:
            total = total / self.denominator
        if self.constant:
            total = total + float(self.constant)
        return total

    def grad_np(self, x: np.ndarray, grad: float) -> np.ndarray:
        """∂cost/∂x · ``grad`` (numpy)."""
        if not self.keys:
            return np.zeros_like(x)
        _, flat, others, numerators = self._arrays()
        scale = numerators * (grad / self.denominator if self.denominator != 1 else grad)
        per_factor = scale if self.degree == 1 else x[others].prod(1).reshape(-1, self.degree) * scale[:, None]
        return np.bincount(flat, weights=per_factor.reshape(-1), minlength=x.size)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The cost at ``x`` = float64 [value of each key…, 1] (differentiable)."""
        if not self.keys:
            return torch.tensor(float(self.constant), dtype=torch.float64, device=x.device)
        return _Polynomial.apply(self, x)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """The cost at ``x`` (no autograd; in numpy on the CPU: a few tiny ops)."""
        if not self.keys or host.runs_on_host(x):
            return torch.tensor(self.value_np(x.detach().numpy()) if self.keys else float(self.constant),
                                dtype=torch.float64, device=x.device)
        index, _, _, numerators = self._tensors(x.device)
        return self._total(x, index, numerators)

    def grad(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """∂cost/∂x · ``grad`` (no autograd)."""
        if host.runs_on_host(x):
            return torch.from_numpy(self.grad_np(x.detach().numpy(), float(grad)))
        result = torch.zeros_like(x)
        if not self.keys:
            return result
        _, flat, others, numerators = self._tensors(x.device)
        scale = numerators * (grad / self.denominator if self.denominator != 1 else grad)
        if self.degree == 1:
            per_factor = scale
        else:
            per_factor = x[others].prod(1).view(-1, self.degree) * scale[:, None]
        return result.index_add_(0, flat, per_factor.reshape(-1))


class _Polynomial(torch.autograd.Function):
    """A `CompiledCost` at a differentiable ``x``, with its hand-written gradient: one node."""

    @staticmethod
    def forward(ctx, cost: CompiledCost, x: torch.Tensor) -> torch.Tensor:
        ctx.cost = cost
        ctx.save_for_backward(x)
        return cost.value(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return None, ctx.cost.grad(x, grad)


def is_builtin_cost(fn) -> bool:
    """Whether ``fn`` is one of `plinio_onnx.cost`'s models (pure: compiled once, then reused)."""
    return any(fn is model for model in BY_NAME.values())


def compile_cost(fn: CostFn, specs, order: Callable | None = None) -> CompiledCost | None:
    """``fn`` summed over ``specs`` (an iterable of specs whose searched fields hold `Sym`
    variables) as a `CompiledCost` whose keys are sorted by ``order``; None when ``fn`` (or
    making the specs) is not a polynomial in them."""
    total = Sym({})
    try:
        for spec in specs:
            value = fn(spec)
            term = Sym._coerce(value)
            if term is None:
                return None
            total = total + term
    except (TypeError, ValueError, ArithmeticError, AttributeError):
        return None
    return CompiledCost(total, order)


def as_int(value) -> int:
    """A cost (tensor or number) as the integer it counts."""
    return int(round(float(value)))


#: The columns of a layer table (`layer_table`).
LAYER_COLUMNS = ("layer", "op", "in", "out", "kernel", "params", "MACs")


def layer_table(title: str, rows, total: tuple[str, str]):
    """A rich table of layers: ``rows`` of texts in `LAYER_COLUMNS` order, then a bold total row
    (``total``: the params and MACs texts)."""
    from rich.table import Table

    table = Table(title=title)
    for col in LAYER_COLUMNS:
        table.add_column(col, justify="left" if col in ("layer", "op") else "right")
    for row in rows:
        table.add_row(*row)
    table.add_row("total", "", "", "", "", *total, style="bold")
    return table


def render_summary(table, skipped: list[str]) -> str:
    """A rich table as text, then what was not searched and why (the first 20)."""
    from io import StringIO

    from rich.console import Console

    buffer = StringIO()
    Console(file=buffer, width=120).print(table)
    if skipped:
        buffer.write("not searched: " + "; ".join(skipped[:20]) + (" …" if len(skipped) > 20 else "") + "\n")
    return buffer.getvalue()
