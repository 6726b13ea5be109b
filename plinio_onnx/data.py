"""Datasets for the CLI: ``DATA.npz`` with ``x`` (or one array per graph input) and optional ``y``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import DataError
from .graph import Graph


def _is_fixed(dim) -> bool:
    return isinstance(dim, (int, np.integer)) and dim > 0


def symbolic_inputs(graph: Graph) -> dict[str, list]:
    """Graph inputs with a symbolic dimension other than the batch (axis 0) → their shapes."""
    return {t.name: list(t.shape) for t in graph.gs.inputs
            if t.shape is not None and not all(_is_fixed(d) for d in list(t.shape)[1:])}


def fixed_batch(graph: Graph) -> int | None:
    """The batch size every graph input fixes (axis 0), or None when it is symbolic."""
    sizes = {int(t.shape[0]) for t in graph.gs.inputs if t.shape and _is_fixed(t.shape[0])}
    symbolic = any(t.shape and not _is_fixed(t.shape[0]) for t in graph.gs.inputs)
    return sizes.pop() if len(sizes) == 1 and not symbolic else None


def parse_input_shapes(specs: list[str] | None, graph: Graph, source: str | None = None) -> dict[str, list[int]]:
    """``--input-shape`` values → input name → shape: ``1x3x32x32`` (a single-input graph) or
    ``NAME:1x3x32x32`` (commas work too)."""
    shapes: dict[str, list[int]] = {}
    names = [t.name for t in graph.gs.inputs]
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        if not sep:
            if len(names) != 1:
                raise DataError(f"--input-shape {spec!r}: the model has inputs {names}; write "
                                "NAME:DIMS for each", file=source)
            name = names[0]
        try:
            shape = [int(d) for d in dims.replace(",", "x").split("x")]
        except ValueError:
            raise DataError(f"--input-shape {spec!r}: expected dimensions like 1x3x32x32",
                            file=source) from None
        shapes[name] = shape
    return shapes


def _concrete(name: str, shape, batch: int) -> list[int]:
    dims = []
    for i, d in enumerate(shape or []):
        if _is_fixed(d):
            dims.append(int(d))
        elif i == 0:
            dims.append(batch)
        else:
            raise DataError(f"input {name!r} has symbolic dimensions {list(shape)}: give "
                            f"--input-shape {name}:{'x'.join(str(x) if _is_fixed(x) else 'N' for x in shape)} "
                            "(N the sizes to test) or --data with real inputs")
    return dims


def random_inputs(graph: Graph, *, batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every graph input; symbolic batch dimensions become ``batch``; other
    symbolic dimensions are refused (`DataError`: sizes made up here could crash a runtime)."""
    if batch < 1:
        raise DataError(f"batch {batch}: the batch size must be at least 1")
    rng = np.random.default_rng(seed)
    feeds = {}
    for tensor in graph.gs.inputs:
        dtype = np.dtype(tensor.dtype)
        shape = _concrete(tensor.name, tensor.shape, batch)
        if np.issubdtype(dtype, np.floating):
            feeds[tensor.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[tensor.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[tensor.name] = rng.integers(0, 4, shape).astype(dtype)
    return feeds


_NPZ_MAGIC = b"PK"            # an .npz is a zip archive
_NPY_MAGIC = b"\x93NUMPY"


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file (no pickles); anything else is one clear `DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no such data file", file=str(path))
    with open(path, "rb") as f:
        head = f.read(8)
    hint = "save the arrays with numpy.savez(PATH, x=inputs, y=labels)"
    if head.startswith(_NPY_MAGIC):
        raise DataError(f"this is a single .npy array; the tool reads an .npz archive: {hint}",
                        file=str(path))
    if not head.startswith(_NPZ_MAGIC):
        kind = "a text file (CSV?)" if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head) \
            else "not an .npz archive"
        raise DataError(f"{kind}; the tool reads an .npz archive: {hint}", file=str(path))
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as err:
        raise DataError(f"not a readable .npz file ({' '.join(str(err).split())[:200]}); {hint}",
                        file=str(path)) from None
    if not arrays:
        raise DataError(f"the .npz archive holds no arrays; {hint}", file=str(path))
    return arrays


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
            raise DataError(f"no array for graph input {tensor.name!r} (the file has "
                            f"{sorted(arrays)}; use 'x' or the input's name)", file=source)
        expected = list(tensor.shape or [])
        if value.ndim != len(expected) or any(
                isinstance(d, (int, np.integer)) and d > 0 and i > 0 and d != s
                for i, (d, s) in enumerate(zip(expected, value.shape))):
            raise DataError(f"array for input {tensor.name!r} has shape {list(value.shape)}, "
                            f"the model expects {expected}", file=source)
        try:
            value = value.astype(np.dtype(tensor.dtype), copy=False)
        except (TypeError, ValueError) as err:
            raise DataError(f"array for input {tensor.name!r} cannot be cast to "
                            f"{np.dtype(tensor.dtype)} ({err})", file=source) from None
        values.append(np.ascontiguousarray(value))
    counts = {t.name: len(v) for t, v in zip(inputs, values) if v.ndim}
    if len(set(counts.values())) > 1:
        raise DataError(f"the input arrays hold different numbers of samples ({counts})", file=source)
    return values


def data_input_shapes(graph: Graph, arrays: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """Input name → the shape of the array that feeds it (``x`` for a single-input graph), for
    `plinio_onnx.load`'s ``input_shapes``; inputs without an array are left out."""
    inputs = graph.gs.inputs
    shapes = {}
    for tensor in inputs:
        value = arrays.get(tensor.name, arrays.get("x") if len(inputs) == 1 else None)
        if value is not None:
            shapes[tensor.name] = list(np.shape(value))
    return shapes


def graph_inputs_from_npz(graph: Graph, path: str | Path, *, limit: int | None = None) -> dict[str, np.ndarray]:
    """`input_arrays` of an ``.npz`` file, by input name, the first ``limit`` samples."""
    values = input_arrays(graph, load_npz(path), str(path))
    return {t.name: (v[:limit] if limit else v) for t, v in zip(graph.gs.inputs, values)}
