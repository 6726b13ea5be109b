"""MPS's training-mode weight mixture Σ_p θ_p·Q_p(W)·s_p as one custom autograd function.

Written as a chain of small ops per precision, a weight quantizer's step spends most of its time
in op dispatch and autograd bookkeeping. `MixedWeightQuant` stacks the P precisions into one
[P, …] tensor (one divide, one round, one clamp, one weighted sum) and differentiates by hand: it
saves Q_p·s_p [P, …] and gives ∂/∂W = g (straight-through; Σθ = 1), ∂/∂θ_p = ⟨g, Q_p·s_p⟩ per
channel (or per layer), and through the scale output ∂/∂θ_p = s_p. In float32 on the CPU the
native kernel (`plinio_onnx.functions.mps_native_weight`) computes the same in one call each way
(a small weight's ~15 ops were mostly op dispatch), once it has passed its check against these
ops. The ATen path reads nothing back to the host, so it is also the form a device runs
(`plinio_onnx.functions.mps_device`).

Values are those of the per-precision ops (same scales, rounding half to even, same clamps).
The plain-autograd references live in tests/test_mps_train.py.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import torch

from .. import host
from . import mps_native_weight


def _clamp_rows(values: torch.Tensor, lows: Sequence[int], highs: Sequence[int]) -> torch.Tensor:
    """Clamp row p of ``values`` to [lows[p], highs[p]] in place (a clamp with tensor bounds is
    several times slower than clamps with scalar ones)."""
    if len(set(lows)) == 1 and len(set(highs)) == 1:
        return values.clamp_(lows[0], highs[0])
    for row, lo, hi in zip(values, lows, highs):
        row.clamp_(lo, hi)
    return values


class WeightPlan(NamedTuple):
    """The fixed numbers of a weight mixture: the bit-widths, the channel axis (−1: per layer) and
    the axes the per-channel (or per-tensor) max reduces."""
    bits: tuple[int, ...]
    axis: int
    reduce_axes: tuple[int, ...]


class MixedWeightQuant(torch.autograd.Function):
    """(Σ_p θ_p·Q_p(W)·s_p, Σ_p θ_p·s_p) with s_p = 2·max|W|/(2^b_p − 1) per channel (or tensor)
    from the detached W, Q_p = clamp(round(W/s_p), −2^(b−1), 2^(b−1)−1) (0 and s_p = 0 at b = 0);
    straight-through into W (see the module docstring). θ: [P] or [P, C]. In float32 on the CPU
    the native kernel (`plinio_onnx.functions.mps_native_weight`) computes it, once checked."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, theta: torch.Tensor, plan: WeightPlan):
        ctx.plan, ctx.theta_shape = plan, theta.shape
        ctx.native = _native_weights(weight, theta, plan)
        if ctx.native is not None:  # (saves W and the scales: Q_p·s_p is recomputed in the backward)
            kernel, shape = ctx.native
            w = weight.detach().contiguous()
            value, scale, scales = kernel.forward(w, theta.detach().contiguous(), plan.bits, shape)
            ctx.save_for_backward(w, scales)
            return value, scale
        value, scale, values, flat_scales = _weight_mixture(weight.detach(), theta.detach(), plan)
        ctx.save_for_backward(values, flat_scales)
        return value, scale

    @staticmethod
    def backward(ctx, grad_value, grad_scale):
        grad_theta = None
        if ctx.needs_input_grad[1] and ctx.native is not None:
            (kernel, shape), (w, scales) = ctx.native, ctx.saved_tensors
            grad_theta = kernel.theta_grad(w, scales, _contiguous(grad_value), _contiguous(grad_scale),
                                           ctx.plan.bits, shape).reshape(ctx.theta_shape)
        elif ctx.needs_input_grad[1]:
            values, flat_scales = ctx.saved_tensors
            grad_theta = weight_theta_grad(values, flat_scales, grad_value, grad_scale, ctx.theta_shape, ctx.plan.axis)
        return grad_value, grad_theta, None


