"""Finite-value checks: NaN or infinity in weights or data stops a run with one clear error.

`check_finite_weights` looks at every floating initializer of a `Graph`; `check_finite_arrays`
at named data arrays (graph inputs, labels, outputs, losses). Both collect every offender before
raising one `NonFiniteError` that names them, so the user fixes them in one go.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from .errors import NonFiniteError
from .graph import Graph

__all__ = ["check_finite_arrays", "check_finite_weights", "non_finite_summary"]

#: Offenders named in one message; the rest are counted.
_SHOWN = 5


def non_finite_summary(values: np.ndarray) -> str | None:
    """``"2 NaN, 1 Inf of 300 values"`` when ``values`` holds any, else None (non-float: None)."""
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.floating) and not np.issubdtype(values.dtype, np.complexfloating):
        return None
    nan = int(np.count_nonzero(np.isnan(values)))
    inf = int(np.count_nonzero(np.isinf(values)))
    if not nan and not inf:
        return None
    parts = [f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else ""]
    return ", ".join(p for p in parts if p) + f" of {values.size} values"


def check_finite_weights(graph: Graph) -> None:
    """Raise `NonFiniteError` naming every floating initializer of ``graph`` (and a node that
    reads it) that holds NaN or infinity."""
    problems = []
    for node in graph.nodes:
        for tensor in node.inputs:
            if not isinstance(tensor, gs.Constant) or any(tensor.name == p[0] for p in problems):
                continue
            try:
                if not np.issubdtype(np.dtype(tensor.dtype), np.floating):
                    continue
            except TypeError:  # bfloat16/float8: no numpy view to check
                continue
            found = non_finite_summary(tensor.values)
            if found:
                problems.append((tensor.name, f"initializer {tensor.name!r} (read by node "
                                              f"{node.name!r} ({node.op})) has {found}"))
    _raise(problems, "weights", graph.source)


def check_finite_arrays(arrays: Mapping[str, np.ndarray], *, what: str = "data",
                        source: str | None = None) -> None:
    """Raise `NonFiniteError` naming every array of ``arrays`` holding NaN or infinity, with the
    first sample that does; ``what`` says what they are ("data", "ONNX Runtime outputs", ...)."""
    problems = []
    for name, values in arrays.items():
        values = np.asarray(values)
        found = non_finite_summary(values)
        if found:
            where = ""
            if values.ndim > 1:
                bad = ~np.isfinite(values.reshape(values.shape[0], -1)).all(axis=1)
                where = f", first in sample {int(np.argmax(bad))} ({int(bad.sum())} samples)"
            problems.append((name, f"{name!r} has {found}{where}"))
    _raise(problems, what, source)


def _raise(problems: list[tuple[str, str]], what: str, source: str | None) -> None:
    if not problems:
        return
    shown = "; ".join(text for _, text in problems[:_SHOWN])
    more = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    raise NonFiniteError(f"NaN/Inf in the {what}: {shown}{more}", file=source)
