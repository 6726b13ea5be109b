"""Measuring a latency table in a process of its own (`measure_in_child`).

OpenVINO, once imported, leaves threads and an allocator behind that make the importing
process's later forks (a DataLoader's workers) read corrupted memory — NaN batches or a crash.
`optimize --hardware openvino-cpu` trains after it profiles, so `plinio_onnx.hardware.for_model`
times the table of a runtime in `plinio_onnx.runtime.ISOLATED_RUNTIMES` in a fresh Python
process (``python -m plinio_onnx.hardware.isolated JOB``) that writes it beside the model, as a
measurement in this process would; the caller then reads the cached JSON file, and the runtime
is never imported there. Progress and errors come back as JSON lines on the child's stdout.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from ..errors import PlinioOnnxError

__all__ = ["measure_in_child"]

Progress = Callable[[int, int, str], None]


def measure_in_child(model: "str | os.PathLike", *, runtime: str, channel_multiple: int, threads: int,
                     repeats: int, progress: Progress | None = None) -> Path:
    """Time ``model``'s table in ``runtime`` in a child process (`plinio_onnx.hardware.measured.measure`
    with these options) and save it beside the model; returns the table's path. ``progress``
    gets the child's ``(done, total, layer)`` calls; its errors are raised here, as they were."""
    job = {"model": str(model), "runtime": runtime, "channel_multiple": int(channel_multiple),
           "threads": int(threads), "repeats": int(repeats)}
    child = subprocess.Popen([sys.executable, "-m", "plinio_onnx.hardware.isolated", json.dumps(job)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result = None
    for line in child.stdout:
        message = _message(line)
        if "progress" in message and progress is not None:
            progress(*message["progress"])
        elif "table" in message or "error" in message:
            result = message
    stderr = child.stderr.read()
    child.wait()
    if result is None:
        last = (stderr.strip().splitlines() or ["no message"])[-1]
        raise PlinioOnnxError(f"timing in {runtime} failed in its own process (exit {child.returncode}): {last}",
                              file=str(model))
    if "error" in result:
        raise PlinioOnnxError(result["error"])
    return Path(result["table"])


def _message(line: str) -> dict:
    """One JSON line of the child; anything else it printed (a runtime's own output) is ignored."""
    try:
        message = json.loads(line)
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}


def _main(job_text: str) -> None:
    """The child: measure, save beside the model, print the table's path (or the error)."""
    from .measured import measure, table_path

    job = json.loads(job_text)

    def progress(done: int, total: int, layer: str) -> None:
        print(json.dumps({"progress": [done, total, layer]}), flush=True)

    try:
        table = measure(job["model"], runtime=job["runtime"], channel_multiple=job["channel_multiple"],
                        threads=job["threads"], repeats=job["repeats"], progress=progress)
        path = table.save(table_path(job["model"], job["runtime"]))
        print(json.dumps({"table": str(path)}), flush=True)
    except PlinioOnnxError as err:
        print(json.dumps({"error": str(err)}), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1])
