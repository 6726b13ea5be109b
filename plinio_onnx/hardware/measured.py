"""Measured latency tables: each layer timed alone in ONNX Runtime on this machine, at the channel
counts a search can reach, and interpolated differentiably in the effective channel counts.

Per-layer tables are how NetAdapt and HALP prune against real latency, and nn-Meter's
kernel-level predictors show that summing kernels predicts a CPU model's latency closely. Here
every Conv (2-D or 1-D; depthwise along its channels; other grouped convs at their full size
only) and every linear layer (Gemm, MatMul with a constant weight) of a model is rebuilt as a
one-node model with the layer's attributes and input size, and timed at input × output channel
counts on the grid of ``channel_multiple`` (its multiples below the layer's size, and the size
itself): one thread, default optimization, a layer's grid points alternately with the whole
model as a reference (the 20th percentile of ``repeats`` rounds of ~1 ms blocks,
`timing.TIMING_QUANTILE`: on a shared machine the samples are bimodal and their median jumps
between the modes; every entry scaled by the reference's drift from its own time, so layers
timed minutes apart on a busy machine stay comparable). The latency of a layer at effective
counts (c_in, c_out) is the bilinear interpolation of its table (constant beyond the grid), so
it is exact at every grid point and differentiable in between; the model's latency is the sum
over layers, calibrated on the whole model (below). The table is cached beside the model
(``MODEL.ort-cpu.json``, ``MODEL.openvino-cpu.json``) and reused while the model file, the
runtime's version and the threads are the same and its grid is as fine as the one asked for.

Calibration (**ours**). A layer timed alone pays what the whole model pays once or not at all:
the runtime's fixed cost of a run, the layout reorders around it (ONNX Runtime's NCHWc kernels
reorder the input and output of a lone conv; in a chain only the ends), the kernel's set-up.
And the whole model runs ops no table holds (pooling, residual adds, activations it does not
fuse). So a layer's entries less its *fixed* part — its time at zero channels, extrapolated
from its two smallest grid points — are its *variable* time, and the model's latency is
modelled as ``fixed + k · Σ variable``: a line through the model itself, timed whole when the
table is made (``whole_seconds``), whose slope is fitted (least squares in relative error) on
pruned copies timed alternately with it: its *anchor*, every prunable channel group cut to about
half on the grid (``anchor_seconds``), and ``CALIBRATION_POINTS`` models whose groups keep
random counts on the grid, as a search leaves them (``calibration_seconds``; their masks come
from a seed stream of their own, `timing.CALIBRATION_SEED`, so a benchmark's random variants are
not calibration points). On the zoo the single-layer timings add up to 1.0–2.5× the whole
model, and the fixed share of a model runs from −6 to 16 % (DS-CNN, DenseNet) to 40–80 % (digits
CNN, ResNet-8, TCN, the tiny transformer), so both are fitted per model; random masks, uneven like a search's,
pin the slope better than uniform cuts (the zoo's 90 random variants, timed in one run with
the calibration models: 96 % within ±10 % on the anchor and 8 random masks, 94 % on the
half-size anchor alone). And ``"fit"`` reads each layer's table smoothed: every entry
replaced by the least-squares fit over the layer's grid of ``a + b·c_in + c·c_out + d·c_in·c_out``
(a run's set-up, the input's and the output's reorders, the arithmetic; depthwise ``a + b·c``),
so one entry timed in a busy moment — a microsecond Gemm is ±10 % from one timing to the next
here — does not bend the layer (`LayerTable.smoothed`; the FC autoencoder's calibration points
were missed by up to 7.5 % reading the entries as timed, 3.8 % smoothed). A layer
costs ``fixed / n + k · variable`` over the table's ``n`` layers, so the sum is exact on the
profiled model (``"fit"``). Without an anchor (nothing prunable, symbolic sizes) it is
``"scale"``: the variable time is the entry less ``run_seconds`` (a run of a one-node model that
does next to nothing), fixed = ``run_seconds`` and k so the model's sum is exact; ``"add"``
(k = 1, the rest a constant) and ``"none"`` (the plain sum of the entries) are there for
comparison. `bench/latency_prediction.py` measures how well each predicts pruned variants of
the zoo that are not calibration points.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..cost import LayerSpec, layer_specs
from ..errors import PlinioOnnxError
from .profile import HardwareProfile
from .rounding import clamp, interpolate
from .timing import (RUNTIMES, Timer, anchor_model, calibration_models, channel_grid, check_runnable, idle_model,
                     layer_model, random_feeds, runtime_name)

__all__ = ["CALIBRATIONS", "RUNTIMES", "LatencyTable", "LayerTable", "cached_table", "channel_grid", "load_or_measure",
           "measure", "measured_profile", "ort_cpu_profile", "random_feeds", "table_path"]

TABLE_VERSION = 4
#: Random-mask models timed whole, beside the model and its anchor, to fit the calibration on.
CALIBRATION_POINTS = 8
CALIBRATIONS = ("fit", "scale", "add", "none")
Progress = Callable[[int, int, str], None]  # (layers done, layers in all, the layer being timed)


@dataclass
class LayerTable:
    """Seconds of one layer at each (input, output) channel count of its grid."""

    op: str
    in_grid: list[int]             # input channel counts; [] for a depthwise conv (input = output)
    out_grid: list[int]            # output channel counts
    seconds: list[list[float]]     # [input index][output index] (depthwise: one row)

    def latency(self, in_channels: Any, out_channels: Any) -> Any:
        """Bilinear interpolation at (``in_channels``, ``out_channels``), numbers or tensors."""
        rows = [interpolate(dict(zip(self.out_grid, row)), out_channels) for row in self.seconds]
        if not self.in_grid:
            return rows[0]
        return interpolate(dict(zip(self.in_grid, rows)), in_channels)

    @property
    def full(self) -> float:
        """Seconds at the layer's own size (the last grid point of both axes)."""
        return self.seconds[-1][-1]

    def smoothed(self) -> "LayerTable":
        """The table with every entry replaced by the least-squares fit over its grid of
        ``a + b·c_in + c·c_out + d·c_in·c_out`` (depthwise: ``a + b·c``) — a run's set-up, the
        reorders of the input and the output, the arithmetic — where the grid has the points for
        it (depthwise 3; otherwise 2 × 2 and 5 in all); as timed otherwise. An entry timed in a
        busy moment then no longer bends the layer's slope (**ours**; see the module docstring)."""
        if not self.in_grid:
            if len(self.out_grid) < 3:
                return self
            terms = np.array([[1.0, c] for c in self.out_grid])
            values = np.array(self.seconds[0])
        else:
            if len(self.in_grid) < 2 or len(self.out_grid) < 2 or len(self.in_grid) * len(self.out_grid) < 5:
                return self
            terms = np.array([[1.0, i, o, i * o] for i in self.in_grid for o in self.out_grid])
            values = np.array([s for row in self.seconds for s in row])
        fitted = np.maximum(terms @ np.linalg.lstsq(terms, values, rcond=None)[0], 0.0).tolist()
        width = len(self.out_grid)
        rows = [fitted[start:start + width] for start in range(0, len(fitted), width)]
        return LayerTable(self.op, list(self.in_grid), list(self.out_grid), rows)

    @property
    def fixed(self) -> float:
        """Seconds at zero channels, extrapolated linearly from the two smallest grid points of
        each axis (within [0, its smallest entry]): what the layer costs alone whatever its size
        (the run, the reorders around it, the kernel's set-up)."""
        def at_zero(grid: list[int], values: list[float]) -> float:
            if len(grid) < 2:
                return values[0]
            return values[0] - grid[0] * (values[1] - values[0]) / (grid[1] - grid[0])
        rows = [at_zero(self.out_grid, row) for row in self.seconds]
        value = rows[0] if not self.in_grid else at_zero(self.in_grid, rows)
        return min(max(value, 0.0), min(min(row) for row in self.seconds))


