"""Timing models in a runtime for the measured latency tables (`plinio_onnx.hardware.measured`):
one-node models of a layer at given channel counts, the model's half-size anchor, a model that
does next to nothing, random inputs, and the `Timer` (ONNX Runtime or OpenVINO)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..cost import LayerSpec
from ..errors import PlinioOnnxError

__all__ = ["CALIBRATION_SEED", "RUNTIMES", "TIMING_QUANTILE", "Timer", "anchor_model", "calibration_models",
           "channel_grid", "check_runnable", "idle_model", "layer_model", "pruned_model", "random_feeds", "runtime_name"]

RUNTIMES = ("ort-cpu", "openvino-cpu")
#: The percentile of a model's timing samples taken as its latency. On a shared machine the
#: samples are bimodal (runs left alone, runs whose caches others' processes flushed) and the
#: median jumps between the modes from one timing to the next; the 20th percentile is the
#: undisturbed time, stable, and on an idle machine about the median.
TIMING_QUANTILE = 20.0


def channel_grid(size: int, multiple: int) -> list[int]:
    """The channel counts a search on blocks of ``multiple`` can keep: its multiples below
    ``size``, and ``size`` itself."""
    return sorted({*range(multiple, size, multiple), size})


def layer_model(node, spec: LayerSpec, c_in: int, c_out: int) -> onnx.ModelProto:
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


def anchor_model(graph, multiple: int):
    """The model with every prunable channel group cut to the count on the grid of ``multiple``
    nearest to half its size (PIT masks set, then finalized): a point of the calibration. None
    when nothing can be pruned."""
    return pruned_model(graph, lambda size: min(channel_grid(size, multiple), key=lambda c: abs(c - size / 2)))


#: Seed material of the calibration's random masks: a stream of its own, so the variants a
#: benchmark draws (``numpy.random.default_rng(0, 1, …)``) are never calibration points.
CALIBRATION_SEED = 0x5EED_CA1B


def calibration_models(graph, multiple: int, count: int) -> list:
    """``count`` pruned copies of the model, each channel group keeping a random count on the grid
    of ``multiple`` (as a search on channel blocks leaves them; `CALIBRATION_SEED`): the points the
    calibration's line is fitted on, beside the model and its anchor. Empty when nothing can be pruned."""
    models = []
    for index in range(count):
        rng = np.random.default_rng([CALIBRATION_SEED, index])
        model = pruned_model(graph, lambda size: int(rng.choice(channel_grid(size, multiple))))
        if model is not None:
            models.append(model)
    return models


def pruned_model(graph, keep: "Callable[[int], int]"):
    """The model with every prunable channel group of size n keeping ``keep(n)`` channels (PIT
    masks set, then finalized); None when nothing can be pruned or nothing was."""
    from ..finalize import finalize
    from ..passes import pit
    try:
        searchable = pit(graph.copy())
    except PlinioOnnxError:
        return None
    changed = False
    for name, tensor in searchable.initializers().items():
        if name.endswith(".pit_alpha"):
            alpha = np.array(tensor.values, dtype=np.float32)
            kept = keep(alpha.size)
            alpha[:alpha.size - kept] = 0.0
            tensor.values = alpha
            changed = changed or kept < alpha.size
    try:
        return finalize(searchable) if changed else None
    except PlinioOnnxError:
        return None


