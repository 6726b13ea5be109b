"""What users would rather look at than read: SVG plots beside an `optimize` report.

* ``OUT.channels.svg``: every layer's output channels before and after (a pruning method);
* ``OUT.bits.svg``: every layer's weight bit-width, float (32) before and the chosen one after
  (a quantizing method; a per-channel choice as its mean);
* ``OUT.trajectory.svg``: the search epoch by epoch, its cost against the validation metric,
  with the target as a line (and the chosen epoch marked).

Hand-written SVG (no plotting dependency): one ``<rect class="before|after">`` per layer and
bar, one ``<circle class="epoch">`` per search epoch, so tests and scripts can read them back.
"""
from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape

from ..atomic import write_text

__all__ = ["PLOTS", "bars_svg", "layer_bars", "plot_links", "trajectory_svg", "write_plots"]

PLOTS = ("channels", "bits", "trajectory")   # OUT.<kind>.svg

_FONT = 'font-family="sans-serif" font-size="11"'
_BEFORE, _AFTER, _LINE, _TARGET = "#c9d6e8", "#2f6db5", "#2f6db5", "#c0392b"


def write_plots(report, stem: "str | Path") -> dict[str, str]:
    """Write the report's plots as ``STEM.channels.svg`` / ``STEM.bits.svg`` /
    ``STEM.trajectory.svg`` (atomically); returns ``{"plot_channels": path, ...}`` for the files
    it wrote (a run without search epochs has no trajectory)."""
    files = {}
    for kind, rows in layer_bars(report).items():
        unit = "output channels" if kind == "channels" else "weight bits"
        path = Path(f"{stem}.{kind}.svg")
        write_text(path, bars_svg(rows, f"{Path(report.output).name}: {unit} per layer, before → after", unit))
        files[f"plot_{kind}"] = str(path)
    history = report.phases.get("search", {}).get("history") or []
    if history:
        path = Path(f"{stem}.trajectory.svg")
        target = report.target["value"] if report.target else None
        write_text(path, trajectory_svg(history, report.metric, report.cost, target,
                                        report.phases["search"].get("best_epoch")))
        files["plot_trajectory"] = str(path)
    return files


def plot_links(files: dict, folder: Path) -> list[str]:
    """Markdown images of the plots among a report's ``files``, relative to ``folder``."""
    import os
    links = [f"![{key[len('plot_'):]}]({Path(os.path.relpath(path, folder)).as_posix()})"
             for key, path in files.items() if key.startswith("plot_")]
    return ["", "Plots:", "", *links] if links else []


def layer_bars(report) -> dict[str, list[tuple[str, float, float]]]:
    """``{"channels": [(layer, before, after)], "bits": [...]}``: channels when the method
    changed (or searched) channel counts or quantizes nothing, bit-widths when it quantizes."""
    precisions = report.architecture.get("precisions") or {}
    out = {}
    pruned = any(r["out_after"] != r["out_before"] or r["in_after"] != r["in_before"] for r in report.layers)
    if pruned or "kept_channels" in report.architecture or not precisions:
        out["channels"] = [(r["name"], r["out_before"], r["out_after"]) for r in report.layers]
    if precisions:
        bits = []
        for row in report.layers:
            chosen = precisions.get(row["name"], {}).get("weight_bits")
            if chosen is not None:
                after = sum(chosen) / len(chosen) if isinstance(chosen, list) else chosen
                bits.append((row["name"], 32, after))
        out["bits"] = bits
    return out


