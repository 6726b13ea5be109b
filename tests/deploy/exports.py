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


# Every zoo model once in float (the float methods in turn), and every method and format on the
# digits CNN (int8 QDQ, and INT4 QDQ where asked); ResNet-8 adds int8 QDQ around residual Adds.
COMPILER_CASES = (
    [Case(name, FLOAT_METHODS[i % len(FLOAT_METHODS)], "float") for i, name in enumerate(ZOO)]
    + [Case("digits_cnn", m, "float") for m in FLOAT_METHODS if ZOO.index("digits_cnn") % 3 != FLOAT_METHODS.index(m)]
    + [Case("digits_cnn", m, "qdq") for m in QUANT_METHODS]
    + [Case("resnet8", "qat", "qdq"), Case("digits_cnn", "qat4", "qdq", int4="on")]
)


def run_compiler(compiler: str, exports: list[Export], folder: Path) -> dict[Path, "list[np.ndarray] | str"]:
    """Compile and run every export with ``compiler`` in one subprocess (`compilers.py`): each
    export's outputs, or the compiler's error message."""
    import json
    import subprocess
    folder.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i, export in enumerate(exports):
        inputs = folder / f"{i}.inputs.npz"
        np.savez(inputs, **export.feeds)
        jobs.append({"model": str(export.path), "inputs": str(inputs), "outputs": str(folder / f"{i}.outputs.npz"),
                     "error": str(folder / f"{i}.error.txt")})
    (folder / "jobs.json").write_text(json.dumps(jobs))
    subprocess.run([sys.executable, str(Path(__file__).with_name("compilers.py")), compiler, str(folder / "jobs.json")],
                   check=True, timeout=900)
    results = {}
    for export, job in zip(exports, jobs):
        if Path(job["outputs"]).exists():
            with np.load(job["outputs"]) as saved:
                results[export.path] = [saved[f"output{i}"] for i in range(len(saved.files))]
        else:
            results[export.path] = Path(job["error"]).read_text()
    return results
