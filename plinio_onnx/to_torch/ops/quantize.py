"""Handlers: QDQ quantization (QuantizeLinear / DequantizeLinear), as ONNX Runtime computes it.

Rounding is half to even (``torch.round``), values saturate to the zero point's type, scales and
zero points are per tensor or per axis. Gradients do not flow through the rounding: these run
exported (deployable) models, e.g. for `plinio-onnx verify`.
"""
from __future__ import annotations

import numpy as np
import torch

from ..context import NodeContext, onnx_to_torch_dtype
from ..registry import Unsupported, register

_RANGES = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255),
           np.dtype(np.int16): (-32768, 32767), np.dtype(np.uint16): (0, 65535),
           np.dtype(np.int32): (-2**31, 2**31 - 1)}


def _per_axis(t: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(())
    shape = [1] * rank
    shape[axis] = -1
    return t.reshape(shape)


def _quantize(x, scale, zero_point, axis: int, low: int, high: int, dtype: torch.dtype):
    scale = _per_axis(scale, axis, x.dim())
    zp = _per_axis(zero_point, axis, x.dim()).to(x.dtype) if zero_point is not None else 0.0
    return torch.clamp(torch.round(x / scale) + zp, low, high).to(dtype)


def _dequantize(x, scale, zero_point, axis: int):
    scale = _per_axis(scale, axis, x.dim())
    y = x.to(scale.dtype)
    if zero_point is not None:
        y = y - _per_axis(zero_point, axis, x.dim()).to(scale.dtype)
    return y * scale


def _range(ctx: NodeContext, tensor) -> tuple[int, int] | None:
    """Integer range of a quantized tensor; 4-bit types are held in 8-bit containers."""
    import onnx
    sub_byte = ctx._builder.graph.gs.__dict__.get("sub_byte_types", {}).get(tensor.name)
    if sub_byte == onnx.TensorProto.INT4:
        return (-8, 7)
    if sub_byte == onnx.TensorProto.UINT4:
        return (0, 15)
    try:
        return _RANGES.get(np.dtype(tensor.dtype))
    except TypeError:  # float8 and other types numpy lacks
        return None


@register("QuantizeLinear", since=10)
def quantize_linear(ctx: NodeContext):
    if ctx.attr("block_size", 0):
        raise Unsupported("blocked quantization")
    out = ctx.node.outputs[0]
    limits = _range(ctx, out)
    if limits is None or out.dtype is None:
        raise Unsupported(f"quantization to {out.dtype}")
    low, high = limits
    dtype = np.dtype(out.dtype)
    axis = int(ctx.attr("axis", 1)) % max(ctx.rank(0), 1)
    return ctx.call(_quantize, ctx.input(0), ctx.input(1, trainable=False), ctx.input(2, trainable=False),
                    axis, low, high, onnx_to_torch_dtype(dtype))


@register("DequantizeLinear", since=10)
def dequantize_linear(ctx: NodeContext):
    if ctx.attr("block_size", 0):
        raise Unsupported("blocked quantization")
    if _range(ctx, ctx.tensor(0)) is None:
        raise Unsupported(f"dequantization from {ctx.tensor(0).dtype}")
    axis = int(ctx.attr("axis", 1)) % max(ctx.rank(0), 1)
    return ctx.call(_dequantize, ctx.input(0), ctx.input(1, trainable=False),
                    ctx.input(2, trainable=False), axis)
