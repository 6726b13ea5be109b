"""Handlers: elementwise ops (math, comparison, logic, casts, activations).

Binary ops inline one-element constants as Python numbers (`NodeContext.operand`), so the
generated code reads e.g. ``x * 0.5`` instead of a buffer. torch stores uint16/uint32/uint64
tensors but has almost no CPU kernels for them: uint16/uint32 arithmetic is emitted in int64 and
cast back (exact, and wraps modulo 2**n like ONNX); uint64 arithmetic is refused.
"""
from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from onnx import TensorProto

from ..context import NodeContext
from ..registry import Unsupported, register

# -- dtypes -------------------------------------------------------------------------------------
_ONNX_TO_TORCH = {
    TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16, TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.INT8: torch.int8, TensorProto.INT16: torch.int16, TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64, TensorProto.UINT8: torch.uint8, TensorProto.UINT16: torch.uint16,
    TensorProto.UINT32: torch.uint32, TensorProto.UINT64: torch.uint64, TensorProto.BOOL: torch.bool,
}
_NUMPY_TO_TORCH = {
    np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
    np.dtype(np.float16): torch.float16, np.dtype(np.int8): torch.int8,
    np.dtype(np.int16): torch.int16, np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64,
    np.dtype(np.uint8): torch.uint8, np.dtype(np.uint16): torch.uint16,
    np.dtype(np.uint32): torch.uint32, np.dtype(np.uint64): torch.uint64, np.dtype(np.bool_): torch.bool,
}
#: Stored by torch but without CPU arithmetic kernels; computed in int64 instead.
WIDENED = (torch.uint16, torch.uint32)
_NUMBER = (bool, int, float)


def torch_dtype(dtype: Any) -> torch.dtype | None:
    """A graph tensor's dtype (numpy dtype, or the ONNX enum onnx-graphsurgeon keeps for types
    numpy lacks, e.g. bfloat16) as a torch dtype; None when unknown. Types torch cannot hold
    (string, float8, complex) raise `Unsupported`."""
    if dtype is None:
        return None
    if isinstance(dtype, (int, np.integer)):
        found = _ONNX_TO_TORCH.get(int(dtype))
        name = TensorProto.DataType.Name(int(dtype)) if int(dtype) in TensorProto.DataType.values() \
            else str(dtype)
    else:
        found = _NUMPY_TO_TORCH.get(np.dtype(dtype))
        name = "string" if np.dtype(dtype).kind in "OSU" else str(np.dtype(dtype))
    if found is None:
        raise Unsupported(f"{name} tensors are not supported")
    return found


def in_dtype(ctx: NodeContext, i: int = 0) -> torch.dtype | None:
    return torch_dtype(ctx.tensor(i).dtype) if ctx.has_input(i) else None


def out_dtype(ctx: NodeContext, j: int = 0) -> torch.dtype | None:
    return torch_dtype(ctx.node.outputs[j].dtype)


def emit(ctx: NodeContext, fn: Any, *args: Any, dtype_of: int = 0, **kwargs: Any):
    """``fn(*args, **kwargs)`` in the generated code, through int64 for uint16/uint32 operands.

    ``dtype_of`` is the input whose dtype decides (for Where: the value operand); run-time
    operands are widened unless they are inputs of another dtype (Where's condition)."""
    dtype = in_dtype(ctx, dtype_of)
    if dtype == torch.uint64:
        raise Unsupported("uint64 arithmetic (torch has no CPU kernels for it)")
    if dtype not in WIDENED:
        return ctx.call(fn, *args, **kwargs)
    # (one-element constants are left out: they may be inlined, and ctx.input would add a buffer)
    other = {ctx.input(i) for i in range(ctx.num_inputs) if ctx.has_input(i)
             and in_dtype(ctx, i) not in WIDENED and getattr(ctx.static(i), "size", 2) > 1}

    def widen(value: Any) -> Any:
        return ctx.method("to", value, torch.int64) if _is_node(value) and value not in other else value

    result = ctx.call(fn, *map(widen, args), **{k: widen(v) for k, v in kwargs.items()})
    target = out_dtype(ctx)
    if target is None:
        raise Unsupported("the output dtype is unknown")
    return result if target in (torch.bool, torch.int64) else ctx.method("to", result, target)


def _is_node(value: Any) -> bool:
    return isinstance(value, torch.fx.Node)


def _is_float(dtype: torch.dtype | None) -> bool:
    return dtype is not None and dtype.is_floating_point


