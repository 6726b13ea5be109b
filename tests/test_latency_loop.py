"""A latency target on a measured profile, closed by measurement (`optimize.latency_loop`): the
search's choice is timed in the runtime and, when it misses the target there, the search goes on
against a tighter predicted target.

No assertion reads a timing: the table is made by a fake timer (deterministic entries) and the
runtime's verdicts are scripted, so the tests check the loop's arithmetic and the flow around it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

import plinio_onnx as po
from plinio_onnx.hardware import measured
from plinio_onnx.optimize import flow, latency_loop
from plinio_onnx.optimize.config import OptimizeConfig
from plinio_onnx.optimize.latency_loop import LatencyCheck, round_notes

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_cnn.onnx"
DATA = ROOT / "models" / "digits.npz"


def _check(**options) -> LatencyCheck:
    return LatencyCheck("latency", 0.6, 100.0, options.pop("min_reachable", 40.0),
                        lambda graph: pytest.fail("not measured here"), **options)


def test_the_verdicts_of_a_measured_round():
    check = _check(rounds=2, slack=0.02)
    met = check.judge(0, 60.0, 57.8, {"input_ms": 0.2, "output_ms": 0.123})   # 61.5 %: within the slack
    assert met.verdict == "met" and met.next_target is None and met.ratio == pytest.approx(0.615)
    # 67.5 % measured for a choice predicted at 57.8 %: the next target is 60 % · 57.8 / 0.675
    missed = check.judge(0, 60.0, 57.8, {"input_ms": 0.2, "output_ms": 0.135})
    assert missed.verdict == "tightened" and missed.next_target == pytest.approx(0.6 * 57.8 / 0.675)
    assert missed.to_json()["ratio"] == pytest.approx(0.675)
    assert check.judge(2, 51.4, 50.0, {"input_ms": 0.2, "output_ms": 0.135}).verdict == "last round"
    # a tighter target at or below the least reachable architecture stops the loop
    assert _check(min_reachable=52.0).judge(0, 60.0, 57.8, {"input_ms": 0.2, "output_ms": 0.135}).verdict == "floor"
    failed = check.judge(0, 60.0, 57.8, {"error": "cannot load"})
    assert failed.verdict == "not measured" and failed.error == "cannot load" and failed.ratio is None
    notes = round_notes([r.to_json() for r in (missed, met, failed)], "ort-cpu", "s")
    assert "measured 67.5% in ort-cpu (wanted ≤ 60.0%)" in notes[0] and "predicted 51.4%" in notes[0]
    assert notes[1].endswith("kept") and "not measured in ort-cpu (cannot load)" in notes[2]


def test_latency_rounds_is_a_validated_option():
    assert OptimizeConfig(output="o.onnx").latency_rounds == 2
    for bad in (-1, 1.5, True):
        with pytest.raises(po.PlinioOnnxError, match="--latency-rounds"):
            OptimizeConfig(output="o.onnx", latency_rounds=bad)


class _FakeTimer:
    """Times nothing: a layer at (c_in, c_out) costs 1 µs + c_in·c_out/256 µs, a whole model (and
    each calibration model) 20 µs more than its layers, an idle run 1 µs."""

    version = "fake"

    def __init__(self, *args) -> None:
        pass

    @staticmethod
    def runtime_version(runtime: str) -> str:
        return "fake"

    def time(self, model, feeds=None) -> float:
        return 1e-6

    def times(self, models: dict) -> dict:
        return {(c_in, c_out): 1e-6 * (1 + c_in * c_out / 256) for c_in, c_out in models}

    def whole(self, path, others=None) -> dict:
        from plinio_onnx.cost import layer_specs

        def seconds(graph) -> float:
            return 2e-5 + sum(1e-6 * (1 + s.in_channels * s.out_channels / 256) for s in layer_specs(graph))
        return {"whole": seconds(po.load(path)), **{key: seconds(graph) for key, graph in (others or {}).items()}}


def test_a_choice_measured_over_the_target_is_searched_on_against_a_tighter_one(tmp_path, monkeypatch):
    monkeypatch.setattr(measured, "Timer", _FakeTimer)
    model = Path(shutil.copy(MODEL, tmp_path / "digits.onnx"))
    verdicts = iter([0.95, 0.80])   # the runtime's output/input ratio of the first and second choice
    measured_graphs = []

    def fake_runtime_measure(input_model, runtime, names, samples):
        assert Path(input_model) == model and runtime == "ort-cpu" and names == ["input"]

        def measure(graph):
            measured_graphs.append(graph)
            return {"input_ms": 1.0, "output_ms": next(verdicts)}
        return measure
    monkeypatch.setattr(latency_loop, "runtime_measure", fake_runtime_measure)
    monkeypatch.setattr(flow, "measure_latency", lambda *a, **k: {})   # the report's own timing
    out = tmp_path / "small.onnx"
    report = po.optimize(model, DATA, output=out, method="pit", hardware="ort-cpu", target_latency="80%",
                         channel_multiple=8, latency_rounds=1, epochs=2, warmup_epochs=0, finetune_epochs=0,
                         threads=1, quiet=True)
    search = report.phases["search"]
    first, second = search["latency_rounds"]
    table = measured.cached_table(model, channel_multiple=8)
    base = table.predict(po.load(model))
    assert first["target"] == pytest.approx(0.8 * base) and first["wanted"] == pytest.approx(0.8)
    assert first["verdict"] == "tightened" and second["verdict"] == "met" and second["round"] == 1
    assert first["next_target"] == pytest.approx(0.8 * first["predicted"] / 0.95)
    assert second["target"] == first["next_target"] and search["targets"]["latency"] == first["next_target"]
    # each measured candidate is the architecture judged: its predicted latency is the round's
    assert [table.predict(g) for g in measured_graphs] == pytest.approx([first["predicted"], second["predicted"]])
    # the round searched one more epoch (half the budget) and the output meets the tighter target
    assert [h["epoch"] for h in search["history"]] == [1, 2, 3]
    (constraint,) = report.constraints
    assert constraint["after"] <= first["next_target"] * (1 + 1e-9) and constraint["target"] == pytest.approx(0.8 * base)
    assert table.predict(po.load(out)) == pytest.approx(constraint["after"])
    notes = json.loads(out.with_name("small.report.json").read_text())["notes"]
    assert any("latency round 0" in n and "measured 95.0%" in n for n in notes)
    assert any("latency round 1" in n and n.endswith("kept") for n in notes)


def test_no_loop_without_a_measured_profile_or_with_no_rounds(tmp_path, monkeypatch):
    monkeypatch.setattr(measured, "Timer", _FakeTimer)
    model = Path(shutil.copy(MODEL, tmp_path / "digits.onnx"))
    monkeypatch.setattr(latency_loop, "runtime_measure", lambda *a: lambda graph: pytest.fail("measured without a loop"))
    monkeypatch.setattr(flow, "measure_latency", lambda *a, **k: {})
    report = po.optimize(model, DATA, output=tmp_path / "a.onnx", hardware="ort-cpu", target_latency="80%",
                         channel_multiple=8, latency_rounds=0, epochs=1, warmup_epochs=0, finetune_epochs=0,
                         threads=1, quiet=True)
    assert report.phases["search"]["latency_rounds"] == []
    report = po.optimize(model, DATA, output=tmp_path / "b.onnx", hardware="simd-mcu", target_latency="80%",
                         epochs=1, warmup_epochs=0, finetune_epochs=0, threads=1, quiet=True)
    assert report.phases["search"]["latency_rounds"] == []


# -- the channel multiple of a latency target ---------------------------------------------------
def test_the_multiples_tried_and_the_block_penalty_of_a_table():
    from plinio_onnx.hardware.measured import LatencyTable, LayerTable
    from plinio_onnx.optimize.latency_multiple import block_penalty, finer_multiples

    assert finer_multiples(16) == [16, 8, 4, 2, 1] and finer_multiples(12) == [12, 6, 3, 1]
    assert finer_multiples(1) == [1]
    # conv: 8 → 16 out of 24; every off-block entry against the aligned one above it (16 or the
    # layer's size, 24): (8,8)/(16,16), (8,16)/(16,16), (8,24)/(16,24), (16,8)/(16,16), (24,8)/(24,16)
    conv = LayerTable("Conv", [8, 16, 24], [8, 16, 24], [[1.0, 1.1, 2.0], [1.0, 1.0, 1.6], [1.5, 1.2, 2.4]])
    depthwise = LayerTable("Conv", [], [8, 16], [[0.9, 0.5]])     # 8 channels: 80 % over 16
    table = LatencyTable("sha", 8, 1, "v", layers={"conv": conv})
    # the median of 1.0, 1.1, 1.25, 1.0, 1.25
    assert block_penalty(table, 16) == pytest.approx(1.1 - 1)
    table.layers["dw"] = depthwise    # and 1.8: the median of six
    assert block_penalty(table, 16) == pytest.approx((1.1 + 2.0 / 1.6) / 2 - 1)
    assert block_penalty(table, 8) == 0.0   # every entry on the block


class _CliffTimer(_FakeTimer):
    """As `_FakeTimer`, but an output channel count off the block of 16 costs twice as much."""

    def times(self, models: dict) -> dict:
        return {key: value * (2.0 if key[1] % 16 else 1.0) for key, value in super().times(models).items()}


def _base_costs(tmp_path, monkeypatch, timer, measure=None, **options):
    """`optimize`'s input costs and method for digits on a fake-timed ort-cpu table (the CPU's
    block: 16), exports timed by ``measure``."""
    from plinio_onnx.hardware import model_profile
    from plinio_onnx.optimize.targets import method_for_targets
    monkeypatch.setattr(measured, "Timer", timer)
    monkeypatch.setattr(model_profile, "nchwc_block", lambda *a: 16)
    model = Path(shutil.copy(MODEL, tmp_path / "digits.onnx"))
    config = OptimizeConfig(output=tmp_path / "o.onnx", hardware="ort-cpu", progress=False, **options)
    return flow._base_costs(po.load(model), config, method_for_targets(config.search_method, config.targets), model,
                            measure)


def test_a_latency_target_out_of_reach_on_the_cpus_block_searches_finer_blocks(tmp_path, monkeypatch):
    # reachable on blocks of 16 (least 27 % of the input's predicted latency): searched on them
    base, method, note = _base_costs(tmp_path, monkeypatch, _FakeTimer, target_latency="60%")
    assert method.options["channel_multiple"] == 16 and note is None
    least16 = base.min_cost / base.cost
    # 20 %: blocks of 16 do not reach it, blocks of 8 (least 18.5 %) leave room
    base, method, note = _base_costs(tmp_path, monkeypatch, _FakeTimer, target_latency="20%")
    table = measured.cached_table(tmp_path / "digits.onnx", channel_multiple=8)
    assert method.options["channel_multiple"] == 8 and table.channel_multiple == 8
    assert base.min_cost <= 0.95 * base.target < least16 * base.cost
    assert f"16: {least16:.0%}" in note and "not this CPU's block of 16" in note
    assert "blocks of 8 reach" in note and "off-block channel counts cost 0% more" in note
    # nothing tried reaches 12 %: one error naming each block's least reachable share
    with pytest.raises(po.PlinioOnnxError, match=r"every channel block tried .*16: \d+%, 8: \d+%, 4: \d+%, 2: \d+%, 1: \d+%\)$"):
        _base_costs(tmp_path, monkeypatch, _FakeTimer, target_latency="12%")
    # a given multiple is searched as given: the usual refusal
    with pytest.raises(po.PlinioOnnxError, match=r"smallest architecture pit can reach .*now 16"):
        _base_costs(tmp_path, monkeypatch, _FakeTimer, target_latency="20%", channel_multiple=16)


def test_no_finer_block_where_the_table_shows_the_blocked_kernels_cliff(tmp_path, monkeypatch):
    with pytest.raises(po.PlinioOnnxError, match=r"no finer block was searched: on blocks of 8 .* costing [1-9]\d+% more"):
        _base_costs(tmp_path, monkeypatch, _CliffTimer, target_latency="20%")


def test_a_run_interrupted_in_a_latency_round_resumes_in_it(tmp_path, monkeypatch):
    monkeypatch.setattr(measured, "Timer", _FakeTimer)
    model = Path(shutil.copy(MODEL, tmp_path / "digits.onnx"))
    verdicts = iter([0.95, 0.80])
    calls = []

    def fake_runtime_measure(*args):
        def measure(graph):
            calls.append(graph)
            return {"input_ms": 1.0, "output_ms": next(verdicts)}
        return measure
    monkeypatch.setattr(latency_loop, "runtime_measure", fake_runtime_measure)
    monkeypatch.setattr(flow, "measure_latency", lambda *a, **k: {})
    options = dict(output=tmp_path / "r.onnx", hardware="ort-cpu", target_latency="80%", channel_multiple=8,
                   epochs=4, warmup_epochs=0, finetune_epochs=0, threads=1, quiet=True)

    def interrupt(phase, epoch, info):
        if phase == "search" and epoch == 5:    # the first epoch of the round (epochs 5 and 6)
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        po.optimize(model, DATA, callback=interrupt, **options)
    state = json.loads((tmp_path / "r.ckpt" / "state.json").read_text())["phases"]["search"]["state"]
    assert state["epoch"] == 5 and len(calls) == 1
    assert state["latency_round"]["start"] == 4 and state["latency_round"]["epochs"] == 2
    resumed = []
    report = po.optimize(model, DATA, callback=lambda p, e, i: resumed.append((p, e)), **options)
    assert resumed == [("search", 6)] and len(calls) == 2 and report.resumed
    search = report.phases["search"]
    assert [r["verdict"] for r in search["latency_rounds"]] == ["tightened", "met"]
    assert [h["epoch"] for h in search["history"]] == [1, 2, 3, 4, 5, 6]
    assert search["targets"]["latency"] == search["latency_rounds"][0]["next_target"]


def test_blocks_whose_least_architecture_misses_the_target_measured_are_passed_over(tmp_path, monkeypatch):
    """On blocks of 16 the table predicts room under 60 %; the runtime says the least
    architecture on blocks of 16 or 8 runs at 70 % of the input, on blocks of 4 at 45 %."""
    from plinio_onnx.cost import layer_specs
    timed = []

    def measure(graph):
        first = layer_specs(graph)[0].out_channels     # the least architecture keeps one block
        timed.append(first)
        return {"input_ms": 1.0, "output_ms": 0.70 if first >= 8 else 0.45}
    base, method, note = _base_costs(tmp_path, monkeypatch, _FakeTimer, measure, target_latency="60%")
    assert method.options["channel_multiple"] == 4 and timed == [16, 8, 4]
    assert base.min_cost <= 0.95 * base.target
    assert "16: 27% predicted, 70% measured" in note and "(45% measured)" in note
    # nothing reaches it measured: the coarsest block that reaches it in prediction
    base, method, note = _base_costs(tmp_path, monkeypatch, _FakeTimer, lambda graph: {"input_ms": 1.0, "output_ms": 0.9},
                                     target_latency="60%")
    assert method.options["channel_multiple"] == 16 and note is None


def test_the_search_reads_the_tables_monotone_envelope(tmp_path, monkeypatch):
    from plinio_onnx.hardware.measured import LatencyTable, LayerTable
    from plinio_onnx.optimize.monotone import monotone_envelope, monotone_table

    # each entry: the least at as many or more input and output channels
    assert monotone_envelope([[3, 2, 4], [5, 1, 6]]) == [[1, 1, 4], [1, 1, 6]]
    assert monotone_envelope([[7.3, 5.6]]) == [[5.6, 5.6]]            # a depthwise row
    ordered = [[1.0, 2.0], [3.0, 4.0]]
    assert monotone_envelope(ordered) == ordered
    table = LatencyTable("sha", 8, 1, "v", whole_seconds=10.0, calibration="none",
                         layers={"conv": LayerTable("Conv", [8, 16], [8, 16], [[3.0, 2.0], [5.0, 4.0]])})
    view = monotone_table(table)
    assert view.layers["conv"].seconds == [[2.0, 2.0], [4.0, 4.0]] and table.layers["conv"].seconds[0][0] == 3.0
    # optimize's measured profile is the envelope of the cached table
    monkeypatch.setattr(measured, "Timer", _FakeTimer)
    model = Path(shutil.copy(MODEL, tmp_path / "digits.onnx"))
    config = OptimizeConfig(output=tmp_path / "o.onnx", hardware="ort-cpu", channel_multiple=8, target_latency="80%",
                            progress=False)
    base = flow._base_costs(po.load(model), config, config.search_method, model)[0]
    profile = SimpleNamespace(latency=getattr(base.cost_ref, "model", base.cost_ref))   # the table under AtPrecision
    cached = measured.cached_table(model, channel_multiple=8)
    assert profile.latency is not cached
    assert {n: t.seconds for n, t in profile.latency.layers.items()} == \
        {n: monotone_envelope(t.seconds) for n, t in cached.layers.items()}
    assert profile.latency.predict(po.load(model)) == pytest.approx(cached.predict(po.load(model)))
