"""No host round trips in a training step on a device.

On a GPU every value read back to Python (``float(t)``, ``.item()``, ``.tolist()``, numpy, a
tensor in an ``if``) waits for the device's queue to drain. The code paths a device takes are
chosen by `plinio_onnx.host.runs_on_host`; these tests replace it to take them on the CPU and
run a whole training step (forward, cost, backward, optimizer step) under `no_host_reads`,
which fails on every host read made by plinio-onnx's code.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

import plinio_onnx as po
from plinio_onnx import host
from plinio_onnx.data import random_inputs

from _util import MODELS, random_architecture

PACKAGE = Path(po.__file__).resolve().parent
TORCH = Path(torch.__file__).resolve().parent
#: torch's optimizers keep their step counts in host tensors (capturable=False) and read them
#: there: no device round trip.
HOST_SIDE = (TORCH / "optim",)

#: The reads patched on `torch.Tensor` (a tensor's value back in Python) and in `torch`; and the
#: constructors from host data, a copy to the device that waits for it on CUDA (constants are
#: made once per device: the guarded steps follow a first, unguarded one).
TENSOR_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy", "__array__")
TORCH_READS = ("equal",)
HOST_DATA = ("tensor", "as_tensor", "from_numpy")


class HostReadError(AssertionError):
    """A training step read a tensor's value back to the host."""


def _reader() -> Path | None:
    """The file of the code that asked for a read: the innermost frame outside torch (None when
    torch's own host-side code asked, or no plinio-onnx code did)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if any(path.is_relative_to(allowed) for allowed in HOST_SIDE):
            return None
        if not path.is_relative_to(TORCH):
            return path if path.is_relative_to(PACKAGE) else None
        frame = frame.f_back
    return None


def _guarded(name: str, original):
    def guard(*args, **kwargs):
        reader = _reader()
        if reader is not None:
            frame = sys._getframe(1)
            while Path(frame.f_code.co_filename) != reader:
                frame = frame.f_back
            what = "host data copied to the device by" if name.split(".")[-1] in HOST_DATA else "host read"
            raise HostReadError(f"{what} {name} in {reader.relative_to(PACKAGE.parent)}:{frame.f_lineno} "
                                f"({frame.f_code.co_name}) during a training step on a device")
        return original(*args, **kwargs)
    return guard


@contextlib.contextmanager
def no_host_reads():
    """Fail (`HostReadError`, naming file, line and function) on every read of a tensor's value
    back to Python made by plinio-onnx's code inside the block."""
    saved = [(torch.Tensor, name, getattr(torch.Tensor, name)) for name in TENSOR_READS]
    saved += [(torch, name, getattr(torch, name)) for name in TORCH_READS + HOST_DATA]
    try:
        for owner, name, original in saved:
            label = f"Tensor.{name}" if owner is torch.Tensor else f"torch.{name}"
            setattr(owner, name, _guarded(label, original))
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


@pytest.fixture
def device_paths(monkeypatch):
    """The device forms of the code, on the CPU."""
    monkeypatch.setattr(host, "runs_on_host", lambda tensor: False)


def test_the_guard_names_a_read_in_the_package():
    from plinio_onnx.functions.relaxation import Temperature
    temperature = Temperature(lambda name: torch.ones(1), ["t"])
    expected = r"Tensor.__float__ in plinio_onnx/functions/relaxation.py"
    with no_host_reads(), pytest.raises(HostReadError, match=expected):
        temperature.value
    with no_host_reads():
        assert float(torch.ones(())) == 1.0   # (the test's own reads pass)
    assert temperature.value == 1.0           # (and every read after the block)


# -- a training step of every method ---------------------------------------------------------------
METHODS = {  # id: (class, model, options, random logits, random masks)
    "pit": (po.PIT, "digits_cnn", {}, (), (".pit_alpha",)),
    "pit-blocks": (po.PIT, "resnet8", {"channel_multiple": 4}, (), (".pit_alpha",)),
    "pit-tcn": (po.PIT, "tcn", {}, (), (".pit_alpha", ".pit_beta", ".pit_gamma")),
    "pit-tcn-layer-by-layer": (po.PIT, "tcn", {"cost": lambda spec: po.cost.params(spec)}, (),
                               (".pit_alpha", ".pit_beta", ".pit_gamma")),
    "mps": (po.MPS, "digits_cnn", {"per_channel": False}, (".mps_w_alpha", ".mps_a_alpha"), ()),
    "mps-per-channel": (po.MPS, "digits_cnn", {"zero_bit": True}, (".mps_w_alpha", ".mps_a_alpha"), ()),
    "pit+mps": (po.MPS, "digits_cnn", {"pit": True}, (".mps_w_alpha", ".mps_a_alpha"), (".pit_alpha",)),
    "mps-gumbel": (po.MPS, "digits_cnn", {"sampling": "gumbel_hard"}, (".mps_w_alpha", ".mps_a_alpha"), ()),
    "supernet-gumbel": (po.SuperNet, "digits_cnn", {"sampling": "gumbel"}, (".supernet_logits",), ()),
    "supernet+pit": (po.SuperNet, "digits_cnn", {"pit": True}, (".supernet_logits",), (".pit_alpha",)),
    "odimo": (po.ODiMO, "digits_cnn", {}, (".mps_w_alpha",), ()),
}


