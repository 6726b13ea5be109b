"""The outputs the deployment checks hand to the compilers: every method's export of a zoo model.

Architectures are drawn at random (PIT masks about 40 % pruned, SuperNet and MPS logits standard
normal), so every export really prunes, swaps layers or mixes precisions; nothing is trained.
Exports are cached per test session (`ExportCache`): every compiler reads the same file. Their
inputs are drawn free of rounding ties that would move an output (`tie_free.tie_free_feeds`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

import plinio_onnx as po
from plinio_onnx.data import random_inputs

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))
from _util import random_architecture  # noqa: E402
from tie_free import tie_free_feeds  # noqa: E402

ZOO = sorted(p.stem for p in MODELS.glob("*.onnx"))
FLOAT_METHODS = ("pit", "supernet", "supernet+pit")
QUANT_METHODS = ("qat", "mps", "pit+mps")
QUANT_OPTIONS = {   # "qat4": 4-bit weights, what int4="on" stores as INT4
    "qat": {"w_precisions": (8,), "a_precisions": (8,)}, "qat4": {"w_precisions": (4,), "a_precisions": (8,)},
    "mps": {"w_precisions": (4, 8)}, "pit+mps": {"w_precisions": (4, 8)},
}
MASKS = (".pit_alpha",)
LOGITS = (".supernet_logits", ".mps_w_alpha", ".mps_a_alpha")


@dataclass(frozen=True)
class Export:
    """One exported model: its file, the method and format that wrote it, and inputs for it."""

    path: Path
    method: str
    format: str          # "float", "qdq" or "qonnx"
    feeds: dict

    @property
    def proto(self) -> onnx.ModelProto:
        return onnx.load(str(self.path))


def searchable(name: str, method: str, seed: int = 0) -> po.methods.SearchableModel:
    """A searchable model of zoo model ``name`` with a random architecture (eval mode)."""
    graph = po.load(MODELS / f"{name}.onnx")
    if method == "pit":
        model = po.PIT(graph)
    elif method in ("supernet", "supernet+pit"):
        model = po.SuperNet(graph, pit=method == "supernet+pit")
    elif method in QUANT_OPTIONS:
        model = po.MPS(graph, pit=method == "pit+mps", **QUANT_OPTIONS[method])
        model.calibrate(*[torch.from_numpy(v) for v in random_inputs(graph, batch=8, seed=seed + 7).values()])
    else:
        raise ValueError(f"unknown method {method!r}")
    random_architecture(model, seed, LOGITS, MASKS, 0.4)
    return model.eval()


class ExportCache:
    """Exports written once per session under ``folder``, keyed by (model, method, format, int4)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._done: dict[tuple, Export] = {}

    def get(self, name: str, method: str, format: str = "float", int4: str = "off", batch: int = 2) -> Export:
        key = (name, method, format, int4, batch)
        if key not in self._done:
            model = searchable(name, method)
            path = self.folder / f"{name}.{method.replace('+', '_')}.{format}.int4_{int4}.onnx"
            if format == "float":
                model.export(path)
            else:
                model.export(path, format=format, int4=int4)
            self._done[key] = Export(path, method, format, tie_free_feeds(onnx.load(str(path)), seed=3, batch=batch))
        return self._done[key]


def relative_error(expected: np.ndarray, got: np.ndarray) -> float:
    """max |expected − got| over max(1, max |expected|)."""
    assert expected.shape == got.shape, (expected.shape, got.shape)
    scale = max(1.0, float(np.max(np.abs(expected))))
    return float(np.max(np.abs(expected.astype(np.float64) - got.astype(np.float64)))) / scale


def output_step(expected: np.ndarray) -> float:
    """One quantization step of an output: its range over 255 levels (what a rounding tie in
    one int8 activation moves an output by, at most, through a small network)."""
    return max(float(expected.max() - expected.min()), 1e-6) / 255


@dataclass(frozen=True)
class Case:
    """One export handed to the compilers: zoo model, method, format, int4 mode."""

    model: str
    method: str
    format: str
    int4: str = "off"

    @property
    def id(self) -> str:
        return f"{self.model}-{self.method}-{self.format}" + ("" if self.int4 == "off" else f"-int4_{self.int4}")


# Every float and int8 QDQ method on every zoo model, and INT4 QDQ where asked (the digits CNN).
COMPILER_CASES = (
    [Case(name, method, "float") for name in ZOO for method in FLOAT_METHODS]
    + [Case(name, method, "qdq") for name in ZOO for method in QUANT_METHODS]
    + [Case("digits_cnn", "qat4", "qdq", int4="on")]
)


def _write_jobs(exports: list[Export], folder: Path) -> list[dict]:
    """The job list `compilers.py` reads, with each export's inputs saved beside it."""
    import json
    folder.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i, export in enumerate(exports):
        inputs = folder / f"{i}.inputs.npz"
        np.savez(inputs, **export.feeds)
        jobs.append({"model": str(export.path), "inputs": str(inputs), "outputs": str(folder / f"{i}.outputs.npz"),
                     "error": str(folder / f"{i}.error.txt")})
    (folder / "jobs.json").write_text(json.dumps(jobs))
    return jobs


def _read_results(exports: list[Export], jobs: list[dict]) -> dict[Path, "list[np.ndarray] | str"]:
    results = {}
    for export, job in zip(exports, jobs):
        if Path(job["outputs"]).exists():
            with np.load(job["outputs"]) as saved:
                results[export.path] = [saved[f"output{i}"] for i in range(len(saved.files))]
        else:
            results[export.path] = Path(job["error"]).read_text()
    return results


def run_compilers(compilers: "list[str]", exports: list[Export], folder: Path,
                  timeout: float = 1800) -> dict[str, dict[Path, "list[np.ndarray] | str"]]:
    """Compile and run every export with each compiler, one subprocess per compiler
    (`compilers.py`) in ``folder / compiler``, the subprocesses side by side: compiler → each
    export's outputs, or the compiler's error message."""
    import subprocess
    script = str(Path(__file__).with_name("compilers.py"))
    jobs = {c: _write_jobs(exports, folder / c) for c in compilers}
    running = {c: subprocess.Popen([sys.executable, script, c, str(folder / c / "jobs.json")]) for c in compilers}
    try:
        for compiler, process in running.items():
            if process.wait(timeout=timeout):
                raise RuntimeError(f"{compiler}'s subprocess ended with status {process.returncode}")
    finally:
        for process in running.values():
            if process.poll() is None:
                process.kill()
    return {c: _read_results(exports, jobs[c]) for c in compilers}


def run_compiler(compiler: str, exports: list[Export], folder: Path) -> dict[Path, "list[np.ndarray] | str"]:
    """`run_compilers` for one compiler, in ``folder / compiler``."""
    return run_compilers([compiler], exports, folder)[compiler]
