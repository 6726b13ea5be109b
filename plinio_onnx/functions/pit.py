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


def group_keep(values_of, group: dict, threshold: float) -> np.ndarray:
    """Kept channels of a PIT group record: its one mask parameter, or one per atom (a group
    whose layers hold parts of it; see `plinio_onnx.analysis.ChannelGroup.atoms`).
    ``values_of(name)`` reads a parameter's values."""
    alpha = group["alpha"]
    if isinstance(alpha, str):
        return channel_keep(values_of(alpha), threshold)
    kept = [np.asarray(atom)[channel_keep(values_of(name), threshold)] for name, atom in zip(alpha, group["atoms"])]
    return np.sort(np.concatenate(kept))


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
        # θγ summed in float64, then rounded: exactly, whatever the order (as θβ's cumsum, which
        # accumulates in float64 too), so that the fused masks (`_MaskPlan`) compute the same.
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


# -- fused masks ------------------------------------------------------------------------------
# On small models a PIT step costs over a plain one what its mask nodes cost: a few tiny ops and
# autograd nodes each (channel mask, weight masks, tap mask, then the same again for the cost),
# each paying Python's and the dispatcher's overhead. `fuse_masks` replaces every mask node of a
# generated module, and the products W ⊙ f of the weights they mask, by one autograd node
# (`_MaskFactors`): from one concatenation of the mask parameters it computes every channel and
# tap mask at once, the factor f of every masked weight by gathers with index arrays made once,
# and all the products W ⊙ f in one foreach call (their gradients likewise). `counts` gives the
# cost every kept-channel and kept-tap count (and, given a compiled cost model, the cost itself)
# in one node (`_Counts`), reusing the masks of the module's last forward while the mask
# parameters are unchanged — or the module computes the cost in its own forward
# (`PITMasks.attach_cost`). Values and straight-through gradients are those of the per-node
# functions above, which stay the reference and the fallback (mask nodes the fusion does not
# recognize, mask parameters of different dtypes).
import functools  # noqa: E402
import operator  # noqa: E402

from ..to_torch.builder import register_module_pass  # noqa: E402


class _MaskState:
    """What `_MaskPlan.forward` computed (and the backwards need): the concatenated parameters
    ``flat``, per tap whether β and γ keep it, and ``extended`` = [channel masks, tap masks, 1]
    (``previous``: the same object, when the masks equal the last call's)."""
    __slots__ = ("flat", "keep_beta", "keep_gamma", "extended", "sign", "previous")


class _DeviceCache:
    """Plans keep per-device copies of their constants in ``_device``; pickling drops them."""

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_device"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._device = {}


