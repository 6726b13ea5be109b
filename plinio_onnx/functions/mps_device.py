"""MPS's quantizers on a device (CUDA, …): the same values and gradients as the host forms
(`plinio_onnx.functions.mps_train`, `plinio_onnx.functions.mps`) with no host round trip.

The host forms read θ and the clips back as Python numbers (cheap there, and the chunked loops
need them); on a device each such read waits for the queue to drain. Here every number stays a
tensor: θ_p·s_p, 1/s_p and the clip bounds are per-precision tensors, the sums of the PACT
backward are tensor reductions, the argmax of an eval-time choice is an index tensor, and the
constants (integer ranges, bit tables) are made once per device and dtype.

Values are bit for bit those of the host forms: the same float32 scales (s_p = max(c_p,
min_clip)/qmax_p), the same reciprocal (1/s_p rounded to x's dtype), the same products in the
same order (θ_0·s_0·Q_0 first, then one fused ``addcmul`` per precision, as the host form's
``add_(…, alpha=θ_p·s_p)``). Gradients are the same sums, taken in float64 in one reduction
each instead of chunk by chunk (equal within float rounding).

`DeviceActQuant` and `DeviceWeightQuant` are what `plinio_onnx.functions.mps.ActQuantizer` and
`WeightQuantizer` call where `plinio_onnx.host.runs_on_host` says the tensor is not on the host.
The weight mixture has one form for both (`plinio_onnx.functions.mps_weights`): its ATen path
reads nothing back.
"""
from __future__ import annotations

import torch

from .mps_train import ActPlan
from .mps_weights import MixedWeightQuant, WeightPlan
from .relaxation import FIXED, choice_weights, one_hot_argmax


class _Constants:
    """Tensors made once per (device, dtype) by ``make(device, dtype, *args)``."""

    def __init__(self, make, *args) -> None:
        self._make, self._args, self._made = make, args, {}

    def get(self, device, dtype):
        key = (device, dtype)
        if key not in self._made:
            self._made[key] = self._make(device, dtype, *self._args)
        return self._made[key]


# -- activations --------------------------------------------------------------------------------
def _act_rows(theta: torch.Tensor, clip: torch.Tensor, plan: ActPlan, x_dtype, highs32: torch.Tensor):
    """Per precision, as tensors: (the clip max(c_p, min_clip) and s_p in float32, as the host
    form computes them, then in x's dtype; 1/s_p (float64, rounded to x's dtype); θ_p·s_p
    (float64, rounded to x's dtype))."""
    clips32 = clip.detach().to(torch.float32).clamp_min(plan.min_clip)
    scales32 = clips32 / highs32
    scales64 = scales32.to(torch.float64)
    weighted = (theta.detach().to(torch.float64) * scales64).to(x_dtype)
    return clips32.to(x_dtype), scales32.to(x_dtype), scales64.reciprocal().to(x_dtype), weighted


def _act_constants(device, dtype, plan: ActPlan):
    """(qmin_p, qmax_p in ``dtype``, qmax_p in float32)."""
    lows = torch.tensor([float(lo) for lo, _ in plan.ranges], dtype=dtype, device=device)
    highs = torch.tensor([float(hi) for _, hi in plan.ranges], dtype=dtype, device=device)
    highs32 = torch.tensor([float(hi) for _, hi in plan.ranges], dtype=torch.float32, device=device)
    return lows, highs, highs32


def _mixture_scale(theta: torch.Tensor, clip: torch.Tensor, plan: ActPlan, highs: torch.Tensor) -> torch.Tensor:
    """Σ_p θ_p·s_p as the host forms compute it (``highs``: qmax_p in ``clip``'s dtype): in float32
    (θ and the clips float32) added in order, else one dot in ``clip``'s dtype."""
    scales = clip.detach().clamp_min(plan.min_clip) / highs
    if theta.dtype == clip.dtype == torch.float32:
        products = theta.detach() * scales
        total = products[0]
        for p in range(1, len(plan.ranges)):
            total = total + products[p]
        return total
    return torch.dot(theta.detach().to(clip.dtype), scales)


