"""Handlers: neural-network layers (convolution, normalization, pooling, dense, dropout)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..context import NodeContext
from ..registry import Unsupported, register

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _spatial_padding(ctx: NodeContext, kernel: list[int], strides: list[int],
                     dilations: list[int], transpose: bool = False) -> tuple[list[int], list[int]]:
    """ONNX pads → (begin, end) per spatial axis, resolving auto_pad with the input shape."""
    n = len(kernel)
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("NOTSET", ""):
        pads = list(ctx.attr("pads", [0] * (2 * n)))
        return pads[:n], pads[n:]
    if auto_pad == "VALID":
        return [0] * n, [0] * n
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        shape = ctx.shape(0)
        if transpose or shape is None or any(not isinstance(d, int) for d in shape[2:]):
            raise Unsupported(f"auto_pad={auto_pad} needs static spatial sizes")
        begin, end = [], []
        for size, k, s, d in zip(shape[2:], kernel, strides, dilations):
            out = math.ceil(size / s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(large if auto_pad == "SAME_LOWER" else small)
            end.append(small if auto_pad == "SAME_LOWER" else large)
        return begin, end
    raise Unsupported(f"auto_pad={auto_pad!r} is not supported")


def _pad_arg(begin: list[int], end: list[int]) -> list[int]:
    """(begin, end) per spatial axis → F.pad's last-axis-first list."""
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [b, e]
    return out


@register("Conv")
def conv(ctx: NodeContext):
    weight_shape = ctx.shape(1)
    if weight_shape is None:
        raise Unsupported("the weight's shape is unknown")
    n = len(weight_shape) - 2
    if n not in _CONV:
        raise Unsupported(f"{n}-D convolution")
    kernel = list(ctx.attr("kernel_shape", weight_shape[2:]))
    strides = list(ctx.attr("strides", [1] * n))
    dilations = list(ctx.attr("dilations", [1] * n))
    begin, end = _spatial_padding(ctx, kernel, strides, dilations)
    x = ctx.input(0)
    if begin != end:
        x = ctx.call(F.pad, x, _pad_arg(begin, end))
        padding = [0] * n
    else:
        padding = begin
    return ctx.call(_CONV[n], x, ctx.input(1), ctx.input(2), stride=strides, padding=padding,
                    dilation=dilations, groups=int(ctx.attr("group", 1)))


@register("ConvTranspose")
def conv_transpose(ctx: NodeContext):
    weight_shape = ctx.shape(1)
    if weight_shape is None:
        raise Unsupported("the weight's shape is unknown")
    n = len(weight_shape) - 2
    if n not in _CONV_T:
        raise Unsupported(f"{n}-D transposed convolution")
    group = int(ctx.attr("group", 1))
    kernel = list(ctx.attr("kernel_shape", weight_shape[2:]))
    strides = list(ctx.attr("strides", [1] * n))
    dilations = list(ctx.attr("dilations", [1] * n))
    output_padding = list(ctx.attr("output_padding", [0] * n))
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    output_shape = ctx.attr("output_shape", None)
    in_shape = ctx.shape(0)
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        # Total padding that yields the requested output size (ONNX ConvTranspose spec).
        if in_shape is None or any(not isinstance(d, int) for d in in_shape[2:]):
            raise Unsupported("output_shape/auto_pad SAME needs static spatial sizes")
        if output_shape is None:
            output_shape = [d * s for d, s in zip(in_shape[2:], strides)]
        output_shape = list(output_shape)[-n:]
        begin, end = [], []
        for i in range(n):
            total = strides[i] * (in_shape[2 + i] - 1) + output_padding[i] + \
                ((kernel[i] - 1) * dilations[i] + 1) - output_shape[i]
            if total < 0:  # the requested size exceeds the natural one: grow at the end
                output_padding[i] += -total
                total = 0
            if auto_pad == "SAME_UPPER":
                b = total // 2
            else:
                b = total - total // 2
            begin.append(b)
            end.append(total - b)
    else:
        if auto_pad not in ("NOTSET", "VALID", ""):
            raise Unsupported(f"auto_pad={auto_pad!r}")
        pads = list(ctx.attr("pads", [0] * (2 * n))) if auto_pad != "VALID" else [0] * (2 * n)
        begin, end = pads[:n], pads[n:]
    # conv_transpose crops `padding` from both sides; crop the asymmetric rest afterwards.
    symmetric = [min(b, e) for b, e in zip(begin, end)]
    y = ctx.call(_CONV_T[n], ctx.input(0), ctx.input(1), ctx.input(2), stride=strides,
                 padding=symmetric, output_padding=output_padding, groups=group, dilation=dilations)
    extra_begin = [b - s for b, s in zip(begin, symmetric)]
    extra_end = [e - s for e, s in zip(end, symmetric)]
    if any(extra_begin) or any(extra_end):
        slices = [slice(None), slice(None)] + [slice(b, -e if e else None)
                                               for b, e in zip(extra_begin, extra_end)]
        y = ctx.getitem(y, tuple(slices))
    return y