class _MaskPlan(_DeviceCache):
    """Every channel mask (an alpha per group) and tap mask (a beta and a gamma per time mask)
    computed from one concatenation of their parameters: |·| and keep-alive once for all, the
    masks of all groups at once, and θβ = Σ_{i≤j} β̂_i, θγ = G·γ̂ of every tap of every time mask
    as one product with a constant 0/1 matrix, summed in float64 then rounded (the value
    `_Taps` computes).

    ``groups``: (size, threshold) per group; ``times``: (beta size, gamma size, gamma map,
    threshold) per time mask (a γ map is a constant of the plan: its buffer is what `gamma_map`
    made it). The concatenation of the parameters: group i's alpha is parameter i, time mask t's
    beta and gamma parameters G + 2t and G + 2t + 1."""

    def __init__(self, groups, times=()) -> None:
        self.groups = [(int(n), float(t)) for n, t in groups]
        self.times = [(int(nb), int(ng), np.asarray(m), float(t)) for nb, ng, m, t in times]
        self.sizes = [n for n, _ in self.groups]
        self.channels = sum(self.sizes)
        self.lengths = self.sizes + [n for nb, ng, _, _ in self.times for n in (nb, ng)]
        self.kernels = [m.shape[0] for _, _, m, _ in self.times]
        self.tap_starts = np.cumsum([0] + self.kernels, dtype=np.int64)  # of every time mask's taps
        self.taps = int(self.tap_starts[-1])
        self.extended_size = self.channels + self.taps + 1
        # The last entry of every parameter is kept alive (θ = 1). Gradients w.r.t. ``extended``
        # are gathered in one more entry, a sink, where everything bound for a kept-alive
        # channel goes: those parameters get no gradient.
        self.kept_alive = np.cumsum(self.lengths, dtype=np.int64) - 1
        self.kept_alive_channels = self.kept_alive[:len(self.sizes)]
        # [θβ; θγ] of every tap = M · θ(time parameters)
        width = sum(self.lengths[len(self.sizes):])
        matrix = np.zeros((2 * self.taps, width))
        start = 0
        for t, (nb, ng, gmap, _) in enumerate(self.times):
            k, row = self.kernels[t], int(self.tap_starts[t])
            for j in range(k):
                if nb > 1:
                    matrix[row + j, start:start + j + 1] = 1.0
                else:
                    matrix[row + j, start] = 1.0
                matrix[self.taps + row + j, start + nb:start + nb + ng] = gmap[j, :ng]
            start += nb + ng
        self.matrix = matrix
        self.tap_thresholds = np.repeat([t for _, _, _, t in self.times], self.kernels) if self.times else None
        self._device: dict = {}

    def constants(self, device, dtype) -> "_MaskConstants":
        """The plan's constants as tensors on ``device`` (floating ones in ``dtype``)."""
        key = (device, dtype)
        if key not in self._device:
            self._device[key] = _MaskConstants(self, device, dtype)
        return self._device[key]

    def forward(self, flat: torch.Tensor) -> _MaskState:
        """The masks of the concatenated parameters ``flat`` (no autograd)."""
        state = _MaskState()
        state.flat, state.sign = flat, None
        const = self.constants(flat.device, flat.dtype)
        theta = flat.abs()
        # Which channels and which taps' θβ, θγ pass their thresholds (kept-alive entries always):
        # compared first, as booleans, so that the common case — no mask flipped since the last
        # call — costs a handful of ops, and what depends on the masks only (the factors, the
        # counts, the cost and the taps' gradient matrix) is reused (``previous``).
        keys = []
        if self.groups:
            keys.append(torch.gt(theta[:self.channels], const.channel_thresholds))
        if self.times:
            sums = torch.addmv(const.tap_offset, const.tap_matrix, theta[self.channels:].double())
            keys.append(torch.gt(sums.to(flat.dtype), const.tap_thresholds))
        key = torch.cat(keys) if len(keys) > 1 else keys[0]
        before = self._device.get("last")
        if before is not None and before[1].dtype == flat.dtype and before[0].device == key.device \
                and torch.equal(before[0], key):
            _, state.extended, state.keep_beta, state.keep_gamma = before
            state.previous = state.extended
            return state
        pieces, channels, taps = [], self.channels, self.taps
        if self.groups:
            pieces.append(key[:channels].to(flat.dtype))
        if self.times:
            kept = key[channels:].to(flat.dtype)
            state.keep_beta, state.keep_gamma = kept[:taps], kept[taps:]
            pieces.append(state.keep_beta * state.keep_gamma)
        else:
            state.keep_beta = state.keep_gamma = None
        pieces.append(const.one)
        state.extended, state.previous = torch.cat(pieces), None
        self._device["last"] = (key, state.extended, state.keep_beta, state.keep_gamma)
        return state

    def grad(self, state: _MaskState, grad_extended: torch.Tensor) -> torch.Tensor:
        """∂/∂(the concatenated parameters) given ∂/∂(``extended``): the straight-through
        gradients of `_ChannelMask` (grad·sign(α)) and `_Taps` (θβ = M_β·θ, θγ = M_γ·θ:
        ∂/∂θ = (grad ⊙ kept by γ)·M_β + (grad ⊙ kept by β)·M_γ), none for kept-alive entries."""
        flat, channels = state.flat, self.channels
        pieces = [grad_extended[:channels]] if self.groups else []
        if self.times:
            pieces.append(grad_extended[channels:channels + self.taps] @ self._tap_grad_matrix(state))
        if state.sign is None:
            state.sign = torch.sign(flat)
        return (torch.cat(pieces) if len(pieces) > 1 else pieces[0]).mul_(state.sign)

    def _tap_grad_matrix(self, state: _MaskState) -> torch.Tensor:
        """diag(kept by γ)·M_β + diag(kept by β)·M_γ (the same while the masks are)."""
        cached = self._device.get("tap grad matrix")
        if cached is not None and (cached[0] is state.extended or cached[0] is state.previous):
            matrix = cached[1]
        else:
            both = self.constants(state.flat.device, state.flat.dtype).tap_grad_matrix
            matrix = state.keep_gamma[:, None] * both[:self.taps] + state.keep_beta[:, None] * both[self.taps:]
        self._device["tap grad matrix"] = (state.extended, matrix)
        return matrix


class _MaskConstants:
    """A `_MaskPlan`'s constants on one device: ``channel_thresholds`` (per alpha entry; −inf
    where kept alive), ``tap_matrix`` and ``tap_offset`` (float64: [θβ; θγ] of every tap = M·θ, the
    kept-alive columns of M folded into the offset, as θ is 1 there), ``tap_thresholds``
    (per row), ``tap_grad_matrix`` (M in the parameters' dtype, the kept-alive columns zero: they
    get no gradient) and ``one``."""

    def __init__(self, plan: "_MaskPlan", device, dtype) -> None:
        thresholds = np.repeat([t for _, t in plan.groups], plan.sizes).astype(np.float64)
        thresholds[plan.kept_alive_channels] = -np.inf
        self.channel_thresholds = torch.as_tensor(thresholds, dtype=dtype, device=device)
        alive = plan.kept_alive[len(plan.sizes):] - plan.channels  # kept-alive columns of M
        folded = plan.matrix.copy()
        folded[:, alive] = 0.0
        self.tap_matrix = torch.as_tensor(folded, dtype=torch.float64, device=device)
        self.tap_offset = torch.as_tensor(plan.matrix[:, alive].sum(axis=1), dtype=torch.float64, device=device)
        taps = np.concatenate([plan.tap_thresholds] * 2) if plan.times else np.zeros(0)
        self.tap_thresholds = torch.as_tensor(taps, dtype=dtype, device=device)
        self.tap_grad_matrix = torch.as_tensor(folded, dtype=dtype, device=device)
        self.one = torch.ones(1, dtype=dtype, device=device)