@dataclass(eq=False)  # hashed by identity: searches key their caches by cost model
class LatencyTable:
    """A model's measured per-layer latency: call it on a `LayerSpec` (a cost model, seconds;
    calibrated on the whole model, see the module docstring); layers it did not time cost 0."""

    model_sha256: str
    channel_multiple: int
    threads: int
    runtime_version: str
    layers: dict[str, LayerTable] = field(default_factory=dict)
    runtime: str = "ort-cpu"
    run_seconds: float = 0.0            # one run of a one-node model that does next to nothing
    whole_seconds: float | None = None  # the profiled model, whole (None: not timed)
    anchor_seconds: float | None = None     # its anchor (about half the channels), whole
    anchor_channels: dict[str, list[int]] | None = None   # the anchor's layers: name → [in, out]
    calibration_seconds: list[float] = field(default_factory=list)   # random-mask models, whole
    calibration_channels: list[dict[str, list[int]]] = field(default_factory=list)  # their layers
    calibration: str = "fit"            # "fit", "scale", "add" or "none" (the plain sum of the entries)
    smooth: bool = True                 # "fit" reads each layer's table smoothed (`LayerTable.smoothed`)
    version: int = TABLE_VERSION

    def __call__(self, spec: LayerSpec) -> Any:
        table = self.entries().get(spec.name)
        if table is None:
            return 0.0
        measured = table.latency(spec.in_channels, spec.out_channels)
        if self.calibration == "none" or self.whole_seconds is None or not self.layers:
            return measured
        fixed, k, base = self.calibrated()
        return fixed / len(self.layers) + k * clamp(measured - base[spec.name], 0.0, float("inf"))

    def entries(self) -> dict[str, LayerTable]:
        """The layer tables the cost model reads: smoothed under ``"fit"`` (with ``smooth``), as
        timed under the other calibrations."""
        if self.calibration != "fit" or not self.smooth:
            return self.layers
        memo = self.__dict__.get("_smoothed")
        if memo is None or memo[0] is not self.layers:
            memo = self.__dict__["_smoothed"] = (self.layers, {n: t.smoothed() for n, t in self.layers.items()})
        return memo[1]

    def calibrated(self) -> tuple[float, float, dict[str, float]]:
        """(fixed, k, base): the model's latency is ``fixed + k · Σ (entry − base[layer])`` over
        its layers (the module docstring says which line each calibration draws)."""
        key = (self.calibration, self.smooth, self.whole_seconds, self.anchor_seconds, self.run_seconds,
               len(self.layers), tuple(self.calibration_seconds))
        memo = self.__dict__.get("_memo")
        if memo is None or memo[0] != key:
            memo = self.__dict__["_memo"] = (key, self._calibrate())
        return memo[1]

    def _calibrate(self) -> tuple[float, float, dict[str, float]]:
        whole = float(self.whole_seconds)
        points = self.calibration_points()
        if self.calibration == "fit" and points:
            base = {name: t.fixed for name, t in self.entries().items()}
            full = self._variable(base)
            line = _line_through(full, whole, [(self._variable(base, channels), seconds) for channels, seconds in points])
            if line is not None:
                return line[0], line[1], base
        base = {name: self.run_seconds for name in self.layers}
        full = self._variable(base)
        if full <= 0:   # no layer costs more than an idle run: the whole model is fixed cost
            return whole, 0.0, base
        if self.calibration == "add":
            return whole - full, 1.0, base
        return self.run_seconds, (whole - self.run_seconds) / full, base   # "scale" (and "fit" without anchor)

    def calibration_points(self) -> list[tuple[dict[str, list[int]], float]]:
        """The pruned models timed whole when the table was made, as (layers' [in, out] channels,
        seconds): the anchor, then the random-mask models."""
        points = []
        if self.anchor_seconds is not None and self.anchor_channels:
            points.append((self.anchor_channels, float(self.anchor_seconds)))
        points += [(channels, float(seconds)) for channels, seconds in
                   zip(self.calibration_channels, self.calibration_seconds)]
        return points

    def _variable(self, base: dict[str, float], channels: dict[str, list[int]] | None = None) -> float:
        """Σ (entry − base) over the layers, at ``channels`` (name → [in, out]) or their own sizes."""
        total = 0.0
        for name, table in self.entries().items():
            entry = table.full if channels is None or name not in channels else \
                float(table.latency(*channels[name]))
            total += max(entry - base[name], 0.0)
        return total

    def predict(self, graph) -> float:
        """The modelled seconds of ``graph`` (a `plinio_onnx.Graph` with this table's layer names,
        e.g. an export of the profiled model)."""
        return float(sum(self(spec) for spec in layer_specs(graph)))

    def save(self, path: "str | os.PathLike") -> Path:
        """Write the table as JSON, atomically (temp file + rename)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(asdict(self), out, indent=1)
            os.chmod(tmp, 0o644)  # an ordinary file, not mkstemp's private one
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @staticmethod
    def load(path: "str | os.PathLike") -> "LatencyTable":
        data = json.loads(Path(path).read_text())
        layers = {name: LayerTable(**entry) for name, entry in data.pop("layers").items()}
        return LatencyTable(layers=layers, **data)


def _line_through(full: float, whole: float, points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(fixed, k) of the line ``fixed + k · variable`` through (``full``, ``whole``) — the profiled
    model, exact — whose slope fits ``points`` ((variable, seconds) of pruned models) best in
    relative error (least squares weighted by 1 / seconds²); ``fixed`` kept within
    [−whole / 2, whole]. It may be negative: the table's variable time (its entries less their
    extrapolation to zero channels) can shrink faster than the whole model does, and the line is
    fitted where a search goes — between the model and its pruned copies. None when the points
    do not spread in variable time or do not rise with it (no slope to fit)."""
    weights = [1.0 / max(seconds, 1e-12) ** 2 for _, seconds in points]
    spread = sum(w * (variable - full) ** 2 for w, (variable, _) in zip(weights, points))
    if full <= 0 or spread <= (1e-3 * full) ** 2 * sum(weights):
        return None
    k = sum(w * (variable - full) * (seconds - whole) for w, (variable, seconds) in zip(weights, points)) / spread
    if k <= 0:   # pruned copies no faster than the model: timing noise, no slope to fit
        return None
    fixed = min(max(whole - k * full, -whole / 2), whole)
    return fixed, (whole - fixed) / full


