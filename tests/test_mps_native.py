"""The native kernel of MPS's activation mixture (`plinio_onnx.functions.mps_native`) against the
ATen path of `plinio_onnx.functions.mps_train` (the one the float64 reference tests check): the
same values and input gradients bit for bit, the same sums up to their order; and its fallbacks."""
from __future__ import annotations

import shutil

import pytest
import torch

from plinio_onnx.atomic import check_writable
from plinio_onnx.functions import mps as fn
from plinio_onnx.functions import mps_native, mps_native_weight, mps_train
from plinio_onnx.functions.mps_train import MixedActQuant, Scratch


def _can_build() -> bool:
    """A C compiler is there and the kernel's cache folder can be written."""
    if not any(shutil.which(name) for name in ("cc", "gcc", "clang")):
        return False
    try:
        check_writable(mps_native.cache_folder())
    except OSError:
        return False
    return True


HAS_COMPILER = _can_build()


def _run(x, theta, clip, plan, grad):
    x = x.detach().clone().requires_grad_()
    theta = theta.detach().clone().requires_grad_()
    clip = clip.detach().clone().requires_grad_()
    y, scale = MixedActQuant.apply(x, theta, clip, plan, Scratch())
    grads = torch.autograd.grad((y * grad).sum() + 2.0 * scale.sum(), [x, theta, clip])
    return y, grads


def test_the_kernel_is_built_and_checked_where_a_compiler_is():
    """(Without a C compiler or a writable cache the ATen path runs: nothing to assert about the kernel.)"""
    if HAS_COMPILER:
        assert mps_train._checked_native() is not None
    x = torch.zeros(3)
    assert mps_train._native(x.double(), 3) is None and mps_train._native(x, mps_native.MAX_PRECISIONS + 1) is None


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("shape", [(4, 8, 9, 9), (3, 5), (0, 4)])   # 2592 values: blocks and a tail
@pytest.mark.parametrize("zero_weight", [False, True])               # hard sampling: θ_p = 0 rows
def test_native_mixture_equals_the_aten_path(signed, exact, shape, zero_weight, monkeypatch):
    native = mps_train._checked_native()
    assert native is not None or not HAS_COMPILER
    if native is None:
        return  # (no compiler: the ATen path is all there is)
    torch.manual_seed(3)
    bits = (2, 4, 8)
    x = torch.randn(shape) * 2
    x.view(-1)[:4] = torch.tensor([0.0, -0.0, 1.5, -1.5])[:x.numel()]  # at zero and at a clip
    theta = torch.tensor([0.0, 0.4, 0.6]) if zero_weight else torch.softmax(torch.randn(3), 0)
    clip = torch.tensor([1.5, 3.0, 2.25])
    plan = fn.act_plan(bits, signed, exact)
    grad = torch.randn(shape)
    y, grads = _run(x, theta, clip, plan, grad)
    monkeypatch.setattr(mps_train, "_native", lambda *args: None)
    want_y, want_grads = _run(x, theta, clip, plan, grad)
    assert torch.equal(y, want_y)
    assert torch.equal(grads[0], want_grads[0])
    for got, want in zip(grads[1:], want_grads[1:]):  # sums: another order of the same terms
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-4)


def test_native_mixture_without_an_input_gradient():
    """Only θ and the clips need gradients (a network input): no input gradient is made."""
    x = torch.randn(2, 300)
    theta = torch.softmax(torch.randn(3), 0).requires_grad_()
    y, _ = MixedActQuant.apply(x, theta, torch.tensor([1.0, 2.0, 3.0]), fn.act_plan((2, 4, 8), False), Scratch())
    (got,) = torch.autograd.grad((y * y.detach()).sum(), [theta])
    reference = sum(theta[p] * fn.act_fake_quant(x, torch.tensor([c]), b, False)[0]
                    for p, (c, b) in enumerate(zip((1.0, 2.0, 3.0), (2, 4, 8))))
    (want,) = torch.autograd.grad((reference * y.detach()).sum(), [theta])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("load", [mps_native.load, mps_native_weight.load], ids=["activations", "weights"])
def test_the_kernels_are_turned_off_by_the_environment(load, monkeypatch):
    load.cache_clear()
    monkeypatch.setenv(mps_native.ENABLE_ENV, "0")
    try:
        assert load() is None
    finally:
        load.cache_clear()


def test_no_compiler_means_the_aten_path(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no C compiler"):
        mps_native.build(tmp_path)
    mps_native.load.cache_clear()
    try:
        assert mps_native.load() is None
    finally:
        mps_native.load.cache_clear()


def test_the_build_is_cached(tmp_path):
    if not HAS_COMPILER:
        return
    first = mps_native.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert mps_native.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no source or temporary left behind


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("only_scale", [False, True])   # only the scale output (a bias's) has a gradient
def test_native_quantizer_at_the_smallest_clip_equals_the_aten_path(signed, only_scale, monkeypatch):
    """A clip below the smallest one (the scale uses min_clip, no clip gradient through it), one
    exactly at it, and a 0 weight: values, scale and gradients as the ATen path's."""
    if mps_train._checked_native() is None:
        assert not HAS_COMPILER
        return
    torch.manual_seed(5)
    x = torch.randn(7, 33) * 1e-3
    theta = torch.tensor([0.5, 0.0, 0.5])
    clip = torch.tensor([1e-5, fn.MIN_CLIP, 2e-3])
    plan = fn.act_plan((2, 4, 8), signed)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (x, theta, clip)]
        y, scale = MixedActQuant.apply(*leaves, plan, Scratch())
        loss = 3.0 * scale.sum() + (0.0 if only_scale else (y * y.detach()).sum())
        return (y, scale) + torch.autograd.grad(loss, leaves, allow_unused=True)

    got = run()
    monkeypatch.setattr(mps_train, "_native", lambda *args: None)
    want = run()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (got[2] is None) == (want[2] is None) and (got[2] is None or torch.equal(got[2], want[2]))
    for a, b in zip(got[3:], want[3:]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    assert want[4][0] == 0.0 or not only_scale   # (below min_clip: no clip gradient through the scale)