def _model(method: str):
    cls, name, options, logits, masks = METHODS[method]
    torch.manual_seed(0)
    model = cls(str(MODELS / f"{name}.onnx"), **options)
    random_architecture(model, 0, logits, masks, below=0.3)
    return model


def _inputs(method: str, batch: int = 4) -> list[torch.Tensor]:
    feeds = random_inputs(po.load(MODELS / f"{METHODS[method][1]}.onnx"), batch=batch, seed=0)
    return [torch.from_numpy(v) for v in feeds.values()]


def _steps(model, inputs, steps: int = 2, guard=contextlib.nullcontext) -> list[torch.Tensor]:
    """``steps`` training steps (weights and architecture parameters, loss + 1e-6·cost), all but
    the first under ``guard()``; the losses, as tensors."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for step in range(steps):
        with guard() if step else contextlib.nullcontext():
            losses.append(_step(model, inputs, optimizer))
    return losses


def _step(model, inputs, optimizer) -> torch.Tensor:
    out = model(*inputs)
    out = out if isinstance(out, torch.Tensor) else out[0]
    loss = out.float().square().mean() + 1e-6 * model.cost
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_training_step_reads_nothing_back_on_a_device(method, device_paths):
    model = _model(method)
    inputs = _inputs(method)
    losses = _steps(model, inputs, steps=3, guard=no_host_reads)
    assert all(torch.isfinite(loss) for loss in losses)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_device_paths_train_as_the_host_paths(method, monkeypatch):
    """The same steps from the same start: the same losses and parameters (within float rounding:
    the device forms sum in another order) and the same architecture."""
    host_model, device_model = _model(method), _model(method)
    inputs = _inputs(method)
    torch.manual_seed(1)   # (the same Gumbel noise)
    host_losses = _steps(host_model, inputs, steps=3)
    monkeypatch.setattr(host, "runs_on_host", lambda tensor: False)
    torch.manual_seed(1)
    device_losses = _steps(device_model, inputs, steps=3)
    monkeypatch.undo()
    for a, b in zip(host_losses, device_losses):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(host_model.named_parameters(), device_model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert device_model.architecture() == host_model.architecture()
    torch.testing.assert_close(device_model.cost, host_model.cost)


# -- the optimize flow's per-step control ----------------------------------------------------------
def _controlled_steps(method: str, steps: int, guard=contextlib.nullcontext):
    """``steps`` steps of a cost-constrained search's control (`TargetControl`, re-keeping off:
    it edits the architecture on the host) on ``method``'s model, the first unguarded; the
    control's state after `flush`."""
    from plinio_onnx.optimize.config import Recipe
    from plinio_onnx.optimize.control import make_control
    model = _model(method)
    inputs = _inputs(method)
    with torch.no_grad():
        initial = float(model.cost_of(po.cost.params))
    state = {"step": 0, "lam": 1.0, "lambdas": {"params": 1.0}, "initial_costs": {"params": initial}}
    control = make_control("constraint", Recipe(floor=0.0, lambda_up=1.5, lambda_down=0.5), {"params": 0.9 * initial},
                           {"params": po.cost.params}, model, state, total_steps=steps, epochs=1)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        with guard() if step else contextlib.nullcontext():
            out = model(*inputs)
            loss = (out if isinstance(out, torch.Tensor) else out[0]).square().mean() + control.regularizer()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            control.after_step()
    control.flush()
    return state


@pytest.mark.parametrize("method", ["pit", "mps"])
def test_the_target_control_keeps_lambda_on_the_device_and_decides_as_the_host(method, monkeypatch):
    on_host = _controlled_steps(method, 4)
    monkeypatch.setattr(host, "runs_on_host", lambda tensor: False)
    on_device = _controlled_steps(method, 4, guard=no_host_reads)
    assert on_device == on_host          # λ bit for bit, the step count
    assert on_host["lambdas"]["params"] != 1.0   # (λ moved)


def _adaptive_lambdas(costs: list[float], guard=contextlib.nullcontext) -> tuple[dict, dict]:
    """λ and the last costs of `po.regularizers.AdaptiveTarget` in a user's own loop, after a
    step per cost in ``costs`` (the cost rises and falls around the moving target), then `flush`."""
    regularizer = po.regularizers.AdaptiveTarget({"params": 10.0}, total_steps=len(costs), strength=2.0,
                                                 lambda_up=1.5, lambda_down=0.5, min_strength=0.6)
    regularizer.start(initial={"params": 20.0})
    for value in costs:
        cost = torch.tensor(value, dtype=torch.float64, requires_grad=True)
        with guard():
            regularizer.penalty({"params": cost}).backward()
            regularizer.after_step()
    regularizer.flush()
    return dict(regularizer.state["lam"]), dict(regularizer.last)


def test_adaptive_target_keeps_lambda_on_the_device_and_decides_as_the_host(monkeypatch):
    costs = [30.0, 25.0, 5.0, 4.0, 3.0, 12.0]   # above, above, below relax (twice: the floor), ...
    on_host = _adaptive_lambdas(costs)
    monkeypatch.setattr(host, "runs_on_host", lambda tensor: False)
    assert _adaptive_lambdas(costs, guard=no_host_reads) == on_host   # λ bit for bit, last costs
    assert on_host[0]["params"] not in (2.0, 0.6)                      # (λ moved, off the floor)