def table_path(model: "str | os.PathLike", runtime: str = "ort-cpu") -> Path:
    """Where the table of ``model`` is cached: ``MODEL.ort-cpu.json`` (``MODEL.RUNTIME.json``) beside it."""
    model = Path(model)
    return model.with_name(f"{model.stem}.{runtime_name(runtime)}.json")


def measure(model: "str | os.PathLike", *, runtime: str = "ort-cpu", channel_multiple: int = 8, threads: int = 1,
            repeats: int = 20, progress: Progress | None = None,
            calibration_points: int = CALIBRATION_POINTS) -> LatencyTable:
    """Time every layer of ``model`` (an .onnx path) on its channel grid, the runtime's fixed cost
    of a run, and the whole model with its anchor and ``calibration_points`` random-mask models
    (see the module docstring)."""
    from ..load import load
    path = Path(model)
    sha = _sha256(path)
    graph = load(path)
    nodes = {node.name: node for node in graph.gs.nodes}
    specs = [s for s in layer_specs(graph) if s.kind in ("conv", "linear")]
    features = _features_per_channel(graph)
    check_runnable(graph, runtime, str(path))
    if not specs:
        raise PlinioOnnxError("no layer to time (no Conv, Gemm or MatMul with a constant weight)", file=str(path))
    timer = Timer(runtime, int(threads), repeats, str(path))
    table = LatencyTable(sha, int(channel_multiple), int(threads), timer.version, runtime=runtime)
    others = {"anchor": anchor_model(graph, channel_multiple)}
    others.update({f"random{i}": model for i, model in enumerate(calibration_models(graph, channel_multiple,
                                                                                   calibration_points))})
    others = {key: model for key, model in others.items() if model is not None}
    # first: a model the runtime cannot run fails now
    whole = timer.whole(path, others)
    table.whole_seconds, table.anchor_seconds = whole.get("whole"), whole.get("anchor")
    idle = timer.time(idle_model())
    for done, spec in enumerate(specs):
        if progress is not None:
            progress(done, len(specs), spec.name)
        try:
            table.layers[spec.name] = _measure_layer(nodes[spec.name], spec, channel_multiple,
                                                     features.get(spec.name, 1), timer)
        except PlinioOnnxError as err:
            raise PlinioOnnxError(f"cannot time this layer alone: {err.message}", file=str(path), node=spec.name,
                                  op=spec.op) from None
    # Nothing runs faster than the idle model: an entry below it means a busy moment inflated it.
    idle = min(idle, timer.time(idle_model()))
    table.run_seconds = min([idle] + [s for layer in table.layers.values() for row in layer.seconds for s in row])
    for key, model in others.items():
        if key not in whole:
            continue
        channels = {s.name: [int(s.in_channels), int(s.out_channels)] for s in layer_specs(model) if s.name in table.layers}
        if key == "anchor":
            table.anchor_channels = channels
        else:
            table.calibration_channels.append(channels)
            table.calibration_seconds.append(whole[key])
    if progress is not None:
        progress(len(specs), len(specs), "")
    return table