class BatchNorm(torch.nn.Module):
    """ONNX BatchNormalization: batch statistics and running-stat updates in train mode."""

    def __init__(self, momentum: float, epsilon: float) -> None:
        super().__init__()
        self.momentum = 1.0 - momentum  # ONNX: running = m*running + (1-m)*batch
        self.epsilon = epsilon

    def forward(self, x, scale, bias, mean, var):
        return F.batch_norm(x, mean, var, scale, bias, self.training, self.momentum, self.epsilon)


def _batch_norm_training(x, scale, bias, mean, var, momentum: float, eps: float):
    """ONNX training-mode BatchNormalization (opset 14+): normalized by the batch statistics;
    also the running statistics it would store (biased batch variance, as ONNX specifies)."""
    dims = [0] + list(range(2, x.dim()))
    batch_mean = x.mean(dims)
    batch_var = x.var(dims, unbiased=False)
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (x - batch_mean.reshape(shape)) * torch.rsqrt(batch_var.reshape(shape) + eps) \
        * scale.reshape(shape) + bias.reshape(shape)
    return (y, mean * momentum + batch_mean * (1 - momentum),
            var * momentum + batch_var * (1 - momentum))


@register("BatchNormalization")
def batch_normalization(ctx: NodeContext):
    if ctx.opset < 7 and ctx.attr("is_test", 0) == 0 and ctx.attr("spatial", 1) != 1:
        raise Unsupported("non-spatial BatchNormalization")
    if ctx.attr("spatial", 1) != 1:
        raise Unsupported("spatial=0")
    if sum(ctx.output_used(j) for j in range(1, ctx.num_outputs)):
        if ctx.opset < 14:
            raise Unsupported("training-mode outputs before opset 14 (saved mean/variance)")
        # the running statistics are outputs here, not state: computed, never updated in place
        outputs = ctx.call(_batch_norm_training, *[ctx.input(i) for i in range(3)],
                           ctx.input(3, trainable=False), ctx.input(4, trainable=False),
                           float(ctx.attr("momentum", 0.9)), float(ctx.attr("epsilon", 1e-5)))
        return [ctx.getitem(outputs, j) for j in range(min(3, ctx.num_outputs))]
    module = BatchNorm(float(ctx.attr("momentum", 0.9)), float(ctx.attr("epsilon", 1e-5)))
    return ctx.module(module, ctx.input(0), ctx.input(1), ctx.input(2),
                      ctx.input(3, trainable=False), ctx.input(4, trainable=False))


@register("InstanceNormalization")
def instance_normalization(ctx: NodeContext):
    return ctx.call(F.instance_norm, ctx.input(0), weight=ctx.input(1), bias=ctx.input(2),
                    eps=float(ctx.attr("epsilon", 1e-5)))


def _layer_norm(x, weight, bias, axis: int, eps: float):
    shape = x.shape[axis:]
    if weight is not None and weight.shape != shape:
        weight = weight.expand(shape)
    if bias is not None and bias.shape != shape:
        bias = bias.expand(shape)
    return F.layer_norm(x, shape, weight, bias, eps)


