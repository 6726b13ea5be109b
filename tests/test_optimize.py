"""End to end: ``plinio-onnx optimize`` / ``export`` on the digits CNN (short epoch budgets)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

import plinio_onnx as po
from plinio_onnx.cli import main
from plinio_onnx.optimize import optimize, parse_amount
from plinio_onnx.optimize.data import split_indices

from _util import MODELS, one_torch_thread, run_ort  # noqa: F401  (the fixture, found by name)

# torch on one thread for the whole module (the fixture is module-scoped)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = MODELS / "digits_cnn.onnx"
DATA = MODELS / "digits.npz"
BASE_PARAMS = 47_530
FAST = ["--warmup-epochs", "3", "--epochs", "6", "--finetune-epochs", "2", "--threads", "1", "--quiet"]


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    """One CLI run with a 50 % parameter target, shared by the checks below."""
    folder = tmp_path_factory.mktemp("optimize")
    out = folder / "digits_pit.onnx"
    digest = _sha(MODEL)
    rc = main(["optimize", str(MODEL), "--method", "pit", "--data", str(DATA), "-o", str(out),
               "--target-params", "50%", *FAST])
    return {"rc": rc, "out": out, "folder": folder, "model_sha": digest}


def test_optimize_writes_a_deployable_model_within_target(optimized):
    assert optimized["rc"] == 0
    out = optimized["out"]
    assert out.is_file()
    graph = po.load(out)
    assert po.cost.total(graph, po.cost.params) <= BASE_PARAMS * 0.5
    proto = onnx.load(str(out))
    assert all(o.domain in ("", "ai.onnx") for o in proto.opset_import)
    assert proto.ir_version == 10
    x = np.load(DATA)["x"][:16]
    (logits,) = run_ort(proto, {"input": x})
    assert logits.shape == (16, 10)


def test_optimize_report_and_input_untouched(optimized):
    out, folder = optimized["out"], optimized["folder"]
    assert _sha(MODEL) == optimized["model_sha"]
    report = json.loads((folder / "digits_pit.report.json").read_text())
    md = (folder / "digits_pit.report.md").read_text()
    assert "params" in md and "accuracy" in md
    assert report["task"] == "classification" and report["metric"] == "accuracy"
    assert report["before"]["params"] == BASE_PARAMS
    assert report["after"]["params"] == po.cost.total(po.load(out), po.cost.params)
    assert report["after"]["params"] <= report["target"]["value"]
    assert report["after"]["test"]["accuracy"] > 0.5          # measured in ONNX Runtime
    assert sum(report["splits"].values()) == 1797
    assert set(report["architecture"]["kept_channels"]) >= {"/conv1/Conv", "/fc1/Gemm"}
    assert {row["name"] for row in report["layers"]} >= {"/conv1/Conv", "/fc2/Gemm"}
    # The searchable checkpoint exports to the same architecture.
    searchable = folder / "digits_pit.ckpt" / "search.best.onnx"
    assert searchable.is_file()
    again = folder / "again.onnx"
    assert main(["export", str(searchable), "-o", str(again)]) == 0
    assert po.cost.total(po.load(again), po.cost.params) == report["after"]["params"]


def test_rerun_after_completion_reuses_checkpoint(optimized, capsys):
    out = optimized["out"]
    before = json.loads((optimized["folder"] / "digits_pit.report.json").read_text())
    rc = main(["optimize", str(MODEL), "--data", str(DATA), "-o", str(out), "--target-params", "50%", *FAST])
    assert rc == 0
    after = json.loads((optimized["folder"] / "digits_pit.report.json").read_text())
    assert after["resumed"] is True
    assert after["after"]["params"] == before["after"]["params"]
    assert after["phases"]["search"]["best_epoch"] == before["phases"]["search"]["best_epoch"]
    # A new fine-tune budget redoes the fine-tune only.
    fast = [a if a != "2" else "1" for a in FAST]
    assert main(["optimize", str(MODEL), "--data", str(DATA), "-o", str(out), "--target-params", "50%", *fast]) == 0
    third = json.loads((optimized["folder"] / "digits_pit.report.json").read_text())
    assert third["phases"]["finetune"]["epochs"] <= 1
    assert third["phases"]["search"] == after["phases"]["search"]


def test_resume_after_interrupt(tmp_path):
    out = tmp_path / "r.onnx"
    kwargs = dict(output=out, target_params="30%", warmup_epochs=2, epochs=5, finetune_epochs=1,
                  progress=False, quiet=True)
    seen = []

    def interrupt(phase, epoch, info):
        seen.append((phase, epoch))
        if phase == "search" and epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        optimize(MODEL, DATA, callback=interrupt, **kwargs)
    assert not out.exists()
    state = json.loads((tmp_path / "r.ckpt" / "state.json").read_text())
    assert state["phases"]["warmup"]["done"] and state["phases"]["search"]["state"]["epoch"] == 2

    resumed = []
    report = optimize(MODEL, DATA, callback=lambda p, e, i: resumed.append((p, e)), **kwargs)
    assert report.resumed
    assert ("warmup", 1) not in resumed and ("search", 1) not in resumed and ("search", 2) not in resumed
    assert ("search", 3) in resumed
    assert report.phases["search"]["epochs"] == 5
    assert [h["epoch"] for h in report.phases["search"]["history"]] == [1, 2, 3, 4, 5]
    assert report.after["params"] <= 0.3 * BASE_PARAMS
    assert out.is_file()
    # Resuming is exact: the same weights as a run that was never interrupted.
    straight = tmp_path / "straight.onnx"
    optimize(MODEL, DATA, **{**kwargs, "output": straight, "checkpoint_dir": False})
    a, b = onnx.load(str(out)), onnx.load(str(straight))
    for x, y in zip(a.graph.initializer, b.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(x), onnx.numpy_helper.to_array(y))


def test_distillation_without_labels(tmp_path):
    data = np.load(DATA)
    unlabeled = tmp_path / "x_only.npz"
    np.savez(unlabeled, input=data["x"][:400])       # named after the graph input
    out = tmp_path / "d.onnx"
    report = optimize(MODEL, unlabeled, output=out, strength=1e-5, epochs=3, finetune_epochs=1,
                      checkpoint_dir=False, progress=False, quiet=True)
    assert report.task == "distill" and report.metric == "mse"
    assert report.phases["warmup"]["epochs"] == 0            # the input model is the teacher
    assert "agreement" in report.after["test"]
    assert not (tmp_path / "d.ckpt").exists()
    (y,) = run_ort(out, {"input": data["x"][:4]})
    assert y.shape == (4, 10)


def test_regression_labels_and_macs_target(tmp_path):
    data = np.load(DATA)
    onehot = np.eye(10, dtype=np.float32)[data["y"][:300]]
    path = tmp_path / "reg.npz"
    np.savez(path, x=data["x"][:300], y=onehot)
    report = optimize(MODEL, path, output=tmp_path / "m.onnx", target_macs="60%", warmup_epochs=2, epochs=4,
                      finetune_epochs=1, checkpoint_dir=False, progress=False, quiet=True)
    assert report.task == "regression" and report.cost == "macs"
    assert report.after["macs"] <= 0.6 * report.before["macs"]
    assert po.cost.total(po.load(tmp_path / "m.onnx"), po.cost.macs) == report.after["macs"]


def _one_line_error(capsys, argv) -> str:
    try:
        rc = main(argv)
    except SystemExit as exit_:                     # argparse usage errors
        rc = exit_.code
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / "o.onnx")
    err = _one_line_error(capsys, ["optimize", str(MODEL), "--data", str(tmp_path / "none.npz"), "-o", out])
    assert "no such data file" in err
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((20, 1, 7, 7), np.float32), y=np.zeros(20, np.int64))
    err = _one_line_error(capsys, ["optimize", str(MODEL), "--data", str(bad), "-o", out])
    assert "shape" in err
    err = _one_line_error(capsys, ["optimize", str(MODEL), "--method", "prune-it", "--data", str(DATA), "-o", out])
    assert "pit" in err and "prune-it" in err
    err = _one_line_error(capsys, ["optimize", str(MODEL), "--data", str(DATA), "-o", str(MODEL)])
    assert "overwrite" in err
    err = _one_line_error(capsys, ["optimize", str(MODEL), "--data", str(DATA), "-o", out, "--target-params", "half"])
    assert "percentage" in err
    err = _one_line_error(capsys, ["optimize", str(MODEL), "--data", str(DATA), "-o", out,
                                   "--target-params", "50%", "--strength", "1e-6"])
    assert "exclusive" in err
    err = _one_line_error(capsys, ["optimize", str(MODEL), "--data", str(DATA), "-o", out, "--target-params", "10"])
    assert "smallest" in err
    err = _one_line_error(capsys, ["optimize", str(MODEL), "-o", out])            # argparse, still one line
    assert "--data" in err
    err = _one_line_error(capsys, ["export", str(MODEL), "-o", out])
    assert "searchable" in err
    assert not (tmp_path / "o.onnx").exists()


def test_console_entry_point_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "plinio_onnx.cli", "optimize", str(MODEL), "--method", "darts",
                             "--data", str(DATA), "-o", str(tmp_path / "o.onnx")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "darts" in result.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_parse_amount():
    assert parse_amount("50%", 1000, what="t") == 500
    assert parse_amount("12k", 1, what="t") == 12000
    assert parse_amount(300, 1, what="t") == 300
    assert parse_amount("1.5M", 1, what="t") == 1.5e6
    for bad in ("0%", "150%", "-3", "x"):
        with pytest.raises(po.PlinioOnnxError):
            parse_amount(bad, 1000, what="t")


def test_splits_are_disjoint_stratified_and_seeded():
    y = np.load(DATA)["y"]
    train, val, test = split_indices(len(y), y, 0, 0.2, 0.2)
    assert len(set(train) | set(val) | set(test)) == len(y) == len(train) + len(val) + len(test)
    assert abs(len(test) - 0.2 * len(y)) <= 2
    assert np.all(np.abs(np.bincount(y[test], minlength=10) / len(test) - np.bincount(y) / len(y)) < 0.02)
    again = split_indices(len(y), y, 0, 0.2, 0.2)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))


@pytest.mark.parametrize("method", ["mps", "qat", "pit+mps"])
def test_quantizing_methods_write_qdq_models(tmp_path, method):
    out = tmp_path / "q.onnx"
    assert main(["optimize", str(MODEL), "--method", method, "--data", str(DATA), "-o", str(out)] + FAST) == 0
    graph = po.load(out)
    ops = {n.op for n in graph.nodes}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert not any((n.domain or "") == "ai.plinio" for n in graph.nodes)
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["after"]["test"]["accuracy"] > 0.8
    x = np.load(DATA)["x"][:8]
    assert run_ort(out, {"input": x})[0].shape == (8, 10)


def test_supernet_method_meets_a_macs_target(tmp_path):
    out = tmp_path / "sn.onnx"
    assert main(["optimize", str(MODEL), "--method", "supernet", "--data", str(DATA), "-o", str(out),
                 "--target-macs", "40%"] + FAST) == 0
    assert po.cost.total(po.load(out), po.cost.macs) <= 0.4 * po.cost.total(po.load(MODEL), po.cost.macs)


def test_targets_are_refused_for_quantizing_methods(tmp_path, capsys):
    code = main(["optimize", str(MODEL), "--method", "mps", "--data", str(DATA), "-o", str(tmp_path / "x.onnx"),
                 "--target-params", "50%"] + FAST)
    assert code != 0 and "does not apply" in capsys.readouterr().err


def test_options_are_spelled_once_in_the_config():
    """The command line's flags are `OptimizeConfig`'s fields: parsing them gives the config the
    keywords give."""
    import argparse

    from plinio_onnx.optimize.config import OptimizeConfig, cli_arguments, config_from_cli
    parser = argparse.ArgumentParser()
    for flags, options in cli_arguments():
        parser.add_argument(*flags, **options)
    argv = ["-o", "s.onnx", "--method", "supernet", "--target-macs", "40%", "--epochs", "7", "--warmup-epochs",
            "0", "--finetune-epochs", "3", "--labels", "classification", "--batch-size", "16", "--seed", "4",
            "--checkpoint-dir", "ck", "--threads", "2", "--quiet"]
    config = config_from_cli(vars(parser.parse_args(argv)))
    assert config == OptimizeConfig(output="s.onnx", method="supernet", target_macs="40%", epochs=7, warmup_epochs=0,
                                    finetune_epochs=3, labels="classification", batch_size=16, seed=4,
                                    checkpoint_dir="ck", threads=2, quiet=True)
    assert config.cost_name == "macs" and config.target_kind == "macs"
    assert config.recipe_with_overrides.search_epochs == 7 and config.recipe_with_overrides.batch_size == 16
    assert config_from_cli(vars(parser.parse_args(["-o", "d.onnx"]))) == OptimizeConfig(output="d.onnx")
    assert OptimizeConfig(output="d.onnx", method="mps").cost_name == "size"   # the method's default cost


def test_config_refuses_bad_options_before_any_work(tmp_path):
    from plinio_onnx.optimize import OptimizeConfig
    for options, message in (({"output": "x.txt"}, ".onnx"), ({"epochs": -1}, "negative"),
                             ({"batch_size": 0}, "at least 1"), ({"method": "darts"}, "darts"),
                             ({"labels": "maybe"}, "labels"), ({"cost": "watts"}, "watts"),
                             ({"strength": float("nan")}, "non-negative"),
                             ({"target_params": "5%", "cost": "macs"}, "conflicts")):
        with pytest.raises(po.PlinioOnnxError, match=message):
            OptimizeConfig(**{"output": "o.onnx", **options})
    with pytest.raises(TypeError):
        optimize(MODEL, tmp_path / "never-read.npz", output=tmp_path / "o.onnx", epoch=3)   # a misspelt option
    base = OptimizeConfig(output=tmp_path / "o.onnx", method="qat")
    with pytest.raises(po.PlinioOnnxError, match="does not apply"):
        optimize(MODEL, DATA, base, target_params="50%")          # keywords override the config's fields


def test_checkpoint_fingerprint_options_are_those_of_earlier_releases():
    """The options hashed into ``state.json``'s fingerprint, exactly as earlier releases wrote
    them: a checkpoint they made still resumes."""
    from plinio_onnx.optimize import OptimizeConfig
    config = OptimizeConfig(output="o.onnx", target_params="30%", warmup_epochs=2, epochs=5, finetune_epochs=1)
    expected = (
        '{"batch_size": 32, "cost": "params", "labels": "auto", "method": "pit", "recipe": {"batch_size": 32, '
        '"floor": 0.95, "lambda_down": 0.99, "lambda_init": 1.0, "lambda_up": 1.01, "lr": 0.01, "lr_nas": null, '
        '"lr_net": 0.001, "margin": 0.97, "momentum": 0.9, "nas_reach": 0.3, "patience": 10, "ramp": 0.4, '
        '"relax": 0.97, "search_patience": 15, "settle": true, "test_fraction": 0.2, "val_fraction": 0.2, '
        '"weight_decay": 0.0001, "weight_decay_net": 0.0001}, "seed": 0, "strength": null, "target": 14259.0, '
        '"target_kind": "params"}')
    assert json.dumps(config.fingerprint(config.recipe_with_overrides, 14259.0), sort_keys=True, default=str) == expected
