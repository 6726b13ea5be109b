"""MPS's quantizers on a device (`plinio_onnx.functions.mps_device`) against the host forms
(`plinio_onnx.functions.mps_train`, `mps_weights`, `plinio_onnx.functions.mps`): the same forward values bit for
bit, the same gradients within float rounding, and no host read (tests/test_device_sync.py)."""
from __future__ import annotations

import pytest
import torch

from plinio_onnx import host
from plinio_onnx.functions import mps as fn
from plinio_onnx.functions.mps_device import DeviceActQuant, DeviceWeightQuant, _ActMixture
from plinio_onnx.functions.mps_train import MixedActQuant, Scratch
from plinio_onnx.functions.mps_weights import MixedWeightQuant, WeightPlan

from test_device_sync import no_host_reads


def _act_case(dtype, signed: bool, seed: int):
    """x with values on the clip bounds and exact ties, θ (one entry 0: hard sampling leaves
    precisions out), clips (one below the minimum)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 7, 3, generator=g, dtype=dtype) * 3
    x.view(-1)[:4] = torch.tensor([6.0, 2.5, -2.5, 0.0], dtype=dtype)
    theta = torch.softmax(torch.randn(3, generator=g, dtype=dtype), 0)
    clip = torch.tensor([6.0, 2.5, 1e-6], dtype=dtype)
    if seed % 2:
        theta = torch.tensor([0.0, 1.0, 0.0], dtype=dtype)
    return x, theta, clip, (2, 4, 8)


def _leaves(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


def _act_run(apply, x, theta, clip, upstream):
    y, scale = apply(x, theta, clip)
    ((y * upstream).sum() + 3.0 * scale.sum()).backward()
    return y.detach(), scale.detach(), x.grad, theta.grad, clip.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_activation_mixture_equals_the_host_form(dtype, signed, exact, seed):
    x, theta, clip, bits = _act_case(dtype, signed, seed)
    plan = fn.act_plan(bits, signed, exact=exact)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=dtype)
    constants = DeviceActQuant(plan, plan).constants
    expected = _act_run(lambda a, b, c: MixedActQuant.apply(a, b, c, plan, Scratch()), *_leaves(x, theta, clip),
                        upstream)
    constants.get(x.device, clip.dtype)   # (constants are made once per device, before the step)
    with no_host_reads():
        got = _act_run(lambda a, b, c: _ActMixture.apply(a, b, c, plan, constants), *_leaves(x, theta, clip),
                       upstream)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])   # forward: bit for bit
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for name, a, b in zip(("x", "theta", "clip"), got[2:], expected[2:]):
        torch.testing.assert_close(a, b, **tolerance, msg=name)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("sampling", ["softmax", "hard", "fixed"])
def test_activation_quantizer_on_a_device_equals_the_host_one(signed, sampling, monkeypatch):
    """The module `ActQuantizer` in training, frozen (fixed) and eval modes."""
    x, _, clip, bits = _act_case(torch.float32, signed, 0)
    alpha = torch.tensor([0.1, 0.7, 0.3])
    temperature = torch.ones(1)
    quantizer = fn.ActQuantizer(bits, signed, sampling)
    for training in (True, False):
        quantizer.train(training)
        results = []
        for on_host in (True, False):
            monkeypatch.setattr(host, "runs_on_host", lambda tensor, on_host=on_host: on_host)
            xs, alphas, clips = _leaves(x, alpha, clip)
            y, scale = quantizer(xs, alphas, clips, temperature)
            (y.square().sum() + scale.sum()).backward()
            results.append((y.detach(), scale.detach(), xs.grad, alphas.grad, clips.grad))
            with torch.no_grad():
                results.append(quantizer(x, alpha, clip, temperature))
        (host_grad, host_eval), (device_grad, device_eval) = (results[0], results[1]), (results[2], results[3])
        assert torch.equal(device_grad[0], host_grad[0]) and torch.equal(device_grad[1], host_grad[1])
        assert all(torch.equal(a, b) for a, b in zip(device_eval, host_eval))
        for a, b in zip(device_grad[2:], host_grad[2:]):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [(2, 4, 8), (0, 2, 4, 8)])
def test_weight_mixture_equals_the_host_form(dtype, per_channel, bits):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(6, 4, 3, 3, generator=g, dtype=dtype)
    weight[2] = 0.0   # a zero range
    theta = torch.softmax(torch.randn(len(bits), 6, generator=g, dtype=dtype) if per_channel
                          else torch.randn(len(bits), generator=g, dtype=dtype), 0)
    plan = WeightPlan(tuple(bits), 0, (1, 2, 3))
    upstream = torch.randn(weight.shape, generator=g, dtype=dtype)
    device = DeviceWeightQuant(plan)

    def run(apply):
        w, t = _leaves(weight, theta)
        y, scale = apply(w, t)
        ((y * upstream).sum() + 5.0 * scale.sum()).backward()
        return y.detach(), scale.detach(), w.grad, t.grad

    expected = run(lambda w, t: MixedWeightQuant.apply(w, t, plan))
    device.table(weight)   # (constants are made once per device, before the step)
    with no_host_reads():
        got = run(device)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(got[2], expected[2], rtol=0, atol=0)   # straight through
    torch.testing.assert_close(got[3], expected[3], **tolerance)