def _layer_norm_with_stats(x, weight, bias, axis: int, eps: float, stash: torch.dtype):
    """LayerNormalization with its Mean and InvStdDev outputs, computed in ``stash``."""
    dims = list(range(axis, x.dim()))
    xs = x.to(stash)
    mean = xs.mean(dims, keepdim=True)
    inv_std = torch.rsqrt((xs - mean).square().mean(dims, keepdim=True) + eps)
    y = ((xs - mean) * inv_std).to(x.dtype) * weight
    if bias is not None:
        y = y + bias
    return y, mean, inv_std


@register("LayerNormalization", since=17)
def layer_normalization(ctx: NodeContext):
    if ctx.attr("stash_type", 1) != 1:
        raise Unsupported("stash_type other than float")
    axis = int(ctx.attr("axis", -1))
    rank = ctx.rank(0)
    axis = axis + rank if axis < 0 else axis
    if sum(ctx.output_used(j) for j in range(1, ctx.num_outputs)):
        outputs = ctx.call(_layer_norm_with_stats, ctx.input(0), ctx.input(1), ctx.input(2), axis,
                           float(ctx.attr("epsilon", 1e-5)), torch.float32)
        return [ctx.getitem(outputs, j) for j in range(ctx.num_outputs)]
    return ctx.call(_layer_norm, ctx.input(0), ctx.input(1), ctx.input(2), axis,
                    float(ctx.attr("epsilon", 1e-5)))


