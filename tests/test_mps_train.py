"""The fused training-mode mixtures (`plinio_onnx.functions.mps_train`, `mps_weights`) against plain autograd
references written precision by precision: values and the gradients of weights, inputs, clips and
the logits α behind θ = softmax(α), in float64."""
from __future__ import annotations

import pytest
import torch

from plinio_onnx.functions import mps as fn
from plinio_onnx.functions import mps_train, mps_weights
from plinio_onnx.functions.mps_train import MixedActQuant, Scratch
from plinio_onnx.functions.mps_weights import MixedWeightQuant, WeightPlan

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


def _hard(theta):
    """One-hot(argmax θ) forward with θ's gradient (hard sampling): zero weights in the forward."""
    one_hot = torch.zeros_like(theta)
    one_hot[theta.argmax()] = 1.0
    return one_hot + (theta - theta.detach())


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [(2, 4, 8), (8,)])
@pytest.mark.parametrize("chunk_bytes", [None, 512])    # 512: 64 elements a chunk, the last one 32
@pytest.mark.parametrize("hard", [False, True])
def test_fused_activation_mixture_matches_the_reference(signed, bits, chunk_bytes, hard, monkeypatch):
    if chunk_bytes:
        monkeypatch.setattr(mps_train, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(1)
    x = (torch.randn(4, 8, 5, 5, dtype=torch.float64) * 3).requires_grad_()
    alpha = torch.randn(len(bits), dtype=torch.float64, requires_grad=True)
    clip = torch.tensor([2.0, 4.0, 1.0][:len(bits)], dtype=torch.float64, requires_grad=True)
    weights = (lambda: _hard(torch.softmax(alpha, 0))) if hard else (lambda: torch.softmax(alpha, 0))
    y, _ = MixedActQuant.apply(x, weights(), clip, fn.act_plan(bits, signed), Scratch())
    reference = _act_reference(x, weights(), clip, bits, signed)
    torch.testing.assert_close(y, reference, **TIGHT)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, alpha, clip], grad)
    want = torch.autograd.grad(reference, [x, alpha, clip], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TIGHT)
    assert got[2].abs().sum() > 0 and got[0].abs().sum() > 0
    assert len(bits) == 1 or got[1].abs().sum() > 0


def test_activation_mixture_leaves_out_the_gradients_nobody_asked_for():
    """Only θ needs a gradient (x and c frozen), or only x: the others come back as None."""
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    theta = torch.softmax(torch.randn(3, dtype=torch.float64), 0).requires_grad_()
    clip = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    y, _ = MixedActQuant.apply(x, theta, clip, fn.act_plan((2, 4, 8), False), Scratch())
    (got,) = torch.autograd.grad(y.sum(), [theta])
    torch.testing.assert_close(got, torch.autograd.grad(_act_reference(x, theta, clip, (2, 4, 8), False).sum(),
                                                        [theta])[0], **TIGHT)
    x.requires_grad_()
    y, _ = MixedActQuant.apply(x, theta.detach(), clip, fn.act_plan((2, 4, 8), False), Scratch())
    (got,) = torch.autograd.grad(y.sum(), [x])
    torch.testing.assert_close(got, torch.autograd.grad(_act_reference(x, theta.detach(), clip, (2, 4, 8), False).sum(),
                                                        [x])[0], **TIGHT)


