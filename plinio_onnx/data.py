"""Datasets for the CLI: ``DATA.npz`` with ``x`` (or one array per graph input) and optional ``y``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import PlinioOnnxError
from .graph import Graph


def _concrete(shape, batch: int) -> list[int]:
    dims = []
    for i, d in enumerate(shape or []):
        dims.append(int(d) if isinstance(d, (int, np.integer)) and d > 0 else (batch if i == 0 else 1))
    return dims


def random_inputs(graph: Graph, *, batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every graph input; symbolic batch dimensions become ``batch``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for tensor in graph.gs.inputs:
        dtype = np.dtype(tensor.dtype)
        shape = _concrete(tensor.shape, batch)
        if np.issubdtype(dtype, np.floating):
            feeds[tensor.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[tensor.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[tensor.name] = rng.integers(0, 4, shape).astype(dtype)
    return feeds


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise PlinioOnnxError("no such data file", file=str(path))
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as err:
        raise PlinioOnnxError(f"not a readable .npz file ({err})", file=str(path)) from None


def input_arrays(graph: Graph, arrays: dict[str, np.ndarray], source: str) -> list[np.ndarray]:
    """The arrays feeding the graph inputs, in input order: ``x`` for a single-input graph, else one
    per input name; shapes checked (all but the batch axis) and cast to the input's dtype."""
    inputs = graph.gs.inputs
    values = []
    for tensor in inputs:
        if tensor.name in arrays:
            value = np.asarray(arrays[tensor.name])
        elif len(inputs) == 1 and "x" in arrays:
            value = np.asarray(arrays["x"])
        else:
            raise PlinioOnnxError(f"no array for graph input {tensor.name!r} (the file has "
                                  f"{sorted(arrays)}; use 'x' or the input's name)", file=source)
        expected = list(tensor.shape or [])
        if value.ndim != len(expected) or any(
                isinstance(d, (int, np.integer)) and d > 0 and i > 0 and d != s
                for i, (d, s) in enumerate(zip(expected, value.shape))):
            raise PlinioOnnxError(f"array for input {tensor.name!r} has shape {list(value.shape)}, "
                                  f"the model expects {expected}", file=source)
        try:
            value = value.astype(np.dtype(tensor.dtype), copy=False)
        except (TypeError, ValueError) as err:
            raise PlinioOnnxError(f"array for input {tensor.name!r} cannot be cast to "
                                  f"{np.dtype(tensor.dtype)} ({err})", file=source) from None
        values.append(np.ascontiguousarray(value))
    return values


def graph_inputs_from_npz(graph: Graph, path: str | Path, *, limit: int | None = None) -> dict[str, np.ndarray]:
    """`input_arrays` of an ``.npz`` file, by input name, the first ``limit`` samples."""
    values = input_arrays(graph, load_npz(path), str(path))
    return {t.name: (v[:limit] if limit else v) for t, v in zip(graph.gs.inputs, values)}
