"""A searchable model's cost on host scalars (`plinio_onnx.cost.dual`, `plinio_onnx.cost.dual_cost`):
the same value and gradients as the tensor form, for every built-in cost model and hardware
profile, MPS (per channel, per layer, with PIT) and ODiMO (max, softmax, a data-movement term);
the helpers' ties, bounds and straight-through roundings; the fallback of cost models that need
tensors."""
from __future__ import annotations

import math

import pytest
import torch

import plinio_onnx as po
from plinio_onnx import host
from plinio_onnx.cost import LayerSpec
from plinio_onnx.cost.dual import Dual
from plinio_onnx.cost.dual_cost import DualCost
from plinio_onnx.hardware import rounding
from plinio_onnx.methods.accelerators import ParallelLatency

from _util import MODELS, random_architecture

DIGITS = MODELS / "digits_cnn.onnx"
COST_NAMES = sorted(po.cost.BY_NAME)
PROFILES = ("gap8", "ne16", "diana", "mpic", "simd-mcu")
#: The costs that do not read bit-widths (under MPS without PIT: no gradient).
BIT_FREE = {"params", "params_no_bias", "macs", "ops", "gap8-latency"}


# -- the dual number and the rounding helpers ---------------------------------------------------
def _leaves(*values: float) -> tuple[list[Dual], list[torch.Tensor]]:
    duals = [Dual(v, {i: 1.0}) for i, v in enumerate(values)]
    tensors = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]
    return duals, tensors


def _same(fn, *values: float) -> None:
    """``fn`` on Duals gives exactly the value and the gradient it gives on tensors."""
    duals, tensors = _leaves(*values)
    on_duals, on_tensors = fn(*duals), fn(*tensors)
    expected = [0.0] * len(values)
    if isinstance(on_tensors, torch.Tensor) and on_tensors.requires_grad:
        expected = [0.0 if g is None else float(g) for g in torch.autograd.grad(on_tensors, tensors,
                                                                                allow_unused=True)]
    value = on_duals.value if isinstance(on_duals, Dual) else float(on_duals)
    partials = on_duals.partials if isinstance(on_duals, Dual) else {}
    assert value == float(on_tensors.detach() if isinstance(on_tensors, torch.Tensor) else on_tensors)
    assert [partials.get(i, 0.0) for i in range(len(values))] == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("values", [(3.7, 2.2), (0.4, 9.0), (16.0, 16.0)])
def test_arithmetic_matches_torch(values):
    _same(lambda a, b: (a + 3) * b - 2 / a + b / 7 - (1 - a) * (a / b), *values)
    _same(lambda a, b: a ** 2 + b ** 3 + a ** 0.5 + abs(a - b) + (-a) * b ** -1 + 5 / (a * b), *values)


@pytest.mark.parametrize("x", [0.0, 3.0, 15.999, 16.0, 16.5, 47.3, 512.0])
def test_straight_through_roundings_and_gates_match_torch(x):
    _same(lambda v: rounding.ceil_div(v, 16) * 3 + rounding.floor_div(v * 2, 5), x)
    _same(lambda v: rounding.mod(v, 3) + rounding.mod(v, 16) * v, x)
    _same(lambda v: rounding.at_least(v, 1) * v + rounding.nonzero(v - 16) * 7 + rounding.at_least(v, 16), x)


@pytest.mark.parametrize("x", [-1.0, 0.0, 0.5, 6.0, 7.0])
def test_clamp_passes_the_gradient_at_its_bounds_like_torch(x):
    _same(lambda v: rounding.clamp(v, 0, 6) * 3, x)
    _same(lambda v: rounding.clamp(v * 2, 0.0, 12.0), x)


@pytest.mark.parametrize("bits", [2.0, 3.0, 4.0, 5.5, 8.0])
def test_interpolate_matches_torch(bits):
    table = {2: 0.15, 4: 0.25, 8: 0.5}
    _same(lambda b: rounding.interpolate(table, b), bits)
    _same(lambda a, w: po.hardware.mpic.cycles_per_mac(a, w), bits, 10.0 - bits)


def test_maximum_splits_the_gradient_among_ties_like_amax():
    _same(lambda a, b: rounding.maximum(a, b), 5.0, 5.0)
    _same(lambda a, b: rounding.maximum(a * 2, b + 5, 10), 5.0, 5.0)          # three tied, one a number
    _same(lambda a, b, c: rounding.maximum(a, b, c), 1.0, 7.0, 7.0)
    _same(lambda a, b: rounding.maximum(a, b), 3.0, 4.0)
    duals, _ = _leaves(5.0, 5.0)
    assert rounding.maximum(*duals).partials == {0: 0.5, 1: 0.5}