def _operand(ctx: NodeContext, i: int, other: int) -> Any:
    """`NodeContext.operand`, refusing constants of types numpy lacks (bfloat16, float8), whose
    values onnx-graphsurgeon hands over converted to float32."""
    if ctx.static(i) is not None and any(isinstance(ctx.tensor(k).dtype, (int, np.integer))
                                         for k in (i, other)):
        raise Unsupported("constants of types numpy lacks (bfloat16, float8)")
    return ctx.operand(i, other)


def _operands(ctx: NodeContext, inline_first: bool = True) -> tuple[Any, Any]:
    """Inputs 0 and 1 of a binary op, one of them possibly inlined as a Python number."""
    b = _operand(ctx, 1, 0)
    if isinstance(b, _NUMBER) or not inline_first:
        a = ctx.input(0)
    else:
        a = _operand(ctx, 0, 1)
    return a, _legacy_broadcast(ctx, b)


def _legacy_broadcast(ctx: NodeContext, b: Any) -> Any:
    """Opset < 7 ``broadcast=1, axis=k``: B's dims align with A's from axis k (not the end)."""
    if ctx.opset >= 7 or not ctx.attr("broadcast", 0) or ctx.attr("axis") is None \
            or isinstance(b, _NUMBER):
        return b
    rank_a, rank_b = ctx.rank(0), ctx.rank(1)
    axis = int(ctx.attr("axis"))
    axis = axis + rank_a if axis < 0 else axis
    trailing = rank_a - axis - rank_b
    if trailing < 0:
        raise Unsupported(f"legacy broadcast of rank {rank_b} at axis {axis} of rank {rank_a}")
    return ctx.getitem(b, (Ellipsis,) + (None,) * trailing) if trailing else b


# -- unary math -------------------------------------------------------------------------------
_UNARY = {
    "Abs": torch.abs, "Neg": torch.neg, "Sqrt": torch.sqrt, "Exp": torch.exp, "Log": torch.log,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil,
    "Round": torch.round,  # rounds half to even, as ONNX
    "Sign": torch.sign, "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan, "Asin": torch.asin,
    "Acos": torch.acos, "Atan": torch.atan, "Sinh": torch.sinh, "Cosh": torch.cosh,
    "Asinh": torch.asinh, "Acosh": torch.acosh, "Atanh": torch.atanh, "Erf": torch.erf,
    "IsNaN": torch.isnan, "Not": torch.logical_not, "Relu": torch.relu, "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh, "Softsign": F.softsign, "Softplus": F.softplus, "Mish": F.mish,
    "HardSwish": F.hardswish,
}


@register(*_UNARY)
def unary(ctx: NodeContext):
    return emit(ctx, _UNARY[ctx.op], ctx.input(0))


@register("IsInf", since=10)
def is_inf(ctx: NodeContext):
    positive = bool(ctx.attr("detect_positive", 1))
    negative = bool(ctx.attr("detect_negative", 1))
    x = ctx.input(0)
    if positive and negative:
        return ctx.call(torch.isinf, x)
    if positive:
        return ctx.call(torch.isposinf, x)
    if negative:
        return ctx.call(torch.isneginf, x)
    return ctx.call(torch.zeros_like, x, dtype=torch.bool)


# -- binary math ------------------------------------------------------------------------------
_BINARY = {
    "Add": operator.add, "Sub": operator.sub, "Mul": operator.mul,
    "And": operator.and_, "Or": operator.or_, "Xor": operator.xor,  # bool inputs only
    "Equal": operator.eq, "Less": operator.lt, "Greater": operator.gt,
    "LessOrEqual": operator.le, "GreaterOrEqual": operator.ge,
}


@register(*_BINARY)
def binary(ctx: NodeContext):
    return emit(ctx, _BINARY[ctx.op], *_operands(ctx))


@register("Div")
def div(ctx: NodeContext):
    dtype = in_dtype(ctx, 0)
    if dtype is None:
        raise Unsupported("the input dtype is unknown")
    if dtype.is_floating_point:
        return emit(ctx, operator.truediv, *_operands(ctx))
    # Integer Div truncates toward zero (ONNX reference: np.divide, then cast to the input type).
    return emit(ctx, torch.div, *_operands(ctx, inline_first=False), rounding_mode="trunc")


@register("Pow")
def pow_(ctx: NodeContext):
    base = in_dtype(ctx, 0)
    exponent = ctx.static(1)
    rank = len(ctx.shape(0)) if ctx.shape(0) is not None else -1
    if exponent is not None and exponent.size == 1 and exponent.ndim <= rank:
        e = exponent.reshape(-1)[0].item()
        result_type = torch.result_type(torch.empty(0, dtype=base), e) if base is not None else None
        y = emit(ctx, torch.pow, ctx.input(0), e)
    else:
        y = emit(ctx, torch.pow, ctx.input(0), _legacy_broadcast(ctx, ctx.input(1)))
        exp_dtype = in_dtype(ctx, 1)
        result_type = None if base is None or exp_dtype is None else \
            torch.promote_types(base, exp_dtype)
    # The output has the base's type (ONNX: np.power(a, b).astype(a.dtype)).
    if base is None or result_type is None:
        raise Unsupported("the operand dtypes are unknown")
    return y if result_type == base or base in WIDENED else ctx.method("to", y, base)


