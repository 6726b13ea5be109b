"""Handlers: reductions (Reduce*, ArgMax/ArgMin, CumSum).

Axes are an attribute before ReduceSum-13 / Reduce*-18, an input after: constant axes are
resolved at build time into direct torch calls; axes computed at run time go through one helper.
Integer sums keep the input dtype (torch would give int64).
"""
from __future__ import annotations

import math

import torch

from ..context import NodeContext
from ..registry import Unsupported, register
from .elementwise import WIDENED, emit, in_dtype

_REDUCE = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
           "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
_AXES_INPUT_SINCE = {op: 13 if op == "ReduceSum" else 18 for op in _REDUCE}
#: torch computes these in floating point only (ONNX also allows integers: rare, refused).
_FLOAT_ONLY = ("ReduceMean", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp")


def _check_dtype(ctx: NodeContext) -> torch.dtype | None:
    dtype = in_dtype(ctx, 0)
    if ctx.op in _FLOAT_ONLY and (dtype is None or not dtype.is_floating_point):
        raise Unsupported(f"{ctx.op} on {dtype or 'unknown-dtype'} inputs")
    return dtype


def _sum_dtype(ctx: NodeContext) -> dict:
    """``dtype=`` for torch.sum/prod/cumsum: torch widens integers and bools to int64 (uint16/32
    are computed in int64 anyway, and cast back by `emit`)."""
    dtype = in_dtype(ctx, 0)
    if dtype is None or dtype.is_floating_point or dtype in WIDENED:
        return {}
    return {"dtype": dtype}


def _empty_value(op: str, dtype: torch.dtype) -> float | int | bool | None:
    """ONNX's value for a reduction over an empty set (torch raises for max/min)."""
    if op not in ("ReduceMax", "ReduceMin"):
        return None
    largest = op == "ReduceMin"
    if dtype == torch.bool:
        return largest
    if dtype.is_floating_point:
        return math.inf if largest else -math.inf
    info = torch.iinfo(dtype)
    return info.max if largest else info.min


def _reduce(ctx: NodeContext, axes: list[int] | None):
    op = ctx.op
    dtype = _check_dtype(ctx)
    x = ctx.input(0)
    keepdim = bool(ctx.attr("keepdims", 1))
    if not axes:
        if ctx.attr("noop_with_empty_axes", 0):
            # Spec and ONNX Runtime: the input unchanged, for every Reduce op (the Python
            # reference squares it for ReduceSumSquare).
            return x
        axes = None
    shape = ctx.shape(0)
    if shape is None:
        raise Unsupported("the input rank is unknown")
    rank = len(shape)
    dims = list(range(rank)) if axes is None else sorted({a + rank if a < 0 else a for a in axes})
    empty = _empty_value(op, dtype) if dtype is not None else None
    if empty is not None and any(shape[d] == 0 for d in dims):
        if not all(isinstance(d, int) for d in shape):
            raise Unsupported(f"{op} over an empty axis needs a static input shape")
        out = [1 if d in dims else n for d, n in enumerate(shape) if keepdim or d not in dims]
        return ctx.call(torch.full, out, empty, dtype=dtype)
    if op == "ReduceSum":
        return emit(ctx, torch.sum, x, dims, keepdim, **_sum_dtype(ctx))
    if op == "ReduceSumSquare":
        return emit(ctx, torch.sum, emit(ctx, torch.square, x), dims, keepdim, **_sum_dtype(ctx))
    if op == "ReduceMean":
        return ctx.call(torch.mean, x, dims, keepdim)
    if op == "ReduceMax":
        return emit(ctx, torch.amax, x, dims, keepdim)
    if op == "ReduceMin":
        return emit(ctx, torch.amin, x, dims, keepdim)
    if op == "ReduceProd":
        return emit(ctx, _prod, x, dims, keepdim, **_sum_dtype(ctx))
    if op == "ReduceL1":
        if dtype is not None and not dtype.is_floating_point:
            return emit(ctx, torch.sum, emit(ctx, torch.abs, x), dims, keepdim, **_sum_dtype(ctx))
        return ctx.call(torch.linalg.vector_norm, x, 1, dims, keepdim)
    if op == "ReduceLogSum":
        return ctx.call(torch.log, ctx.call(torch.sum, x, dims, keepdim))
    if op == "ReduceL2":
        return ctx.call(torch.linalg.vector_norm, x, 2, dims, keepdim)
    if op == "ReduceLogSumExp":
        return ctx.call(torch.logsumexp, x, dims, keepdim)
    raise AssertionError(op)


def _prod(x, dims: list[int], keepdim: bool, dtype: torch.dtype | None = None):
    """torch.prod reduces one axis at a time."""
    if len(dims) == x.dim() and not keepdim:
        return torch.prod(x, dtype=dtype)
    for d in reversed(dims):
        x = torch.prod(x, d, keepdim, dtype=dtype)
    return x


@register(*_REDUCE)
def reduce_axes_attribute(ctx: NodeContext):
    axes = ctx.attr("axes")
    return _reduce(ctx, None if axes is None else [int(a) for a in axes])


def reduce_axes_input(ctx: NodeContext):
    if ctx.has_input(1) and ctx.static(1) is None:
        _check_dtype(ctx)
        return emit(ctx, _reduce_at_run_time, ctx.input(0), ctx.input(1),
                    bool(ctx.attr("keepdims", 1)), bool(ctx.attr("noop_with_empty_axes", 0)), ctx.op)
    return _reduce(ctx, ctx.ints(1))


def _int_dtype(x):
    return None if x.dtype.is_floating_point else x.dtype


#: Reductions over a list of dims, for axes only known at run time (same semantics as `_reduce`).
_AT_RUN_TIME = {
    "ReduceSum": lambda x, d, k: torch.sum(x, d, k, dtype=_int_dtype(x)),
    "ReduceSumSquare": lambda x, d, k: torch.sum(torch.square(x), d, k, dtype=_int_dtype(x)),
    "ReduceMean": lambda x, d, k: torch.mean(x, d, k),
    "ReduceMax": lambda x, d, k: torch.amax(x, d, k),
    "ReduceMin": lambda x, d, k: torch.amin(x, d, k),
    "ReduceProd": lambda x, d, k: _prod(x, d, k, _int_dtype(x)),
    "ReduceL1": lambda x, d, k: torch.sum(torch.abs(x), d, k, dtype=_int_dtype(x)),
    "ReduceL2": lambda x, d, k: torch.linalg.vector_norm(x, 2, d, k),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, d, k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, k),
}


