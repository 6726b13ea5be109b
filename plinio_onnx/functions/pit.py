"""PIT's functions (PLiNIO's PIT, "Lightweight Neural Architecture Search for Temporal
Convolutional Networks at the Edge"): binary masks on channels, receptive field and dilation.

Binarizer: bin(θ) = 1[θ > threshold] forward, identity backward (straight-through). Keep-alive:
the last entry of every mask parameter counts as 1 whatever its value (θ = |x| elsewhere), so a
layer keeps at least one channel, the newest tap and the widest dilation pattern.

* ``PITChannelMask(alpha) -> mask``: mask_c = bin(θα_c).
* ``PITBlockMask(alpha, blocks) -> mask``: channels searched in blocks (``channel_multiple``):
  mask_c = bin(θα_{blocks_c}), ``blocks`` mapping every channel to its entry
  (`plinio_onnx.functions.pit_keep.block_index`); straight-through, a block's entry gets the sum
  of its channels' gradients.
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

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..graph import PLINIO_DOMAIN
from ..to_torch.context import NodeContext
from ..to_torch.registry import register
from . import constant_from_attribute, make_function

CHANNEL_MASK = "PITChannelMask"
BLOCK_MASK = "PITBlockMask"
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


def block_mask_function() -> onnx.FunctionProto:
    nodes = (_keep_alive_nodes("alpha", "theta", "a") + _binarize_nodes("theta", "entries", "b")
             + [helper.make_node("Gather", ["entries", "blocks"], ["mask"], axis=0)])
    return make_function(BLOCK_MASK, ["alpha", "blocks"], ["mask"], nodes, ["threshold"])


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
    return [channel_mask_function(), block_mask_function(), mask_weight_function(), time_mask_function()]


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
        # θγ summed in float64, then rounded: exactly, whatever the order (as θβ's cumsum, which
        # accumulates in float64 too), so that the fused masks (`plinio_onnx.to_torch.pit_masks`)
        # compute the same.
        keep_gamma = ((gamma_map_.double() @ gamma_hat.double()).to(beta.dtype) > threshold).to(beta.dtype)
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


def exported_taps(mask: torch.Tensor, dilation: int, pads: tuple[int, int]) -> torch.Tensor:
    """The number of taps `plinio_onnx.functions.pit_keep.kernel_plan` exports for the 0/1 tap
    ``mask`` of a Conv1d (oldest tap first), as an int64 tensor computed on the mask's device
    with no host read: kept taps forming a progression of step s that ends at the newest tap
    export as n taps at dilation d·s, plus the zero taps that keep a left pad of
    p0 − first·d from going negative (one when n = 1, else ⌈−pad/(d·s)⌉); any other mask exports
    the whole kernel."""
    kernel = mask.shape[0]
    positions = torch.arange(kernel, device=mask.device)
    kept = mask.detach() > 0
    count = kept.sum()
    first = torch.where(kept, positions, kernel).amin()
    last = torch.where(kept, positions, -1).amax()
    second = torch.where(kept & (positions > first), positions, kernel).amin()
    step = torch.where(count > 1, second - first, 1)
    on_grid = torch.where(kept, (positions - first) % step, 0).amax() == 0
    regular = (last == kernel - 1) & on_grid & (count == (last - first) // step + 1)
    begin = int(pads[0]) - first * int(dilation)
    widened = int(dilation) * step
    extra = torch.where(count == 1, 1, torch.div(-begin + widened - 1, widened, rounding_mode="floor"))
    extra = torch.where(begin < 0, extra, 0)
    return torch.where(regular & (count < kernel), count + extra, kernel)


def channel_mask(alpha: torch.Tensor, threshold: float) -> torch.Tensor:
    return _ChannelMask.apply(alpha, threshold)


def block_mask(alpha: torch.Tensor, blocks: torch.Tensor, threshold: float) -> torch.Tensor:
    """The channel mask of channels masked in blocks: bin(θα)[blocks] (straight-through)."""
    return channel_mask(alpha, threshold)[blocks]


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


@register(BLOCK_MASK, domain=PLINIO_DOMAIN)
def _block_mask_handler(ctx: NodeContext):
    return ctx.call(block_mask, ctx.input(0), ctx.input(1), float(ctx.attr("threshold", 0.5)))


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