class _ActMixture(torch.autograd.Function):
    """`plinio_onnx.functions.mps_train.MixedActQuant` with tensor scalars: (Σ_p θ_p·Q_p(x)·s_p,
    Σ_p θ_p·max(c_p, min_clip)/qmax_p), PACT gradients (see that class)."""

    @staticmethod
    def forward(ctx, x, theta, clip, plan: ActPlan, constants: _Constants):
        ctx.set_materialize_grads(False)
        _, highs, highs32 = constants.get(x.device, clip.dtype)
        clips, scales, inverses, weighted = _act_rows(theta, clip, plan, x.dtype, highs32)
        ctx.save_for_backward(x, theta, clip)
        ctx.plan, ctx.constants = plan, constants
        scale = _mixture_scale(theta, clip, plan, highs)
        y, work = None, torch.empty_like(x)
        for p, (lo, hi) in enumerate(plan.ranges):
            if plan.exact:
                torch.div(x, scales[p], out=work)
            else:
                torch.mul(x, inverses[p], out=work)
            work.round_().clamp_(lo, hi)
            if y is None:
                y = torch.mul(work, weighted[p])
            else:
                y.addcmul_(work, weighted[p])
        return y, scale.reshape(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, grad_scale):
        x, theta, clip = ctx.saved_tensors
        plan = ctx.plan
        lows, highs, highs32 = ctx.constants.get(x.device, clip.dtype)
        clips, scales, inverses, _ = _act_rows(theta, clip, plan, x.dtype, highs32)
        weights = theta.detach().to(x.dtype)
        count = len(plan.ranges)
        f64 = torch.float64
        grad_x = None
        theta_grads = torch.zeros(count, dtype=f64, device=x.device)
        clip_grads = torch.zeros(count, dtype=f64, device=x.device)
        if grad is not None:
            zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
            sign = torch.sign(x) if plan.signed else None
            outside = (grad * sign).sum(dtype=f64) if plan.signed else torch.where(x > 0, grad, zero).sum(dtype=f64)
            inside_sums, products = [], []
            for p in range(count):
                low = -clips[p] if plan.signed else zero
                inside = torch.where((x > low) & (x < clips[p]), grad, zero)
                inside_sums.append((inside * sign).sum(dtype=f64) if plan.signed else inside.sum(dtype=f64))
                if ctx.needs_input_grad[1]:
                    rounded = torch.div(x, scales[p]) if plan.exact else torch.mul(x, inverses[p])
                    products.append((inside * rounded.round_()).sum(dtype=f64))
                if ctx.needs_input_grad[0]:
                    grad_x = inside * weights[p] if grad_x is None else grad_x.addcmul_(inside, weights[p])
            inside_sums = torch.stack(inside_sums)
            clipped = outside - inside_sums      # Σ g where x is at or beyond the clip (signed: ±)
            if products:
                theta_grads = (torch.stack(products) + highs.to(f64) * clipped) * scales.to(f64)
            clip_grads = theta.detach().to(f64) * clipped
        if grad_scale is not None:   # (c_p below min_clip: the clamp passes no gradient)
            g = grad_scale.sum(dtype=f64)
            raw = clip.detach().to(f64)
            theta_grads = theta_grads + g * raw.clamp_min(plan.min_clip) / highs.to(f64)
            clip_grads = clip_grads + torch.where(raw >= plan.min_clip, g * theta.detach().to(f64) / highs.to(f64),
                                                  torch.zeros((), dtype=f64, device=raw.device))
        grad_theta = theta_grads.to(theta.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_theta, clip_grads.to(clip.dtype), None, None


class DeviceActQuant:
    """The forward of `plinio_onnx.functions.mps.ActQuantizer` (not calibrating) on a device:
    ``mixture`` the plan over every precision (training), ``exact`` the same with eval's
    divisions (the argmax precision with gradients, as a one-hot mixture)."""

    def __init__(self, mixture: ActPlan, exact: ActPlan) -> None:
        self.mixture, self.exact = mixture, exact
        self.constants = _Constants(_act_constants, mixture)

    def __call__(self, x, alpha, clip, temperature, sampling: str, training: bool):
        if training and sampling != FIXED:
            theta = choice_weights(alpha, temperature, sampling, True)
            return _ActMixture.apply(x, theta, clip, self.mixture, self.constants)
        if torch.is_grad_enabled() and (x.requires_grad or clip.requires_grad):
            one_hot = one_hot_argmax(alpha.detach()).to(x.dtype)
            return _ActMixture.apply(x, one_hot, clip, self.exact, self.constants)
        return self.fake_quant(x, alpha, clip)

    def fake_quant(self, x, alpha, clip):
        """Eval's value (no gradient) at the argmax precision, as `plinio_onnx.functions.mps.act_fake_quant`."""
        lows, highs, _ = self.constants.get(x.device, clip.dtype)
        index = alpha.detach().argmax(0).reshape(1)
        scale = clip.detach().index_select(0, index).clamp_min(self.mixture.min_clip) / highs.index_select(0, index)
        with torch.no_grad():
            y = torch.div(x, scale).round_()
            y = torch.minimum(torch.maximum(y, lows.index_select(0, index).to(y.dtype)),
                              highs.index_select(0, index).to(y.dtype)).mul_(scale)
        return y, scale


# -- weights ------------------------------------------------------------------------------------
def _bit_table(device, dtype, bits: tuple[int, ...]) -> torch.Tensor:
    """The bit-widths as a tensor."""
    return torch.tensor([float(b) for b in bits], dtype=dtype, device=device)


class DeviceWeightQuant:
    """The training-mode mixture of `plinio_onnx.functions.mps.WeightQuantizer` on a device
    (`plinio_onnx.functions.mps_weights.MixedWeightQuant`, whose ATen path reads nothing back),
    and its bit-width table (eval's argmax gathers from it) made once per device."""

    def __init__(self, plan: WeightPlan) -> None:
        self.plan = plan
        self.constants = _Constants(_bit_table, plan.bits)

    def __call__(self, weight: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ_p θ_p·Q_p(W)·s_p, Σ_p θ_p·s_p) for θ [P] or [P, C]."""
        return MixedWeightQuant.apply(weight, theta, self.plan)

    def table(self, like: torch.Tensor) -> torch.Tensor:
        """The bit-widths as a tensor like ``like`` (its dtype and device)."""
        return self.constants.get(like.device, like.dtype)
