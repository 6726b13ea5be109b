"""The search's view of a measured latency table: latency never falls as channels are added.

A measured table (`plinio_onnx.hardware.measured`) times each layer alone at every channel count
of its grid. On a small model an entry is a few µs, and one timed in a busy moment can read more
than the entries *above* it (digits' first conv: 7.3 µs at 8 channels, 5.6 µs at 16). Interpolated,
such an entry is a slope the wrong way: the cost's gradient pushes the layer to keep channels,
a false local minimum that no strength of the latency penalty gets the search out of (a 60 %
target on digits stalled at 69 % predicted while λ grew a millionfold). A runtime can compute
fewer channels no slower than more (at worst padded to them), so the search reads the table's
monotone envelope: each entry the least of itself and every entry with at least as many input
and output channels. Entries already in order are unchanged, the layer's full-size entry (and so
the whole model's calibration point) among them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["monotone_envelope", "monotone_table"]


def monotone_envelope(seconds: list[list[float]]) -> list[list[float]]:
    """``seconds[i][j]`` (input index i, output index j, both ascending in channels) replaced by
    the least entry at indices ``≥ i`` and ``≥ j``."""
    rows = [list(row) for row in seconds]
    for i in range(len(rows) - 1, -1, -1):
        for j in range(len(rows[i]) - 1, -1, -1):
            if j + 1 < len(rows[i]):
                rows[i][j] = min(rows[i][j], rows[i][j + 1])
            if i + 1 < len(rows):
                rows[i][j] = min(rows[i][j], rows[i + 1][j])
    return rows


def monotone_table(table: Any) -> Any:
    """A copy of ``table`` (a `plinio_onnx.hardware.LatencyTable`) with every layer's entries
    replaced by their `monotone_envelope`; the table itself is not changed."""
    layers = {name: dataclasses.replace(layer, seconds=monotone_envelope(layer.seconds))
              for name, layer in table.layers.items()}
    view = dataclasses.replace(table, layers=layers)
    view.__dict__.pop("_memo", None)   # the calibration is computed anew on the envelope
    return view
