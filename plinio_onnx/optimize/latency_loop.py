"""Latency targets closed by measurement: a measured profile predicts, the runtime decides.

With ``--target-latency`` on a measured profile (``ort-cpu``, ``openvino-cpu``) the search meets
the target in the profile's *prediction* (its per-layer table, calibrated on two whole-model
timings). Where the chosen architecture lies off the calibration line — pruning concentrated in a
few layers — the prediction can be low by several points. So after the search, the chosen
architecture is exported and timed against the input model in that runtime (alternately, in one
run: `plinio_onnx.optimize.measure`). When its measured output/input ratio is over the target's
share of the input by more than ``slack``, the predicted target is tightened by what this very
architecture showed,

    next target = wanted share × predicted latency / measured ratio,

(the prediction's error on the architecture the search settles near, taken as a factor) and the
search goes on from the chosen architecture for a round of epochs against the tighter target —
at most ``rounds`` times. A tightened target at or below the least reachable architecture stops
the loop (the run keeps its choice; the report says so). Every measure is a `LatencyRound` in
the search's summary (``latency_rounds``) and in the report's notes.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..graph import Graph
from ..hardware import is_measured
from .targets import format_cost

__all__ = ["LatencyCheck", "LatencyRound", "latency_check", "measure_for", "on_main", "round_notes",
           "runtime_measure"]

#: A measure of an exported candidate: ``{"input_ms", "output_ms"}``, or ``{"error": message}``.
Measure = Callable[[Graph], dict]


@dataclass
class LatencyRound:
    """One measure of the search's choice: the predicted ``target`` the round searched against,
    the choice's ``predicted`` latency (both in the profile's unit), its measured latency and the
    input's (ms, alternately), the ``wanted`` output/input share (the target as given), and what
    followed: ``verdict`` "met", "tightened" (``next_target`` searched next), "last round",
    "floor" (the tighter target is not reachable) or "not measured" (``error``)."""

    round: int
    target: float
    predicted: float
    base: float
    wanted: float
    input_ms: float | None = None
    output_ms: float | None = None
    verdict: str = "met"
    next_target: float | None = None
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        """The measured output/input latency ratio."""
        if self.input_ms is None or self.output_ms is None or self.input_ms <= 0:
            return None
        return self.output_ms / self.input_ms

    def to_json(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


class LatencyCheck:
    """The measure-and-tighten loop of one latency target (see the module docstring).

    ``kind``: the target's kind ("latency"); ``wanted``: its share of the input (target / base);
    ``base``: the input's predicted latency; ``min_reachable``: the least predicted latency the
    method reaches (None: unknown); ``measure``: times an exported candidate against the input;
    ``rounds``: the most rounds searched after the first measure; ``round_epochs``: the epochs of
    one round; ``slack``: how far over ``wanted`` (a share of the input's latency) still counts as
    met — the noise of a measure on a busy machine."""

    def __init__(self, kind: str, wanted: float, base: float, min_reachable: float | None, measure: Measure,
                 *, rounds: int = 2, round_epochs: int = 10, slack: float = 0.02) -> None:
        self.kind, self.wanted, self.base = kind, float(wanted), float(base)
        self.min_reachable = min_reachable
        self.measure = measure
        self.rounds, self.round_epochs, self.slack = int(rounds), max(1, int(round_epochs)), float(slack)

    def judge(self, done: int, target: float, predicted: float, measured: dict) -> LatencyRound:
        """The verdict on round ``done`` (0: the search as asked), which searched against the
        predicted ``target`` and chose an architecture predicted at ``predicted``, measured as
        ``measured`` (`Measure`'s dict)."""
        record = LatencyRound(done, float(target), float(predicted), self.base, self.wanted)
        if "error" in measured:
            record.verdict, record.error = "not measured", str(measured["error"])
            return record
        record.input_ms, record.output_ms = float(measured["input_ms"]), float(measured["output_ms"])
        ratio = record.ratio
        if ratio is None or not math.isfinite(ratio) or ratio <= self.wanted + self.slack:
            return record
        if done >= self.rounds:
            record.verdict = "last round"
            return record
        tighter = self.wanted * float(predicted) / ratio
        if self.min_reachable is not None and tighter <= self.min_reachable:
            record.verdict = "floor"
            return record
        record.verdict, record.next_target = "tightened", min(tighter, float(target))
        return record


def runtime_measure(input_model: "str | Path", runtime: str, input_names: list[str], samples: list) -> Measure:
    """A `Measure` timing a candidate against ``input_model`` in ``runtime`` (one thread,
    alternately; `plinio_onnx.optimize.measure.measure_latency`), the candidate written to a
    temporary folder."""
    from .measure import measure_latency

    def measure(graph: Graph) -> dict:
        with tempfile.TemporaryDirectory(prefix="plinio-latency-round-") as folder:
            candidate = Path(folder) / "candidate.onnx"
            graph.save(candidate)
            return measure_latency(input_model, candidate, input_names, samples, only=[runtime])[runtime]
    return measure


def measure_for(config, problem, model_path: "str | Path") -> Measure | None:
    """A latency target's `Measure` for an `optimize` run (``config``: its `OptimizeConfig`,
    ``problem``: its data): an export timed against the input on a validation sample in the
    measured profile's runtime; None without a latency target on a measured profile, or with
    ``measure_latency`` off."""
    if "latency" not in config.targets or not config.measure_latency or not is_measured(config.hardware):
        return None
    sample = [t.cpu().numpy() for t in problem.val.head(8)[0]]
    return runtime_measure(model_path, config.hardware, problem.input_names, sample)


def on_main(dist, measure: Measure) -> Measure:
    """``measure`` run on rank 0 of ``dist`` (a `plinio_onnx.optimize.distributed.Distributed`),
    its result on every rank (every rank calls it, in step)."""
    return lambda graph: dist.broadcast(measure(graph) if dist.is_main else None)


def latency_check(config, budgets: list, measure: Measure | None) -> "LatencyCheck | None":
    """The loop of a run's latency target (among ``budgets``, `plinio_onnx.optimize.targets.Budget`
    records): rounds of half the search budget, at most ``config.latency_rounds``; None without a
    latency target or a ``measure``, or with no rounds."""
    budget = next((b for b in budgets if b.kind == "latency"), None)
    if budget is None or measure is None or not config.latency_rounds:
        return None
    epochs = max(1, -(-config.recipe_with_overrides.search_epochs // 2))
    return LatencyCheck("latency", budget.value / budget.base, budget.base, budget.min_reachable, measure,
                        rounds=config.latency_rounds, round_epochs=epochs)


def round_notes(rounds: list[dict], runtime: str, unit: str = "") -> list[str]:
    """Report notes, one per measured round (``rounds``: `LatencyRound.to_json` records)."""
    notes = []
    for r in rounds:
        head = (f"latency round {r['round']} (predicted target {format_cost(r['target'])} {unit}, "
                f"{r['target'] / r['base']:.1%} of the input): the choice is predicted at {r['predicted'] / r['base']:.1%}")
        if r["verdict"] == "not measured":
            notes.append(f"{head}, not measured in {runtime} ({r['error']})")
            continue
        head += f", measured {r['ratio']:.1%} in {runtime} (wanted ≤ {r['wanted']:.1%})"
        tail = {"met": "kept",
                "tightened": f"searched on against a predicted {r['next_target'] / r['base']:.1%}"
                if r["next_target"] else "",
                "last round": "kept: no rounds left (--latency-rounds)",
                "floor": "kept: a tighter target would be below the least reachable architecture"}[r["verdict"]]
        notes.append(f"{head}; {tail}")
    return notes
