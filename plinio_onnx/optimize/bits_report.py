"""What a quantizing search chose, for the report: every layer's weight and activation
bit-widths (a histogram for per-channel choices: ``2b×12 4b×20 8b×32``), its weight bytes and
bit-operations, and the totals against the input model at float32 and at uniform int8.

Read from the exported file alone (its ``mps.bit_widths`` metadata and its layers, through
`plinio_onnx.cost.bits.quantized_specs`), so the figures are those of what was written. Bytes
are `plinio_onnx.cost.size`'s — weights at their bit-widths, biases at 32 bits, the same
measure ``--target-size`` constrains; bit-operations are `plinio_onnx.cost.bitops`'s — MACs ×
weight bits × input bits (a float layer: 32 × 32).
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from ..cost import bits as bit_costs
from ..cost import layer_specs, params_no_bias
from ..graph import Graph
from ..records import BitWidths

__all__ = ["bits_histogram", "quantization_markdown", "quantization_report", "quantization_table"]


def bits_histogram(bits: "int | list[int] | None", pruned: int = 0) -> str:
    """``"8"`` for one precision, ``"2b×12 4b×20 8b×32"`` for per-channel ones (lowest first;
    ``0b×N``: ``pruned`` channels that chose 0 bits and were removed), ``"float"`` for an
    unquantized layer."""
    if bits is None:
        return "float"
    if isinstance(bits, int):
        return str(bits)
    counts = Counter(int(b) for b in bits)
    if pruned:
        counts[0] += int(pruned)
    if len(counts) == 1:
        return str(next(iter(counts)))
    return " ".join(f"{b}b×{n}" for b, n in sorted(counts.items()))


def quantization_report(before: Graph, final: Graph) -> dict | None:
    """Per-layer bit-widths, bytes and bit-operations of the exported ``final`` model, and the
    totals against ``before`` (the input model) at float32 and at uniform int8; None when
    ``final`` holds no quantized layer."""
    record = BitWidths.of(final)
    if record is None or not record.layers:
        return None
    layers = []
    for spec in bit_costs.quantized_specs(final):
        entry = record.layers.get(spec.name)
        layers.append({
            "name": spec.name, "op": spec.op,
            "weight_bits": None if entry is None else entry.weight_bits,
            "weight_histogram": bits_histogram(None if entry is None else entry.weight_bits,
                                               0 if entry is None else entry.pruned_channels),
            "input_bits": None if entry is None else int(entry.input_bits),
            "input_signed": None if entry is None else bool(entry.input_signed),
            "pruned_channels": 0 if entry is None else int(entry.pruned_channels),
            "weights": _number(params_no_bias(spec)), "bytes": _number(bit_costs.size(spec)),
            "bitops": _number(bit_costs.bitops(spec))})
    base = layer_specs(before)
    int8 = [spec.with_(weight_bits=8, input_bits=8) for spec in base]
    totals = {"bytes": _sum(row["bytes"] for row in layers),
              "float32_bytes": _sum(bit_costs.size(spec) for spec in base),
              "int8_bytes": _sum(bit_costs.size(spec) for spec in int8),
              "bitops": _sum(row["bitops"] for row in layers),
              "float32_bitops": _sum(bit_costs.bitops(spec) for spec in base),
              "int8_bitops": _sum(bit_costs.bitops(spec) for spec in int8)}
    return {"format": record.format, "layers": layers, "totals": totals}


def _number(value: Any) -> "int | float":
    """An integer where the value counts one (a mean bit-width times MACs rounds off by an ulp)."""
    number = float(value)
    nearest = round(number)
    return int(nearest) if abs(number - nearest) <= 1e-9 * max(1.0, abs(number)) else number


def _sum(values) -> "int | float":
    return _number(sum(float(v) for v in values))


def _ratio(a: float, b: float) -> str:
    return f"{100.0 * a / b:.1f}%" if b else "n/a"


def _input(row: dict) -> str:
    if row["input_bits"] is None:
        return "float"
    return f"{'s' if row['input_signed'] else 'u'}{row['input_bits']}"


def summary_line(quant: dict) -> str:
    """One line: bytes against float32 and int8, bit-operations against int8."""
    t = quant["totals"]
    return (f"weight bytes {t['bytes']:,.0f} = {_ratio(t['bytes'], t['float32_bytes'])} of float32 "
            f"({t['float32_bytes']:,.0f}), {_ratio(t['bytes'], t['int8_bytes'])} of uniform int8 "
            f"({t['int8_bytes']:,.0f}); bit-ops {t['bitops']:,.0f} = {_ratio(t['bitops'], t['int8_bitops'])} "
            f"of int8 ({t['int8_bitops']:,.0f})")


def quantization_markdown(quant: dict) -> list[str]:
    """The markdown lines of the bit-width table and its summary."""
    lines = ["## Bit-widths", "", f"- {summary_line(quant)}", "",
             "| layer | op | weight bits | input bits | weights | bytes | bit-ops |",
             "|---|---|---|---:|---:|---:|---:|"]
    for row in quant["layers"]:
        lines.append(f"| {row['name']} | {row['op']} | {row['weight_histogram']} | {_input(row)} | "
                     f"{row['weights']:,} | {row['bytes']:,.1f} | {row['bitops']:,} |")
    return lines


def quantization_table(quant: dict):
    """The bit-width table for the console (rich)."""
    from rich.table import Table

    table = Table(title="bit-widths (exported)")
    for col in ("layer", "op", "weight bits", "input bits", "weights", "bytes", "bit-ops"):
        table.add_column(col, justify="left" if col in ("layer", "op", "weight bits") else "right")
    for row in quant["layers"]:
        table.add_row(row["name"], row["op"], row["weight_histogram"], _input(row), f"{row['weights']:,}",
                      f"{row['bytes']:,.1f}", f"{row['bitops']:,}")
    t = quant["totals"]
    table.add_row("total", "", "", "", "", f"{t['bytes']:,.1f}", f"{t['bitops']:,}", style="bold")
    return table
