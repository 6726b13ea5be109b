"""The report measures, not only predicts: the input and the output model timed in ONNX Runtime
(and OpenVINO when it is installed) on this machine, alternately in one run.

A cost model predicts; a user deploys the file. So after `optimize` writes its output, both
files run on the same inputs (a sample of the test split, at batch 1 or the model's fixed
batch) in each runtime, one thread, default optimization, alternately (A B A B …, the order
reversed every round) so a shared machine's noise falls on both alike; the medians and their
ratio land in the report, with a warning when the output is not faster.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

from ..errors import PlinioOnnxError
from ..runtime import ISOLATED_RUNTIMES, RUNNERS, alternate_seconds, latency_clock, openvino_available

__all__ = ["latency_lines", "latency_markdown", "latency_target_notes", "measure_latency", "not_faster", "runtimes"]


def runtimes() -> list[str]:
    """The runtimes to time in: ONNX Runtime, and OpenVINO when it can be imported."""
    return ["ort-cpu"] + (["openvino-cpu"] if openvino_available() else [])


def measure_latency(input_model: "str | os.PathLike", output_model: "str | os.PathLike",
                    input_names: list[str], samples: list[np.ndarray], *, threads: int = 1,
                    budget_s: float = 2.0, rounds: int = 15, only: list[str] | None = None) -> dict[str, dict]:
    """``{runtime: {"input_ms", "output_ms", "speedup", "threads"}}``: each model's median latency
    on the first sample(s) of ``samples`` (one array per graph input, by ``input_names``),
    timed alternately; a runtime that cannot run a model gets ``{"error": message}`` instead
    (the run's output is written already: a measure never fails it). ``only``: these runtimes
    (default: `runtimes`)."""
    models = {"input": Path(input_model), "output": Path(output_model)}
    out = {}
    for runtime in (runtimes() if only is None else only):
        try:
            time_pair = _time_isolated if runtime in ISOLATED else _time_pair
            out[runtime] = time_pair(runtime, models, input_names, samples, threads, budget_s, rounds)
        except PlinioOnnxError as err:
            out[runtime] = {"error": str(err)}
    return out


#: Runtimes timed in a process of their own (`plinio_onnx.runtime.ISOLATED_RUNTIMES`).
ISOLATED = ISOLATED_RUNTIMES


def _time_pair(runtime: str, models: dict[str, Path], input_names: list[str], samples: list[np.ndarray],
               threads: int, budget_s: float, rounds: int) -> dict:
    """The input and output model of ``models`` timed alternately in ``runtime``, in this process."""
    protos = {key: onnx.load(str(path)) for key, path in models.items()}
    runners = {key: RUNNERS[runtime](protos[key], _feeds(protos[key], input_names, samples), threads=threads,
                                     source=str(models[key])) for key in models}
    seconds = alternate_seconds(runners, rounds=rounds, budget_s=budget_s, clock=latency_clock(runtime, threads))
    return {"input_ms": 1e3 * seconds["input"], "output_ms": 1e3 * seconds["output"],
            "speedup": seconds["input"] / max(seconds["output"], 1e-12), "threads": threads}


def _time_isolated(runtime: str, models: dict[str, Path], input_names: list[str], samples: list[np.ndarray],
                   threads: int, budget_s: float, rounds: int) -> dict:
    """`_time_pair` in a fresh Python process (``python -m plinio_onnx.optimize.measure``)."""
    with tempfile.TemporaryDirectory(prefix="plinio-measure-") as folder:
        arrays = Path(folder) / "samples.npz"
        np.savez(arrays, *samples)
        job = {"runtime": runtime, "models": {k: str(v) for k, v in models.items()}, "input_names": input_names,
               "samples": str(arrays), "threads": threads, "budget_s": budget_s, "rounds": rounds}
        try:
            done = subprocess.run([sys.executable, "-m", "plinio_onnx.optimize.measure", json.dumps(job)],
                                  capture_output=True, text=True, timeout=300 + 10 * budget_s)
        except subprocess.TimeoutExpired:
            raise PlinioOnnxError(f"timing in {runtime} did not finish within its time limit") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise PlinioOnnxError(f"timing in {runtime} failed in its own process (exit {done.returncode}): {last}")
    result = json.loads(lines[-1])
    if "error" in result:
        raise PlinioOnnxError(result["error"])
    return result


def _main(job_text: str) -> None:
    """The child side of `_time_isolated`: one JSON job in, one JSON line out."""
    job = json.loads(job_text)
    with np.load(job["samples"]) as data:
        samples = [data[f"arr_{i}"] for i in range(len(data.files))]
    try:
        result = _time_pair(job["runtime"], {k: Path(v) for k, v in job["models"].items()}, job["input_names"],
                            samples, job["threads"], job["budget_s"], job["rounds"])
    except PlinioOnnxError as err:
        result = {"error": str(err)}
    print(json.dumps(result), flush=True)


def _feeds(model: onnx.ModelProto, input_names: list[str], samples: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The first sample of each input (the first ``B`` for a model whose batch is fixed at B,
    repeated when the data hold fewer), under the model's own input names."""
    initializers = {t.name for t in model.graph.initializer}
    graph_inputs = [value for value in model.graph.input if value.name not in initializers]
    by_name = dict(zip(input_names, samples))
    feeds = {}
    for value in graph_inputs:
        array = by_name.get(value.name)
        if array is None:
            raise PlinioOnnxError(f"no data for input {value.name!r} to time the model")
        dims = value.type.tensor_type.shape.dim
        batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") else 1
        take = np.resize(np.arange(min(batch, len(array))), batch)
        feeds[value.name] = np.ascontiguousarray(array[take])
    return feeds


def not_faster(measured: dict | None) -> list[str]:
    """The runtimes in which the output is not faster than the input."""
    return [runtime for runtime, row in (measured or {}).items() if "speedup" in row and row["speedup"] <= 1.0]


def latency_target_notes(constraints: list[dict], measured: dict | None, hardware: str | None,
                         slack: float = 0.05) -> list[str]:
    """Notes for a latency target on a measured profile (``hardware`` one of the runtimes
    ``measured`` holds) met in prediction while the measured output/input ratio is over the
    target's share of the input by more than ``slack`` (of the input's latency): the profile
    predicted the export's latency low, and the user should know."""
    row = (measured or {}).get(hardware or "")
    if not row or "error" in row or not row.get("input_ms"):
        return []
    notes = []
    for c in constraints:
        if c["kind"] != "latency" or not c.get("before"):
            continue
        wanted, predicted = c["target"] / c["before"], c["after"] / c["before"]
        ratio = row["output_ms"] / row["input_ms"]
        if ratio > wanted + slack:
            notes.append(f"the latency target ({c['given']}: {wanted:.1%} of the input) is met by the {hardware} "
                         f"profile's prediction ({predicted:.1%}), but the output measured {ratio:.1%} of the "
                         f"input's latency in {hardware} ({row['output_ms']:.3f} vs {row['input_ms']:.3f} ms)")
    return notes


def latency_markdown(measured: dict | None) -> list[str]:
    """The report's markdown table of measured latencies (no lines without a measure)."""
    if not measured:
        return []
    lines = ["| runtime (1 thread) | input ms | output ms | speed-up |", "|---|---:|---:|---:|"]
    for runtime, row in measured.items():
        if "error" in row:
            lines.append(f"| {runtime} | n/a | n/a | {row['error']} |")
        else:
            lines.append(f"| {runtime} | {row['input_ms']:.3f} | {row['output_ms']:.3f} | {row['speedup']:.2f}× |")
    lines += [f"- **warning**: the output is not faster than the input in {runtime}" for runtime in not_faster(measured)]
    return ["", "Measured latency (this machine; input and output timed alternately, medians):", "", *lines]


def latency_lines(measured: dict | None) -> list[str]:
    """Console lines: one per runtime, and a warning line where the output is not faster."""
    lines = []
    for runtime, row in (measured or {}).items():
        if "error" in row:
            lines.append(f"latency in {runtime}: not measured ({row['error']})")
            continue
        lines.append(f"latency in {runtime} (1 thread, measured): {row['input_ms']:.3f} ms → "
                     f"{row['output_ms']:.3f} ms (speed-up {row['speedup']:.2f}×)")
        if row["speedup"] <= 1.0:
            lines.append(f"[yellow]warning: the output is not faster than the input in {runtime} "
                         f"({row['output_ms']:.3f} vs {row['input_ms']:.3f} ms)[/yellow]")
    return lines


if __name__ == "__main__":
    _main(sys.argv[1])