def _weight_mixture(w: torch.Tensor, theta: torch.Tensor, plan: WeightPlan):
    """The ATen path of `MixedWeightQuant`'s forward on detached tensors: (value, scale, the
    Q_p·s_p stack [P, …], the scales [P, C or 1] (0 where b = 0))."""
    bits, rank = plan.bits, w.dim()
    m = w.abs().amax(dim=list(plan.reduce_axes), keepdim=True).clamp_min_(1e-30)
    levels, lows, highs = _weight_constants(bits, rank, w.dtype, w.device)
    scales = torch.div(m.mul(2.0).unsqueeze(0), levels)         # [P, *m.shape], as eval's s
    values = torch.div(w.unsqueeze(0), scales).round_()
    if values.numel() > SMALL_WEIGHTS and host.runs_on_host(values):
        _clamp_rows(values, _weight_range(bits, 0), _weight_range(bits, 1))
    else:  # one clamp with tensor bounds: fewer ops where they dominate (and no host read)
        values.clamp_(lows, highs)
    values.mul_(scales)                                          # Q_p·s_p
    if 0 in bits:
        scales.masked_fill_(_zero_bits(bits, rank, w.device), 0.0)
    value = torch.mul(values, _theta_like(theta, plan.axis, rank)).sum(0)  # θ [P, 1…] or [P, …C…]
    flat_scales = scales.reshape(len(bits), -1)
    scale = torch.mul(flat_scales, theta.reshape(len(bits), -1)).sum(0)
    return value, scale, values, flat_scales


