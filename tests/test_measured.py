"""Measured ONNX Runtime latency tables: grids, the cache beside the model, interpolation.

No assertion reads a timing (this machine is shared and noisy): the tests check what is timed,
where it is kept, and how the table is read."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import plinio_onnx as po
from plinio_onnx.hardware import measured, timing
from plinio_onnx.hardware.measured import LayerTable


def _tiny(path, scale: float = 0.1) -> None:
    """conv 4→16 3×3 on 6×6 → depthwise 3×3 → conv 16→8 1×1 → pool → flatten → Gemm 8→4."""
    def init(name, *shape):
        return onnx.numpy_helper.from_array(np.full(shape, scale, np.float32), name)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["d"], name="dw", kernel_shape=[3, 3], pads=[1] * 4, group=16),
             helper.make_node("Conv", ["d", "w3"], ["c"], name="conv2", kernel_shape=[1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w4", "b4"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [init("w1", 16, 4, 3, 3), init("b1", 16), init("w2", 16, 1, 3, 3), init("w3", 8, 16, 1, 1),
                               init("w4", 4, 8), init("b4", 4)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_grids_and_cache_beside_the_model(tmp_path, monkeypatch):
    path = tmp_path / "tiny.onnx"
    _tiny(path)
    seen = []
    table = measured.load_or_measure(path, channel_multiple=8, repeats=2, progress=lambda *a: seen.append(a))
    grids = {name: (t.in_grid, t.out_grid) for name, t in table.layers.items()}
    assert grids == {"conv1": ([4], [8, 16]), "dw": ([], [8, 16]), "conv2": ([8, 16], [8]), "fc": ([8], [4])}
    assert all(s > 0 for t in table.layers.values() for row in t.seconds for s in row)
    assert [len(t.seconds) for t in table.layers.values()] == [1, 1, 2, 1]
    assert seen[0] == (0, 4, "conv1") and seen[-1] == (4, 4, "")
    cache = tmp_path / "tiny.ort-cpu.json"
    assert measured.table_path(path) == cache and cache.exists()

    # reused while it describes the model: nothing is timed again
    def no_timing(*args):
        raise AssertionError("timed again")
    monkeypatch.setattr(timing.Timer, "time", no_timing)
    monkeypatch.setattr(timing.Timer, "times", no_timing)
    again = measured.load_or_measure(path, channel_multiple=8)
    assert {n: t.seconds for n, t in again.layers.items()} == {n: t.seconds for n, t in table.layers.items()}
    # another grid, or another model in the same file: measured again
    with pytest.raises(AssertionError, match="timed again"):
        measured.load_or_measure(path, channel_multiple=4)
    _tiny(path, scale=0.2)
    with pytest.raises(AssertionError, match="timed again"):
        measured.load_or_measure(path, channel_multiple=8)


def test_the_table_is_interpolated_bilinearly_and_differentiably():
    layer = LayerTable("Conv", in_grid=[8, 16], out_grid=[8, 16, 24], seconds=[[1.0, 2.0, 4.0], [3.0, 5.0, 9.0]])
    assert layer.latency(8, 16) == 2.0 and layer.latency(16, 24) == 9.0      # exact at grid points
    assert layer.latency(12, 8) == pytest.approx(2.0)                        # (1 + 3) / 2
    assert layer.latency(12, 20) == pytest.approx((3.0 + 7.0) / 2)           # rows at out 20: 3 and 7
    assert layer.latency(4, 40) == 4.0                                       # constant beyond the grid
    c_in = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
    c_out = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    value = layer.latency(c_in, c_out)
    value.backward()
    assert float(value.detach()) == pytest.approx(5.0)
    assert float(c_in.grad) == pytest.approx((7.0 - 3.0) / 8)               # d/dc_in at out 20
    assert float(c_out.grad) == pytest.approx(((4 - 2) / 8 + (9 - 5) / 8) / 2)
    depthwise = LayerTable("Conv", in_grid=[], out_grid=[8, 16], seconds=[[1.0, 3.0]])
    assert depthwise.latency(None, 12) == pytest.approx(2.0)


def _at_zero(grid: list[int], values: list[float]) -> float:
    """Linear extrapolation to 0 channels from the first two grid points."""
    return values[0] if len(grid) < 2 else values[0] - grid[0] * (values[1] - values[0]) / (grid[1] - grid[0])


def test_ort_cpu_profile_drives_pit(tmp_path):
    path = tmp_path / "tiny.onnx"
    _tiny(path)
    profile = measured.ort_cpu_profile(path, channel_multiple=8, repeats=2)
    table = profile.latency
    assert profile.name == "ort-cpu" and profile.channel_multiple == 8 and profile.latency_unit == "s"
    assert 0 < table.run_seconds and 0 < table.whole_seconds and 0 < table.anchor_seconds
    # the anchor: conv1 (and dw, its channels) at 8 of 16, the rest whole (conv2's 8 and fc's 4
    # outputs have no smaller grid point)
    assert table.anchor_channels == {"conv1": [4, 8], "dw": [8, 8], "conv2": [8, 8], "fc": [8, 4]}
    layers = table.layers
    full = {name: t.seconds[-1][-1] for name, t in layers.items()}
    eight = {"conv1": layers["conv1"].seconds[0][0], "dw": layers["dw"].seconds[0][0],
             "conv2": layers["conv2"].seconds[0][0], "fc": layers["fc"].seconds[0][0]}
    # each layer's fixed part: at zero channels, linearly from its two smallest grid points
    at_zero = {"conv1": _at_zero([8, 16], layers["conv1"].seconds[0]), "dw": _at_zero([8, 16], layers["dw"].seconds[0]),
               "conv2": _at_zero([8, 16], [row[0] for row in layers["conv2"].seconds]), "fc": layers["fc"].seconds[0][0]}
    base = {n: min(max(at_zero[n], 0.0), min(min(row) for row in layers[n].seconds)) for n in layers}
    assert {n: t.fixed for n, t in layers.items()} == pytest.approx(base)
    v_full = sum(max(full[n] - base[n], 0) for n in layers)
    v_anchor = sum(max(eight[n] - base[n], 0) for n in layers)
    whole, anchor = table.whole_seconds, table.anchor_seconds
    # the random-mask calibration models: conv1 (with dw) is the only group with a smaller grid
    # point, so each one that prunes anything is the anchor's shape (one that keeps all is not timed)
    assert 1 <= len(table.calibration_channels) == len(table.calibration_seconds) <= measured.CALIBRATION_POINTS
    assert all(channels == table.anchor_channels for channels in table.calibration_channels)
    points = [anchor, *table.calibration_seconds]
    weights = [1 / s ** 2 for s in points]
    k = sum(w * (v_anchor - v_full) * (s - whole) for w, s in zip(weights, points)) / \
        sum(w * (v_anchor - v_full) ** 2 for w in weights) if v_anchor != v_full else 0.0
    if abs(v_full - v_anchor) > 1e-3 * v_full and k > 0:   # "fit": through (v_full, whole), least squares
        fixed = min(max(whole - k * v_full, -whole / 2), whole)                            # (1/s²) on the points
        k = (whole - fixed) / v_full
        expected_eight = fixed + k * v_anchor
    else:                                   # timing noise made the copies no faster: "scale"
        run = table.run_seconds
        expected_eight = run + (whole - run) / sum(max(full[n] - run, 0) for n in layers) * \
            sum(max(eight[n] - run, 0) for n in layers)
    # every layer at its full size: exactly the whole model's measured latency
    assert table.predict(po.load(path)) == pytest.approx(whole)
    model = po.PIT(path, cost=profile.cost())
    assert float(model.cost.detach()) == pytest.approx(whole)
    with torch.no_grad():
        model.tensor("conv1.pit_alpha")[:8] = 0.2              # conv1 (and dw) keep 8 of 16 channels
    cost = model.cost
    assert float(cost.detach()) == pytest.approx(expected_eight)
    assert cost.requires_grad
    # "scale": run once + k' · Σ (entry − run), k' = (whole − run) / Σ (full − run)
    table.calibration = "scale"
    run = table.run_seconds
    scale = (whole - run) / sum(max(full[n] - run, 0) for n in layers)
    assert float(model.cost.detach()) == pytest.approx(run + scale * sum(max(eight[n] - run, 0) for n in layers))
    # the uncalibrated table: the plain sum of the entries
    table.calibration = "none"
    assert float(model.cost.detach()) == pytest.approx(sum(eight.values()))


def test_the_fit_goes_through_the_model_and_its_anchor():
    # fixed parts: a 3 − 8·(5 − 3)/8 = 1; b 2 − 8·(4 − 2)/8 = 0; variable at full: a 4, b 4
    layers = {"a": LayerTable("Conv", [], [8, 16], [[3.0, 5.0]]), "b": LayerTable("Conv", [8], [8, 16], [[2.0, 4.0]])}
    table = measured.LatencyTable("sha", 8, 1, "v", layers, run_seconds=1.0, whole_seconds=10.0,
                                  anchor_seconds=6.0, anchor_channels={"a": [8, 8], "b": [8, 8]})
    assert (layers["a"].fixed, layers["b"].fixed) == (1.0, 0.0)
    fixed, k, base = table.calibrated()       # variable at the anchor: a 2, b 2 → k = (10 − 6) / (8 − 4)
    assert (fixed, k) == pytest.approx((2.0, 1.0)) and base == {"a": 1.0, "b": 0.0}
    spec = po.cost.LayerSpec
    a8 = spec(name="a", op="Conv", kind="conv", in_channels=8, out_channels=8, kernel_size=9, groups=8,
              bias=False, output_positions=1, depthwise=True)
    b12 = spec(name="b", op="Conv", kind="conv", in_channels=8, out_channels=12, kernel_size=1)
    assert table(a8) == pytest.approx(2.0 / 2 + 1.0 * (3.0 - 1.0))
    assert table(b12) == pytest.approx(2.0 / 2 + 1.0 * (3.0 - 0.0))          # 3.0: halfway between 2 and 4
    table.anchor_seconds = 4.0                 # a line that starts below 0: through (8, 10) and (4, 4)
    assert table.calibrated()[:2] == pytest.approx((-2.0, 12.0 / 8))
    table.anchor_seconds = 2.0                 # one that would start below −whole/2: through (8, 10) and −5
    assert table.calibrated()[:2] == pytest.approx((-5.0, 15.0 / 8))
    table.anchor_seconds = 11.0                # the smaller anchor timed slower than the model: no slope, "scale"
    assert table.calibrated()[:2] == pytest.approx((1.0, 9.0 / 7))
    table.anchor_seconds = None                # no anchor: "scale" on entries less run_seconds (nets 4 and 3)
    assert table.calibrated()[:2] == pytest.approx((1.0, 9.0 / 7)) and table.calibrated()[2] == {"a": 1.0, "b": 1.0}
    table.calibration = "add"
    assert table.calibrated()[:2] == pytest.approx((3.0, 1.0))


def test_the_fit_takes_every_calibration_point():
    # the same layers: variable time 8 at full size (whole 10), 4 at the anchor (a 8, b 8), 6 with
    # a at 16 and b at 8, 2 with a and b at 8 less... (b at 8 is its smallest point: 2 − 0)
    layers = {"a": LayerTable("Conv", [], [8, 16], [[3.0, 5.0]]), "b": LayerTable("Conv", [8], [8, 16], [[2.0, 4.0]])}
    table = measured.LatencyTable("sha", 8, 1, "v", layers, run_seconds=1.0, whole_seconds=10.0,
                                  anchor_seconds=5.0, anchor_channels={"a": [8, 8], "b": [8, 8]},
                                  calibration_seconds=[8.0, 9.0],
                                  calibration_channels=[{"a": [16, 16], "b": [16, 8]}, {"a": [12, 12], "b": [16, 16]}])
    # points (variable, seconds): anchor (4, 5), (6, 8), (7, 9); through (8, 10), weights 1/s²:
    # k = Σ w·(v − 8)·(s − 10) / Σ w·(v − 8)²
    weights, dv, ds = [1 / 25, 1 / 64, 1 / 81], [-4, -2, -1], [-5, -2, -1]
    k = sum(w * v * s for w, v, s in zip(weights, dv, ds)) / sum(w * v * v for w, v in zip(weights, dv))
    assert [v for v, _ in [(table._variable({"a": 1.0, "b": 0.0}, c), s) for c, s in table.calibration_points()]] \
        == [4.0, 6.0, 7.0]
    fixed, slope, _ = table.calibrated()
    assert (fixed, slope) == pytest.approx((10 - 8 * k, k))
    spec = po.cost.LayerSpec
    full_a = spec(name="a", op="Conv", kind="conv", in_channels=16, out_channels=16, kernel_size=9, groups=16,
                  bias=False, output_positions=1, depthwise=True)
    full_b = spec(name="b", op="Conv", kind="conv", in_channels=16, out_channels=16, kernel_size=1)
    assert table(full_a) + table(full_b) == pytest.approx(10.0)     # exact on the profiled model
    # points that do not spread in variable time give no slope: "scale" (the line through run_seconds)
    full = {"a": [16, 16], "b": [16, 16]}
    flat = dataclasses.replace(table, anchor_channels=full, calibration_channels=[full, full])
    assert flat.calibrated()[:2] == pytest.approx((1.0, 9.0 / 7))


# -- the profile command and for_model --------------------------------------------------------
def _counting_timer(monkeypatch) -> list:
    """Counts the models timed (the real timer still runs)."""
    calls = []
    real_time, real_times = timing.Timer.time, timing.Timer.times

    def counted_time(self, model, *args, **kwargs):
        calls.append(1)
        return real_time(self, model, *args, **kwargs)

    def counted_times(self, models):
        calls.extend([1] * len(models))
        return real_times(self, models)
    monkeypatch.setattr(timing.Timer, "time", counted_time)
    monkeypatch.setattr(timing.Timer, "times", counted_times)
    return calls


def test_profile_command_caches_reuses_and_forces(tmp_path, monkeypatch, capsys):
    import json

    from plinio_onnx.cli import main
    path = tmp_path / "tiny.onnx"
    _tiny(path)
    before = path.read_bytes()
    calls = _counting_timer(monkeypatch)
    assert main(["profile", str(path), "--channel-multiple", "8", "--repeats", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    cache = tmp_path / "tiny.ort-cpu.json"
    # 7 grid entries (conv1 2, dw 2, conv2 2, fc 1) + an idle run, before and after (the whole
    # model and its anchor are timed together, alternately)
    assert len(calls) == 9 and cache.exists() and path.read_bytes() == before
    assert summary["table"] == str(cache) and summary["layers"] == 4 and not summary["reused"]
    assert summary["predicted_ms"] == pytest.approx(summary["measured_ms"])    # calibrated on it
    stamp = cache.stat().st_mtime_ns

    calls.clear()
    assert main(["profile", str(path), "--channel-multiple", "8"]) == 0
    out = capsys.readouterr().out
    assert not calls and cache.stat().st_mtime_ns == stamp and "cached table reused" in out
    assert "4 layers" in out and str(cache) in out
    assert main(["profile", str(path), "--channel-multiple", "16"]) == 0   # a subset of the grid of 8
    assert not calls and cache.stat().st_mtime_ns == stamp
    capsys.readouterr()

    assert main(["profile", str(path), "--channel-multiple", "8", "--repeats", "2", "--force"]) == 0
    assert len(calls) == 9 and cache.stat().st_mtime_ns != stamp and "reused" not in capsys.readouterr().out
    assert not list(tmp_path.glob(".*.tmp"))    # written atomically, no temporary left


def test_profile_command_errors_are_one_clear_line(tmp_path, capsys):
    from plinio_onnx.cli import main
    assert main(["profile", str(tmp_path / "missing.onnx")]) == 2
    assert "missing.onnx: no such model file" in capsys.readouterr().err
    (tmp_path / "text.onnx").write_text("not a model")
    assert main(["profile", str(tmp_path / "text.onnx")]) == 2
    assert "text.onnx: not an ONNX model" in capsys.readouterr().err
    path = tmp_path / "strange.onnx"
    _tiny(path)
    model = onnx.load(str(path))
    model.graph.node.insert(1, helper.make_node("Foo", ["a"], ["a2"], name="strange", domain="com.example"))
    model.graph.node[2].input[0] = "a2"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.save(model, str(path))
    assert main(["profile", str(path)]) == 2
    err = capsys.readouterr().err
    assert "strange.onnx: node 'strange' (com.example:Foo)" in err and err.count("\n") == 1
    assert not (tmp_path / "strange.ort-cpu.json").exists()
    assert main(["profile", str(path), "--hardware", "gap8"]) == 2
    assert "not a measured runtime" in capsys.readouterr().err


def test_for_model_analytical_and_measured(tmp_path, monkeypatch):
    import sys

    path = tmp_path / "tiny.onnx"
    _tiny(path)
    gap8 = po.hardware.for_model("gap8", path)
    assert gap8 == po.hardware.get("gap8")
    assert gap8.latency is po.hardware.gap8_latency and gap8.channel_multiple == 4
    assert po.hardware.for_model("gap8", path, channel_multiple=16).channel_multiple == 16
    assert not (tmp_path / "tiny.ort-cpu.json").exists()      # analytical: nothing measured

    seen = []
    calls = _counting_timer(monkeypatch)
    profile = po.hardware.for_model("ort-cpu", path, channel_multiple=8, progress=lambda *a: seen.append(a))
    assert profile.name == "ort-cpu" and profile.channel_multiple == 8 and profile.latency_unit == "s"
    assert seen[0] == (0, 4, "conv1") and seen[-1] == (4, 4, "") and calls
    assert profile.source == str(tmp_path / "tiny.ort-cpu.json")
    latency = profile.cost()
    assert sum(latency(s) for s in po.cost.layer_specs(po.load(path))) == pytest.approx(profile.latency.whole_seconds)
    seen.clear()
    calls.clear()
    again = po.hardware.for_model("ort-cpu", path, channel_multiple=8, progress=lambda *a: seen.append(a))  # cached
    assert not seen and not calls and again.latency.layers.keys() == profile.latency.layers.keys()
    from plinio_onnx.inspect import inspect_model             # inspect --hardware ort-cpu reads it too
    report = inspect_model(path, hardware="ort-cpu")
    assert not calls and report["latency"] == pytest.approx(profile.latency.whole_seconds)
    assert report["hardware"]["latency_unit"] == "s" and [r["name"] for r in report["layers"]] == list(
        profile.latency.layers)

    monkeypatch.setitem(sys.modules, "openvino", None)       # as where it is not installed
    with pytest.raises(po.PlinioOnnxError, match="pip install openvino"):
        po.hardware.for_model("openvino-cpu", path)
    with pytest.raises(po.PlinioOnnxError, match="unknown hardware profile"):
        po.hardware.for_model("no-such-board", path)


def test_the_default_channel_multiple_is_the_cpus_nchwc_block(tmp_path, monkeypatch):
    from plinio_onnx.hardware import model_profile
    avx512, avx2 = tmp_path / "avx512", tmp_path / "avx2"
    avx512.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert model_profile.nchwc_block(avx512) == 16 and model_profile.nchwc_block(avx2) == 8
    assert model_profile.nchwc_block(tmp_path / "missing") == 8
    path = tmp_path / "tiny.onnx"
    _tiny(path)
    monkeypatch.setattr(model_profile, "nchwc_block", lambda: 8)
    assert po.hardware.for_model("ort-cpu", path).channel_multiple == 8
    monkeypatch.setattr(model_profile, "nchwc_block", lambda: 16)
    profile = po.hardware.for_model("ort-cpu", path)
    assert profile.channel_multiple == 16 and profile.latency.channel_multiple == 8   # the finer cached grid serves


def test_calibration_models_keep_random_grid_counts_reproducibly():
    from pathlib import Path
    graph = po.load(Path(__file__).resolve().parent.parent / "models" / "dscnn.onnx")
    full = {s.name: (s.in_channels, s.out_channels) for s in po.cost.layer_specs(graph)}
    first = [[(s.name, s.in_channels, s.out_channels) for s in po.cost.layer_specs(m)]
             for m in timing.calibration_models(graph, 16, 3)]
    again = [[(s.name, s.in_channels, s.out_channels) for s in po.cost.layer_specs(m)]
             for m in timing.calibration_models(graph, 16, 3)]
    assert len(first) == 3 and first == again                      # the same seed stream every time
    assert len({tuple(shape) for shape in first}) == 3               # three different draws
    for shape in first:
        assert [name for name, _, _ in shape] == list(full)         # every layer kept, none removed
        for name, c_in, c_out in shape:
            assert c_out == full[name][1] or c_out % 16 == 0         # on the grid of 16, or whole
        assert any(c_out < full[name][1] for name, _, c_out in shape)   # each one prunes something
    # the anchor: every group at the grid point nearest half its size
    anchor = {s.name: (s.op, s.out_channels) for s in po.cost.layer_specs(timing.anchor_model(graph, 16))}
    assert {name: out for name, (op, out) in anchor.items() if op == "Conv"} == \
        {name: min(timing.channel_grid(out, 16), key=lambda c: abs(c - out / 2))
         for name, (_, out) in full.items() if anchor[name][0] == "Conv"}
    assert [out for op, out in anchor.values() if op != "Conv"] == [full[n][1] for n in anchor if anchor[n][0] != "Conv"]


def test_fit_reads_each_layer_smoothed_by_least_squares():
    # an exact set-up + reorders + arithmetic table is its own fit
    grid = [8, 16, 24]
    exact = [[1.0 + 0.1 * i + 0.2 * o + 0.01 * i * o for o in grid] for i in grid]
    layer = LayerTable("Conv", grid, grid, exact)
    assert layer.smoothed().seconds == [pytest.approx(row) for row in exact]
    # one entry timed in a busy moment: every entry becomes the least-squares fit (normal equations)
    noisy = [row[:] for row in exact]
    noisy[1][2] += 0.9
    terms = np.array([[1, i, o, i * o] for i in grid for o in grid], float)
    values = np.array([s for row in noisy for s in row])
    coef = np.linalg.solve(terms.T @ terms, terms.T @ values)
    smoothed = LayerTable("Conv", grid, grid, noisy).smoothed()
    assert [s for row in smoothed.seconds for s in row] == pytest.approx(list(terms @ coef))
    assert exact[1][2] < smoothed.seconds[1][2] < noisy[1][2]         # the busy entry pulled back, not all the way
    # depthwise: a + b·c through (8, 1), (16, 2), (24, 4): b = 24/128, a = 7/3 − 16·b
    depthwise = LayerTable("Conv", [], grid, [[1.0, 2.0, 4.0]]).smoothed()
    b = 24 / 128
    assert depthwise.seconds[0] == pytest.approx([7 / 3 + (c - 16) * b for c in grid])
    # too few points to fit: as timed
    few = LayerTable("Conv", [8], [8, 16], [[2.0, 5.0]])
    assert few.smoothed().seconds == [[2.0, 5.0]] and LayerTable("Conv", [], [8, 16], [[1.0, 3.0]]).smoothed().seconds == [[1.0, 3.0]]
    # "fit" reads the smoothed tables; "none" the entries as timed
    table = measured.LatencyTable("sha", 8, 1, "v", {"dw": LayerTable("Conv", [], grid, [[1.0, 2.0, 4.0]])},
                                  run_seconds=0.5, whole_seconds=4.0)
    spec = po.cost.LayerSpec(name="dw", op="Conv", kind="conv", in_channels=16, out_channels=16, kernel_size=9,
                             groups=16, depthwise=True)
    assert table.entries()["dw"].seconds == depthwise.seconds
    # no anchor: "scale" inside "fit" — run + k·(smoothed − run), k so the full size is the whole model
    k = (4.0 - 0.5) / (depthwise.seconds[0][2] - 0.5)
    assert table(spec) == pytest.approx(0.5 + k * (depthwise.seconds[0][1] - 0.5))
    assert dataclasses.replace(table, calibration="none")(spec) == 2.0
    assert dataclasses.replace(table, smooth=False)(spec) == pytest.approx(0.5 + (3.5 / 3.5) * (2.0 - 0.5))