def bars_svg(rows: list[tuple[str, float, float]], title: str, unit: str) -> str:
    """Horizontal bars, two per row: ``before`` (light, behind) and ``after`` (dark, in front)."""
    label_w, bar_w, row_h = 150, 360, 18
    width, height = label_w + bar_w + 70, 46 + row_h * max(len(rows), 1) + 24
    top = max([b for _, b, _ in rows] + [a for _, _, a in rows] + [1])
    parts = [_header(width, height), f'<text x="8" y="18" {_FONT} font-weight="bold">{escape(title)}</text>',
             f'<text x="8" y="34" {_FONT} fill="#555">light: before, dark: after ({escape(unit)})</text>']
    for i, (name, before, after) in enumerate(rows):
        y = 44 + i * row_h
        parts += [f'<text x="{label_w - 6}" y="{y + 12}" {_FONT} text-anchor="end">{escape(_short(name))}</text>',
                  f'<rect class="before" x="{label_w}" y="{y + 1}" width="{bar_w * before / top:.1f}" '
                  f'height="{row_h - 3}" fill="{_BEFORE}"><title>{escape(name)}: {before:g} before</title></rect>',
                  f'<rect class="after" x="{label_w}" y="{y + 4}" width="{bar_w * after / top:.1f}" '
                  f'height="{row_h - 9}" fill="{_AFTER}"><title>{escape(name)}: {after:g} after</title></rect>',
                  f'<text x="{label_w + bar_w * max(before, after) / top + 4:.1f}" y="{y + 12}" {_FONT}>'
                  f'{after:g}/{before:g}</text>']
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def trajectory_svg(history: list[dict], metric: str, cost: str, target: float | None,
                   best_epoch: int | None = None) -> str:
    """The search's cost (x) against its validation ``metric`` (y), one point per epoch joined
    in epoch order; the target as a dashed vertical line; the chosen epoch ringed."""
    width, height, left, right, top, bottom = 560, 360, 70, 20, 40, 50
    costs = [float(h["cost"]) for h in history]
    values = [float(h["val"].get(metric, h["val"].get("loss", 0.0))) for h in history]
    x_lo, x_hi = _range(costs + ([target] if target is not None else []))
    y_lo, y_hi = _range(values)

    def x(value: float) -> float:
        return left + (width - left - right) * (value - x_lo) / (x_hi - x_lo)

    def y(value: float) -> float:
        return height - bottom - (height - top - bottom) * (value - y_lo) / (y_hi - y_lo)
    parts = [_header(width, height),
             f'<text x="8" y="18" {_FONT} font-weight="bold">search trajectory: {escape(cost)} against '
             f'validation {escape(metric)}, epoch by epoch</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#333"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#333"/>',
             f'<text x="{(left + width - right) / 2}" y="{height - 12}" {_FONT} text-anchor="middle">'
             f'{escape(cost)} (x: {x_lo:.4g} … {x_hi:.4g})</text>',
             f'<text x="12" y="{(top + height - bottom) / 2}" {_FONT} transform="rotate(-90 12 '
             f'{(top + height - bottom) / 2})" text-anchor="middle">val {escape(metric)} '
             f'({y_lo:.4g} … {y_hi:.4g})</text>']
    if target is not None:
        parts.append(f'<line class="target" x1="{x(target):.1f}" y1="{top}" x2="{x(target):.1f}" '
                     f'y2="{height - bottom}" stroke="{_TARGET}" stroke-dasharray="5,4"/>'
                     f'<text x="{x(target) + 4:.1f}" y="{top + 10}" {_FONT} fill="{_TARGET}">target {target:.4g}</text>')
    points = " ".join(f"{x(c):.1f},{y(v):.1f}" for c, v in zip(costs, values))
    parts.append(f'<polyline points="{points}" fill="none" stroke="{_LINE}" stroke-opacity="0.5"/>')
    for h, c, v in zip(history, costs, values):
        parts.append(f'<circle class="epoch" cx="{x(c):.1f}" cy="{y(v):.1f}" r="3" fill="{_LINE}">'
                     f'<title>epoch {h["epoch"]}: {escape(cost)} {c:.4g}, {escape(metric)} {v:.4g}</title></circle>')
        if h["epoch"] == best_epoch:
            parts.append(f'<circle class="chosen" cx="{x(c):.1f}" cy="{y(v):.1f}" r="7" fill="none" '
                         f'stroke="{_TARGET}"/>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _header(width: int, height: int) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">\n<rect width="{width}" height="{height}" fill="white"/>')


def _range(values: list[float]) -> tuple[float, float]:
    """[low, high] around ``values`` with a little room (a single value gets some width)."""
    low, high = min(values), max(values)
    pad = (high - low) * 0.05 or abs(high) * 0.05 or 1.0
    return low - pad, high + pad


def _short(name: str, limit: int = 24) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]