_BLOCKS, _INDEX, _TIME = "blocks", "index", "time"


class _FusedPlan(_DeviceCache):
    """How `_MaskFactors` makes the factor f of every masked weight W ⊙ f: a product of gathers
    from the masks' ``extended`` vector (the last entry a 1) by index ``rows`` made once, so that
    all factors of a module take a handful of tensor ops and their gradients as many (scatters by
    the same indices).

    ``masks``: the `_MaskPlan`; ``targets``: the module attribute of every input (the mask
    parameters, in ``masks``' order); ``shapes``: every factor's ([1, *W.shape[1:]] when no mask
    lies along W's first axis: a product broadcasting over the first axis only, and its ∂/∂f a
    sum over it, are several times faster than broadcasting a [1, C, 1, 1] mask);
    ``thresholds``: every group's."""

    def __init__(self, masks: _MaskPlan, shapes, rows, targets, thresholds) -> None:
        self.masks, self.shapes = masks, [tuple(s) for s in shapes]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.rows = np.asarray(rows, dtype=np.int64)
        self.targets, self.thresholds = list(targets), thresholds
        # the factors with a leading 1 where their weight has more: ∂/∂f sums over that axis
        self.reduced = [len(shape) > 1 and shape[0] == 1 for shape in self.shapes]
        self._device: dict = {}

    def factor_grad_buffer(self, like: torch.Tensor) -> tuple:
        """A vector for ∂/∂(every factor, concatenated) like ``like``, and a view per factor of
        its part (the shape the backward's sum gives: without a reduced first axis). Reused by
        every backward: what it holds is consumed before the backward returns."""
        key = ("factor grads", like.device, like.dtype)
        if key not in self._device:
            buffer = torch.empty(sum(self.sizes), dtype=like.dtype, device=like.device)
            pieces = buffer.split_with_sizes(self.sizes) if len(self.sizes) > 1 else (buffer,)
            slots = [piece.view(shape[1:] if reduced else shape)
                     for piece, shape, reduced in zip(pieces, self.shapes, self.reduced)]
            self._device[key] = (buffer, slots)
        return self._device[key]

    def indices(self, device) -> tuple:
        """The index rows on ``device``, and their concatenation with the kept-alive channels'
        entries sent to the sink (the backward's one scatter, see `_MaskPlan`)."""
        if device not in self._device:
            rows = [torch.as_tensor(row, device=device) for row in self.rows]
            scatter = np.concatenate(list(self.rows))
            scatter[np.isin(scatter, self.masks.kept_alive_channels)] = self.masks.extended_size
            self._device[device] = (rows, torch.as_tensor(scatter, device=device))
        return self._device[device]

    def factors(self, extended: torch.Tensor, previous: torch.Tensor | None = None) -> tuple:
        """(every factor, shaped; with several index rows, the product of the other rows'
        entries for each row, [rows, entries] — ∂f/∂(row p's entries) — else None) from
        ``extended`` (with autograd or not; without, the last ones are reused while ``extended``
        equals ``previous``, theirs)."""
        last = self._device.get("last")
        if previous is not None and last is not None and last[0] is previous:
            views, others = last[1], last[2]
        else:
            gathered = [torch.index_select(extended, 0, index) for index in self.indices(extended.device)[0]]
            flat = functools.reduce(operator.mul, gathered) if len(gathered) > 1 else gathered[0]
            pieces = flat.split_with_sizes(self.sizes) if len(self.sizes) > 1 else (flat,)
            views = [piece.view(shape) for piece, shape in zip(pieces, self.shapes)]
            others = None if len(gathered) == 1 else torch.stack(
                [functools.reduce(operator.mul, [g for q, g in enumerate(gathered) if q != p])
                 for p in range(len(gathered))])
        if not extended.requires_grad:
            self._device["last"] = (extended, views, others)
        return views, others


