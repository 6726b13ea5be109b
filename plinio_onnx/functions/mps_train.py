"""MPS's training-mode weight mixture Σ_p θ_p·Q_p(W) as one custom autograd function over all precisions.

Written as a chain of small ops per precision, a weight quantizer's step on a small model spends
most of its time in op dispatch and autograd bookkeeping. `MixedWeightQuant` stacks the P
precisions into one [P, …] tensor (one divide, one round, a clamp per precision, one weighted
sum) and writes the backward by hand: it saves Q_p·s_p [P, …] and gives ∂/∂W = g
(straight-through; Σθ = 1), ∂/∂θ_p = ⟨g, Q_p·s_p⟩ per channel (or per layer), and through the
scale output ∂/∂θ_p = s_p. Values are those of the per-precision ops (same scales, rounding half
to even, same clamps). (Activation mixtures stay `plinio_onnx.functions.mps._MixedActQuant`:
its per-precision loop over reused buffers is faster on large activations than a [P, N] stack.)
The plain-autograd reference lives in tests/test_mps_train.py.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


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
    straight-through into W (see the module docstring). θ: [P] or [P, C]."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, theta: torch.Tensor, plan: WeightPlan):
        w = weight.detach()
        bits = plan.bits
        rank = w.dim()
        m = w.abs().amax(dim=list(plan.reduce_axes), keepdim=True).clamp_min_(1e-30)
        stacked = [len(bits)] + [1] * rank
        levels = torch.tensor([float(max(2 ** b - 1, 1)) for b in bits], dtype=w.dtype,
                              device=w.device).reshape(stacked)
        scales = torch.div(m.mul(2.0).unsqueeze(0), levels)         # [P, *m.shape], as eval's s
        values = torch.div(w.unsqueeze(0), scales).round_()
        lows = [-(2 ** (b - 1)) if b else 0 for b in bits]
        highs = [2 ** (b - 1) - 1 if b else 0 for b in bits]
        _clamp_rows(values, lows, highs).mul_(scales)                # Q_p·s_p
        if 0 in bits:
            scales[[p for p, b in enumerate(bits) if b == 0]] = 0.0
        theta_b = _theta_like(theta.detach(), plan.axis, rank)     # [P, 1…] or [P, …C…]
        value = torch.mul(values, theta_b).sum(0)
        flat_scales = scales.reshape(len(bits), -1)
        scale = torch.mul(flat_scales, theta.detach().reshape(len(bits), -1)).sum(0)
        ctx.save_for_backward(values, flat_scales)
        ctx.plan, ctx.theta_shape = plan, theta.shape
        return value, scale

    @staticmethod
    def backward(ctx, grad_value, grad_scale):
        values, flat_scales = ctx.saved_tensors
        plan = ctx.plan
        grad_theta = None
        if ctx.needs_input_grad[1]:
            P = values.shape[0]
            products = torch.mul(values, grad_value.unsqueeze(0))
            if len(ctx.theta_shape) == 2:  # per channel: sum all but the channel axis
                dims = [d for d in range(1, products.dim()) if d != plan.axis + 1]
                grad_theta = products.sum(dim=dims).reshape(P, -1)
            else:
                grad_theta = products.reshape(P, -1).sum(1)
            if grad_scale is not None:
                extra = torch.mul(flat_scales, grad_scale.reshape(1, -1))
                grad_theta = grad_theta + (extra if len(ctx.theta_shape) == 2 else extra.sum(1))
            grad_theta = grad_theta.reshape(ctx.theta_shape)
        return grad_value, grad_theta, None


def _theta_like(theta: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    """θ [P] or [P, C] shaped to broadcast against a [P, *W.shape] stack."""
    shape = [theta.shape[0]] + [1] * rank
    if theta.dim() == 2:
        shape[axis + 1] = -1
    return theta.reshape(shape)
