"""Data-parallel search under torchrun (two gloo processes on the CPU), resuming it with one
process, and choosing the device (`--device auto|cpu|cuda`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import plinio_onnx as po
from plinio_onnx.cli import main as cli_main
from plinio_onnx.errors import SettingError
from plinio_onnx.optimize import OptimizeConfig, Recipe, adam, export_searchable
from plinio_onnx.optimize.checkpoint import Checkpoint
from plinio_onnx.optimize.data import TensorSplit, index_batches, prepare
from plinio_onnx.optimize.progress import Progress
from plinio_onnx.optimize.training import Run
from plinio_onnx.optimize.distributed import DUMP_ENV, Distributed, resolve_device

from _util import MODELS, ROOT

MODEL, DATA = str(MODELS / "digits_cnn.onnx"), str(MODELS / "digits.npz")
# The options of tests/_ddp_worker.py, on the command line.
FLAGS = ["--epochs", "2", "--warmup-epochs", "1", "--finetune-epochs", "1", "--target-params", "50%",
         "--batch-size", "64", "--quiet"]


def _env(**extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A two-process search (interrupted after search epoch 1, then resumed and finished on the
    same two ranks), and the interrupted checkpoint resumed by one process."""
    folder = tmp_path_factory.mktemp("ddp")
    out, copy, dumps = folder / "two.onnx", folder / "interrupted.ckpt", folder / "dumps"
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          str(ROOT / "tests" / "_ddp_worker.py"), MODEL, DATA, str(out), str(copy)],
         _env(**{DUMP_ENV: str(dumps)}))
    interrupted = json.loads((copy / "state.json").read_text())
    one = folder / "one.onnx"
    _run(["-m", "plinio_onnx.cli", "optimize", MODEL, "--data", DATA, "-o", str(one),
          "--checkpoint-dir", str(copy), *FLAGS], _env())
    return {"two": out, "one": one, "dumps": dumps, "interrupted": interrupted,
            "report_two": json.loads(out.with_suffix(".report.json").read_text()),
            "report_one": json.loads(one.with_suffix(".report.json").read_text()),
            "copy": copy}


def test_both_ranks_end_with_the_same_architecture_and_weights(runs):
    rank0, rank1 = (np.load(runs["dumps"] / f"rank{r}.npz") for r in (0, 1))
    assert sorted(rank0.files) == sorted(rank1.files)
    searched = [k for k in rank0.files if k.startswith("search/")]
    assert any("alpha" in k or "mask" in k for k in searched), searched   # architecture parameters too
    for key in rank0.files:
        assert np.array_equal(rank0[key], rank1[key]), key
    kept = json.loads(str(rank0["architecture"]))["kept_channels"]
    assert sum(v["kept"] for v in kept.values()) < sum(v["total"] for v in kept.values())


def test_the_output_is_what_every_rank_holds(runs):
    written = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(runs["two"])).graph.initializer}
    rank1 = np.load(runs["dumps"] / "rank1.npz")
    final = {k[len("final/"):]: rank1[k] for k in rank1.files if k.startswith("final/")}
    assert final.keys() == written.keys()
    for name, value in written.items():
        assert np.array_equal(value, final[name]), name
    report = runs["report_two"]
    assert report["world_size"] == 2
    assert report["devices"] == [str(resolve_device("auto"))] * 2
    assert report["resumed"] is True
    md = runs["two"].with_suffix(".report.md").read_text()
    assert "world_size): 2" in md


def test_one_process_continues_the_two_process_search(runs):
    before = runs["interrupted"]["phases"]
    two, one = runs["report_two"], runs["report_one"]
    assert before["warmup"]["done"] and not before["search"].get("done")
    assert before["search"]["state"]["epoch"] == 1
    assert one["world_size"] == 1 and one["resumed"] is True
    # The same warm-up, the same first search epoch (read back, not redone), then epoch 2.
    assert one["phases"]["warmup"] == two["phases"]["warmup"] == before["warmup"]["info"]
    history = one["phases"]["search"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0] == before["search"]["state"]["history"][0] == two["phases"]["search"]["history"][0]
    # The rate of the architecture parameters is the two-process run's (kept in the state).
    assert one["phases"]["search"]["lr_nas"] == two["phases"]["search"]["lr_nas"] \
        == before["search"]["state"]["lr_nas"]
    # The schedules count optimizer steps: with two ranks an epoch is half the batches.
    batches = len(index_batches(two["splits"]["train"], 64, np.random.default_rng(0)))
    assert before["search"]["state"]["step"] == batches // 2
    assert json.loads((runs["copy"] / "state.json").read_text())["phases"]["search"]["info"]["epochs"] == 2
    assert one["after"]["params"] <= 0.5 * one["before"]["params"] + 1e-6