@pytest.mark.parametrize("signed", [False, True])
def test_activation_mixture_scale_is_the_weighted_scale_with_its_gradients(signed):
    """scale = Σ θ_p·act_scale(c_p) (the bias quantizer's input scale) and its gradients: alone,
    with one clip below the smallest clip (no gradient there), and together with y's."""
    x = torch.randn(3, 4, dtype=torch.float64).requires_grad_()
    alpha = torch.randn(3, dtype=torch.float64, requires_grad=True)
    clip = torch.tensor([2.0, fn.MIN_CLIP / 2, 1.5], dtype=torch.float64, requires_grad=True)
    bits = (2, 4, 8)
    y, scale = MixedActQuant.apply(x, torch.softmax(alpha, 0), clip, fn.act_plan(bits, signed), Scratch())
    want = (torch.softmax(alpha, 0) * torch.stack([fn.act_scale(clip[p], b, signed) for p, b in enumerate(bits)])).sum()
    assert scale.shape == (1,)
    torch.testing.assert_close(scale[0], want, **TIGHT)
    got = torch.autograd.grad(3.0 * scale.sum(), [alpha, clip], retain_graph=True)
    for g, w in zip(got, torch.autograd.grad(3.0 * want, [alpha, clip], retain_graph=True)):
        torch.testing.assert_close(g, w, **TIGHT)
    assert got[1][1] == 0
    clip = torch.tensor([2.0, 0.5, 1.5], dtype=torch.float64, requires_grad=True)
    y, scale = MixedActQuant.apply(x, torch.softmax(alpha, 0), clip, fn.act_plan(bits, signed), Scratch())
    want = (torch.softmax(alpha, 0) * torch.stack([fn.act_scale(clip[p], b, signed) for p, b in enumerate(bits)])).sum()
    reference = _act_reference(x, torch.softmax(alpha, 0), clip, bits, signed)
    grad = torch.randn_like(y)
    got = torch.autograd.grad((y * grad).sum() + 3.0 * scale.sum(), [x, alpha, clip])
    for g, w in zip(got, torch.autograd.grad((reference * grad).sum() + 3.0 * want, [x, alpha, clip])):
        torch.testing.assert_close(g, w, **TIGHT)


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


def test_activation_mixture_of_an_empty_tensor():
    x = torch.empty(0, 3, requires_grad=True)
    theta = torch.softmax(torch.randn(3), 0).requires_grad_()
    y, _ = MixedActQuant.apply(x, theta, torch.tensor([1.0, 2.0, 3.0]), fn.act_plan((2, 4, 8), False), Scratch())
    assert y.shape == (0, 3)
    grad_x, grad_theta = torch.autograd.grad(y.sum(), [x, theta])
    assert grad_x.shape == (0, 3) and torch.equal(grad_theta, torch.zeros(3))


@pytest.mark.parametrize("signed", [False, True])
def test_activation_mixture_logit_gradients_at_the_clip_and_at_zero(signed):
    """x exactly at ±c_p and at 0: ∂/∂θ still sees Q_p(x) there (qmax, qmin or 0)."""
    clip = torch.tensor([2.0, 4.0, 1.0], dtype=torch.float64)
    x = torch.tensor([0.0, 2.0, 4.0, 1.0, -2.0, -4.0, -1.0, 0.3, 7.0, -7.0], dtype=torch.float64)
    alpha = torch.randn(3, dtype=torch.float64, requires_grad=True)
    grad = torch.randn_like(x)
    y, _ = MixedActQuant.apply(x, torch.softmax(alpha, 0), clip, fn.act_plan((2, 4, 8), signed), Scratch())
    reference = _act_reference(x, torch.softmax(alpha, 0), clip, (2, 4, 8), signed)
    torch.testing.assert_close(y, reference, **TIGHT)
    got, = torch.autograd.grad(y, [alpha], grad)
    want, = torch.autograd.grad(reference, [alpha], grad)
    torch.testing.assert_close(got, want, **TIGHT)


def test_weight_mixture_clamps_the_same_with_tensor_and_scalar_bounds(monkeypatch):
    """Small stacks clamp with tensor bounds in one op, large ones row by row: the same values."""
    torch.manual_seed(4)
    weight = torch.randn(8, 4, 3, 3) * 0.2
    theta = torch.softmax(torch.randn(4, 8), 0)
    plan = WeightPlan((0, 2, 4, 8), 0, (1, 2, 3))
    small = MixedWeightQuant.apply(weight, theta, plan)
    monkeypatch.setattr(mps_weights, "SMALL_WEIGHTS", 0)
    large = MixedWeightQuant.apply(weight, theta, plan)
    for a, b in zip(small, large):
        assert torch.equal(a, b)