class Dropout(torch.nn.Module):
    """ONNX Dropout: active only in train mode (the ratio input/attribute is fixed at build)."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, x):
        return F.dropout(x, self.ratio, self.training)


class DropoutWithMask(torch.nn.Module):
    """ONNX Dropout in full: a run-time ratio, a ``training_mode`` input (absent: the module's
    train/eval mode), the mask output and, with the ``seed`` attribute, the mask ONNX's
    reference draws (numpy's ``RandomState(seed)``), so seeded graphs are deterministic."""

    def __init__(self, ratio: float, seed: int | None) -> None:
        super().__init__()
        self.ratio = ratio
        self.seed = seed

    def forward(self, x, ratio=None, training_mode=None):
        ratio = self.ratio if ratio is None else float(ratio)
        active = self.training if training_mode is None else bool(training_mode)
        if not active or ratio == 0.0:
            return x, torch.ones_like(x, dtype=torch.bool)
        if self.seed is None:
            keep = torch.rand_like(x, dtype=torch.float32) >= ratio
        else:
            import numpy as np
            drawn = np.random.RandomState(self.seed).uniform(0.0, 1.0, tuple(x.shape))
            keep = torch.from_numpy(drawn >= ratio).to(x.device)
        return x * keep / (1.0 - ratio), keep


@register("Dropout")
def dropout(ctx: NodeContext):
    ratio = ctx.attr("ratio", 0.5)
    training = None  # None: the module's train/eval mode decides
    if ctx.opset >= 12:
        ratio = ctx.scalar(1, 0.5)
        if ctx.has_input(2):
            static = ctx.static(2)
            training = ctx.input(2) if static is None else bool(static.reshape(-1)[0])
    seed = ctx.attr("seed", None)
    fixed_ratio = isinstance(ratio, float)
    if fixed_ratio and training is None and seed is None and not ctx.output_used(1):
        return ctx.module(Dropout(float(ratio)), ctx.input(0))  # the common case: torch's kernel
    if training is False:  # a constant False: inactive whatever the module's mode
        outputs = [ctx.input(0), ctx.call(torch.ones_like, ctx.input(0), dtype=torch.bool)]
        return outputs[:ctx.num_outputs] if ctx.num_outputs > 1 else outputs[0]
    module = DropoutWithMask(float(ratio) if fixed_ratio else 0.5, None if seed is None else int(seed))
    both = ctx.module(module, ctx.input(0), None if fixed_ratio else ratio, training)
    if ctx.num_outputs > 1:
        return [ctx.getitem(both, 0), ctx.getitem(both, 1)]
    return ctx.getitem(both, 0)


def _pool_args(ctx: NodeContext):
    kernel = list(ctx.attr("kernel_shape"))
    n = len(kernel)
    strides = list(ctx.attr("strides", [1] * n))
    dilations = list(ctx.attr("dilations", [1] * n))
    begin, end = _spatial_padding(ctx, kernel, strides, dilations)
    return n, kernel, strides, dilations, begin, end


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _ceil_extra(ctx: NodeContext, kernel, strides, dilations, begin, end) -> list[int]:
    """Extra end padding for ceil_mode, so no window starts inside the end padding only."""
    shape = ctx.shape(0)
    if shape is None or any(not isinstance(d, int) for d in shape[2:]):
        raise Unsupported("ceil_mode with asymmetric padding needs static spatial sizes")
    extra = []
    for size, k, s, d, b, e in zip(shape[2:], kernel, strides, dilations, begin, end):
        eff = (k - 1) * d + 1
        out = math.ceil((size + b + e - eff) / s) + 1
        if (out - 1) * s >= size + b:
            out -= 1
        extra.append(max((out - 1) * s + eff - (size + b + e), 0))
    return extra


def _max_pool_with_indices(x, kernel, strides, padding, dilations, ceil_mode: bool,
                           column_major: bool):
    """MaxPool and ONNX's Indices: positions in the whole flattened input (batch and channel
    included, padding not), in row-major or, with ``storage_order=1``, column-major order."""
    y, local = _MAX_POOL[len(kernel)](x, kernel, strides, padding, dilations, ceil_mode=ceil_mode,
                                      return_indices=True)
    spatial = list(x.shape[2:])
    if column_major:  # unravel row-major, ravel with the first spatial axis fastest
        coords, rest = [], local
        for size in reversed(spatial):
            coords.append(rest % size)
            rest = rest // size
        coords.reverse()
        local, stride = torch.zeros_like(local), 1
        for coord, size in zip(coords, spatial):
            local, stride = local + coord * stride, stride * size
    plane = math.prod(spatial)
    base = torch.arange(x.shape[0] * x.shape[1], device=x.device).reshape(
        [x.shape[0], x.shape[1]] + [1] * len(spatial)) * plane
    return y, local + base


@register("MaxPool")
def max_pool(ctx: NodeContext):
    if ctx.output_used(1):
        return _max_pool_indices(ctx)
    if ctx.attr("storage_order", 0) != 0:
        raise Unsupported("storage_order=1")
    n, kernel, strides, dilations, begin, end = _pool_args(ctx)
    ceil_mode = bool(ctx.attr("ceil_mode", 0))
    x = ctx.input(0)
    symmetric = begin == end and all(2 * p <= k for p, k in zip(begin, kernel))
    if not symmetric:
        if ceil_mode:
            end = [e + x_ for e, x_ in zip(end, _ceil_extra(ctx, kernel, strides, dilations, begin, end))]
            ceil_mode = False
        x = ctx.call(F.pad, x, _pad_arg(begin, end), value=float("-inf"))
        begin = [0] * n
    return ctx.call(_MAX_POOL[n], x, kernel, strides, begin, dilations, ceil_mode=ceil_mode)


def _max_pool_indices(ctx: NodeContext):
    n, kernel, strides, dilations, begin, end = _pool_args(ctx)
    if begin != end or any(2 * p > k for p, k in zip(begin, kernel)):
        raise Unsupported("the Indices output with asymmetric or large padding")
    outputs = ctx.call(_max_pool_with_indices, ctx.input(0), kernel, strides, begin, dilations,
                       bool(ctx.attr("ceil_mode", 0)), bool(ctx.attr("storage_order", 0)))
    return [ctx.getitem(outputs, 0), ctx.getitem(outputs, 1)]


def _windowed_sum(x, kernel, strides, dilations):
    """Sum over every (dilated) window: a depthwise convolution with a kernel of ones."""
    n = len(kernel)
    planes = x.reshape([-1, 1] + list(x.shape[2:]))
    ones = torch.ones([1, 1] + list(kernel), dtype=x.dtype, device=x.device)
    out = _CONV[n](planes, ones, stride=strides, dilation=dilations)
    return out.reshape(list(x.shape[:2]) + list(out.shape[2:]))


def _dilated_average(x, kernel, strides, dilations, begin, end, count_include_pad: bool):
    """AveragePool with dilations: window sums over the padded input divided by the number of
    elements each window covers (the pads count only when ``count_include_pad``)."""
    pad = _pad_arg(begin, end)
    ones = torch.ones([1, 1] + list(x.shape[2:]), dtype=x.dtype, device=x.device)
    ones = F.pad(ones, pad, value=1.0 if count_include_pad else 0.0)
    total = _windowed_sum(F.pad(x, pad), kernel, strides, dilations)
    return total / _windowed_sum(ones, kernel, strides, dilations)


def _reference_ceil_pads(ctx: NodeContext, kernel, strides, dilations, begin, end):
    """ceil_mode as ONNX's reference implementation pads for it: the windows the ceiling adds
    are padded half before, half after the input (and count as padding)."""
    shape = ctx.shape(0)
    if shape is None or any(not isinstance(d, int) for d in shape[2:]):
        raise Unsupported("ceil_mode with dilations needs static spatial sizes")
    begin, end = list(begin), list(end)
    for i, (size, k, s, d) in enumerate(zip(shape[2:], kernel, strides, dilations)):
        window = (k - 1) * d + 1
        out = math.ceil((size + begin[i] + end[i] - window) / s + 1)
        extra = (out - 1) * s + window - size - begin[i] - end[i]
        if extra > 0:
            begin[i] += extra // 2
            end[i] += extra - extra // 2
    return begin, end


def _dilated_lp(x, p: float, kernel, strides, dilations, pad):
    return _windowed_sum(F.pad(x.abs().pow(p), pad), kernel, strides, dilations).pow(1.0 / p)


def _avg_pool_excluding_pad(x, kernel, strides, begin, end, ceil_extra):
    """Average over valid (non-pad) elements for asymmetric pads: sum / count."""
    pool = _AVG_POOL[len(kernel)]
    pad = _pad_arg(begin, [e + c for e, c in zip(end, ceil_extra)])
    ones = torch.ones_like(x[:1, :1])
    total = pool(F.pad(x, pad), kernel, strides, 0, False, True) 
    count = pool(F.pad(ones, pad), kernel, strides, 0, False, True)
    return total / count


@register("AveragePool")
def average_pool(ctx: NodeContext):
    n, kernel, strides, dilations, begin, end = _pool_args(ctx)
    ceil_mode = bool(ctx.attr("ceil_mode", 0))
    count_include_pad = bool(ctx.attr("count_include_pad", 0))
    if any(d != 1 for d in dilations):
        if ceil_mode:
            begin, end = _reference_ceil_pads(ctx, kernel, strides, dilations, begin, end)
        return ctx.call(_dilated_average, ctx.input(0), kernel, strides, dilations, begin, end,
                        count_include_pad)
    symmetric = begin == end and all(2 * p <= k for p, k in zip(begin, kernel))
    if symmetric and not (ceil_mode and not count_include_pad and any(begin)):
        return ctx.call(_AVG_POOL[n], ctx.input(0), kernel, strides, begin,
                        ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    extra = _ceil_extra(ctx, kernel, strides, dilations, begin, end) if ceil_mode else [0] * n
    if count_include_pad:
        # Padded zeros count; the ceil_mode overhang beyond the pads does not (ONNX reference).
        x = ctx.call(F.pad, ctx.input(0), _pad_arg(begin, end))
        return ctx.call(_avg_pool_excluding_pad, x, kernel, strides, [0] * n, [0] * n, extra)
    return ctx.call(_avg_pool_excluding_pad, ctx.input(0), kernel, strides, begin, end, extra)


def _lp_pool(x, p: float, kernel, strides, pad):
    pool = _AVG_POOL[len(kernel)]
    if any(pad):
        x = F.pad(x, pad)
    count = math.prod(kernel)
    return (pool(x.abs().pow(p), kernel, strides) * count).pow(1.0 / p)


@register("LpPool")
def lp_pool(ctx: NodeContext):
    n, kernel, strides, dilations, begin, end = _pool_args(ctx)
    if ctx.attr("ceil_mode", 0):
        raise Unsupported("ceil_mode LpPool")
    if any(d != 1 for d in dilations):
        return ctx.call(_dilated_lp, ctx.input(0), float(ctx.attr("p", 2)), kernel, strides,
                        dilations, _pad_arg(begin, end))
    return ctx.call(_lp_pool, ctx.input(0), float(ctx.attr("p", 2)), kernel, strides,
                    _pad_arg(begin, end))


def _global_dims(ctx: NodeContext) -> list[int]:
    return list(range(2, ctx.rank(0)))


@register("GlobalAveragePool")
def global_average_pool(ctx: NodeContext):
    return ctx.call(torch.mean, ctx.input(0), _global_dims(ctx), keepdim=True)


@register("GlobalMaxPool")
def global_max_pool(ctx: NodeContext):
    return ctx.call(torch.amax, ctx.input(0), _global_dims(ctx), keepdim=True)


def _global_lp(x, p: float, dims):
    return x.abs().pow(p).sum(dims, keepdim=True).pow(1.0 / p)


@register("GlobalLpPool")
def global_lp_pool(ctx: NodeContext):
    return ctx.call(_global_lp, ctx.input(0), float(ctx.attr("p", 2)), _global_dims(ctx))


@register("LRN")
def lrn(ctx: NodeContext):
    return ctx.call(F.local_response_norm, ctx.input(0), int(ctx.attr("size")),
                    float(ctx.attr("alpha", 1e-4)), float(ctx.attr("beta", 0.75)),
                    float(ctx.attr("bias", 1.0)))


def _gemm(a, b, c, alpha: float, beta: float, trans_a: bool, trans_b: bool):
    if trans_a:
        a = a.t()
    if trans_b:
        b = b.t()
    y = a @ b
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


@register("Gemm")
def gemm(ctx: NodeContext):
    alpha = float(ctx.attr("alpha", 1.0))
    beta = float(ctx.attr("beta", 1.0))
    trans_a = bool(ctx.attr("transA", 0))
    trans_b = bool(ctx.attr("transB", 0))
    c = ctx.input(2)
    c_shape = ctx.shape(2) if c is not None else None
    # The common dense layer (x @ W^T + b) maps to F.linear, torch's fastest path.
    if trans_b and not trans_a and alpha == 1.0 and beta == 1.0 and (c is None or (c_shape is not None and len(c_shape) == 1)):
        return ctx.call(F.linear, ctx.input(0), ctx.input(1), c)
    return ctx.call(_gemm, ctx.input(0), ctx.input(1), c, alpha, beta, trans_a, trans_b)


@register("MatMul")
def matmul(ctx: NodeContext):
    return ctx.call(torch.matmul, ctx.input(0), ctx.input(1))


def _softmax_2d(x, axis: int, op: str):
    """Opset < 13: softmax over all axes from ``axis`` on, as one flattened axis."""
    shape = x.shape
    fn = _SOFTMAX[op]
    return fn(x.reshape(int(math.prod(shape[:axis])), -1), 1).reshape(shape)


@register("Softmax", "LogSoftmax", "Hardmax")
def softmax_legacy(ctx: NodeContext):
    axis = int(ctx.attr("axis", 1))
    rank = ctx.rank(0)
    axis = axis + rank if axis < 0 else axis
    if axis == rank - 1:
        return ctx.call(_SOFTMAX[ctx.op], ctx.input(0), -1)
    return ctx.call(_softmax_2d, ctx.input(0), axis, ctx.op)


@register("Softmax", "LogSoftmax", "Hardmax", since=13)
def softmax(ctx: NodeContext):
    return ctx.call(_SOFTMAX[ctx.op], ctx.input(0), int(ctx.attr("axis", -1)))


def _hardmax(x, axis: int):
    index = x.argmax(axis, keepdim=True)
    return torch.zeros_like(x).scatter_(axis, index, 1.0)


_SOFTMAX = {"Softmax": torch.softmax, "LogSoftmax": torch.log_softmax, "Hardmax": _hardmax}
