"""PIT's functions (PLiNIO's PIT, "Lightweight Neural Architecture Search for Temporal
Convolutional Networks at the Edge"): binary masks on channels, receptive field and dilation.

Binarizer: bin(θ) = 1[θ > threshold] forward, identity backward (straight-through). Keep-alive:
the last entry of every mask parameter counts as 1 whatever its value (θ = |x| elsewhere), so a
layer keeps at least one channel, the newest tap and the widest dilation pattern.

* ``PITChannelMask(alpha) -> mask``: mask_c = bin(θα_c).
* ``PITMaskWeight(W, mask, index, shape) -> W'``: W' = W ⊙ reshape([mask, 1][index], shape): the
  consumer-side channel mask. ``index`` maps each input feature of W to its channel's mask entry
  (or to the trailing 1 for features outside this group), so flattened channels (one channel = a
  block of features) and concatenated groups are masked exactly where the layer reads them; a
  pruned channel contributes nothing to what survives, whatever ops lie between.
* ``PITTimeMask(W, beta, gamma, gamma_map) -> W'``: for a Conv1d of kernel k (tap 0 oldest):
  θβ_j = Σ_{i≤j} β̂_i (taps are dropped from the old end), θγ = gamma_map · γ̂ with
  gamma_map[j, p] = 1 when (k-1-j) mod 2^p = 0 (dilation patterns anchored at the newest tap),
  m_j = bin(θβ_j)·bin(θγ_j), W' = W ⊙ m along the kernel axis.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..graph import PLINIO_DOMAIN
from ..to_torch.context import NodeContext
from ..to_torch.registry import register
from . import constant_from_attribute, make_function

CHANNEL_MASK = "PITChannelMask"
MASK_WEIGHT = "PITMaskWeight"
TIME_MASK = "PITTimeMask"


# -- ONNX bodies ------------------------------------------------------------------------------
def _keep_alive_nodes(src: str, dst: str, prefix: str) -> list[onnx.NodeProto]:
    """dst = concat(|src|[:-1], [1])."""
    return [
        helper.make_node("Abs", [src], [f"{prefix}_abs"]),
        helper.make_node("Constant", [], [f"{prefix}_start"], value=numpy_helper.from_array(np.array([0], np.int64))),
        helper.make_node("Constant", [], [f"{prefix}_end"], value=numpy_helper.from_array(np.array([-1], np.int64))),
        helper.make_node("Slice", [f"{prefix}_abs", f"{prefix}_start", f"{prefix}_end"], [f"{prefix}_head"]),
        helper.make_node("Constant", [], [f"{prefix}_one"], value=numpy_helper.from_array(np.array([1.0], np.float32))),
        helper.make_node("Concat", [f"{prefix}_head", f"{prefix}_one"], [dst], axis=0),
    ]


def _binarize_nodes(src: str, dst: str, prefix: str) -> list[onnx.NodeProto]:
    return [
        constant_from_attribute(f"{prefix}_threshold", "threshold"),
        helper.make_node("Greater", [src, f"{prefix}_threshold"], [f"{prefix}_gt"]),
        helper.make_node("Cast", [f"{prefix}_gt"], [dst], to=TensorProto.FLOAT),
    ]


def channel_mask_function() -> onnx.FunctionProto:
    nodes = _keep_alive_nodes("alpha", "theta", "a") + _binarize_nodes("theta", "mask", "b")
    return make_function(CHANNEL_MASK, ["alpha"], ["mask"], nodes, ["threshold"])


def mask_weight_function() -> onnx.FunctionProto:
    nodes = [
        helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array([1.0], np.float32))),
        helper.make_node("Concat", ["mask", "one"], ["extended"], axis=0),
        helper.make_node("Gather", ["extended", "index"], ["per_feature"], axis=0),
        helper.make_node("Reshape", ["per_feature", "shape"], ["broadcast"]),
        helper.make_node("Mul", ["W", "broadcast"], ["masked"]),
    ]
    return make_function(MASK_WEIGHT, ["W", "mask", "index", "shape"], ["masked"], nodes)


def time_mask_function() -> onnx.FunctionProto:
    nodes = (_keep_alive_nodes("beta", "beta_hat", "kb")
             + [helper.make_node("Constant", [], ["axis0"], value=numpy_helper.from_array(np.array(0, np.int64))),
                helper.make_node("CumSum", ["beta_hat", "axis0"], ["theta_beta"])]
             + _keep_alive_nodes("gamma", "gamma_hat", "kg")
             + [helper.make_node("Cast", ["gamma_map"], ["gamma_map_f"], to=TensorProto.FLOAT),
                helper.make_node("MatMul", ["gamma_map_f", "gamma_hat"], ["theta_gamma"])]
             + _binarize_nodes("theta_beta", "m_beta", "bb")
             + _binarize_nodes("theta_gamma", "m_gamma", "bg")
             + [helper.make_node("Mul", ["m_beta", "m_gamma"], ["taps"]),
                helper.make_node("Mul", ["W", "taps"], ["masked"])])
    return make_function(TIME_MASK, ["W", "beta", "gamma", "gamma_map"], ["masked"], nodes, ["threshold"])


def functions() -> list[onnx.FunctionProto]:
    return [channel_mask_function(), mask_weight_function(), time_mask_function()]


def dilation_levels(kernel: int) -> int:
    """L = max(⌈log2 k⌉, 1) dilation mask entries for a kernel of k taps."""
    return max(math.ceil(math.log2(kernel)), 1)


def gamma_map(kernel: int) -> np.ndarray:
    """[k, L] 0/1 matrix: tap j counts γ_p when (k-1-j) mod 2^p = 0 (anchored at the newest tap).

    Stored as int64 so the loader keeps it a buffer, not a trainable parameter."""
    levels = dilation_levels(kernel)
    return np.array([[1 if (kernel - 1 - j) % (2 ** p) == 0 else 0 for p in range(levels)]
                     for j in range(kernel)], dtype=np.int64)


# -- numpy (finalize) -------------------------------------------------------------------------
def keep_alive(values: np.ndarray) -> np.ndarray:
    theta = np.abs(np.asarray(values, dtype=np.float32)).reshape(-1).copy()
    theta[-1] = 1.0
    return theta


def channel_keep(alpha: np.ndarray, threshold: float) -> np.ndarray:
    """Indices of kept channels."""
    return np.flatnonzero(keep_alive(alpha) > threshold)


def tap_mask(beta: np.ndarray, gamma: np.ndarray, threshold: float) -> np.ndarray:
    kernel = np.asarray(beta).size
    theta_beta = np.cumsum(keep_alive(beta))
    theta_gamma = gamma_map(kernel).astype(np.float32) @ keep_alive(gamma)
    return ((theta_beta > threshold) & (theta_gamma > threshold)).astype(np.float32)


from dataclasses import dataclass


@dataclass(frozen=True)
class KernelPlan:
    """How a masked Conv1d kernel is exported: ``taps`` lists, oldest first, the original tap
    index of every exported tap (None: a zero tap that only keeps the alignment), with
    ``dilation`` and ``pads`` of the exported conv."""
    taps: tuple
    dilation: int
    pads: tuple[int, int]


def kernel_plan(mask: np.ndarray, dilation: int, pads: tuple[int, int]) -> KernelPlan:
    """The shortest kernel computing exactly what the masked kernel computes.

    Kept taps form a progression ending at the newest tap (β drops from the old end, γ keeps
    every 2^p-th tap counted from the newest), so they are a kernel of |J| taps at dilation d·step
    whose first tap sits J0·d later: its left pad shrinks by J0·d. Where that pad would be
    negative (a centred kernel that lost its older half), zero taps are prepended until it is not.
    """
    kernel = mask.size
    kept = np.flatnonzero(mask)
    if kept.size == kernel:
        return KernelPlan(tuple(range(kernel)), dilation, tuple(pads))
    step = int(kept[1] - kept[0]) if kept.size > 1 else 1
    if kept[-1] != kernel - 1 or np.any(np.diff(kept) != step):
        return KernelPlan(tuple(int(j) if mask[j] else None for j in range(kernel)), dilation, tuple(pads))
    begin = pads[0] - int(kept[0]) * dilation
    new_dilation = dilation * step
    taps: list = [int(j) for j in kept]
    if begin < 0:
        if kept.size == 1:
            new_dilation, extra = -begin, 1
        else:
            extra = -(-(-begin) // new_dilation)
        taps = [None] * extra + taps
        begin += extra * new_dilation
    return KernelPlan(tuple(taps), new_dilation, (begin, pads[1]))


# -- torch ------------------------------------------------------------------------------------
def _theta(x: torch.Tensor) -> torch.Tensor:
    """|x| with the last entry forced to 1 (keep-alive)."""
    return torch.cat([x[:-1].abs(), x.new_ones(1)])


def binarize(theta: torch.Tensor, threshold: float) -> torch.Tensor:
    """1[θ > threshold] forward; identity gradient (straight-through)."""
    hard = (theta > threshold).to(theta.dtype)
    return hard + (theta - theta.detach())  # exactly `hard` forward: a - a == 0


class _ChannelMask(torch.autograd.Function):
    """bin(θ(α)) forward; straight-through backward d/dα = sign(α), none for the kept-alive entry.

    One autograd node instead of the half dozen of the composed form: on small models the
    per-op overhead of the masks is what a PIT step costs over a plain one."""

    @staticmethod
    def forward(ctx, alpha: torch.Tensor, threshold: float) -> torch.Tensor:
        ctx.save_for_backward(alpha)
        theta = alpha.abs()
        theta[-1] = 1.0
        return (theta > threshold).to(alpha.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (alpha,) = ctx.saved_tensors
        grad_alpha = grad * torch.sign(alpha)
        grad_alpha[-1] = 0.0
        return grad_alpha, None


class _Taps(torch.autograd.Function):
    """m = bin(θβ)·bin(θγ) with θβ = cumsum(β̂), θγ = G·γ̂ (see the module docstring); the
    straight-through backward written out: one autograd node."""

    @staticmethod
    def forward(ctx, beta, gamma, gamma_map_, threshold: float):
        beta_hat, gamma_hat = beta.abs(), gamma.abs()
        beta_hat[-1] = 1.0
        gamma_hat[-1] = 1.0
        keep_beta = (torch.cumsum(beta_hat, 0) > threshold).to(beta.dtype)
        keep_gamma = (gamma_map_ @ gamma_hat > threshold).to(beta.dtype)
        ctx.save_for_backward(beta, gamma, gamma_map_, keep_beta, keep_gamma)
        return keep_beta * keep_gamma

    @staticmethod
    def backward(ctx, grad):
        beta, gamma, gamma_map_, keep_beta, keep_gamma = ctx.saved_tensors
        grad_theta_beta = grad * keep_gamma
        if beta.numel() == 1:  # receptive field not searched: one broadcast entry
            grad_theta_beta = grad_theta_beta.sum(0, keepdim=True)
        # θβ_j = Σ_{i≤j} β̂_i  →  ∂/∂β̂_i = Σ_{j≥i}: a reversed cumulative sum.
        grad_beta = torch.flip(torch.cumsum(torch.flip(grad_theta_beta, [0]), 0), [0]) * torch.sign(beta)
        grad_gamma = (gamma_map_.t() @ (grad * keep_beta)) * torch.sign(gamma)
        grad_beta[-1] = 0.0
        grad_gamma[-1] = 0.0
        return grad_beta, grad_gamma, None, None


def channel_mask(alpha: torch.Tensor, threshold: float) -> torch.Tensor:
    return _ChannelMask.apply(alpha, threshold)


def mask_weight(weight: torch.Tensor, mask: torch.Tensor, index: torch.Tensor, shape: list[int]) -> torch.Tensor:
    extended = torch.cat([mask, mask.new_ones(1)])
    return weight * extended[index].view(shape)


def time_mask(weight: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor, gamma_map_: torch.Tensor,
              threshold: float) -> torch.Tensor:
    return weight * taps(beta, gamma, gamma_map_, threshold)


def taps(beta: torch.Tensor, gamma: torch.Tensor, gamma_map_: torch.Tensor, threshold: float) -> torch.Tensor:
    return _Taps.apply(beta, gamma, gamma_map_.to(beta.dtype), threshold)


@register(CHANNEL_MASK, domain=PLINIO_DOMAIN)
def _channel_mask_handler(ctx: NodeContext):
    return ctx.call(channel_mask, ctx.input(0), float(ctx.attr("threshold", 0.5)))


def mask_blocks(weight: torch.Tensor, mask: torch.Tensor, axis: int, inner: int) -> torch.Tensor:
    """W ⊙ mask along ``axis`` where every channel covers ``inner`` consecutive features and the
    group spans the whole axis: views instead of a gather (the common case, and cheaper)."""
    shape = list(weight.shape)
    blocks = shape[:axis] + [mask.numel(), inner] + shape[axis + 1:]
    view = [1] * len(blocks)
    view[axis] = -1
    return (weight.reshape(blocks) * mask.view(view)).reshape(shape)


@register(MASK_WEIGHT, domain=PLINIO_DOMAIN)
def _mask_weight_handler(ctx: NodeContext):
    shape = ctx.ints(3)
    index, weight_shape = ctx.static(2), ctx.shape(0)
    channels = ctx.shape(1)
    if index is not None and isinstance(shape, list) and -1 in shape and weight_shape is not None \
            and channels and isinstance(channels[0], int):
        axis = shape.index(-1)
        inner = index.size // channels[0] if index.size % channels[0] == 0 else 0
        if inner and np.array_equal(index, np.repeat(np.arange(channels[0]), inner)):
            return ctx.call(mask_blocks, ctx.input(0), ctx.input(1), axis, inner)
    return ctx.call(mask_weight, ctx.input(0), ctx.input(1), ctx.input(2), shape)


@register(TIME_MASK, domain=PLINIO_DOMAIN)
def _time_mask_handler(ctx: NodeContext):
    return ctx.call(time_mask, ctx.input(0), ctx.input(1), ctx.input(2), ctx.input(3),
                    float(ctx.attr("threshold", 0.5)))