@register("Mod", since=10)
def mod(ctx: NodeContext):
    a, b = _operands(ctx, inline_first=False)
    if ctx.attr("fmod", 0):
        return emit(ctx, torch.fmod, a, b)  # sign of the dividend (C fmod)
    if _is_float(in_dtype(ctx, 0)):
        raise Unsupported("fmod=0 on floating-point inputs (the ONNX spec requires fmod=1)")
    return emit(ctx, torch.remainder, a, b)  # sign of the divisor (Python %)


@register("BitShift", since=11)
def bit_shift(ctx: NodeContext):
    direction = ctx.attr("direction")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    fn = {"LEFT": torch.bitwise_left_shift, "RIGHT": torch.bitwise_right_shift}.get(direction)
    if fn is None:
        raise Unsupported(f"direction={direction!r}")
    return emit(ctx, fn, *_operands(ctx, inline_first=False))


# -- variadic ---------------------------------------------------------------------------------
def _fold(ctx: NodeContext, fn: Any) -> Any:
    values = [ctx.input(i) for i in range(ctx.num_inputs) if ctx.has_input(i)]
    result = values[0]
    for value in values[1:]:
        result = emit(ctx, fn, result, value)
    return result


@register("Sum")
def sum_(ctx: NodeContext):
    return _fold(ctx, operator.add)


@register("Mean")
def mean(ctx: NodeContext):
    n = sum(ctx.has_input(i) for i in range(ctx.num_inputs))
    total = _fold(ctx, operator.add)
    return ctx.call(operator.truediv, total, n) if n > 1 else total


@register("Max", "Min")
def max_min(ctx: NodeContext):
    if ctx.num_inputs == 2:
        # Max(x, c) with a one-element constant c is a clamp (same NaN propagation).
        bound = "min" if ctx.op == "Max" else "max"
        for i, c in ((0, 1), (1, 0)):
            value = _operand(ctx, c, i)
            if isinstance(value, _NUMBER) and ctx.has_input(i):
                return emit(ctx, torch.clamp, ctx.input(i), **{bound: value}, dtype_of=i)
    return _fold(ctx, torch.maximum if ctx.op == "Max" else torch.minimum)


# -- selection and casts ----------------------------------------------------------------------
@register("Where", since=9)
def where(ctx: NodeContext):
    x = _operand(ctx, 1, 2)
    y = _operand(ctx, 2, 1) if _is_node(x) else ctx.input(2)
    return emit(ctx, torch.where, ctx.input(0), x, y, dtype_of=1)


def _cast(ctx: NodeContext, target: torch.dtype | None):
    source = in_dtype(ctx, 0)
    if target is None or source is None:
        raise Unsupported("the source or target dtype is unknown")
    if source == target:
        return ctx.input(0)
    return ctx.method("to", ctx.input(0), target)


@register("Cast")
def cast(ctx: NodeContext):
    to = ctx.attr("to")
    if isinstance(to, (str, bytes)):  # opset < 6 names the type
        to = TensorProto.DataType.Value((to.decode() if isinstance(to, bytes) else to).upper())
    return _cast(ctx, torch_dtype(int(to)))


@register("CastLike", since=15)
def cast_like(ctx: NodeContext):
    return _cast(ctx, in_dtype(ctx, 1))


#: Clip-6's default bounds (float32's largest finite value).
_FLT_MAX = float(np.finfo(np.float32).max)


@register("Clip")
def clip_legacy(ctx: NodeContext):
    return _clamp(ctx, float(ctx.attr("min", -_FLT_MAX)), float(ctx.attr("max", _FLT_MAX)))


@register("Clip", since=11)
def clip(ctx: NodeContext):
    return _clamp(ctx, ctx.scalar(1), ctx.scalar(2))


def _clamp(ctx: NodeContext, low: Any, high: Any):
    x = ctx.input(0)
    if low is None and high is None:
        return x
    if isinstance(low, float) and isinstance(high, float) and _is_float(in_dtype(ctx, 0)):
        # Constant float bounds: hardtanh has a dedicated backward kernel (ReLU6 is hardtanh(0, 6)).
        return emit(ctx, F.hardtanh, x, low, high)
    if _is_node(low) != _is_node(high) and low is not None and high is not None:
        # torch.clamp takes two numbers or two tensors; ONNX Clip is min(max(x, low), high).
        x = emit(ctx, torch.clamp, x, min=low)
        low = None
    return emit(ctx, torch.clamp, x, min=low, max=high)


