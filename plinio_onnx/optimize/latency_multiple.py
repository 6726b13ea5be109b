"""The channel multiple of a latency target on a measured profile, when none is given.

A measured CPU profile searches channels in blocks of this CPU's NCHWc block (16 with AVX-512)
by default: off-block counts drop ONNX Runtime out of its blocked kernels, so a model pruned on
finer blocks can run slower than its input. But a small model — a few µs a layer, most of its
latency the fixed cost of a run and of each op — may not reach a latency target on blocks of 16
at all: one block per layer is already most of the layer. And a single-layer table cannot see
what an off-block layer costs the whole model in ONNX Runtime (its NCHWc chain broken: reorders
around it), so its prediction of a small model's least architecture can be low by 10 points or
more. Rather than refuse, the run tries the finer blocks that divide the CPU's (8, 4, 2, 1),
measuring each one's table, and searches on the coarsest whose least reachable architecture
leaves room under the target in prediction (at most `ROOM` of it) and — with a ``measure`` (the
run's latency measure on) — reaches it when exported and timed against the input in the runtime;
failing that, the coarsest that reaches it in both, then in prediction — but only while the table itself shows that
the block matters little for this model: its off-block entries (a channel count off the block)
cost, in the median, at most `BLOCK_PENALTY` more than the block-aligned counts above them
(`block_penalty`; the median, so that one entry timed in a busy moment does not decide). Where
the table shows the blocked kernels' cliff, no finer block is tried, and the target is refused. The choice and its reason are a note of the run's report.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import PlinioOnnxError
from ..graph import Graph
from .methods import Method
from .targets import COST_OF_TARGET, Budget, budgets, cost_ref

__all__ = ["BLOCK_PENALTY", "ROOM", "MultipleChoice", "block_penalty", "choose_multiple", "finer_multiples"]

#: A finer block is chosen when its least reachable latency is at most this share of the target
#: (room for the search to choose among architectures, not only the smallest).
ROOM = 0.95
#: The most the off-block entries of a table may cost over the block-aligned ones above them
#: (median) for finer blocks to be tried ("the block matters little").
BLOCK_PENALTY = 0.10


def finer_multiples(block: int) -> list[int]:
    """``block`` and its halvings down to 1: the multiples tried, coarsest first."""
    out, multiple = [], int(block)
    while multiple >= 1:
        out.append(multiple)
        if multiple % 2:
            break
        multiple //= 2
    return out if out[-1] == 1 else [*out, 1]


def block_penalty(table: Any, block: int) -> float:
    """The median relative cost of an off-block entry of ``table`` (a
    `plinio_onnx.hardware.LatencyTable`: a channel count off the block on either axis) over the
    entry at the block-aligned counts above it (the layer's size where no block fits), over every
    layer: how much leaving the block costs here (0 without off-block entries)."""
    def up(grid: list[int], count: int) -> int:
        return min([c for c in grid if c >= count and (c % block == 0 or c == grid[-1])] or [grid[-1]])

    excess = []
    for layer in table.layers.values():
        ins = layer.in_grid or [0]
        for i, c_in in enumerate(ins):
            row_up = ins.index(up(ins, c_in)) if layer.in_grid else 0
            for o, c_out in enumerate(layer.out_grid):
                column_up = layer.out_grid.index(up(layer.out_grid, c_out))
                aligned = layer.seconds[row_up][column_up]
                if (row_up, column_up) != (i, o) and aligned > 0:
                    excess.append(layer.seconds[i][o] / aligned - 1.0)
    return float(statistics.median(excess)) if excess else 0.0


@dataclass
class MultipleChoice:
    """The multiple a latency target searches on: ``multiple`` (the method and profile built
    with it), the CPU's ``block``, the least reachable share of the input's predicted latency of
    every multiple tried (``least``), the chosen table's `block_penalty` (None at the block
    itself) and the share of the input's predicted latency that is fixed cost (``fixed_share``)."""

    multiple: int
    block: int
    method: Method
    profile: Any
    wanted: float
    least: dict[int, float] = field(default_factory=dict)
    measured: dict[int, float] = field(default_factory=dict)
    penalty: float | None = None
    fixed_share: float | None = None

    @property
    def note(self) -> str | None:
        """The report's note on the choice (None: the CPU's block, as without a latency target)."""
        if self.multiple == self.block:
            return None
        tried = ", ".join(f"{m}: {share:.0%}" + (f" predicted, {self.measured[m]:.0%} measured" if m in self.measured
                                                 else "") for m, share in self.least.items() if m > self.multiple)
        reach = f"{self.least[self.multiple]:.0%}" + (f" ({self.measured[self.multiple]:.0%} measured)"
                                                      if self.multiple in self.measured else "")
        fixed = f"; {self.fixed_share:.0%} of its predicted latency is fixed cost" if self.fixed_share is not None else ""
        return (f"channels searched in blocks of {self.multiple}, not this CPU's block of {self.block}: the "
                f"least reachable latency on coarser blocks ({tried}, of the input's) leaves no room "
                f"under the {self.wanted:.0%} target in prediction or misses it measured, blocks of {self.multiple} reach {reach}, and the "
                f"{self.profile.name} table shows the block matters "
                f"little for this model (its off-block channel counts cost {max(self.penalty, 0.0):.0%} more than the "
                f"block-aligned counts above them, in the median{fixed})")


