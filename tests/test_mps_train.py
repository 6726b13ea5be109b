"""The fused training-mode mixtures (`plinio_onnx.functions.mps_train`, `mps._MixedActQuant`) against plain autograd
references written precision by precision: values and the gradients of weights, inputs, clips and
the logits α behind θ = softmax(α), in float64."""
from __future__ import annotations

import pytest
import torch

from plinio_onnx.functions import mps as fn
from plinio_onnx.functions.mps_train import MixedWeightQuant, WeightPlan

TIGHT = dict(rtol=1e-10, atol=1e-12)


def _weight_reference(weight, theta, bits, axis, reduce_axes):
    """Σ_p θ_p·Q_p(W)·s_p + straight-through, and Σ_p θ_p·s_p, one precision at a time."""
    w = weight.detach()
    m = w.abs().amax(dim=reduce_axes, keepdim=True).clamp_min(1e-30)
    value, scale = 0, 0
    for p, b in enumerate(bits):
        tp = fn.broadcast_bits(theta[p], w.dim(), axis)
        if b == 0:
            sp, term = torch.zeros_like(m), torch.zeros_like(w)
        else:
            sp = (m * 2.0) / float(2 ** b - 1)
            term = torch.clamp(torch.round(w / sp), -(2 ** (b - 1)), 2 ** (b - 1) - 1) * sp
        value = value + term * tp
        scale = scale + sp.reshape(-1) * theta[p]
    return value + (weight - w), scale


@pytest.mark.parametrize("case", [
    # (weight shape, bits, θ per channel, channel axis, reduce axes)
    ((6, 3, 3, 3), (2, 4, 8), True, 0, [1, 2, 3]),
    ((6, 3, 3, 3), (0, 2, 4, 8), True, 0, [1, 2, 3]),
    ((6, 3, 3, 3), (2, 4, 8), False, -1, [0, 1, 2, 3]),
    ((6, 3, 3, 3), (2, 4, 8), False, 0, [1, 2, 3]),       # per-layer θ, per-channel scales
    ((6, 5), (2, 4, 8), True, 1, [0]),                    # Gemm without transB: channels on axis 1
    ((6, 5), (2, 8), True, 0, [0, 1]),                    # per-channel θ, per-tensor scale
    ((7, 1, 3, 3), (8,), False, 0, [1, 2, 3]),            # QAT: one precision
])
def test_fused_weight_mixture_matches_the_reference(case):
    shape, bits, per_channel, axis, reduce_axes = case
    torch.manual_seed(0)
    weight = (torch.randn(shape, dtype=torch.float64) * 0.3).requires_grad_()
    channels = shape[axis] if axis >= 0 else 1
    alpha = torch.randn((len(bits), channels) if per_channel else (len(bits),), dtype=torch.float64,
                        requires_grad=True)
    got = MixedWeightQuant.apply(weight, torch.softmax(alpha, 0), WeightPlan(bits, axis, tuple(reduce_axes)))
    want = _weight_reference(weight, torch.softmax(alpha, 0), bits, axis, reduce_axes)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, **TIGHT)
    grad_value, grad_scale = torch.randn_like(got[0]), torch.randn_like(got[1])
    got_grads = torch.autograd.grad((got[0] * grad_value).sum() + (got[1] * grad_scale).sum(), [weight, alpha])
    want_grads = torch.autograd.grad((want[0] * grad_value).sum() + (want[1] * grad_scale).sum(),
                                     [weight, alpha])
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, **TIGHT)
    assert len(bits) == 1 or got_grads[1].abs().sum() > 0  # (one precision: softmax is constant)


def _act_reference(x, theta, clip, bits, signed):
    """Σ_p θ_p·(Q_p(x) with PACT's straight-through), one precision at a time (training's x·(1/s))."""
    y = 0
    for p, b in enumerate(bits):
        c = clip[p].clamp_min(fn.MIN_CLIP)
        clipped = torch.clamp(x, -c if signed else torch.zeros_like(c), c)
        s = fn.act_scale(clip[p].detach().float(), b, signed).to(x.dtype)  # float32 scales, as exported
        lo, hi = fn.act_range(b, signed)
        value = torch.clamp(torch.round(x.detach() * (1.0 / s)), lo, hi) * s
        y = y + theta[p] * (value + (clipped - clipped.detach()))
    return y


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [(2, 4, 8), (8,)])
def test_fused_activation_mixture_matches_the_reference(signed, bits):
    torch.manual_seed(1)
    x = (torch.randn(4, 8, 5, 5, dtype=torch.float64) * 3).requires_grad_()
    alpha = torch.randn(len(bits), dtype=torch.float64, requires_grad=True)
    clip = torch.tensor([2.0, 4.0, 1.0][:len(bits)], dtype=torch.float64, requires_grad=True)
    y = fn._MixedActQuant.apply(x, torch.softmax(alpha, 0), clip, bits, signed, fn._Scratch())
    reference = _act_reference(x, torch.softmax(alpha, 0), clip, bits, signed)
    torch.testing.assert_close(y, reference, **TIGHT)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, alpha, clip], grad)
    want = torch.autograd.grad(reference, [x, alpha, clip], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TIGHT)
    assert got[2].abs().sum() > 0 and got[0].abs().sum() > 0


def test_fused_mixtures_compute_the_eval_network_when_one_precision_wins():
    """θ one-hot: the fused weight mixture is exactly `weight_fake_quant` at that precision."""
    torch.manual_seed(2)
    weight = torch.randn(5, 4, 3, 3)
    theta = torch.zeros(3, 5)
    chosen = torch.tensor([0, 2, 1, 1, 0])
    theta[chosen, torch.arange(5)] = 1.0
    value, scale = MixedWeightQuant.apply(weight, theta, WeightPlan((2, 4, 8), 0, (1, 2, 3)))
    bits = fn.broadcast_bits(torch.tensor([2.0, 4.0, 8.0])[chosen], 4, 0)
    want, want_scale = fn.weight_fake_quant(weight, bits, [1, 2, 3])
    assert torch.equal(value, want)
    assert torch.equal(scale, want_scale.reshape(-1))
