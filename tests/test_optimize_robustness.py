"""`plinio-onnx optimize` on bad input: one named error, exit code 2, nothing written; and the
files it leaves (locks, temporaries, permissions) after a crash or a second run."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from _util import MODELS
from plinio_onnx.cli import main

MODEL = MODELS / "digits_cnn.onnx"
DATA = MODELS / "digits.npz"
SHORT = ("--epochs", "1", "--warmup-epochs", "1", "--finetune-epochs", "1", "--quiet")


def _optimize(capsys, model, data, out: Path, *extra) -> tuple[int, str]:
    code = main(["optimize", str(model), "--data", str(data), "-o", str(out), *SHORT, *extra])
    return code, capsys.readouterr().err


def _digits() -> dict[str, np.ndarray]:
    with np.load(DATA) as d:
        return {"x": d["x"], "y": d["y"]}


def _outputs(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.stem) and p.suffix != ".ckpt"
                  and not p.is_dir())


def _refused(code: int, err: str, out: Path, *words: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and "internal error" not in err, err
    for word in words:
        assert word in err, err
    assert not out.exists() and not any(p.suffix == ".json" for p in out.parent.glob(out.stem + "*")), err


# -- 1. NaN/Inf -------------------------------------------------------------------------------
def test_nan_weight_is_refused_naming_the_initializer(tmp_path, capsys):
    model = onnx.load(MODEL)
    init = model.graph.initializer[0]
    values = numpy_helper.to_array(init).copy()
    values.flat[3] = np.nan
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(model, tmp_path / "nan.onnx")
    code, err = _optimize(capsys, tmp_path / "nan.onnx", DATA, tmp_path / "out.onnx")
    _refused(code, err, tmp_path / "out.onnx", "NaN/Inf in the weights", repr(init.name), "nan.onnx")


def test_nan_samples_in_x_are_refused_naming_the_array_and_sample(tmp_path, capsys):
    arrays = _digits()
    arrays["x"][[4, 9]] = np.nan
    np.savez(tmp_path / "d.npz", **arrays)
    code, err = _optimize(capsys, MODEL, tmp_path / "d.npz", tmp_path / "out.onnx")
    _refused(code, err, tmp_path / "out.onnx", "NaN/Inf in the data", "'x'", "first in sample 4", "(2 samples)")


def test_inf_in_regression_targets_is_refused(tmp_path, capsys):
    arrays = _digits()
    y = np.zeros((len(arrays["x"]), 10), np.float32)
    y[7, 2] = np.inf
    np.savez(tmp_path / "d.npz", x=arrays["x"], y=y)
    code, err = _optimize(capsys, MODEL, tmp_path / "d.npz", tmp_path / "out.onnx")
    _refused(code, err, tmp_path / "out.onnx", "NaN/Inf in the data", "'y'", "1 Inf")


def test_a_diverging_training_loss_stops_the_run(tmp_path, capsys):
    arrays = _digits()   # finite targets whose squared error overflows float32
    np.savez(tmp_path / "d.npz", x=arrays["x"], y=np.full((len(arrays["x"]), 10), 1e20, np.float32))
    code, err = _optimize(capsys, MODEL, tmp_path / "d.npz", tmp_path / "out.onnx")
    _refused(code, err, tmp_path / "out.onnx", "NaN/Inf in the training loss", "warmup epoch 1")


# -- 2. shapes --------------------------------------------------------------------------------
class _Net(torch.nn.Module):
    def __init__(self, fixed_batch: bool = False) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)
        self.fixed_batch = fixed_batch

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(h.reshape(1, 8) if self.fixed_batch else h)


def _export(net, path: Path, batch: int, axes: dict | None) -> Path:
    torch.onnx.export(net, torch.zeros(batch, 1, 8, 8), path, dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes=axes)
    return path


def test_symbolic_spatial_sizes_come_from_the_data_and_the_report_says_so(tmp_path, capsys):
    torch.manual_seed(0)
    model = _export(_Net(), tmp_path / "sym.onnx", 2, {"x": {0: "N", 2: "H", 3: "W"}})
    code, err = _optimize(capsys, model, DATA, tmp_path / "out.onnx")
    assert code == 0, err
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["notes"] == ["symbolic input sizes taken from the data: x ['N', 1, 'H', 'W'] → ['N', 1, 8, 8]"]
    assert "note: symbolic input sizes taken from the data" in (tmp_path / "out.report.md").read_text()
    dims = [d.dim_value or d.dim_param for d in onnx.load(tmp_path / "out.onnx").graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [1, 8, 8]


def test_a_fixed_batch_with_a_hard_coded_reshape_is_refused_up_front(tmp_path, capsys):
    model = _export(_Net(fixed_batch=True), tmp_path / "fixed.onnx", 1, None)
    code, err = _optimize(capsys, model, DATA, tmp_path / "out.onnx")
    _refused(code, err, tmp_path / "out.onnx", "fixes the batch size to 1", "fixed.onnx")
    assert not (tmp_path / "out.ckpt").exists()


# -- 7. labels and options --------------------------------------------------------------------
def test_out_of_range_class_labels_are_named_as_such(tmp_path, capsys):
    arrays = _digits()
    arrays["y"][5] = 12
    np.savez(tmp_path / "d.npz", **arrays)
    code, err = _optimize(capsys, MODEL, tmp_path / "d.npz", tmp_path / "out.onnx")
    _refused(code, err, tmp_path / "out.onnx", "d.npz: class labels 'y' range over 0..12", "10 classes")
    assert "regression" not in err


# -- 3. named errors for outputs and checkpoints ----------------------------------------------
def _interrupted(out: Path) -> Path:
    """A checkpoint of a run stopped after search epoch 1 (an optimizer .npz in it); its folder."""
    from plinio_onnx.optimize import optimize

    def stop(phase, epoch, info):
        if phase == "search" and epoch == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        optimize(MODEL, DATA, output=out, epochs=2, warmup_epochs=1, finetune_epochs=1, quiet=True, callback=stop)
    folder = out.with_suffix(".ckpt")
    assert (folder / "search-e0001.optim.npz").is_file() and not (folder / "lock").exists()
    return folder


def _rerun(capsys, out: Path) -> tuple[int, str]:
    code = main(["optimize", str(MODEL), "--data", str(DATA), "-o", str(out), "--epochs", "2",
                 "--warmup-epochs", "1", "--finetune-epochs", "1", "--quiet"])
    return code, capsys.readouterr().err


def test_an_unwritable_output_or_checkpoint_folder_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    calls = []
    from plinio_onnx.optimize import optimize
    from plinio_onnx.errors import OutputError
    for options in ({"output": tmp_path / "file" / "out.onnx"},
                    {"output": tmp_path / "out.onnx", "checkpoint_dir": tmp_path / "file" / "ck"}):
        with pytest.raises(OutputError, match="folder"):
            optimize(MODEL, DATA, **options, epochs=1, quiet=True,
                     callback=lambda *a: calls.append(a))
    assert calls == []   # not one epoch trained
    code, err = _optimize(capsys, MODEL, DATA, tmp_path / "file" / "o.onnx")
    assert code == 2 and "the output folder is a file" in err and "internal error" not in err


def test_a_truncated_optimizer_file_is_a_named_checkpoint_error(tmp_path, capsys):
    folder = _interrupted(tmp_path / "out.onnx")
    npz = folder / "search-e0001.optim.npz"
    npz.write_bytes(npz.read_bytes()[:100])
    code, err = _rerun(capsys, tmp_path / "out.onnx")
    assert code == 2 and "damaged checkpoint file (BadZipFile" in err and str(npz) in err, err
    assert f"delete {folder} to start over" in err and not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("path, value, message", [
    (("search", "state", "epoch"), "1", "search.state.epoch is str '1', expected int"),
    (("search", "optim_file"), "../../x.npz", "expected a file name in the checkpoint folder"),
    (("warmup",), [1, 2], "phase 'warmup' is list"),
])
def test_a_state_json_with_wrong_types_is_a_named_checkpoint_error(tmp_path, capsys, path, value, message):
    folder = _interrupted(tmp_path / "out.onnx")
    state = json.loads((folder / "state.json").read_text())
    record = state["phases"]
    for key in path[:-1]:
        record = record[key]
    record[path[-1]] = value
    (folder / "state.json").write_text(json.dumps(state))
    code, err = _rerun(capsys, tmp_path / "out.onnx")
    assert code == 2 and "damaged checkpoint state" in err and message in err, err


def test_the_same_command_still_resumes_and_says_so_on_stderr(tmp_path, capsys):
    folder = _interrupted(tmp_path / "out.onnx")
    code = main(["optimize", str(MODEL), "--data", str(DATA), "-o", str(tmp_path / "out.onnx"), "--epochs", "2",
                 "--warmup-epochs", "1", "--finetune-epochs", "1"])
    captured = capsys.readouterr()   # not a terminal: the note is printed all the same
    assert code == 0 and f"resuming from {folder}" in captured.err, captured.err
    assert json.loads((tmp_path / "out.report.json").read_text())["resumed"] is True
    code = main(["optimize", str(MODEL), "--data", str(DATA), "-o", str(tmp_path / "out.onnx"), "--epochs", "2",
                 "--warmup-epochs", "1", "--finetune-epochs", "1", "--seed", "5"])
    captured = capsys.readouterr()
    assert code == 0 and "was made by another command; starting over" in captured.err, captured.err
    code = main(["optimize", str(MODEL), "--data", str(DATA), "-o", str(tmp_path / "out.onnx"), "--epochs", "2",
                 "--warmup-epochs", "1", "--finetune-epochs", "1", "--seed", "6", "--quiet"])
    assert code == 0 and capsys.readouterr().err == ""   # --quiet stays quiet


def test_a_live_lock_blocks_a_second_run_and_a_stale_one_does_not(tmp_path, capsys):
    import socket
    import subprocess
    import sys
    folder = tmp_path / "out.ckpt"
    folder.mkdir()
    lock = folder / "lock"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": alive.pid, "host": socket.gethostname()}))
        code, err = _optimize(capsys, MODEL, DATA, tmp_path / "out.onnx")
        assert code == 2 and f"another optimize run (pid {alive.pid}" in err and str(lock) in err, err
        assert lock.exists() and not (tmp_path / "out.onnx").exists()
    finally:
        alive.kill()
        alive.wait()
    # the process is gone: its lock is stale, taken over and released at the end
    code, err = _optimize(capsys, MODEL, DATA, tmp_path / "out.onnx")
    assert code == 0, err
    assert (tmp_path / "out.onnx").is_file() and not lock.exists()


# -- 4. temporaries and permissions -----------------------------------------------------------
def test_a_rerun_removes_stale_temporaries_of_its_own_outputs_only(tmp_path, capsys):
    folder = _interrupted(tmp_path / "out.onnx")
    ours = [tmp_path / ".out.onnx.0123abcd.tmp", tmp_path / ".out.report.json.89abcdef.tmp",
            folder / ".search-e0002.onnx.deadbeef.tmp", folder / ".state.json.00ff00ff.tmp"]
    others = [tmp_path / ".other.onnx.0123abcd.tmp", tmp_path / "out.onnx.tmp", folder / "notes.tmp"]
    for path in ours + others:
        path.write_bytes(b"partial")
    code, err = _rerun(capsys, tmp_path / "out.onnx")
    assert code == 0, err
    assert not any(p.exists() for p in ours) and all(p.exists() for p in others)


def test_outputs_honour_the_umask(tmp_path, capsys):
    from plinio_onnx.atomic import write_text
    previous = os.umask(0o027)
    try:
        write_text(tmp_path / "a.txt", "x")
        code, err = _optimize(capsys, MODEL, DATA, tmp_path / "out.onnx")
    finally:
        os.umask(previous)
    assert code == 0, err
    for name in ("a.txt", "out.onnx", "out.report.json", "out.report.md", "out.ckpt/state.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


# -- 6. export names the method ---------------------------------------------------------------
@pytest.mark.parametrize("method", ["qat", "pit+mps"])
def test_export_names_the_method_the_checkpoint_was_searched_with(tmp_path, capsys, method):
    code, err = _optimize(capsys, MODEL, DATA, tmp_path / "out.onnx", "--method", method)
    assert code == 0, err
    searchable = tmp_path / "out.ckpt" / "search.best.onnx"
    assert main(["export", str(searchable), "-o", str(tmp_path / "e.onnx")]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'e.onnx'}: {method} → ")
    assert "plinio.method" not in {p.key for p in onnx.load(tmp_path / "e.onnx").metadata_props}
    # a checkpoint written before the method was recorded: detected from its records as before
    old = onnx.load(searchable)
    kept = [p for p in old.metadata_props if p.key != "plinio.method"]
    del old.metadata_props[:]
    old.metadata_props.extend(kept)
    onnx.save(old, tmp_path / "old.onnx")
    assert main(["export", str(tmp_path / "old.onnx"), "-o", str(tmp_path / "e2.onnx")]) == 0
    assert capsys.readouterr().out.split(": ")[1].split(" ")[0] in ("mps", "pit")


def test_batch_size_below_one_is_a_usage_error(tmp_path, capsys):
    for value in ("0", "-2"):
        code, err = _optimize(capsys, MODEL, DATA, tmp_path / "out.onnx", "--batch-size", value)
        assert code == 2 and "batch size must be at least 1" in err
    assert not list(tmp_path.iterdir())


def test_several_inputs_and_outputs_are_read_by_name_and_distilled(tmp_path):
    class TwoInTwoOut(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(1, 8, 3, padding=1)
            self.head, self.fc = torch.nn.Conv2d(8, 4, 1), torch.nn.Linear(8 * 8 * 8, 3)

        def forward(self, x, side):
            h = torch.relu(self.a(x) + self.b(side))
            return self.head(h), self.fc(h.flatten(1))

    path = tmp_path / "two.onnx"
    batch = {"x": {0: "N"}, "side": {0: "N"}, "map": {0: "N"}, "logits": {0: "N"}}
    torch.onnx.export(TwoInTwoOut(), (torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)), path, opset_version=17,
                      input_names=["x", "side"], output_names=["map", "logits"], dynamic_axes=batch, dynamo=False)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", side=rng.random((64, 1, 8, 8), dtype=np.float32),
             x=rng.random((64, 1, 8, 8), dtype=np.float32))
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(path), "--method", "pit", "--data", str(tmp_path / "d.npz"), "-o", str(out),
                 "--epochs", "1", "--warmup-epochs", "1", "--finetune-epochs", "1", "--quiet"]) == 0
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["task"] == "distill"
    exported = onnx.load(out)
    assert [i.name for i in exported.graph.input] == ["x", "side"]
    assert [o.name for o in exported.graph.output] == ["map", "logits"]