def test_the_same_checkpoint_exports_the_same_bytes(runs, tmp_path):
    best = runs["copy"] / "search.best.onnx"
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    export_searchable(best, first)
    export_searchable(best, second)
    assert first.read_bytes() == second.read_bytes()


def test_a_gloo_collective_returns_once_the_backend_has_let_go_of_its_tensors(monkeypatch):
    """gloo wakes the caller before its worker thread drops the collective's tensors; a rank that
    exits right after its last collective must not leave that release to interpreter exit (the
    process aborts there). Here the "worker" holds the tensor in an autograd graph (a C++
    reference) for 50 ms after the operation returns."""
    monkeypatch.setattr(Distributed, "backend", property(lambda self: "gloo"))

    def operation(tensor):
        holder = [(torch.ones(3, requires_grad=True) * tensor).sum()]
        threading.Timer(0.05, holder.clear).start()

    tensor = torch.zeros(3)
    Distributed(world=2)._collective(operation, tensor)
    assert tensor._use_count() == 1


def test_a_resumed_run_goes_on_from_the_checkpointed_loss_scale(tmp_path, monkeypatch):
    """float16 AMP (CUDA) adapts its loss scale step by step; an interrupted and resumed run ends
    with the scale an uninterrupted one has. A CPU GradScaler that grows every 3 steps stands in
    for CUDA's (the flow is the same)."""
    scalers, real = [], torch.amp.GradScaler

    def cpu_scaler(device, enabled=True):
        scalers.append(real("cpu", init_scale=2.0 ** 4, growth_interval=3))
        return scalers[-1]

    monkeypatch.setattr(torch.amp, "GradScaler", cpu_scaler)
    kwargs = dict(target_params="50%", warmup_epochs=1, epochs=3, finetune_epochs=1, threads=1, quiet=True,
                  measure_latency=False)

    def interrupt(phase, epoch, info):
        if phase == "search" and epoch == 1:
            raise KeyboardInterrupt

    po.optimize(MODEL, DATA, output=tmp_path / "straight.onnx", checkpoint_dir=False, **kwargs)
    straight = scalers[-1].state_dict()
    with pytest.raises(KeyboardInterrupt):
        po.optimize(MODEL, DATA, output=tmp_path / "r.onnx", callback=interrupt, **kwargs)
    saved = json.loads((tmp_path / "r.ckpt" / "state.json").read_text())["scaler"]
    assert saved["scale"] > 2.0 ** 4   # it grew during the warm-up and the first search epoch
    po.optimize(MODEL, DATA, output=tmp_path / "r.onnx", **kwargs)
    assert scalers[-1].state_dict() == straight


def test_auto_picks_the_cpu_without_cuda():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_missing_cuda_device_is_one_clear_error(tmp_path, capsys):
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    with pytest.raises(SettingError, match="no CUDA device"):
        resolve_device(missing)
    code = cli_main(["optimize", MODEL, "--data", DATA, "-o", str(tmp_path / "x.onnx"), "--device", missing,
                     "--quiet"])
    assert code == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_an_unknown_device_name_is_refused():
    with pytest.raises(SettingError, match="unknown device 'gpu'"):
        OptimizeConfig(output="x.onnx", device="gpu")


def test_amp_runs_the_forward_in_bfloat16_on_the_cpu_and_keeps_costs_and_parameters_float():
    problem = prepare(MODEL, DATA, "auto", 0, 0.2, 0.2)
    model = po.PIT(problem.base.copy(), cost="params")
    small = TensorSplit(*problem.train.head(128))
    run = Run(Recipe(batch_size=64), problem.task, small, small, Checkpoint(None, ""), Progress(False), 0, amp=True)
    seen = {}

    def record(module, inputs, output) -> None:
        seen["output"] = output.dtype

    model.register_forward_hook(record)

    def regularizer():
        cost = model.cost
        seen["cost"] = cost.dtype
        return 1e-9 * cost

    loss = run.train_epoch("search", model, [adam(model.parameters(), lr=1e-3)], 1, 1, regularizer)
    assert seen == {"output": torch.bfloat16, "cost": torch.float64}
    assert np.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())
