"""MPS's training-mode mixtures Σ_p θ_p·Q_p as custom autograd functions over all precisions at once.

A quantizer in training computes every candidate precision (`plinio_onnx.functions.mps`). Written
as one chain of small ops per precision, a step of a small model spends most of its time in op
dispatch and autograd bookkeeping. Here each mixture is one `torch.autograd.Function`: the P
precisions are one [P, …] tensor (one multiply, one round, one clamp for all of them), the mixture
is one weighted sum, and the backward is written by hand in a few passes:

* `MixedActQuant` (PACT activations): forward saves the integers Q [P, N] and x; backward gives
  ∂/∂θ_p = s_p·⟨g, Q_p⟩ (one matrix-vector product), ∂/∂x = g·Σ_p θ_p·1[x inside p's range],
  ∂/∂c_p = θ_p·Σ_{x clipped at c_p} g (signed: ± at ∓c_p).
* `MixedWeightQuant` (min-max weights): forward saves Q_p·s_p [P, …]; backward gives ∂/∂W = g
  (straight-through; Σθ = 1), ∂/∂θ_p = ⟨g, Q_p·s_p⟩ per channel (or per layer), and the scale
  output's ∂/∂θ_p = s_p.

Values are those of the per-precision reference ops (same scales, same rounding half to even, same
clamps); only the order of the final float sums may differ (a few ulps). The reference
implementations in plain autograd ops live in tests/test_mps_train.py.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class ActPlan(NamedTuple):
    """The numbers of an activation mixture, per precision, as Python floats (taken from the
    detached θ and clips each call): θ_p, the clip c_p (≥ the minimum clip), the integer bounds and
    the scale s_p (float32-rounded, as the exported scale)."""
    weights: tuple[float, ...]
    clips: tuple[float, ...]
    lows: tuple[int, ...]
    highs: tuple[int, ...]
    scales: tuple[float, ...]


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """[P, 1] tensor of ``values`` in ``like``'s dtype (rounded like a Python scalar operand)."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).reshape(-1, 1)


def _clamp_rows(values: torch.Tensor, lows: Sequence[int], highs: Sequence[int]) -> torch.Tensor:
    """Clamp row p of ``values`` to [lows[p], highs[p]] in place (a clamp with tensor bounds is
    several times slower than clamps with scalar ones)."""
    if len(set(lows)) == 1 and len(set(highs)) == 1:
        return values.clamp_(lows[0], highs[0])
    for row, lo, hi in zip(values, lows, highs):
        row.clamp_(lo, hi)
    return values


class MixedActQuant(torch.autograd.Function):
    """y = Σ_p θ_p·s_p·clamp(round(x·(1/s_p)), lo_p, hi_p) with PACT gradients (see the module
    docstring); ``exact``: x/s_p instead of x·(1/s_p), the eval-time ops bit for bit."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, theta: torch.Tensor, clip: torch.Tensor, plan: ActPlan,
                signed: bool, exact: bool = False) -> torch.Tensor:
        flat = x.reshape(1, -1)
        if exact:
            q = torch.div(flat, _column(plan.scales, x))
        else:  # x·(1/s) rounds like x/s except on exact ties, and multiplies faster
            q = torch.mul(flat, _column([1.0 / s for s in plan.scales], x))
        _clamp_rows(q.round_(), plan.lows, plan.highs)
        coefficients = torch.tensor([w * s for w, s in zip(plan.weights, plan.scales)], dtype=x.dtype)
        y = torch.mv(q.t(), coefficients) if len(plan.scales) > 1 else q.reshape(-1).mul_(coefficients)
        ctx.save_for_backward(x, q, theta, clip)
        ctx.plan, ctx.signed = plan, signed
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        x, q, theta, clip = ctx.saved_tensors
        plan, signed = ctx.plan, ctx.signed
        grad = grad.contiguous()
        flat_grad = grad.reshape(-1)
        grad_theta = grad_x = None
        if ctx.needs_input_grad[1]:
            scales = torch.tensor(plan.scales, dtype=theta.dtype, device=theta.device)
            grad_theta = torch.mv(q, flat_grad).to(theta.dtype).mul_(scales)
        hardtanh_backward = torch.ops.aten.hardtanh_backward
        if signed:  # Σ_{x≥c} g − Σ_{x≤−c} g = Σ g·sign(x) − Σ_{|x|<c} g·sign(x)
            sign = torch.sign(x).reshape(-1)
            outside_total = torch.dot(flat_grad, sign)
        else:       # Σ_{x≥c} g = Σ_{x>0} g − Σ_{0<x<c} g
            positive = hardtanh_backward(grad, x, 0.0, float("inf")).sum()
        # One row per precision: g where x lies inside its clip range (0 elsewhere).
        inside = grad.new_empty((len(plan.clips),) + tuple(grad.shape))
        for row, c in zip(inside, plan.clips):
            hardtanh_backward(grad, x, -c if signed else 0.0, c, grad_input=row)
        rows = inside.reshape(len(plan.clips), -1)
        weights = torch.tensor(plan.weights, dtype=grad.dtype, device=grad.device)
        if ctx.needs_input_grad[0]:
            grad_x = torch.mv(rows.t(), weights).reshape(x.shape)
        grad_clip = None
        if ctx.needs_input_grad[2]:
            clipped = outside_total - torch.mv(rows, sign) if signed else positive - rows.sum(1)
            grad_clip = clipped.mul_(weights).to(clip.dtype)
        return grad_x, grad_theta, grad_clip, None, None, None


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
        levels = torch.tensor([float(max(2 ** b - 1, 1)) for b in bits], dtype=w.dtype).reshape(stacked)
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