# -- activations ------------------------------------------------------------------------------
@register("LeakyRelu")
def leaky_relu(ctx: NodeContext):
    return ctx.call(F.leaky_relu, ctx.input(0), float(ctx.attr("alpha", 0.01)))


def _prelu(x, slope):
    return torch.where(x < 0, x * slope, x)


@register("PRelu")
def prelu(ctx: NodeContext):
    x, slope = ctx.input(0), ctx.input(1)
    x_shape, slope_shape = ctx.shape(0), ctx.shape(1)
    if _is_float(in_dtype(ctx, 0)) and x_shape is not None and slope_shape is not None \
            and all(isinstance(d, int) for d in slope_shape) and len(slope_shape) <= len(x_shape):
        # Slope broadcasts unidirectionally to X (numpy style, from the last axis); F.prelu takes
        # one slope or one per channel (axis 1), so use it only when the slope is that shape.
        padded = [1] * (len(x_shape) - len(slope_shape)) + list(slope_shape)
        channels = int(np.prod(slope_shape)) if slope_shape else 1
        per_channel = len(padded) >= 2 and all(d == 1 for k, d in enumerate(padded) if k != 1)
        if channels == 1 or (per_channel and x_shape[1] == channels):
            if list(slope_shape) != [channels]:
                slope = ctx.method("reshape", slope, [channels])
            return ctx.call(F.prelu, x, slope)
    return ctx.call(_prelu, x, slope)


@register("Elu")
def elu(ctx: NodeContext):
    return ctx.call(F.elu, ctx.input(0), float(ctx.attr("alpha", 1.0)))


#: torch.selu's constants, rounded to float32 as in ONNX's defaults.
_SELU_ALPHA, _SELU_GAMMA = float(np.float32(1.6732632423543772)), float(np.float32(1.0507009873554805))


def _selu(x, alpha: float, gamma: float):
    return F.elu(x, alpha) * gamma


@register("Selu")
def selu(ctx: NodeContext):
    alpha = float(ctx.attr("alpha", _SELU_ALPHA))
    gamma = float(ctx.attr("gamma", _SELU_GAMMA))
    if float(np.float32(alpha)) == _SELU_ALPHA and float(np.float32(gamma)) == _SELU_GAMMA:
        return ctx.call(torch.selu, ctx.input(0))
    return ctx.call(_selu, ctx.input(0), alpha, gamma)


@register("Celu", since=12)
def celu(ctx: NodeContext):
    return ctx.call(F.celu, ctx.input(0), float(ctx.attr("alpha", 1.0)))


def _hard_sigmoid(x, alpha: float, beta: float):
    return torch.clamp(x * alpha + beta, 0.0, 1.0)


@register("HardSigmoid")
def hard_sigmoid(ctx: NodeContext):
    alpha = float(ctx.attr("alpha", 0.2))
    beta = float(ctx.attr("beta", 0.5))
    if float(np.float32(alpha)) == float(np.float32(1 / 6)) and beta == 0.5:
        return ctx.call(F.hardsigmoid, ctx.input(0))
    return ctx.call(_hard_sigmoid, ctx.input(0), alpha, beta)


@register("Gelu", since=20)
def gelu(ctx: NodeContext):
    approximate = ctx.attr("approximate", "none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    if approximate not in ("none", "tanh"):
        raise Unsupported(f"approximate={approximate!r}")
    return ctx.call(F.gelu, ctx.input(0), approximate=approximate)


@register("ThresholdedRelu", since=10)
def thresholded_relu(ctx: NodeContext):
    return ctx.call(F.threshold, ctx.input(0), float(ctx.attr("alpha", 1.0)), 0.0)


def _shrink(x, lambd: float, bias: float):
    y = torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, 0))
    return y.to(x.dtype)


@register("Shrink", since=9)
def shrink(ctx: NodeContext):
    lambd = float(ctx.attr("lambd", 0.5))
    bias = float(ctx.attr("bias", 0.0))
    if _is_float(in_dtype(ctx, 0)) and lambd >= 0:
        if bias == lambd:
            return ctx.call(F.softshrink, ctx.input(0), lambd)
        if bias == 0:
            return ctx.call(F.hardshrink, ctx.input(0), lambd)
    return emit(ctx, _shrink, ctx.input(0), lambd, bias)
