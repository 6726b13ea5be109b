"""Measured latency tables: each layer timed alone in ONNX Runtime on this machine, at the channel
counts a search can reach, and interpolated differentiably in the effective channel counts.

Per-layer tables are how NetAdapt and HALP prune against real latency, and nn-Meter's
kernel-level predictors show that summing kernels predicts a CPU model's latency closely. Here
every Conv (2-D or 1-D; depthwise along its channels; other grouped convs at their full size
only) and every linear layer (Gemm, MatMul with a constant weight) of a model is rebuilt as a
one-node model with the layer's attributes and input size, and timed (median of ``repeats``
runs after a warm-up, one thread, default optimization) at input × output channel counts on the
grid of ``channel_multiple`` (its multiples below the layer's size, and the size itself). The
latency of a layer at effective counts (c_in, c_out) is the bilinear interpolation of its table
(constant beyond the grid), so it is exact at every grid point and differentiable in between;
the model's latency is the sum over layers. The table is cached beside the model
(``MODEL.ort-cpu.json``) and reused while the model file, the grid, the threads and the ONNX
Runtime version are the same.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..cost import LayerSpec, layer_specs
from ..errors import PlinioOnnxError
from .profile import HardwareProfile
from .rounding import interpolate

TABLE_VERSION = 1
RUNTIME = "ort-cpu"
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


@dataclass(eq=False)  # hashed by identity: searches key their caches by cost model
class LatencyTable:
    """A model's measured per-layer latency: call it on a `LayerSpec` (a cost model, seconds);
    layers it did not time cost 0."""

    model_sha256: str
    channel_multiple: int
    threads: int
    runtime_version: str
    layers: dict[str, LayerTable] = field(default_factory=dict)
    version: int = TABLE_VERSION

    def __call__(self, spec: LayerSpec) -> Any:
        table = self.layers.get(spec.name)
        return 0.0 if table is None else table.latency(spec.in_channels, spec.out_channels)

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


def table_path(model: "str | os.PathLike") -> Path:
    """Where the table of ``model`` is cached: ``MODEL.ort-cpu.json`` beside it."""
    model = Path(model)
    return model.with_name(f"{model.stem}.{RUNTIME}.json")


def channel_grid(size: int, multiple: int) -> list[int]:
    """The channel counts a search on blocks of ``multiple`` can keep: its multiples below
    ``size``, and ``size`` itself."""
    return sorted({*range(multiple, size, multiple), size})


def measure(model: "str | os.PathLike", *, channel_multiple: int = 8, threads: int = 1, repeats: int = 20,
            progress: Progress | None = None) -> LatencyTable:
    """Time every layer of ``model`` (an .onnx path) on its channel grid (see the module docstring)."""
    import onnxruntime

    from ..load import load
    path = Path(model)
    graph = load(path)
    nodes = {node.name: node for node in graph.gs.nodes}
    specs = [s for s in layer_specs(graph) if s.kind in ("conv", "linear")]
    features = _features_per_channel(graph)
    table = LatencyTable(_sha256(path), int(channel_multiple), int(threads), onnxruntime.__version__)
    for done, spec in enumerate(specs):
        if progress is not None:
            progress(done, len(specs), spec.name)
        table.layers[spec.name] = _measure_layer(nodes[spec.name], spec, channel_multiple, features.get(spec.name, 1),
                                                 threads, repeats, str(path))
    if progress is not None:
        progress(len(specs), len(specs), "")
    return table


def load_or_measure(model: "str | os.PathLike", *, channel_multiple: int = 8, threads: int = 1,
                    repeats: int = 20, progress: Progress | None = None) -> LatencyTable:
    """The cached table of ``model`` when it still describes it, else a fresh measurement
    (written beside the model)."""
    import onnxruntime
    cache = table_path(model)
    if cache.exists():
        try:
            table = LatencyTable.load(cache)
        except (ValueError, TypeError, KeyError):
            table = None  # an unreadable or older cache: measured again
        if table is not None and table.version == TABLE_VERSION and table.model_sha256 == _sha256(Path(model)) \
                and table.channel_multiple == channel_multiple and table.threads == threads \
                and table.runtime_version == onnxruntime.__version__:
            return table
    table = measure(model, channel_multiple=channel_multiple, threads=threads, repeats=repeats, progress=progress)
    table.save(cache)
    return table


def ort_cpu_profile(model: "str | os.PathLike", *, channel_multiple: int = 8, threads: int = 1,
                    repeats: int = 20, progress: Progress | None = None) -> HardwareProfile:
    """The measured ONNX Runtime CPU profile of ``model``: its latency table (cached or
    measured now) as the latency cost model, in seconds; float layers as they are."""
    table = load_or_measure(model, channel_multiple=channel_multiple, threads=threads, repeats=repeats,
                            progress=progress)
    return HardwareProfile(RUNTIME, latency=table, channel_multiple=channel_multiple, weight_bits=(8,),
                           activation_bits=(8,), default_bits=None, latency_unit="s",
                           description=f"ONNX Runtime {table.runtime_version} on this CPU, {threads} thread(s), "
                                       "measured per layer",
                           source=str(table_path(model)))


# -- timing one layer -------------------------------------------------------------------------
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


def _measure_layer(node, spec: LayerSpec, multiple: int, features: int, threads: int, repeats: int,
                   source: str) -> LayerTable:
    grouped = spec.kind == "conv" and spec.groups > 1 and not spec.depthwise
    out_grid = [spec.out_channels] if grouped else channel_grid(spec.out_channels, multiple)
    if spec.depthwise:
        return LayerTable(node.op, [], out_grid, [[_time(_layer_model(node, spec, c, c), threads, repeats, source)
                                                   for c in out_grid]])
    if grouped or spec.in_channels % features:
        in_grid = [spec.in_channels]
    else:
        in_grid = [c * features for c in channel_grid(spec.in_channels // features, multiple)]
    seconds = [[_time(_layer_model(node, spec, c_in, c_out), threads, repeats, source) for c_out in out_grid]
               for c_in in in_grid]
    return LayerTable(node.op, in_grid, out_grid, seconds)


def _layer_model(node, spec: LayerSpec, c_in: int, c_out: int) -> onnx.ModelProto:
    """A one-node model: ``node`` with ``c_in`` input and ``c_out`` output channels, batch 1."""
    shape = [1 if not isinstance(d, (int, np.integer)) else int(d) for d in node.inputs[0].shape]
    shape[0] = 1
    rng = np.random.default_rng(0)
    attrs = {k: v for k, v in node.attrs.items() if k not in ("group",)}
    inputs = ["x", "w"]
    if node.op == "Conv":
        shape[1] = c_in
        groups = c_in if spec.depthwise else spec.groups
        kernel = list(spec.extra["kernel_shape"])
        weight = rng.standard_normal([c_out, c_in // groups, *kernel]).astype(np.float32)
        attrs["group"] = groups
    elif node.op == "Gemm":
        shape = [1, c_in]
        attrs = {"transB": 1}
        weight = rng.standard_normal([c_out, c_in]).astype(np.float32)
    else:  # MatMul with a constant [in, out] weight
        shape[-1] = c_in
        attrs = {}
        weight = rng.standard_normal([c_in, c_out]).astype(np.float32)
    initializers = [onnx.numpy_helper.from_array(weight, "w")]
    if spec.bias and node.op in ("Conv", "Gemm"):
        inputs.append("b")
        initializers.append(onnx.numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "b"))
    layer = helper.make_node(node.op, inputs, ["y"], **attrs)
    graph = helper.make_graph([layer], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def _time(model: onnx.ModelProto, threads: int, repeats: int, source: str) -> float:
    """Median seconds of one run of ``model`` on random input."""
    from ..runtime import ort_session
    session = ort_session(model, source=source, threads=threads)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    feed = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(max(int(repeats), 1)):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _sha256(path: Path) -> str:
    if not path.is_file():
        raise PlinioOnnxError(f"{path}: no such model file")
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