def _reduce_at_run_time(x, axes, keepdim: bool, noop: bool, op: str):
    """A Reduce op whose axes input is computed at run time."""
    dims = axes.tolist()
    if not dims:
        if noop:
            return x
        dims = list(range(x.dim()))
    dims = sorted({d % x.dim() for d in dims}) if x.dim() else []
    if any(x.shape[d] == 0 for d in dims):
        empty = _empty_value(op, x.dtype)
        if empty is not None:
            shape = [1 if i in dims else n for i, n in enumerate(x.shape) if keepdim or i not in dims]
            return torch.full(shape, empty, dtype=x.dtype, device=x.device)
    return _AT_RUN_TIME[op](x, dims, keepdim)


for _op in _REDUCE:
    register(_op, since=_AXES_INPUT_SINCE[_op])(reduce_axes_input)


# -- ArgMax / ArgMin --------------------------------------------------------------------------
def _arg_last(x, dim: int, keepdim: bool, largest: bool):
    """Index of the last extreme value: search the flipped axis, map the index back."""
    index = (torch.argmax if largest else torch.argmin)(x.flip(dim), dim, keepdim)
    return (x.shape[dim] - 1) - index


@register("ArgMax", "ArgMin")
def arg_max_min(ctx: NodeContext):
    dtype = in_dtype(ctx, 0)
    if dtype == torch.bool:
        raise Unsupported(f"{ctx.op} on bool inputs")
    axis = int(ctx.attr("axis", 0))
    keepdim = bool(ctx.attr("keepdims", 1))
    largest = ctx.op == "ArgMax"
    if ctx.attr("select_last_index", 0):
        return emit(ctx, _arg_last, ctx.input(0), axis, keepdim, largest)
    # torch returns the first extreme index, as ONNX's default.
    return emit(ctx, torch.argmax if largest else torch.argmin, ctx.input(0), axis, keepdim)


# -- CumSum -----------------------------------------------------------------------------------
def _cumsum(x, axis, exclusive: bool, reverse: bool, dtype: torch.dtype | None = None):
    dim = int(axis)
    if reverse:
        x = x.flip(dim)
    y = torch.cumsum(x, dim, dtype=dtype)
    if exclusive and y.shape[dim] > 0:
        # Shift by one along dim: [0, y_0, ..., y_{n-2}] (not y - x, which turns inf into NaN).
        zero = torch.zeros_like(y.narrow(dim, 0, 1))
        y = torch.cat([zero, y.narrow(dim, 0, y.shape[dim] - 1)], dim)
    return y.flip(dim) if reverse else y


@register("CumSum", since=11)
def cumsum(ctx: NodeContext):
    axis = ctx.scalar(1)
    exclusive = bool(ctx.attr("exclusive", 0))
    reverse = bool(ctx.attr("reverse", 0))
    if isinstance(axis, int) and not exclusive and not reverse:
        return emit(ctx, torch.cumsum, ctx.input(0), axis, **_sum_dtype(ctx))
    return emit(ctx, _cumsum, ctx.input(0), axis, exclusive, reverse, **_sum_dtype(ctx))
