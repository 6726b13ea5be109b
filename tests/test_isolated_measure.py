"""A latency table measured in a process of its own (`plinio_onnx.hardware.isolated`): the path
`optimize --hardware openvino-cpu` takes so that OpenVINO is never loaded into the process that
trains next. The mechanism is runtime-agnostic, so it is checked here with ONNX Runtime;
`tests/with_openvino` checks OpenVINO itself where it is installed."""
from __future__ import annotations

import sys
from dataclasses import asdict

import pytest

import plinio_onnx as po
from plinio_onnx.hardware import measured
from plinio_onnx.hardware.isolated import measure_in_child
from plinio_onnx.runtime import ISOLATED_RUNTIMES

from test_measured import _tiny


def test_table_measured_in_a_child_process(tmp_path, monkeypatch):
    path = tmp_path / "tiny.onnx"
    _tiny(path)
    in_here = []
    monkeypatch.setattr(measured, "measure", lambda *a, **k: in_here.append(a))   # must not run in this process
    seen = []
    table_file = measure_in_child(path, runtime="ort-cpu", channel_multiple=8, threads=1, repeats=2,
                                  progress=lambda *a: seen.append(a))
    assert not in_here and table_file == tmp_path / "tiny.ort-cpu.json"
    assert seen[0] == (0, 4, "conv1") and seen[-1] == (4, 4, "")   # the child's progress, forwarded
    table = measured.LatencyTable.load(table_file)
    grids = {name: (t.in_grid, t.out_grid) for name, t in table.layers.items()}
    assert grids == {"conv1": ([4], [8, 16]), "dw": ([], [8, 16]), "conv2": ([8, 16], [8]), "fc": ([8], [4])}
    # What the child wrote is the cache this process reads (the same runtime version and grid).
    assert measured.cached_table(path, runtime="ort-cpu", channel_multiple=8) is not None


def test_child_errors_come_back_as_they_were(tmp_path):
    path = tmp_path / "tiny.onnx"
    with pytest.raises(po.PlinioOnnxError, match="tiny.onnx: no such model file"):
        measure_in_child(path, runtime="ort-cpu", channel_multiple=8, threads=1, repeats=2)
    _tiny(path)
    with pytest.raises(po.PlinioOnnxError, match="unknown measured runtime 'tpu'"):
        measure_in_child(path, runtime="tpu", channel_multiple=8, threads=1, repeats=2)


def test_for_model_times_isolated_runtimes_in_a_child(tmp_path, monkeypatch):
    from plinio_onnx.hardware import model_profile

    path = tmp_path / "tiny.onnx"
    _tiny(path)
    sha = measured._sha256(path)
    written = measured.LatencyTable(sha, 8, 1, "2026.4.1", runtime="openvino-cpu", calibration="none",
                                    layers={"fc": measured.LayerTable("Gemm", [8], [4], [[2e-6]])})
    calls = []

    def child(model, **options):
        calls.append((str(model), options["runtime"], options["channel_multiple"], options["repeats"]))
        return written.save(measured.table_path(model, options["runtime"]))

    monkeypatch.setattr(model_profile, "measure_in_child", child)
    monkeypatch.setattr(measured, "measure", lambda *a, **k: pytest.fail("measured in this process"))
    monkeypatch.setattr(measured.Timer, "runtime_version", staticmethod(lambda runtime: "2026.4.1"))
    assert "openvino-cpu" in ISOLATED_RUNTIMES
    profile = po.hardware.for_model("openvino-cpu", path, channel_multiple=8)
    assert calls == [(str(path), "openvino-cpu", 8, model_profile.MEASURE_REPEATS)]
    assert asdict(profile.latency) == asdict(written) and profile.source == str(tmp_path / "tiny.openvino-cpu.json")
    po.hardware.for_model("openvino-cpu", path, channel_multiple=8)   # cached: no second child
    assert len(calls) == 1 and "openvino" not in sys.modules
    # A child that leaves no matching table is an error, not a measurement in this process.
    monkeypatch.setattr(model_profile, "measure_in_child", lambda model, **options: None)
    with pytest.raises(po.PlinioOnnxError, match="does not describe the model"):
        po.hardware.for_model("openvino-cpu", path, channel_multiple=8, threads=2)
