"""No host round trip in a training step on a CUDA device, as CUDA itself sees it: torch's sync
debug mode turns every synchronizing call (a value read back, a blocking copy) into an error.
tests/test_device_sync.py checks the same code paths on the CPU."""
from __future__ import annotations

import contextlib

import pytest
import torch

import plinio_onnx as po
from plinio_onnx.data import random_inputs
from plinio_onnx.optimize.distributed import resolve_device

from _util import MODELS, random_architecture

CUDA = resolve_device("cuda")
METHODS = {  # id: (class, model, options, random logits, random masks)
    "pit": (po.PIT, "digits_cnn", {}, (), (".pit_alpha",)),
    "pit-tcn": (po.PIT, "tcn", {}, (), (".pit_alpha", ".pit_beta", ".pit_gamma")),
    "mps": (po.MPS, "digits_cnn", {}, (".mps_w_alpha", ".mps_a_alpha"), ()),
    "pit+mps": (po.MPS, "digits_cnn", {"pit": True}, (".mps_w_alpha", ".mps_a_alpha"), (".pit_alpha",)),
    "supernet+pit": (po.SuperNet, "digits_cnn", {"pit": True}, (".supernet_logits",), (".pit_alpha",)),
    "odimo": (po.ODiMO, "digits_cnn", {}, (".mps_w_alpha",), ()),
}


@contextlib.contextmanager
def _sync_is_an_error():
    torch.cuda.synchronize(CUDA)
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_training_step_on_cuda_does_not_synchronize(method, record_property):
    record_property("device", f"{CUDA} ({torch.cuda.get_device_name(CUDA)})")
    cls, name, options, logits, masks = METHODS[method]
    torch.manual_seed(0)
    model = cls(str(MODELS / f"{name}.onnx"), **options)
    random_architecture(model, 0, logits, masks, below=0.3)
    model = model.to(CUDA).train()
    feeds = random_inputs(po.load(MODELS / f"{name}.onnx"), batch=8, seed=0)
    inputs = [torch.from_numpy(v).to(CUDA) for v in feeds.values()]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2, capturable=True)
    for step in range(3):   # the first makes the constants each device needs once
        with _sync_is_an_error() if step else contextlib.nullcontext():
            out = model(*inputs)
            loss = (out if isinstance(out, torch.Tensor) else out[0]).square().mean() + 1e-6 * model.cost
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    assert torch.isfinite(loss.detach().cpu())
