"""The native kernel of MPS's weight mixture (`plinio_onnx.functions.mps_native_weight`) against the
ATen path of `plinio_onnx.functions.mps_weights.MixedWeightQuant` (the one the float64 reference
tests check): the same values, scales and weight gradients bit for bit (up to 4 precisions), θ
gradients up to the order of their sums, on every layout the MPS pass makes; and its fallbacks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import plinio_onnx as po
from plinio_onnx.functions import mps_native, mps_native_weight, mps_weights
from plinio_onnx.functions.mps_weights import MixedWeightQuant, WeightPlan
from test_mps_native import HAS_COMPILER


def _run(weight, theta, plan, grads, use_scale=True):
    weight = weight.detach().clone().requires_grad_()
    theta = theta.detach().clone().requires_grad_()
    value, scale = MixedWeightQuant.apply(weight, theta, plan)
    loss = (value * grads[0]).sum() + ((scale * grads[1]).sum() if use_scale else 0.0)
    return value, scale, torch.autograd.grad(loss, [weight, theta])


def _both(weight, theta, plan, monkeypatch, use_scale=True):
    """(native results, ATen results) of one mixture, or None where no kernel could be built."""
    native = mps_weights._native_weights(weight, theta, plan)
    assert native is not None or not HAS_COMPILER
    if native is None:
        return None
    generator = torch.Generator().manual_seed(5)
    channels = weight.shape[plan.axis] if theta.dim() == 2 or len(plan.reduce_axes) < weight.dim() else 1
    grads = (torch.randn(weight.shape, generator=generator), torch.randn(channels, generator=generator))
    got = _run(weight, theta, plan, grads, use_scale)
    with monkeypatch.context() as patch:
        patch.setattr(mps_weights, "_native_weights", lambda *args: None)
        want = _run(weight, theta, plan, grads, use_scale)
    return got, want


def _weight(shape, axis, seed=0):
    """Random values with, in every channel, ties of the 2-bit and 1-bit grids (max 1.5: s = 1 and
    3), zeros of both signs, and one channel all zeros (its max is the 1e-30 floor)."""
    generator = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=generator) * 0.5).clamp_(-1.4, 1.4)
    moved = w.movedim(max(axis, 0), 0).reshape(shape[max(axis, 0)], -1)
    specials = torch.tensor([1.5, -0.5, 0.5, -1.5, 0.0, -0.0, 1.0])[:moved.shape[1]]
    moved[:, :len(specials)] = specials
    moved[-1] = 0.0
    return moved.reshape([shape[max(axis, 0)]] + [d for k, d in enumerate(shape) if k != max(axis, 0)]
                         ).movedim(0, max(axis, 0)).contiguous()


LAYOUTS = [
    # (weight shape, channel axis, per-channel scale, per-channel θ): Conv, Gemm with transB, Gemm
    # without it / MatMul (channels on axis 1, runs of 1 value), ConvTranspose (axis 1, runs of 9),
    # a 1×1 conv, long runs (≥ SHORT_RUN) on axis 1
    ((8, 5, 3, 3), 0), ((6, 40), 0), ((40, 6), 1), ((5, 6, 3, 3), 1), ((7, 3, 1, 1), 0), ((3, 6, 20), 1)]


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("scale_per_channel", [True, False])
@pytest.mark.parametrize("theta_per_channel", [True, False])
@pytest.mark.parametrize("bits", [(2, 4, 8), (0, 2, 4, 8), (1, 8), (8,)])
def test_native_weight_mixture_equals_the_aten_path(shape, axis, scale_per_channel, theta_per_channel, bits,
                                                    monkeypatch):
    channel_axis = axis if (scale_per_channel or theta_per_channel) else -1
    reduce_axes = tuple(a for a in range(len(shape)) if not (scale_per_channel and a == axis))
    plan = WeightPlan(bits, channel_axis, reduce_axes)
    generator = torch.Generator().manual_seed(1)
    theta = torch.softmax(torch.randn((len(bits), shape[axis]) if theta_per_channel else (len(bits),),
                                      generator=generator), 0)
    results = _both(_weight(shape, axis), theta, plan, monkeypatch)
    if results is None:
        return  # (no compiler: the ATen path is all there is)
    (value, scale, grads), (want_value, want_scale, want_grads) = results
    assert value.shape == want_value.shape and scale.shape == want_scale.shape
    assert torch.equal(value, want_value) and torch.equal(scale, want_scale)
    assert torch.equal(grads[0], want_grads[0])                              # straight through
    torch.testing.assert_close(grads[1], want_grads[1], rtol=1e-5, atol=1e-6)  # sums in another order
    assert grads[1].abs().sum() > 0


@pytest.mark.parametrize("bits", [(1, 2, 3, 4, 8), (0, 2, 3, 4, 5, 6, 7, 8)])
def test_more_than_four_precisions_are_close(bits, monkeypatch):
    """Beyond 4 precisions ATen's sum(0) adds in an order that depends on where a value sits: close."""
    theta = torch.softmax(torch.randn(len(bits), 8), 0)
    results = _both(_weight((8, 5, 3, 3), 0), theta, WeightPlan(bits, 0, (1, 2, 3)), monkeypatch)
    if results is None:
        return
    for got, want in zip(results[0][:2] + results[0][2], results[1][:2] + results[1][2]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_native_weight_mixture_without_the_scale_output(monkeypatch):
    """Only the value reaches the loss (no bias quantizer): ∂θ has no scale term."""
    theta = torch.softmax(torch.randn(3, 6), 0)
    results = _both(_weight((6, 40), 0), theta, WeightPlan((2, 4, 8), 0, (1,)), monkeypatch, use_scale=False)
    if results is not None:
        torch.testing.assert_close(results[0][2][1], results[1][2][1], rtol=1e-5, atol=1e-6)


def test_non_finite_weights_give_what_the_aten_path_gives(monkeypatch):
    weight = _weight((6, 4, 3, 3), 0)
    weight[1, 0, 0, 0], weight[2, 1, 1, 1] = float("nan"), float("inf")
    results = _both(weight, torch.softmax(torch.randn(3, 6), 0), WeightPlan((2, 4, 8), 0, (1, 2, 3)), monkeypatch)
    if results is None:
        return
    for got, want in zip(results[0][:2], results[1][:2]):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_layouts():
    layout = mps_native_weight.layout
    assert layout((32, 16, 3, 3), 0, (1, 2, 3), (3, 32)) == (1, 32, 144, 32, 32)
    assert layout((32, 16, 3, 3), 0, (0, 1, 2, 3), (3, 32)) == (1, 32, 144, 1, 32)
    assert layout((32, 16, 3, 3), 0, (1, 2, 3), (3,)) == (1, 32, 144, 32, 1)
    assert layout((32, 16, 3, 3), -1, (0, 1, 2, 3), (3,)) == (1, 1, 4608, 1, 1)
    assert layout((512, 64), 1, (0,), (3, 64)) == (512, 64, 1, 64, 64)           # Gemm, MatMul
    assert layout((16, 8, 3, 3), 1, (0, 2, 3), (3, 8)) == (16, 8, 9, 8, 8)        # ConvTranspose
    assert layout((32, 16, 3, 3), 0, (2, 3), (3, 32)) is None                     # another reduction
    assert layout((32, 16, 3, 3), 0, (1, 2, 3), (3, 16)) is None                  # θ columns ≠ channels
    assert layout((0, 16, 3, 3), 0, (1, 2, 3), (3, 0)) is None and layout((9,), 0, (), (3, 9)) is None


def test_the_weight_kernel_is_used_only_where_it_computes_the_mixture():
    if HAS_COMPILER:
        assert mps_weights.native_weights_available()
    plan = WeightPlan((2, 4, 8), 0, (1, 2, 3))
    w, theta = torch.randn(4, 2, 3, 3), torch.full((3, 4), 1 / 3)
    assert (mps_weights._native_weights(w, theta, plan) is not None) == HAS_COMPILER
    assert mps_weights._native_weights(w.double(), theta.double(), plan) is None
    assert mps_weights._native_weights(w, theta[:2], plan) is None
    many = tuple(range(1, mps_native_weight.MAX_PRECISIONS + 2))
    assert mps_weights._native_weights(w, torch.ones(len(many), 4), WeightPlan(many, 0, (1, 2, 3))) is None


def test_a_kernel_that_fails_its_check_is_not_used(monkeypatch):
    """A kernel whose values differ from the ATen path's (here: by one ulp) is left out."""
    kernel = mps_native_weight.load()
    if kernel is None:
        return

    class OffByOne:
        def forward(self, *args):
            value, scale, scales = kernel.forward(*args)
            return torch.nextafter(value, torch.tensor(float("inf"))), scale, scales

        def theta_grad(self, *args):
            return kernel.theta_grad(*args)

    monkeypatch.setattr(mps_native_weight, "load", lambda: OffByOne())
    mps_weights._checked_weight_native.cache_clear()
    try:
        assert mps_weights._checked_weight_native() is None
        w, theta = _weight((4, 2, 3, 3), 0), torch.full((3, 4), 1 / 3)
        assert mps_weights._native_weights(w, theta, WeightPlan((2, 4, 8), 0, (1, 2, 3))) is None
    finally:
        mps_weights._checked_weight_native.cache_clear()


def test_no_compiler_means_the_aten_path(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", str(tmp_path))
    mps_native_weight.load.cache_clear()
    mps_weights._checked_weight_native.cache_clear()
    try:
        assert mps_native_weight.load() is None and not mps_weights.native_weights_available()
        weight = _weight((4, 2, 3, 3), 0).requires_grad_()
        theta = torch.full((3, 4), 1 / 3, requires_grad=True)
        value, scale = MixedWeightQuant.apply(weight, theta, WeightPlan((2, 4, 8), 0, (1, 2, 3)))
        value.sum().backward()
        assert value.shape == weight.shape and theta.grad.shape == theta.shape
    finally:
        mps_native_weight.load.cache_clear()
        mps_weights._checked_weight_native.cache_clear()


def test_the_weight_kernel_has_a_build_of_its_own(tmp_path):
    if not HAS_COMPILER:
        return
    activations = mps_native.build(tmp_path)
    weights = mps_native.build(tmp_path, source=mps_native_weight.SOURCE, stem="mps_weight")
    assert activations != weights and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [activations.name, weights.name])


def _every_layer_graph() -> po.Graph:
    """ConvTranspose (channels on axis 1), a grouped one (per layer), Conv, Gemm without transB and
    MatMul (channels on axis 1)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("ConvTranspose", ["x", "w1"], ["a"], name="deconv"),
             helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("ConvTranspose", ["ar", "w2"], ["b"], name="grouped", group=2),
             helper.make_node("Relu", ["b"], ["br"]),
             helper.make_node("Conv", ["br", "w3"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["cr"]),
             helper.make_node("Flatten", ["cr"], ["f"]),
             helper.make_node("Gemm", ["f", "w4", "b4"], ["g"], name="gemm"),
             helper.make_node("Relu", ["g"], ["gr"]),
             helper.make_node("MatMul", ["gr", "w5"], ["y"], name="matmul")]
    shapes = {"w1": (4, 6, 3, 3), "w2": (6, 3, 1, 1), "w3": (8, 6, 3, 3), "w4": (288, 10), "b4": (10,), "w5": (10, 5)}
    inits = [numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
             for name, shape in shapes.items()]
    proto = helper.make_model(helper.make_graph(
        nodes, "every_layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])], inits),
        opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    return po.load(proto)


@pytest.mark.parametrize("options", [{}, {"zero_bit": True}, {"per_channel": False},
                                     {"per_channel": False, "weight_scale": "per_tensor"}])
def test_every_quantizer_the_mps_pass_makes_runs_the_kernel(options, monkeypatch):
    """Through the MPS pass (each option it allows, each layer kind): every weight mixture of a
    training step takes the kernel, and the step's output and gradients are the ATen path's."""
    if not HAS_COMPILER:
        return
    model = po.MPS(_every_layer_graph(), **options)
    x = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    model.calibrate(x)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    taken = []
    decide = mps_weights._native_weights
    monkeypatch.setattr(mps_weights, "_native_weights", lambda *args: taken.append(decide(*args)) or taken[-1])
    y = model(x)
    grads = torch.autograd.grad(y.square().sum() + model.cost, parameters)
    assert len(taken) == 5 and all(t is not None for t in taken)
    monkeypatch.setattr(mps_weights, "_native_weights", lambda *args: None)
    want_y = model(x)
    want = torch.autograd.grad(want_y.square().sum() + model.cost, parameters)
    assert torch.equal(y, want_y)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