@pytest.mark.parametrize("reduction", ["max", "softmax"])
@pytest.mark.parametrize("values", [(3.0, 3.0), (1.5, 2.5), (40.0, 2.0)])
def test_parallel_reduction_matches_torch(reduction, values):
    latency = ParallelLatency(reduction=reduction)
    duals, tensors = _leaves(*values)
    on_duals, on_tensors = latency._reduce([duals[0] * 2, duals[1] * 2, 1.0]), \
        latency._reduce([tensors[0] * 2, tensors[1] * 2, 1.0])
    grads = torch.autograd.grad(on_tensors, tensors)
    assert on_duals.value == pytest.approx(float(on_tensors.detach()), rel=1e-15)
    assert [on_duals.partials.get(i, 0.0) for i in range(2)] == pytest.approx([float(g) for g in grads], rel=1e-12)
    # numbers alone: the number it gives a static graph
    assert latency._reduce([3, 5.0]) == pytest.approx(5.0 if reduction == "max" else
                                                      float(torch.dot(torch.softmax(torch.tensor([3.0, 5.0]), 0),
                                                                      torch.tensor([3.0, 5.0]))))


def test_a_dual_never_becomes_a_number_implicitly():
    d = Dual(3.0, {0: 1.0})
    for misuse in (lambda: float(d), lambda: int(d), lambda: bool(d), lambda: d > 2, lambda: d == 3,
                   lambda: max(d, 2), lambda: math.ceil(d), lambda: torch.as_tensor(d) * 1, lambda: {d: 1}):
        with pytest.raises((TypeError, RuntimeError)):
            misuse()
    assert rounding.is_tensor(d)


# -- whole models: dual against tensor ----------------------------------------------------------
def _cost_and_grads(model, cost, dual: bool):
    model.dual_cost = dual
    params = list(model.nas_parameters())
    value = model.cost_of(cost)
    grads = [None] * len(params)
    if value.requires_grad:   # (None: the cost does not reach the parameter)
        grads = list(torch.autograd.grad(value, params, allow_unused=True))
    return value, grads


def _compare(model, cost, dual_used: bool = True) -> bool:
    """Value and gradients w.r.t. every NAS parameter, dual against tensor, train and eval;
    whether the cost moves any of them."""
    moved = False
    for training in (True, False):
        model.train(training)
        expected, expected_grads = _cost_and_grads(model, cost, dual=False)
        got, got_grads = _cost_and_grads(model, cost, dual=True)
        assert got.dtype == torch.float64
        assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-13)
        assert got.requires_grad == expected.requires_grad
        assert (type(got.grad_fn).__name__ == "_DualSumBackward") == (dual_used and expected.requires_grad)
        assert [g is None for g in got_grads] == [e is None for e in expected_grads]
        expected_grads = [e for e in expected_grads if e is not None]
        for g, e in zip([g for g in got_grads if g is not None], expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12 * max(1.0, float(e.abs().max())))
        moved = moved or any(float(e.abs().max()) > 0 for e in expected_grads)
    model.dual_cost = True
    return moved


def _all_costs():
    costs = [(name, name) for name in COST_NAMES]
    costs += [(f"{p}-latency", po.hardware.get(p).cost()) for p in PROFILES]
    costs += [("mpic-energy", po.hardware.get("mpic").cost("energy"))]
    return costs


@pytest.fixture(scope="module")
def mps_models():
    models = {"per-channel": po.MPS(DIGITS, per_channel=True), "per-layer": po.MPS(DIGITS),
              "pit": po.MPS(DIGITS, pit=True, per_channel=True)}
    for seed, model in enumerate(models.values()):
        random_architecture(model, seed, logits=("alpha",), masks=("pit_alpha",), below=0.3)
    return models


@pytest.mark.parametrize("label,cost", _all_costs(), ids=[c[0] for c in _all_costs()])
@pytest.mark.parametrize("kind", ["per-channel", "per-layer", "pit"])
def test_mps_cost_on_duals_equals_the_tensor_form(mps_models, kind, label, cost):
    moved = _compare(mps_models[kind], cost)
    assert moved or (kind != "pit" and label in BIT_FREE)


