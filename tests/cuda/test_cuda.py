"""The same search on a CUDA device and on the CPU: the same architecture from the same seed and
fixed masks, costs on the device, mixed precision, and the same export from the same checkpoint."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import plinio_onnx as po
from plinio_onnx.optimize import Recipe, adam, export_searchable, optimize
from plinio_onnx.optimize.checkpoint import Checkpoint
from plinio_onnx.optimize.data import prepare
from plinio_onnx.optimize.distributed import Distributed, resolve_device
from plinio_onnx.optimize.progress import Progress
from plinio_onnx.optimize.training import Run

from _util import MODELS, random_architecture, run_ort

MODEL, DATA = MODELS / "digits_cnn.onnx", MODELS / "digits.npz"
CUDA = resolve_device("cuda")
METHODS = {   # class, options, architecture parameters set at random (logits, masks)
    "pit": (po.PIT, {}, (), (".pit_alpha",)),
    "pit+mps": (po.MPS, {"pit": True}, (".mps_w_alpha", ".mps_a_alpha"), (".pit_alpha",)),
    "supernet": (po.SuperNet, {}, (".supernet_logits",), ()),
}


@pytest.fixture(scope="module")
def problem():
    return prepare(MODEL, DATA, "auto", 0, 0.2, 0.2)


@pytest.fixture(autouse=True)
def _state_device(record_property):
    name = f"{CUDA} ({torch.cuda.get_device_name(CUDA)})"
    record_property("device", name)
    print(f"ran on {name}")


def _searched(problem, method: str, device: torch.device):
    """One training epoch of ``method``'s model with architecture parameters fixed at random
    values (seed 0); returns (the model back on the CPU, its cost on ``device``)."""
    cls, options, logits, masks = METHODS[method]
    torch.manual_seed(0)
    model = cls(problem.base.copy(), cost="params", **options)
    random_architecture(model, 0, logits, masks, below=0.4)
    run = Run(Recipe(batch_size=64), problem.task, problem.train, problem.val, Checkpoint(None, ""),
              Progress(False), 0, dist=Distributed(device=device))
    model = run.place(model)
    model.before_search([t.to(device) for t in problem.train.head(256)[0]])
    cost = model.cost
    assert cost.device.type == device.type and cost.dtype == torch.float64
    # Only the weights step: the masks / logits stay where the seed put them.
    run.train_epoch("search", model, [adam(model.net_parameters(), lr=1e-3)], 1, 1, lambda: 1e-9 * model.cost)
    return model.cpu(), float(cost.detach())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_cuda_and_cpu_export_the_same_architecture(problem, method):
    on_cpu, cpu_cost = _searched(problem, method, torch.device("cpu"))
    on_gpu, gpu_cost = _searched(problem, method, CUDA)
    # PIT counts are integers (exact); MPS / SuperNet weigh them by float32 softmaxes.
    assert gpu_cost == pytest.approx(cpu_cost, rel=1e-6)
    assert on_gpu.architecture() == on_cpu.architecture()
    a, b = on_cpu.export().to_onnx(), on_gpu.export().to_onnx()
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    weights_a = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    weights_b = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert {k: v.shape for k, v in weights_a.items()} == {k: v.shape for k, v in weights_b.items()}
    x = problem.test_inputs[0][:64]
    out_a, out_b = run_ort(a, {problem.input_names[0]: x})[0], run_ort(b, {problem.input_names[0]: x})[0]
    assert np.mean(out_a.argmax(1) == out_b.argmax(1)) >= 0.95


def test_a_search_on_cuda_with_amp_exports_what_its_checkpoint_exports_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.onnx"
    report = optimize(MODEL, DATA, output=out, epochs=2, warmup_epochs=1, finetune_epochs=0, batch_size=64,
                      target_params="50%", device="cuda", amp=True, quiet=True)
    assert report.devices == [str(CUDA)] and report.amp and report.world_size == 1
    assert report.after["params"] <= 0.5 * report.before["params"] + 1e-6
    again = tmp_path / "cpu.onnx"
    export_searchable(tmp_path / "gpu.ckpt" / "search.best.onnx", again)
    assert again.read_bytes() == out.read_bytes()
    assert report.after["test"]["accuracy"] > 0.5
    onnx.checker.check_model(onnx.load(str(out)))