class _MaskFactors(torch.autograd.Function):
    """Every masked weight W ⊙ f of a PIT module from the concatenated mask parameters and the
    weights, in one autograd node: ∂/∂W = grad ⊙ f, and ∂/∂f = Σ grad ⊙ W (summed to f's shape)
    mapped to the straight-through gradients of `channel_mask` and `time_mask` — what autograd
    computes through the per-node functions (and, with a cost attached to its `PITMasks`, that
    cost too: a last output). It saves no tensor for backward (what it needs lives on ``ctx``;
    the weights' versions are checked by hand), so a cost taken from it backpropagates on its
    own after the loss did, or before."""

    @staticmethod
    def forward(ctx, plan: _FusedPlan, owner, flat, *weights):
        ctx.set_materialize_grads(False)
        state = plan.masks.forward(flat)
        factors, others = plan.factors(state.extended, state.previous)
        outputs = tuple(torch._foreach_mul(list(weights), factors))
        ctx.plan, ctx.state, ctx.others, ctx.cost = plan, state, others, None
        ctx.factors, ctx.weights, ctx.versions = factors, weights, [w._version for w in weights]
        if owner is not None:
            owner.remember(state)
            attached = owner.attached_cost()
            if attached is not None:  # the cost too, as `_Counts` would
                count_plan, cost = attached
                x, value = count_plan.evaluate(state, cost)
                ctx.cost = (count_plan, cost, x)
                outputs += (torch.scalar_tensor(value, dtype=torch.float64, device=flat.device),)
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        # (once differentiable, checked by hand: the decorator's wrapping costs a step's worth)
        if torch.is_grad_enabled():
            raise RuntimeError("PIT masks support no double backward (create_graph=True)")
        plan: _FusedPlan = ctx.plan
        weights, factors = ctx.weights, ctx.factors
        count = len(weights)
        if [w._version for w in weights] != ctx.versions:
            raise RuntimeError("a PIT-masked weight was modified in place between the forward and the backward")
        grad_weights = grads[:count]
        needs = ctx.needs_input_grad
        result = [None] * (3 + count)
        present = [i for i, g in enumerate(grad_weights) if g is not None]
        wanted = [i for i in present if needs[3 + i]]
        to_masks = needs[2] and present
        # ∂/∂W = grad ⊙ f, and grad ⊙ W (for ∂/∂f): one foreach call for both
        if len(present) == count and len(wanted) == count and to_masks:
            products = torch._foreach_mul(grad_weights + grad_weights, [*factors, *weights])
            result[3:] = products[:count]
            products = products[count:]
        else:
            if wanted:
                for i, g in zip(wanted, torch._foreach_mul([grad_weights[i] for i in wanted],
                                                           [factors[i] for i in wanted])):
                    result[3 + i] = g
            products = torch._foreach_mul([grad_weights[i] for i in present],
                                          [weights[i] for i in present]) if to_masks else []
        if not needs[2]:
            return tuple(result)
        mask_plan, state = plan.masks, ctx.state
        grad_extended = None
        if ctx.cost is not None and len(grads) > count and grads[-1] is not None:
            count_plan, cost, x = ctx.cost  # the cost's share first: the scatter adds to it
            grad_extended = count_plan.cost_grads(x, cost, grads[-1], state.flat)
        if present:
            # ∂/∂f: every product summed to its factor's shape, straight into one vector
            grad, slots = plan.factor_grad_buffer(state.flat)
            if len(present) < count:
                grad.zero_()
            for i, product in zip(present, products):
                if plan.reduced[i]:
                    torch.sum(product, 0, out=slots[i])
                else:
                    slots[i].copy_(product)
            if ctx.others is not None:  # ∂f/∂(each row's entries): every row scattered at once
                grad = torch.mul(ctx.others, grad).view(-1)
            if grad_extended is None:
                grad_extended = state.flat.new_zeros(mask_plan.extended_size + 1)
            grad_extended.index_add_(0, plan.indices(grad.device)[1], grad)
        if grad_extended is not None:
            result[2] = mask_plan.grad(state, grad_extended)
        return tuple(result)