def _contiguous(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.contiguous()


def weight_theta_grad(values: torch.Tensor, flat_scales: torch.Tensor, grad_value: torch.Tensor | None,
                      grad_scale: torch.Tensor | None, theta_shape: torch.Size, axis: int) -> torch.Tensor:
    """∂/∂θ of a weight mixture: ⟨g, Q_p·s_p⟩ per channel (or per layer) plus s_p through the
    scale output; ``values`` the saved Q_p·s_p stack [P, …], ``flat_scales`` s_p as [P, C or 1]."""
    count = values.shape[0]
    products = torch.zeros_like(values) if grad_value is None else torch.mul(values, grad_value.unsqueeze(0))
    if len(theta_shape) == 2:  # per channel: sum all but the channel axis
        dims = [d for d in range(1, products.dim()) if d != axis + 1]
        grad_theta = products.sum(dim=dims).reshape(count, -1)
    else:
        grad_theta = products.reshape(count, -1).sum(1)
    if grad_scale is not None:
        extra = torch.mul(flat_scales, grad_scale.reshape(1, -1))
        grad_theta = grad_theta + (extra if len(theta_shape) == 2 else extra.sum(1))
    return grad_theta.reshape(theta_shape)

#: Weight stacks up to this many values clamp with tensor bounds (one op, where op dispatch is
#: most of the cost); larger ones row by row with scalar bounds (faster per value).
SMALL_WEIGHTS = 2 ** 16


@functools.lru_cache(maxsize=256)
def _weight_constants(bits: tuple[int, ...], rank: int, dtype: torch.dtype, device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(2^b − 1 (≥ 1), qmin, qmax) per precision, shaped [P, 1, …] against a [P, *W.shape] stack
    (made once per plan: read-only, the step only reads them)."""
    shape = [len(bits)] + [1] * rank
    levels = torch.tensor([float(max(2 ** b - 1, 1)) for b in bits], dtype=dtype, device=device)
    lows = torch.tensor([float(-(2 ** (b - 1))) if b else 0.0 for b in bits], dtype=dtype, device=device)
    highs = torch.tensor([float(2 ** (b - 1) - 1) if b else 0.0 for b in bits], dtype=dtype, device=device)
    return levels.reshape(shape), lows.reshape(shape), highs.reshape(shape)


def _weight_range(bits: tuple[int, ...], side: int) -> list[int]:
    """qmin (``side`` 0) or qmax (1) of every precision (0 at b = 0)."""
    return [(-(2 ** (b - 1)), 2 ** (b - 1) - 1)[side] if b else 0 for b in bits]


@functools.lru_cache(maxsize=256)
def _zero_bits(bits: tuple[int, ...], rank: int, device: torch.device) -> torch.Tensor:
    """True at the 0-bit precisions, shaped [P, 1, …] against the scales (made once per plan and
    device: no index list copied to a device every step)."""
    return torch.tensor([b == 0 for b in bits], device=device).reshape([len(bits)] + [1] * rank)


def _theta_like(theta: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    """θ [P] or [P, C] shaped to broadcast against a [P, *W.shape] stack."""
    shape = [theta.shape[0]] + [1] * rank
    if theta.dim() == 2:
        shape[axis + 1] = -1
    return theta.reshape(shape)


def _native_weights(weight: torch.Tensor, theta: torch.Tensor, plan: WeightPlan):
    """(the native weight kernel, the weight's layout) where it computes this mixture (float32 on
    the CPU, a layout it knows) and passed its check; None otherwise."""
    if not mps_native_weight.supports(weight, theta, len(plan.bits)) or theta.shape[0] != len(plan.bits):
        return None
    shape = mps_native_weight.layout(tuple(weight.shape), plan.axis, plan.reduce_axes, tuple(theta.shape))
    kernel = _checked_weight_native() if shape is not None else None
    return None if kernel is None else (kernel, shape)


def native_weights_available() -> bool:
    """Whether float32 weight mixtures on the CPU run the native kernel (else ATen)."""
    return _checked_weight_native() is not None


@functools.lru_cache(maxsize=None)
def _checked_weight_native() -> "mps_native_weight.NativeWeightMixture | None":
    """`mps_native_weight.load`'s kernel, once it has computed what the ATen path computes (the
    values and scales bit for bit, the θ gradients up to the order of their sums) on every layout
    it takes, with ties, zeros and a zero-bit precision; None otherwise."""
    kernel = mps_native_weight.load()
    if kernel is None:
        return None
    cases = [((6, 20), WeightPlan((0, 2, 4, 8), 0, (1,)), True),           # runs of 20 values
             ((5, 6, 3, 3), WeightPlan((1, 2, 8), 1, (0, 2, 3)), True),    # short runs (ConvTranspose)
             ((7, 6), WeightPlan((2, 8), 1, (0, 1)), True),                # per-tensor scale, θ per channel
             ((4, 5, 3, 3), WeightPlan((2, 4, 8), 0, (1, 2, 3)), False),   # per-layer θ, per-channel scales
             ((4, 5, 3, 3), WeightPlan((2, 4, 8), -1, (0, 1, 2, 3)), False)]
    return kernel if all(_weight_agrees(kernel, *case) for case in cases) else None


def _weight_agrees(kernel: "mps_native_weight.NativeWeightMixture", shape: tuple[int, ...], plan: WeightPlan,
                   per_channel: bool) -> bool:
    generator = torch.Generator().manual_seed(0)  # (the global random state stays as it was)
    w = (torch.randn(shape, generator=generator) * 0.5).clamp_(-1.4, 1.4)
    w.view(-1)[:8] = torch.tensor([1.5, -1.5, 0.5, -0.5, 1.0, 0.0, -0.0, 0.25])  # 2 and 1 bits: ties
    columns = shape[plan.axis] if per_channel else None
    theta = torch.softmax(torch.randn((len(plan.bits), columns) if columns else (len(plan.bits),),
                                      generator=generator), 0)
    value, scale, values, flat_scales = _weight_mixture(w, theta, plan)
    grad_value = torch.randn(value.shape, generator=generator)
    grad_scale = torch.randn(scale.shape, generator=generator)
    want = weight_theta_grad(values, flat_scales, grad_value, grad_scale, theta.shape, plan.axis)
    layout = mps_native_weight.layout(shape, plan.axis, plan.reduce_axes, tuple(theta.shape))
    got_value, got_scale, scales = kernel.forward(w, theta, plan.bits, layout)
    got = kernel.theta_grad(w, scales, grad_value, grad_scale, plan.bits, layout).reshape(theta.shape)
    return bool(torch.equal(value, got_value) and torch.equal(scale, got_scale)
                and torch.allclose(want, got, rtol=1e-5, atol=1e-6))
