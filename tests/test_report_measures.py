"""The optimize report measures (input and output timed in ONNX Runtime) and draws (SVG plots).

No assertion reads a timing's value (this machine is shared): the tests check what is timed,
on which inputs, how it is reported, and what the plots hold."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from plinio_onnx.optimize import measure, plots

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_cnn.onnx"
DATA = ROOT / "models" / "digits.npz"
SVG = "{http://www.w3.org/2000/svg}"


def _conv_model(path: Path, channels: int, batch="N", domain: str = "") -> None:
    """x [batch, 3, 8, 8] → Conv 3→channels 3×3 → Relu → GlobalAveragePool (y)."""
    weight = onnx.numpy_helper.from_array(np.full((channels, 3, 3, 3), 0.1, np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"], name="relu", domain=domain),
             helper.make_node("GlobalAveragePool", ["r"], ["y"], name="pool")]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, channels, 1, 1])], [weight])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    onnx.save(model, str(path))


def test_measure_times_both_models_on_the_data(tmp_path, monkeypatch):
    big, small = tmp_path / "big.onnx", tmp_path / "small.onnx"
    _conv_model(big, 64)
    _conv_model(small, 8)
    samples = [np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)]
    fed = []
    real = measure.RUNNERS["ort-cpu"]

    def recording(model, feeds, **options):
        fed.append({k: v.shape for k, v in feeds.items()})
        return real(model, feeds, **options)
    monkeypatch.setitem(measure.RUNNERS, "ort-cpu", recording)
    result = measure.measure_latency(big, small, ["x"], samples, budget_s=0.2)
    assert list(result) == measure.runtimes() and measure.runtimes()[0] == "ort-cpu"
    row = result["ort-cpu"]
    assert set(row) == {"input_ms", "output_ms", "speedup", "threads"} and row["threads"] == 1
    assert row["input_ms"] > 0 and row["output_ms"] > 0
    assert row["speedup"] == pytest.approx(row["input_ms"] / row["output_ms"])
    assert fed == [{"x": (1, 3, 8, 8)}, {"x": (1, 3, 8, 8)}]          # one sample: batch 1
    # a model whose batch is fixed at 3 gets the first 3 samples; at 7, the 5 repeated
    _conv_model(small, 8, batch=3)
    feeds = measure._feeds(onnx.load(str(small)), ["x"], samples)
    assert np.array_equal(feeds["x"], samples[0][:3])
    _conv_model(small, 8, batch=7)
    assert np.array_equal(measure._feeds(onnx.load(str(small)), ["x"], samples)["x"], samples[0][[0, 1, 2, 3, 4, 0, 1]])


def test_a_model_the_runtime_cannot_run_is_reported_not_raised(tmp_path):
    good, strange = tmp_path / "good.onnx", tmp_path / "strange.onnx"
    _conv_model(good, 8)
    _conv_model(strange, 8, domain="com.example")
    samples = [np.zeros((2, 3, 8, 8), np.float32)]
    result = measure.measure_latency(good, strange, ["x"], samples, budget_s=0.1)
    assert "ONNX Runtime cannot load the model" in result["ort-cpu"]["error"]
    assert "not measured" in measure.latency_lines(result)[0]


def test_the_report_says_when_the_output_is_not_faster():
    faster = {"ort-cpu": {"input_ms": 2.0, "output_ms": 1.0, "speedup": 2.0, "threads": 1}}
    slower = {"ort-cpu": {"input_ms": 1.0, "output_ms": 1.25, "speedup": 0.8, "threads": 1},
              "openvino-cpu": {"input_ms": 2.0, "output_ms": 1.0, "speedup": 2.0, "threads": 1}}
    assert measure.not_faster(faster) == [] and measure.not_faster(slower) == ["ort-cpu"]
    assert "| ort-cpu | 2.000 | 1.000 | 2.00× |" in measure.latency_markdown(faster)
    assert not any("warning" in line for line in measure.latency_markdown(faster) + measure.latency_lines(faster))
    lines = measure.latency_lines(slower)
    assert len(lines) == 3 and "not faster than the input in ort-cpu (1.250 vs 1.000 ms)" in lines[1]
    assert "- **warning**: the output is not faster than the input in ort-cpu" in measure.latency_markdown(slower)
    assert measure.latency_markdown(None) == [] and measure.latency_lines(None) == []


def _parse(path: "Path | str") -> ET.Element:
    return ET.parse(path).getroot()   # valid XML, or this raises


def test_bars_and_trajectory_svg_hold_one_mark_per_layer_and_epoch():
    rows = [("conv1", 32, 16), ("a<b&c", 64, 8), ("fc", 10, 10)]
    root = ET.fromstring(plots.bars_svg(rows, "channels", "output channels"))
    after = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "after"]
    before = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "before"]
    assert len(after) == len(before) == 3
    widths = [float(r.get("width")) for r in after]
    assert widths[1] == pytest.approx(360 * 8 / 64, abs=0.05) and widths[2] == pytest.approx(360 * 10 / 64, abs=0.05)
    assert "a<b&c: 8 after" in "".join(after[1].itertext())
    history = [{"epoch": e, "cost": 100.0 - 10 * e, "val": {"accuracy": 0.5 + 0.05 * e, "loss": 1.0}}
               for e in range(1, 6)]
    root = ET.fromstring(plots.trajectory_svg(history, "accuracy", "params", 60.0, best_epoch=4))
    points = [c for c in root.iter(f"{SVG}circle") if c.get("class") == "epoch"]
    assert len(points) == 5 and [c.get("class") for c in root.iter(f"{SVG}circle")].count("chosen") == 1
    assert float(points[0].get("cx")) > float(points[-1].get("cx"))     # cost falls: leftwards
    assert float(points[0].get("cy")) > float(points[-1].get("cy"))     # accuracy rises: upwards
    assert len([line for line in root.iter(f"{SVG}line") if line.get("class") == "target"]) == 1


def test_quantizing_methods_plot_bit_widths():
    layers = [{"name": n, "out_before": 8, "out_after": 8, "in_before": 3, "in_after": 3} for n in ("a", "b")]
    report = SimpleNamespace(layers=layers, architecture={"precisions": {"a": {"weight_bits": 4, "input_bits": 8},
                                                                         "b": {"weight_bits": [2, 8], "input_bits": 8}}})
    assert plots.layer_bars(report) == {"bits": [("a", 32, 4), ("b", 32, 5.0)]}
    report.architecture["kept_channels"] = {}
    assert set(plots.layer_bars(report)) == {"channels", "bits"}


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    from plinio_onnx.optimize import optimize
    out = tmp_path_factory.mktemp("measured") / "small.onnx"
    report = optimize(MODEL, DATA, output=out, target_params="60%", warmup_epochs=1, epochs=3, finetune_epochs=0,
                      threads=1, quiet=True)
    return report, out


def test_optimize_reports_measured_latency_and_draws_plots(optimized):
    report, out = optimized
    data = json.loads(out.with_name("small.report.json").read_text())
    row = data["measured_latency"]["ort-cpu"]
    assert row["input_ms"] > 0 and row["speedup"] == pytest.approx(row["input_ms"] / row["output_ms"])
    md = out.with_name("small.report.md").read_text()
    assert "| ort-cpu |" in md and "![channels](small.channels.svg)" in md and "![trajectory](small.trajectory.svg)" in md
    channels = _parse(out.with_name("small.channels.svg"))
    after = [r for r in channels.iter(f"{SVG}rect") if r.get("class") == "after"]
    assert len(after) == len(report.layers) == 5
    assert [float(r.get("width")) for r in after] == pytest.approx(
        [360 * row["out_after"] / max(max(r["out_before"], r["out_after"]) for r in report.layers)
         for row in report.layers], abs=0.05)
    trajectory = _parse(out.with_name("small.trajectory.svg"))
    history = data["phases"]["search"]["history"]
    assert len([c for c in trajectory.iter(f"{SVG}circle") if c.get("class") == "epoch"]) == len(history) >= 1
    assert data["files"]["plot_trajectory"] == str(out.with_name("small.trajectory.svg"))


def test_no_measure_skips_the_timing(tmp_path, monkeypatch, capsys):
    import argparse

    from plinio_onnx.optimize.config import OptimizeConfig, cli_arguments, config_from_cli
    parser = argparse.ArgumentParser()
    for flags, options in cli_arguments():
        parser.add_argument(*flags, **options)
    assert config_from_cli(vars(parser.parse_args(["-o", "o.onnx", "--no-measure"]))).measure_latency is False
    assert OptimizeConfig(output="o.onnx").measure_latency is True
    from plinio_onnx.optimize import flow
    monkeypatch.setattr(flow, "measure_latency", lambda *a, **k: pytest.fail("timed despite --no-measure"))
    from plinio_onnx.cli import main
    out = tmp_path / "m.onnx"
    assert main(["optimize", str(MODEL), "--data", str(DATA), "-o", str(out), "--no-measure", "--epochs", "1",
                 "--warmup-epochs", "0", "--finetune-epochs", "0", "--threads", "1", "--quiet"]) == 0
    assert json.loads(out.with_name("m.report.json").read_text())["measured_latency"] is None
    assert "Measured latency" not in out.with_name("m.report.md").read_text()


def test_a_latency_target_met_in_prediction_but_not_measured_is_noted():
    """MobileNetV2-style at --target-latency 60%: predicted 57.8 %, measured 67.4 % of the
    input's latency — the report says so; within the slack, or with nothing measured, it does not."""
    from plinio_onnx.optimize.measure import latency_target_notes

    constraint = {"kind": "latency", "given": "60%", "before": 2.0e-4, "target": 1.2e-4, "after": 1.156e-4}
    measured = {"ort-cpu": {"input_ms": 0.190, "output_ms": 0.128, "speedup": 0.190 / 0.128}}
    (note,) = latency_target_notes([constraint], measured, "ort-cpu")
    assert "60.0% of the input" in note and "prediction (57.8%)" in note and "measured 67.4%" in note
    assert "0.128 vs 0.190 ms" in note
    close = {"ort-cpu": {"input_ms": 0.190, "output_ms": 0.123, "speedup": 0.190 / 0.123}}   # 64.7 %: in the slack
    assert latency_target_notes([constraint], close, "ort-cpu") == []
    assert latency_target_notes([constraint], measured, "gap8") == []      # an analytical profile: not timed
    assert latency_target_notes([{**constraint, "kind": "params"}], measured, "ort-cpu") == []
    assert latency_target_notes([constraint], {"ort-cpu": {"error": "x"}}, "ort-cpu") == []


def test_a_runtime_timed_in_its_own_process_reports_like_one_timed_here(tmp_path, monkeypatch):
    """OpenVINO is timed in a child process (loaded here it corrupts later forks); the child's
    answer has the same form, and a child that fails is one error in the report, not a crash."""
    big, small = tmp_path / "big.onnx", tmp_path / "small.onnx"
    _conv_model(big, 64)
    _conv_model(small, 8)
    samples = [np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)]
    monkeypatch.setattr(measure, "ISOLATED", ("ort-cpu",))
    monkeypatch.setattr(measure, "runtimes", lambda: ["ort-cpu"])   # OpenVINO, if installed, not timed in here
    row = measure.measure_latency(big, small, ["x"], samples, budget_s=0.2)["ort-cpu"]
    assert set(row) == {"input_ms", "output_ms", "speedup", "threads"}
    assert row["input_ms"] > 0 and row["speedup"] == pytest.approx(row["input_ms"] / row["output_ms"])

    broken = measure.measure_latency(big, tmp_path / "missing.onnx", ["x"], samples, budget_s=0.2)["ort-cpu"]
    assert set(broken) == {"error"} and "ort-cpu" in broken["error"]