def cached_table(model: "str | os.PathLike", *, runtime: str = "ort-cpu", channel_multiple: int = 8,
                 threads: int = 1) -> LatencyTable | None:
    """The table cached beside ``model`` when it still describes it (the same file, runtime
    version and threads, a grid that holds the one of ``channel_multiple``), else None."""
    cache = table_path(model, runtime)
    if not cache.exists():
        return None
    try:
        table = LatencyTable.load(cache)
    except (ValueError, TypeError, KeyError):
        return None  # an unreadable or older cache: measured again
    fits = table.version == TABLE_VERSION and table.runtime == runtime and table.threads == threads \
        and channel_multiple % table.channel_multiple == 0 and table.model_sha256 == _sha256(Path(model)) \
        and table.runtime_version == Timer.runtime_version(runtime)
    return table if fits else None


def load_or_measure(model: "str | os.PathLike", *, runtime: str = "ort-cpu", channel_multiple: int = 8,
                    threads: int = 1, repeats: int = 20, progress: Progress | None = None,
                    force: bool = False) -> LatencyTable:
    """The cached table of ``model`` when it still describes it (`cached_table`; not with
    ``force``), else a fresh measurement (written beside the model, atomically)."""
    table = None if force else cached_table(model, runtime=runtime, channel_multiple=channel_multiple,
                                            threads=threads)
    if table is None:
        table = measure(model, runtime=runtime, channel_multiple=channel_multiple, threads=threads,
                        repeats=repeats, progress=progress)
        table.save(table_path(model, runtime))
    return table


