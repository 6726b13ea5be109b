"""`inspect --hardware` against PLiNIO's own cost models on the same torch network.

PLiNIO is not on the package index (no extra of this project), so `bench/plinio_cost_models.py`
runs the comparison where a PLiNIO checkout is importable; the totals below are what PLiNIO's
models gave there for `bench/plinio_cost_models.network` (eml-eda/plinio commit 3d6b5e0, its
`PIT` for ``gap8_latency``, its `MPS` at 8-bit weights and activations for the others). PLiNIO
computes in float32, this project in float64: the MPIC figures agree to ~1e-7 relative, the
integer-cycle models exactly.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from plinio_onnx.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import plinio_cost_models as bench  # noqa: E402

PLINIO_TOTALS = {"gap8_latency": 54608.0, "ne16_latency": 20170.0, "diana_latency": 6453.25,
                 "mpic_latency": 140591.421875, "mpic_energy": 3.0269338822108693e-06}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return bench.export(tmp_path_factory.mktemp("plinio") / "net.onnx")


def test_inspect_totals_are_plinios(exported):
    ours = bench.ours(exported)
    assert set(ours) == set(PLINIO_TOTALS)
    for name in ("gap8_latency", "ne16_latency", "diana_latency"):
        assert ours[name] == PLINIO_TOTALS[name], name
    for name in ("mpic_latency", "mpic_energy"):
        assert ours[name] == pytest.approx(PLINIO_TOTALS[name], rel=1e-6), name


def test_the_command_line_reports_them(exported, capsys):
    assert main(["inspect", str(exported), "--hardware", "mpic", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["latency"] == pytest.approx(PLINIO_TOTALS["mpic_latency"], rel=1e-6)
    assert report["energy"] == pytest.approx(PLINIO_TOTALS["mpic_energy"], rel=1e-6)
    assert [layer["name"] for layer in report["layers"]] and all("latency" in layer for layer in report["layers"])