def idle_model() -> onnx.ModelProto:
    """A one-node model that does next to nothing: what the runtime costs per run by itself."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "idle",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


_RUNTIME_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}


def check_runnable(graph, runtime: str, source: str) -> None:
    """A node of a domain the runtime has no kernels for (nor the model a function) fails here,
    named, before anything is timed."""
    known = _RUNTIME_DOMAINS | {function.domain for function in getattr(graph.gs, "functions", [])}
    for node in graph.gs.nodes:
        if (node.domain or "") not in known:
            raise PlinioOnnxError(f"{runtime} has no kernel for ops of domain {node.domain!r}; only models of "
                                  "standard ONNX ops can be profiled", file=source, node=node.name,
                                  op=f"{node.domain}:{node.op}")


def runtime_name(name: str) -> str:
    if name not in RUNTIMES:
        raise PlinioOnnxError(f"unknown measured runtime {name!r}; choose from {', '.join(RUNTIMES)}")
    return name


class Timer:
    """Times models in one runtime (``RUNTIMES``): the `TIMING_QUANTILE` of ``repeats`` samples
    of ~1 ms each, on the calling thread's CPU time for ONNX Runtime on one thread (`latency_clock`)."""

    def __init__(self, runtime: str, threads: int, repeats: int, source: str) -> None:
        from ..runtime import RUNNERS, latency_clock
        self.version = self.runtime_version(runtime)   # fails first, with how to install it
        self.runner, self.threads, self.repeats, self.source = RUNNERS[runtime], threads, repeats, source
        self.clock = latency_clock(runtime, threads)
        self.reference = None   # (the whole model's runner, its seconds): see `times`

    @staticmethod
    def runtime_version(runtime: str) -> str:
        from importlib.metadata import PackageNotFoundError, version

        from ..runtime import OPENVINO_MISSING, openvino_available
        if runtime_name(runtime) == "ort-cpu":
            import onnxruntime
            return onnxruntime.__version__
        # The installed distribution's version, read without importing OpenVINO: a cached table is
        # checked in processes that must never load it (`plinio_onnx.hardware.isolated`).
        if not openvino_available():
            raise PlinioOnnxError(OPENVINO_MISSING)
        try:
            return version("openvino")
        except PackageNotFoundError:
            raise PlinioOnnxError(OPENVINO_MISSING) from None

    def time(self, model: "onnx.ModelProto | Path", feeds: dict | None = None) -> float:
        """Seconds of one run of ``model`` (on random inputs of its shapes by default)."""
        from ..runtime import median_seconds
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
        feeds = feeds if feeds is not None else random_feeds(proto)
        run = self.runner(proto, feeds, threads=self.threads, source=self.source)
        return median_seconds(run, repeats=self.repeats, block_s=0.001, clock=self.clock, quantile=TIMING_QUANTILE)

    def times(self, models: dict) -> dict:
        """Seconds of each of ``models`` (one-input models on random inputs), timed
        alternately with the whole model as a reference, and scaled by how far the reference
        is off its own time: entries timed at different moments of a busy machine stay comparable."""
        from ..runtime import alternate_seconds
        runners = {key: self.runner(proto, random_feeds(proto), threads=self.threads, source=self.source)
                   for key, proto in models.items()}
        if self.reference is not None:
            runners["reference"] = self.reference[0]
        seconds = alternate_seconds(runners, rounds=self.repeats, budget_s=1e9, clock=self.clock,
                                    block_s=0.001, quantile=TIMING_QUANTILE)
        drift = self.reference[1] / seconds.pop("reference") if self.reference is not None else 1.0
        return {key: value * drift for key, value in seconds.items()}

    def whole(self, path: Path, others: "dict | None" = None) -> dict:
        """Seconds of the whole model (``"whole"``) and of each of ``others`` (name → `Graph`
        with the model's inputs), timed alternately over a few seconds (at least ``2 · repeats``
        rounds); then the whole model is the reference of `times`. {} when the model's input
        sizes are not all known."""
        from ..runtime import alternate_seconds
        models = {"whole": onnx.load(str(path))}
        models.update({key: graph.to_onnx(check=False) for key, graph in (others or {}).items()})
        try:
            feeds = random_feeds(models["whole"])
        except PlinioOnnxError:
            return {}
        runners = {key: self.runner(proto, feeds, threads=self.threads, source=self.source)
                   for key, proto in models.items()}
        seconds = alternate_seconds(runners, rounds=max(2 * self.repeats, 3), budget_s=2.0 + 0.5 * len(runners),
                                    clock=self.clock, quantile=TIMING_QUANTILE)
        self.reference = (runners["whole"], seconds["whole"])
        return seconds


def random_feeds(model: onnx.ModelProto, *, batch: int = 1) -> dict[str, np.ndarray]:
    """Random float inputs for ``model``: its input shapes, a symbolic batch (the first axis) as
    ``batch``; a `PlinioOnnxError` when another size is symbolic."""
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    rng = np.random.default_rng(0)
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        if dims and dims[0] is None:
            dims[0] = batch
        if any(d is None for d in dims):
            raise PlinioOnnxError(f"input {value.name!r} has symbolic sizes; they are needed to time the model")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feeds[value.name] = np.zeros(dims, dtype) if np.issubdtype(dtype, np.integer) \
            else rng.standard_normal(dims).astype(dtype)   # integer inputs (token ids): 0 is valid
    return feeds