def measured_profile(model: "str | os.PathLike", runtime: str = "ort-cpu", *, channel_multiple: int = 8,
                     threads: int = 1, repeats: int = 20, progress: Progress | None = None,
                     force: bool = False) -> HardwareProfile:
    """The measured ``runtime`` profile of ``model``: its latency table (cached or measured now)
    as the latency cost model, in seconds; float layers as they are."""
    table = load_or_measure(model, runtime=runtime, channel_multiple=channel_multiple, threads=threads,
                            repeats=repeats, progress=progress, force=force)
    engine = "ONNX Runtime" if runtime == "ort-cpu" else "OpenVINO"
    return HardwareProfile(runtime, latency=table, channel_multiple=channel_multiple, weight_bits=(8,),
                           activation_bits=(8,), default_bits=None, latency_unit="s",
                           description=f"{engine} {table.runtime_version} on this CPU, {threads} thread(s), "
                                       "measured per layer",
                           source=str(table_path(model, runtime)))


def ort_cpu_profile(model: "str | os.PathLike", *, channel_multiple: int = 8, threads: int = 1,
                    repeats: int = 20, progress: Progress | None = None) -> HardwareProfile:
    """The measured ONNX Runtime CPU profile of ``model`` (`measured_profile`)."""
    return measured_profile(model, "ort-cpu", channel_multiple=channel_multiple, threads=threads,
                            repeats=repeats, progress=progress)


# -- timing the layers ------------------------------------------------------------------------
def _features_per_channel(graph) -> dict[str, int]:
    """Input features per channel of each layer that reads a flattened tensor (a Gemm after
    Flatten reads H·W features of every channel): its input grid steps in channels, not features."""
    from ..analysis import analyze_channels
    try:
        analysis = analyze_channels(graph.copy())
    except PlinioOnnxError:
        return {}
    return {node: int(entries[0][1]) for node, entries in analysis.layer_inputs.items()
            if len({int(e[1]) for e in entries}) == 1 and int(entries[0][1]) > 1}


def _measure_layer(node, spec: LayerSpec, multiple: int, features: int, timer: "Timer") -> LayerTable:
    grouped = spec.kind == "conv" and spec.groups > 1 and not spec.depthwise
    out_grid = [spec.out_channels] if grouped else channel_grid(spec.out_channels, multiple)
    if spec.depthwise:
        seconds = timer.times({(c, c): layer_model(node, spec, c, c) for c in out_grid})
        return LayerTable(node.op, [], out_grid, [[seconds[c, c] for c in out_grid]])
    if grouped or spec.in_channels % features:
        in_grid = [spec.in_channels]
    else:
        in_grid = [c * features for c in channel_grid(spec.in_channels // features, multiple)]
    seconds = timer.times({(c_in, c_out): layer_model(node, spec, c_in, c_out) for c_in in in_grid
                           for c_out in out_grid})
    return LayerTable(node.op, in_grid, out_grid, [[seconds[c_in, c_out] for c_out in out_grid] for c_in in in_grid])


def _sha256(path: Path) -> str:
    if not path.is_file():
        raise PlinioOnnxError(f"{path}: no such model file")
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