def _latency_budget(graph: Graph, method: Method, targets: dict, profile: Any) -> tuple[Budget, bool]:
    """The latency budget on ``profile`` for ``method`` and whether every target is reachable."""
    refs = {kind: cost_ref(COST_OF_TARGET[kind], method=method, profile=profile) for kind in targets}
    found = budgets(targets, graph, method, refs, profile, refuse=False)
    return next(b for b in found if b.kind == "latency"), all(b.reachable for b in found)


def _fixed_share(table: Any) -> float | None:
    calibrated = getattr(table, "calibrated", None)
    if calibrated is None or not table.whole_seconds:
        return None
    return calibrated()[0] / table.whole_seconds


def _measured_least(graph: Graph, method: Method, ref: Any, measure: Callable[[Graph], dict]) -> float | None:
    """The measured output/input latency ratio of the least reachable architecture's export."""
    model = method.build(graph, "params")
    model.eval()
    model.min_cost(ref)
    row = measure(model.export())
    if "error" in row or not row.get("input_ms"):
        return None
    return row["output_ms"] / row["input_ms"]


def choose_multiple(graph: Graph, method: Method, targets: dict, profile: Any,
                    profile_of: Callable[[int], Any], measure: Callable[[Graph], dict] | None = None
                    ) -> MultipleChoice:
    """The multiple a latency target on the measured ``profile`` (at the CPU's block, its
    ``channel_multiple``) searches on (see the module docstring); ``profile_of(m)``: the
    profile on blocks of ``m`` (its table measured now when none as fine is cached);
    ``measure``: times an export against the input in the runtime (a
    `plinio_onnx.optimize.latency_loop.Measure`). Targets no multiple tried reaches (in
    prediction) fail here, naming what each reached."""
    block = int(profile.channel_multiple)
    choice = MultipleChoice(block, block, method, profile, 0.0)
    reaching, predicted_only, cliff = None, None, None
    for multiple in finer_multiples(block):
        here = profile if multiple == block else profile_of(multiple)
        candidate = method.with_channel_multiple(multiple)
        latency, reachable = _latency_budget(graph, candidate, targets, here)
        choice.wanted = latency.value / latency.base
        if latency.min_reachable is None:
            return choice
        choice.least[multiple] = latency.min_reachable / latency.base
        penalty = None if multiple == block else block_penalty(here.latency, block)
        if penalty is not None and penalty > BLOCK_PENALTY:
            cliff = (multiple, penalty)   # the blocked kernels' cliff shows in this model's table
            break
        found = MultipleChoice(multiple, block, candidate, here, choice.wanted, choice.least, choice.measured,
                               penalty, _fixed_share(here.latency))
        if not reachable:
            continue
        predicted_only = predicted_only or found
        if measure is not None:
            ratio = _measured_least(graph, candidate, latency.ref, measure)
            if ratio is not None:
                choice.measured[multiple] = ratio
                if ratio > choice.wanted:
                    continue   # the runtime does not reach the target on these blocks, even at the least
        if latency.min_reachable <= ROOM * latency.value:
            return found
        reaching = reaching or found
    if reaching is None and predicted_only is None and len(choice.least) > 1:
        raise _unreachable(choice, cliff)
    return reaching or predicted_only or choice


def _unreachable(choice: MultipleChoice, cliff: tuple[int, float] | None) -> PlinioOnnxError:
    least = ", ".join(f"{m}: {share:.0%}" for m, share in choice.least.items())
    why = ""
    if cliff is not None:
        why = (f"; no finer block was searched: on blocks of {cliff[0]} the {choice.profile.name} table shows "
               f"off-block channel counts costing {cliff[1]:.0%} more than the block-aligned counts above them, "
               "in the median")
    return PlinioOnnxError(f"target latency {choice.wanted:.0%} of the input's is below the smallest architecture "
                           f"pit can reach on every channel block tried (the least reachable share of the input's "
                           f"predicted latency on blocks of {least}){why}")