def _gather(spec, counts):
    """A data-movement term: every channel off the first unit is moved once per output position."""
    names = list(counts)
    return sum(counts[n] for n in names[1:]) * spec.output_positions * 0.25 + rounding.ceil_div(counts[names[0]], 8)


@pytest.fixture(scope="module")
def odimo_models():
    models = {"max": po.ODiMO(DIGITS), "softmax": po.ODiMO(DIGITS, reduction="softmax"),
              "data-movement": po.ODiMO(DIGITS, data_movement=_gather)}
    for seed, model in enumerate(models.values()):
        random_architecture(model, seed, logits=("alpha",), masks=(), below=0.0)
    return models


@pytest.mark.parametrize("kind", ["max", "softmax", "data-movement"])
def test_odimo_latency_on_duals_equals_the_tensor_form(odimo_models, kind):
    assert _compare(odimo_models[kind], "latency")
    assert _compare(odimo_models[kind], "size")


@pytest.mark.parametrize("label,cost", _all_costs()[::3], ids=[c[0] for c in _all_costs()[::3]])
def test_odimo_other_costs_on_duals_equal_the_tensor_form(odimo_models, label, cost):
    _compare(odimo_models["max"], cost)


# -- fallback -----------------------------------------------------------------------------------
def test_a_cost_that_uses_torch_falls_back_and_still_trains(mps_models):
    model = mps_models["per-layer"]
    calls = []

    def log_size(spec):
        calls.append(spec.name)
        bits = spec.weight_bits if spec.weight_bits is not None else 32
        return torch.log1p(torch.as_tensor(bits, dtype=torch.float64)) * spec.out_channels

    _compare(model, log_size, dual_used=False)
    dual = model.__dict__["_dual_cost"]
    assert dual.tensor_only(log_size)
    calls.clear()
    model.train()
    value = model.cost_of(log_size)
    assert len(calls) == len(model.specs)        # remembered: not tried on Duals again
    value.backward()
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in model.nas_parameters())
    for p in model.nas_parameters():
        p.grad = None


def test_costs_that_branch_or_return_tensors_fall_back(mps_models):
    model = mps_models["per-channel"]

    def branching(spec):   # a comparison of a searched value: the tensor form decides
        return spec.out_channels * (3 if spec.weight_bits is not None and spec.weight_bits > 4 else 1)

    def constant_tensor(spec):
        return torch.tensor(2.0, dtype=torch.float64) * 3

    for fn in (branching, constant_tensor):
        _compare(model, fn, dual_used=False)
        assert model.__dict__["_dual_cost"].tensor_only(fn)


def test_a_spec_holding_a_vector_runs_the_tensor_form():
    spec = LayerSpec("l", "Conv", "conv", 4, torch.tensor([3.0, 4.0], dtype=torch.float64), kernel_size=9)
    assert DualCost().total(po.cost.params, [spec]) is None
    spec32 = spec.with_(out_channels=torch.tensor(3.0))        # float32: its own rounding
    assert DualCost().total(po.cost.params, [spec32]) is None


def test_ties_in_a_hand_made_spec():
    a = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    spec = LayerSpec("l", "Conv", "conv", a, b, extra={"pair": [a * 1, {"b": b}]})

    def cost(s):
        return rounding.maximum(s.in_channels * 2, s.out_channels * 2, 12) + s.extra["pair"][1]["b"]

    total = DualCost().total(cost, [spec, spec])
    assert type(total.grad_fn).__name__ == "_DualSumBackward"
    assert float(total.detach()) == 2 * 18.0
    ga, gb = torch.autograd.grad(total, [a, b])
    # amax over three tied entries: 2/3 each to a and b, then b's own term
    assert float(ga) == pytest.approx(2 * 2 / 3) and float(gb) == pytest.approx(2 * (2 / 3 + 1))


def test_no_grad_eval_and_a_device_take_the_right_path(mps_models, monkeypatch):
    model = mps_models["per-channel"]
    model.train()
    expected = float(model.cost.detach())
    with torch.no_grad():
        value = model.cost
    assert value.grad_fn is None and float(value) == expected
    monkeypatch.setattr(host, "runs_on_host", lambda tensor: False)
    on_device = model.cost       # (the device form: no read back to the host)
    assert type(on_device.grad_fn).__name__ != "_DualSumBackward"
    assert float(on_device) == pytest.approx(expected, rel=1e-13)