class PITMasks(torch.nn.Module):
    """Every PIT-masked weight of a generated module, in one autograd node (see `fuse_masks`):
    called with the module's mask parameters then the weights they mask, returns the masked
    weights[, the attached cost]. It keeps the masks of its last call (values, no graph) for
    `counts`, valid while its mask parameters are the same tensors at the same versions, and
    computes an attached cost (`attach_cost`) in every call."""

    def __init__(self, plan: _FusedPlan) -> None:
        super().__init__()
        self.plan = plan
        self._memo: dict = {}  # "last": (masks, concatenation, parameters, versions) of the last call

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        plan, memo = self.plan, self._memo
        memo.pop("cost_out", None)
        packed = self._parameters.get("packed")
        if packed is not None:  # the mask parameters, packed (see `_pack_mask_parameters`)
            params, weights = (packed,), tensors
            flat = packed
        else:
            count = len(plan.targets)
            params, weights = tensors[:count], tensors[count:]
            dtype = params[0].dtype
            if any(p.dtype != dtype for p in params):
                return self._per_node(params, weights)
            flat = torch.cat(params) if len(params) > 1 else params[0]
        memo["pending"] = (params, flat)
        outputs = _MaskFactors.apply(plan, self, flat, *weights)
        if len(outputs) > len(weights):
            memo["cost_out"] = (outputs[-1], memo["cost"][1])
        return outputs

    def mask_inputs(self, module) -> list[torch.Tensor]:
        """What ``module`` (the generated module holding this) passes as mask parameters: the
        packed parameter, or the plan's targets."""
        packed = self._parameters.get("packed")
        if packed is not None:
            return [packed]
        parameters, buffers = module._parameters, module._buffers  # (getattr is slower)
        return [parameters[a] if a in parameters else buffers[a] for a in self.plan.targets]

    def remember(self, state: _MaskState) -> None:
        params, flat = self._memo.pop("pending")
        self._memo["last"] = (state, flat, params, [p._version for p in params])

    def last_masks(self, params) -> tuple | None:
        """(masks, concatenated parameters) of the last call if ``params`` (its mask parameters)
        are the same tensors at the same versions as then; else None. (The concatenation is the
        autograd `cat` of the call: backward through it needs no saved tensor, so a cost on it
        backpropagates on its own as well as with the forward's loss.)"""
        last = self._memo.get("last")
        if last is None or len(last[2]) != len(params):
            return None
        state, flat, before, versions = last
        if not all(map(operator.is_, params, before)) or [p._version for p in params] != versions:
            return None
        return state, flat

    def attach_cost(self, count_plan: "CountPlan", cost) -> None:
        """Compute ``cost`` (a compiled cost model bound to ``count_plan``'s counts, whose masks
        are this plan's) in every call too, for `take_cost`."""
        self._memo["cost"] = (count_plan, cost)

    def attached_cost(self):
        """(count plan, cost) attached, or None."""
        return self._memo.get("cost")

    def take_cost(self, cost, params) -> torch.Tensor | None:
        """The attached ``cost`` as the last call computed it — a node of that call's graph, so
        it backpropagates with the masked weights (or on its own) — if ``params`` are what they
        were then and it is still to be taken (once per call); else None."""
        out = self._memo.pop("cost_out", None)
        if out is None or out[1] is not cost or self.last_masks(params) is None:
            return None
        value = out[0]
        if not value.requires_grad and torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return None
        return value

    def _per_node(self, params, weights) -> tuple[torch.Tensor, ...]:
        """The per-node functions, composed (mask parameters of different dtypes)."""
        plan, mask_plan = self.plan, self.plan.masks
        self._memo.pop("last", None)
        groups = len(mask_plan.groups)
        pieces = [channel_mask(params[g], plan.thresholds[g]) for g in range(groups)]
        for t, (_, _, gmap, threshold) in enumerate(mask_plan.times):
            beta, gamma = params[groups + 2 * t], params[groups + 2 * t + 1]
            pieces.append(taps(beta, gamma, torch.as_tensor(gmap, device=beta.device), threshold))
        dtype = pieces[0].dtype
        pieces = [p.to(dtype) for p in pieces] + [torch.ones(1, dtype=dtype, device=params[0].device)]
        factors = plan.factors(torch.cat(pieces))[0]
        return tuple(weight * factor for weight, factor in zip(weights, factors))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_memo"] = {}
        return state


def _target(module: torch.nn.Module, target: str) -> torch.Tensor:
    return functools.reduce(getattr, target.split("."), module)


