"""Inference sessions for verification, benchmarks and latency measures: ONNX Runtime (and
OpenVINO when it is installed), and timing them."""
from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from .errors import PlinioOnnxError


def ort_session(model: onnx.ModelProto, *, source: str | None = None,
                threads: int | None = None, optimize: bool = True) -> ort.InferenceSession:
    """An inference session on CPU; exact int4 MatMul kernels (see DESIGN.md).

    ``optimize=False`` runs every node as written (no fused integer kernels): the reference
    semantics of a QDQ graph, which fused int8 kernels reproduce only up to requantization
    rounding."""
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise PlinioOnnxError(f"ONNX Runtime cannot load the model: {' '.join(str(err).split())[:300]}",
                              file=source) from None


# -- timing -----------------------------------------------------------------------------------
Runner = Callable[[], object]
OPENVINO_MISSING = "OpenVINO is not installed: `pip install openvino` (in the same environment) to use it"


def ort_runner(model: "onnx.ModelProto | str | os.PathLike", feeds: dict[str, np.ndarray], *,
               threads: int = 1, source: str | None = None) -> Runner:
    """A function running ``model`` once on ``feeds`` in ONNX Runtime (CPU, default optimization
    ``ORT_ENABLE_ALL``, ``threads`` intra-op threads): what a user deploying the file would see."""
    if not isinstance(model, onnx.ModelProto):
        source = source or str(model)
        model = onnx.load(str(model))
    session = ort_session(model, source=source, threads=threads)
    return lambda: session.run(None, feeds)


#: Runtimes timed only in a process of their own (`plinio_onnx.hardware.isolated`, and the
#: report's measures): OpenVINO's threads and allocator, once loaded, make the caller's later
#: forks (a DataLoader's workers) read corrupted memory or crash.
ISOLATED_RUNTIMES = ("openvino-cpu",)


def openvino_available() -> bool:
    """Whether the ``openvino`` package is installed — found, not imported: loaded into a process,
    OpenVINO corrupts that process's later forks (a DataLoader's workers)."""
    import importlib.util
    try:
        spec = importlib.util.find_spec("openvino")
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is not None   # a package, not a folder of that name


def openvino_runner(model: "onnx.ModelProto | str | os.PathLike", feeds: dict[str, np.ndarray], *,
                    threads: int = 1, source: str | None = None) -> Runner:
    """A function running ``model`` once on ``feeds`` in OpenVINO on the CPU (``threads``
    inference threads, latency hint), compiled for the feeds' shapes (static: OpenVINO 2026.4's
    CPU plugin mis-scales some int8 graphs under a dynamic batch, tests/deploy/openvino_gap.py);
    a `PlinioOnnxError` saying how to install it when missing."""
    try:
        import openvino as ov
    except ImportError:
        raise PlinioOnnxError(OPENVINO_MISSING, file=source) from None
    import tempfile
    core = ov.Core()
    try:
        with tempfile.TemporaryDirectory() as folder:   # OpenVINO reads ONNX from a file
            if isinstance(model, onnx.ModelProto):
                onnx.save(model, os.path.join(folder, "model.onnx"))
                model = os.path.join(folder, "model.onnx")
            read = core.read_model(str(model))
            read.reshape({port: list(feeds[port.get_any_name()].shape) for port in read.inputs})
            compiled = core.compile_model(read, "CPU",
                                          {"INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY"})
    except Exception as err:
        raise PlinioOnnxError(f"OpenVINO cannot compile the model: {' '.join(str(err).split())[:300]}",
                              file=source) from None
    request = compiled.create_infer_request()
    by_position = [feeds[port.get_any_name()] for port in compiled.inputs]
    return lambda: request.infer(by_position)


RUNNERS: dict[str, Callable[..., Runner]] = {"ort-cpu": ort_runner, "openvino-cpu": openvino_runner}
Clock = Callable[[], float]


def latency_clock(runtime: str, threads: int) -> Clock:
    """The clock that times one run: with one thread ONNX Runtime computes on the calling thread,
    so that thread's CPU time is the run's latency on an idle machine and stays so on a busy one
    (other processes' time slices are not counted); otherwise (several threads, OpenVINO's own
    worker threads) the wall clock."""
    return time.thread_time if runtime == "ort-cpu" and int(threads) == 1 else time.perf_counter


def median_seconds(run: Runner, *, repeats: int = 20, warmup: int = 3, block_s: float = 0.0,
                   clock: Clock = time.perf_counter, quantile: float = 50.0) -> float:
    """The median time (on ``clock``, see `latency_clock`) of one call of ``run``: ``repeats``
    samples after ``warmup`` calls; with ``block_s``, each sample is the mean of as many calls as
    last about that long (a microsecond kernel is then not timed against the clock's resolution).
    ``quantile`` (percent) takes another percentile of the samples than the median."""
    start = clock()
    for _ in range(max(int(warmup), 1)):
        run()
    one = (clock() - start) / max(int(warmup), 1)
    steps = max(1, int(block_s / max(one, 1e-7))) if block_s > 0 else 1
    times = []
    for _ in range(max(int(repeats), 1)):
        start = clock()
        for _ in range(steps):
            run()
        times.append((clock() - start) / steps)
    return float(np.percentile(times, quantile))


def alternate_seconds(runners: dict, *, rounds: int = 15, budget_s: float = 3.0, warmup: int = 3,
                      clock: Clock = time.perf_counter, block_s: float = 0.005, quantile: float = 50.0) -> dict:
    """The median seconds of one call of each runner, timed alternately (A B A B …, the order
    reversed every round) so a shared machine's noise falls on all of them alike. Each round runs
    every runner for ~``block_s`` (at least once); ``budget_s`` caps the total (at least 3 rounds).
    ``clock``: see `latency_clock`; ``quantile`` (percent): another percentile than the median."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    slowest = max(median_seconds(run, repeats=3, warmup=0, clock=clock) for run in runners.values())
    steps = max(1, int(block_s / max(slowest, 1e-7)))
    rounds = max(3, min(int(rounds), int(budget_s / max(slowest * steps * len(runners), 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            run = runners[name]
            start = clock()
            for _ in range(steps):
                run()
            times[name].append((clock() - start) / steps)
    return {name: float(np.percentile(values, quantile)) for name, values in times.items()}