def fuse_masks(module) -> None:
    """Replace, in a generated ``torch.fx.GraphModule``, the PIT mask calls on parameters
    (`channel_mask` → `mask_blocks` / `mask_weight` → `time_mask` chains from a weight) by one
    `PITMasks` call computing the factor of every masked weight (split into views), each weight
    then one product; in place. Calls it does not recognize (and channel masks read by them)
    stay as they are. Run by `to_torch` on every module it generates."""
    graph = module.graph

    def attr(node) -> bool:
        return isinstance(node, torch.fx.Node) and node.op == "get_attr"

    def called(node, fn) -> bool:
        return node.op == "call_function" and node.target is fn and not node.kwargs

    cmasks = {n for n in graph.nodes if called(n, channel_mask) and len(n.args) == 2 and attr(n.args[0])
              and isinstance(n.args[1], float)}

    def parse(node):
        args = node.args
        if called(node, mask_blocks) and len(args) == 4 and args[1] in cmasks \
                and all(isinstance(a, int) for a in args[2:]):
            return args[0], (_BLOCKS, args[1], args[2], args[3])
        if called(node, mask_weight) and len(args) == 4 and args[1] in cmasks and attr(args[2]) \
                and isinstance(args[3], (list, tuple)) and all(isinstance(a, int) for a in args[3]):
            return args[0], (_INDEX, args[1], args[2], tuple(args[3]))
        if called(node, time_mask) and len(args) == 5 and all(attr(a) for a in args[1:4]) \
                and isinstance(args[4], float):
            return args[0], (_TIME, args[1], args[2], args[3], args[4])
        return None

    parsed = {}
    for node in graph.nodes:
        entry = parse(node)
        if entry is not None:
            parsed[node] = entry
    chains = []
    for node, (source, part) in parsed.items():
        if not attr(source):
            continue
        members, parts = [node], [part]
        while len(members[-1].users) == 1:
            (user,) = members[-1].users
            if user not in parsed or parsed[user][0] is not members[-1]:
                break
            members.append(user)
            parts.append(parsed[user][1])
        chains.append((source, parts, members))
    # A channel mask read elsewhere than by fused chains stays a node, and so do its chains.
    while True:
        inside = {m for _, _, members in chains for m in members}
        outside = {m for m in cmasks if any(u not in inside for u in m.users)}
        kept = [c for c in chains if not any(p[0] is not _TIME and p[1] in outside for p in c[1])]
        if len(kept) == len(chains):
            break
        chains = kept
    if not chains:
        return

    groups: dict = {}   # channel mask node -> (group, alpha target, size, threshold)
    times: dict = {}    # (beta, gamma, gamma map targets, threshold) -> (time mask, spec)
    for _, parts, _ in chains:
        for part in parts:
            if part[0] is _TIME:
                _, beta, gamma, gmap, threshold = part
                key = (beta.target, gamma.target, gmap.target, threshold)
                if key not in times:
                    times[key] = (len(times), (int(_target(module, beta.target).numel()),
                                               int(_target(module, gamma.target).numel()),
                                               _target(module, gmap.target).detach().cpu().numpy(), float(threshold)))
            elif part[1] not in groups:
                alpha = part[1].args[0]
                groups[part[1]] = (len(groups), alpha.target, int(_target(module, alpha.target).numel()),
                                   float(part[1].args[1]))
    mask_plan = _MaskPlan([(size, threshold) for _, _, size, threshold in groups.values()],
                          [spec for _, spec in times.values()])
    group_start = np.cumsum([0] + mask_plan.sizes)
    one = mask_plan.extended_size - 1   # the extending 1

    # Every part as an index array broadcastable to W: the entry of ``extended`` each weight
    # entry is multiplied by.
    shapes, columns = [], []
    for source, parts, _ in chains:
        weight_shape = tuple(_target(module, source.target).shape)
        rank = len(weight_shape)
        arrays = []
        for part in parts:
            if part[0] is _TIME:
                t = times[(part[1].target, part[2].target, part[3].target, part[4])][0]
                kernel = weight_shape[-1]
                start = mask_plan.channels + int(mask_plan.tap_starts[t])
                arrays.append((start + np.arange(kernel)).reshape((1,) * (rank - 1) + (kernel,)))
                continue
            group, _, size, _ = groups[part[1]]
            if part[0] is _BLOCKS:
                _, _, axis, inner = part
                shape = [1] * rank
                shape[axis] = weight_shape[axis]
                arrays.append((group_start[group] + np.arange(weight_shape[axis]) // inner).reshape(shape))
            else:
                _, _, index, shape = part
                values = _target(module, index.target).detach().cpu().numpy().astype(np.int64)
                resolved = [w if s == -1 else s for s, w in zip(shape, weight_shape)]
                arrays.append(np.where(values < size, group_start[group] + values, one).reshape(resolved))
        along_first = weight_shape[0] != 1 and any(a.shape[0] != 1 for a in arrays)
        shape = weight_shape if along_first or rank < 2 else (1,) + weight_shape[1:]
        shapes.append(shape)
        # Entry by entry, the masks that apply first (the 1s last: the product is the same), so
        # that the parts of different groups along one axis (a Concat's) share a row.
        column = np.sort(np.stack([np.broadcast_to(a, shape).reshape(-1) for a in arrays]), axis=0)
        columns.append(column[(column != one).any(axis=1)] if (column != one).any() else column[:1])
    rows = [np.concatenate([c[p] if p < len(c) else np.full(int(np.prod(s)), one) for c, s in zip(columns, shapes)])
            for p in range(max(len(c) for c in columns))]
    param_targets = [target for _, target, _, _ in groups.values()] + \
        [t for (beta, gamma, _, _) in times for t in (beta, gamma)]
    plan = _FusedPlan(mask_plan, shapes, rows, param_targets,
                      [threshold for _, _, _, threshold in groups.values()])

    name, k = "pit_masks", 1
    while hasattr(module, name):
        name, k = f"pit_masks_{k}", k + 1
    module.add_submodule(name, PITMasks(plan))
    first = next(n for n in graph.nodes if n.op != "placeholder")
    existing = {n.target: n for n in graph.nodes if n.op == "get_attr"}
    inputs = []
    for target in plan.targets:  # the parameters' get_attr nodes, moved first
        node = existing.get(target)
        if node is None:
            with graph.inserting_before(first):
                node = graph.get_attr(target)
        elif node is not first:
            first.prepend(node)
        inputs.append(node)
    for source, _, _ in chains:  # then the weights'
        if source is not first:
            first.prepend(source)
        inputs.append(source)
    with graph.inserting_before(first.next if first in inputs else first):  # (after every input)
        # called as a plain function of the submodule: nn.Module.__call__'s hooks machinery is a
        # measurable share of a small model's step
        fused = graph.call_function(_call_masks, (graph.get_attr(name), *inputs))
        masked = [graph.call_function(operator.getitem, (fused, i)) for i in range(len(chains))]
    orphans = set()
    for (_, _, members), weight in zip(chains, masked):
        members[-1].replace_all_uses_with(weight)
        for member in reversed(members):
            orphans.update(a for a in member.args if isinstance(a, torch.fx.Node))
            graph.erase_node(member)
    for mask in groups:
        if not mask.users:
            orphans.update(a for a in mask.args if isinstance(a, torch.fx.Node))
            graph.erase_node(mask)
    for node in orphans:  # (indices and γ maps are constants of the plan: their get_attr nodes go too)
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    _pack_mask_parameters(module, name, fused, inputs[:len(plan.targets)])
    graph.lint()
    module.recompile()


def _call_masks(masks: PITMasks, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return masks.forward(*tensors)


def _pack_mask_parameters(module, name: str, fused, nodes) -> None:
    """Pack the mask parameters read by ``fused`` only (their get_attr ``nodes``) into one flat
    parameter of its `PITMasks`: one autograd leaf, gradient and optimizer entry instead of one
    per group and time mask (on a small model, a sizable part of a step)."""
    targets = [node.target for node in nodes]
    params = [module._parameters.get(t) for t in targets]
    if any(p is None for p in params) or len({(p.dtype, p.device, p.requires_grad) for p in params}) != 1 \
            or any(set(node.users) != {fused} for node in nodes) or not hasattr(module, "pack"):
        return
    fused.args = fused.args[:1] + fused.args[1 + len(nodes):]
    for node in nodes:
        module.graph.erase_node(node)
    module.pack(targets, name)


register_module_pass(fuse_masks)


# -- counts for the cost ----------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def _exported_taps(mask: tuple, dilation: int, pads: tuple) -> int:
    return len(kernel_plan(np.asarray(mask, dtype=np.float32), dilation, pads).taps)


class CountPlan:
    """What `counts` computes from ``masks`` (a `_MaskPlan`): x = [kept channels of every group,
    exported taps of every time mask (``exports``: its (dilation, pads)), 1] — sums of segments
    of the masks' ``extended`` vector. ``shared``: the `PITMasks` whose last masks it may reuse
    (``masks`` is its plan's)."""

    def __init__(self, masks: _MaskPlan, exports, shared: PITMasks | None = None) -> None:
        self.masks, self.shared = masks, shared
        self.exports = [(int(d), tuple(int(p) for p in pads)) for d, pads in exports]
        groups = len(masks.groups)
        self.size = groups + len(masks.times) + 1
        self.starts = np.concatenate([np.cumsum([0] + masks.sizes[:-1]) if groups else [],
                                      masks.channels + masks.tap_starts[:-1], [masks.extended_size - 1]]).astype(np.int64)
        # x position of every extended entry (for ∂/∂extended = ∂/∂x at the count it is in)
        position = np.repeat(np.arange(self.size), np.diff(np.append(self.starts, masks.extended_size)))
        position[masks.kept_alive_channels] = self.size  # (no gradient: a zero appended to ∂/∂x)
        self.position = np.append(position, self.size)  # the sink
        self.kernels = np.asarray(masks.kernels, dtype=np.float64)
        self._last: dict = {}

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_last"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._last = {}

    def evaluate(self, state: _MaskState, cost) -> tuple:
        """(x, ``cost`` at x or None): the counts change only when a mask flips, so the last
        ones are reused while the masks are equal to theirs."""
        last, extended = self._last, state.extended
        before = last.get("extended")
        if before is not None and last["cost"] is cost and (before is extended or before is state.previous):
            last["extended"] = extended
            return last["x"], last["value"]
        x = self.values(state)
        value = None if cost is None else cost.value_np(x)
        self._last = {"extended": extended, "cost": cost, "x": x, "value": value}
        return x, value

    def cost_grads(self, x: np.ndarray, cost, grad, like: torch.Tensor) -> torch.Tensor:
        """∂cost/∂extended · ``grad`` (a number or a 0-d tensor) at ``x`` (like ``like``, a new
        tensor): ∂cost/∂x on every entry of its count, at unit gradient computed once per x."""
        last = self._last
        unit = last.get("unit") if last.get("x") is x and last.get("cost") is cost else None
        if unit is None or unit.dtype != like.dtype or unit.device != like.device:
            unit = self.entry_grads(cost.grad_np(x, 1.0), like)
            if last.get("x") is x:
                last["unit"] = unit
        return unit * grad

    def values(self, state: _MaskState) -> np.ndarray:
        """x (numpy float64) from the masks."""
        extended = state.extended.detach().cpu().numpy()
        x = np.add.reduceat(extended, self.starts).astype(np.float64)  # exact below 2^24
        groups = len(self.masks.groups)
        if self.masks.times:
            taps = x[groups:-1]
            for t in np.flatnonzero(taps != self.kernels):  # shortened kernels: their exported size
                start = self.masks.channels + int(self.masks.tap_starts[t])
                mask = tuple(bool(v) for v in extended[start:start + self.masks.kernels[t]])
                taps[t] = _exported_taps(mask, *self.exports[t])
        return x

    def entry_grads(self, grad: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        """∂/∂extended and the sink (like ``like``) given ∂/∂x (numpy): every entry gets its
        count's, but kept-alive channels and the sink get 0."""
        return torch.as_tensor(np.append(grad, 0.0)[self.position], dtype=like.dtype, device=like.device)


class _Counts(torch.autograd.Function):
    """x = float64 [kept channels of each group…, exported taps of each time mask…, 1] — the values
    of Σ channel_mask(α) and of `PIT.kernel` — with the straight-through gradients of
    Σ channel_mask(α) and Σ taps(β, γ), from the concatenated mask parameters in one autograd
    node; or, given a compiled cost model, its value at x."""

    @staticmethod
    def forward(ctx, plan: CountPlan, cost, state, flat):
        ctx.set_materialize_grads(False)
        if state is None:
            state = plan.masks.forward(flat)
        x, value = plan.evaluate(state, cost)
        ctx.plan, ctx.state, ctx.cost, ctx.x = plan, state, cost, x
        if cost is not None:
            return torch.scalar_tensor(value, dtype=torch.float64, device=flat.device)
        return torch.tensor(x, dtype=torch.float64, device=flat.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if grad is None or not ctx.needs_input_grad[3]:
            return None, None, None, None
        state, plan = ctx.state, ctx.plan
        if ctx.cost is None:
            from_counts = plan.entry_grads(grad.detach().cpu().numpy(), state.flat)
        else:
            from_counts = plan.cost_grads(ctx.x, ctx.cost, float(grad), state.flat)
        return None, None, None, plan.masks.grad(state, from_counts)


def counts(plan: CountPlan, params: list, cost=None) -> torch.Tensor | None:
    """The `_Counts` vector of ``params`` (the mask parameters, in ``plan.masks``' order); with
    ``cost`` (an object with ``value_np(x)`` and ``grad_np(x, grad)``, e.g. a compiled cost model),
    its value there. None when the parameters' dtypes differ (count them one by one instead)."""
    if not params:  # nothing prunable: count layer by layer
        return None
    dtype = params[0].dtype
    if any(p.dtype != dtype for p in params):
        return None
    last = plan.shared.last_masks(params) if plan.shared is not None else None
    if last is not None:
        state, flat = last
        if flat.requires_grad or not torch.is_grad_enabled() or not any(p.requires_grad for p in params):
            return _Counts.apply(plan, cost, state, flat)
        return _Counts.apply(plan, cost, state, torch.cat(params) if len(params) > 1 else params[0])
    return _Counts.apply(plan, cost, None, torch.cat(params) if len(params) > 1 else params[0])


def count_plan(model_masks: "PITMasks | None", alphas: dict, times: dict, threshold: float):
    """A `CountPlan` for the groups ``alphas`` (key → (attribute, tensor)) and time masks
    ``times`` (key → ((beta attribute, beta), (gamma attribute, gamma), gamma map, dilation,
    pads)), reusing the masks of ``model_masks`` (the module's `PITMasks`) when its plan holds
    them all at ``threshold``. Returns the plan, the attributes of its parameters (in its
    masks' order; None: those of ``model_masks``, `PITMasks.mask_inputs`) and the position of
    every key in the counts."""
    if model_masks is not None:
        plan = model_masks.plan
        mp = plan.masks
        index_of = {target: i for i, target in enumerate(plan.targets)}
        groups_count = len(mp.groups)
        positions, exports = {}, [(1, (0, 0))] * len(mp.times)
        ok = all(t == threshold for _, t in mp.groups) and all(t[3] == threshold for t in mp.times)
        for key, (attr, _) in alphas.items():
            index = index_of.get(attr)
            ok = ok and index is not None and index < groups_count
            if not ok:
                break
            positions[key] = index
        for key, ((battr, _), (gattr, _), _, dilation, pads) in (times.items() if ok else ()):
            index = index_of.get(battr)
            ok = index is not None and index >= groups_count and (index - groups_count) % 2 == 0 \
                and index_of.get(gattr) == index + 1
            if not ok:
                break
            t = (index - groups_count) // 2
            positions[key] = groups_count + t
            exports[t] = (dilation, pads)
        if ok:
            return CountPlan(mp, exports, model_masks), None, positions
    groups = [(int(t.numel()), threshold) for _, t in alphas.values()]
    specs, exports, attrs = [], [], [attr for attr, _ in alphas.values()]
    for (battr, beta), (gattr, gamma), gmap, dilation, pads in times.values():
        specs.append((int(beta.numel()), int(gamma.numel()), gmap.detach().cpu().numpy(), threshold))
        attrs += [battr, gattr]
        exports.append((dilation, pads))
    positions = {key: i for i, key in enumerate(alphas)}
    positions.update({key: len(groups) + i for i, key in enumerate(times)})
    return CountPlan(_MaskPlan(groups, specs), exports), attrs, positions
