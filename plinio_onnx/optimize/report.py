"""What an `optimize` run did: the `Report` (JSON, markdown, a rich table on the console)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import write_text
from ..cost import layer_specs
from ..cost import macs as macs_cost
from ..cost import params as params_cost
from ..graph import Graph
from ..passes.odimo_split import MAPPING_KEY
from .bits_report import quantization_markdown, quantization_table, summary_line
from .checkpoint import dumps
from .measure import latency_lines, latency_markdown
from .plots import plot_links
from .targets import format_cost

__all__ = ["Report", "layer_rows", "mapping_latency_line", "mapping_markdown", "mapping_table", "percent"]


@dataclass
class Report:
    """What `optimize` did; ``to_json()`` / ``to_markdown()`` are what lands next to the output."""

    model: str
    output: str
    method: str
    task: str
    metric: str
    cost: str
    target: dict | None
    strength: float | None
    splits: dict
    before: dict
    after: dict
    layers: list[dict]
    architecture: dict
    phases: dict
    seed: int
    resumed: bool
    seconds: float
    files: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)   # e.g. input sizes taken from the data
    world_size: int = 1                              # processes of a data-parallel (torchrun) search
    devices: list[str] = field(default_factory=lambda: ["cpu"])   # each rank's device, in rank order
    amp: bool = False                                # mixed precision in the forward pass
    channel_multiple: int | None = None   # PIT's channel blocks (None: the method searches no channels)
    measured_latency: dict | None = None   # {runtime: {input_ms, output_ms, speedup}} (`measure`)
    #: Every constrained cost: kind, unit, given, target, before, after (the exported model's), met.
    constraints: list[dict] = field(default_factory=list)
    regularizer: str | None = None
    #: A quantizing method's bit-widths, bytes and bit-operations (`bits_report`); None otherwise.
    quantization: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)

    def _fmt_metric(self, value: float | None) -> str:
        if value is None:
            return "n/a"
        return f"{100 * value:.2f}%" if self.metric == "accuracy" else f"{value:.4g}"

    def headline(self) -> str:
        """One line: params, MACs and the test metric, before → after."""
        b, a = self.before, self.after
        parts = [f"params {b['params']:,} → {a['params']:,} ({percent(a['params'], b['params'])})",
                 f"MACs {b['macs']:,} → {a['macs']:,} ({percent(a['macs'], b['macs'])})",
                 f"test {self.metric} {self._fmt_metric(b['test'].get(self.metric))} → "
                 f"{self._fmt_metric(a['test'].get(self.metric))}"]
        return "; ".join(parts)

    def to_markdown(self) -> str:
        lines = [f"# plinio-onnx optimize: {Path(self.model).name} → {Path(self.output).name}", "",
                 f"- method: {self.method}, cost: {self.cost}"
                 + (f", channel multiple: {self.channel_multiple}" if self.channel_multiple else "")
                 + (f", target: {self.target['kind']} ≤ {format_cost(self.target['value'])} ({self.target['given']})"
                    if self.target and len(self.constraints) <= 1 else "")
                 + (", targets: " + ", ".join(f"{c['kind']} ≤ {format_cost(c['target'])} ({c['given']})"
                                              for c in self.constraints) if len(self.constraints) > 1 else "")
                 + (f", strength: {self.strength:.3g}" if self.strength is not None else ""),
                 f"- task: {self.task} (metric: {self.metric}); splits: train {self.splits['train']}, "
                 f"validation {self.splits['val']}, test {self.splits['test']} (seed {self.seed})",
                 f"- {self.headline()}",
                 "- test metrics measured in ONNX Runtime; 'before' is the input model after warm-up",
                 f"- wall time {self.seconds:.1f} s" + (" (resumed)" if self.resumed else ""),
                 f"- processes (world_size): {self.world_size}; devices: {', '.join(self.devices)}"
                 + ("; mixed precision (amp)" if self.amp else ""),
                 *(f"- note: {note}" for note in self.notes), "",
                 "| | params | MACs | test " + self.metric + " | test loss |", "|---|---:|---:|---:|---:|"]
        for label, d in (("before", self.before), ("after", self.after)):
            lines.append(f"| {label} | {d['params']:,} | {d['macs']:,} | {self._fmt_metric(d['test'].get(self.metric))} "
                         f"| {d['test'].get('loss', float('nan')):.4g} |")
        if self.constraints:
            lines += ["", f"## Targets ({self.regularizer} regularizer)", "",
                      "| cost | before | after | target | given | met |", "|---|---:|---:|---:|---|---|"]
            lines += [f"| {c['kind']} ({c['unit']}) | {format_cost(c['before'])} | {format_cost(c['after'])} "
                      f"({percent(c['after'], c['before'])}) | {format_cost(c['target'])} | {c['given']} | "
                      f"{'yes' if c['met'] else '**no**'} |" for c in self.constraints]
        if self.quantization:
            lines += [""] + quantization_markdown(self.quantization)
        lines += mapping_markdown(self.architecture)
        lines += ["", "| layer | op | in | out | kernel | params | MACs |", "|---|---|---:|---:|---:|---:|---:|"]
        for row in self.layers:
            lines.append(f"| {row['name']} | {row['op']} | {row['in_after']}/{row['in_before']} | "
                         f"{row['out_after']}/{row['out_before']} | {row['kernel_after']}/{row['kernel_before']} | "
                         f"{row['params_after']:,}/{row['params_before']:,} | {row['macs_after']:,}/{row['macs_before']:,} |")
        lines += ["", "| phase | epochs | best epoch | val loss | val " + self.metric + " | seconds |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, p in self.phases.items():
            lines.append(f"| {name} | {p.get('epochs', 0)} | {p.get('best_epoch', '')} | "
                         f"{p.get('val_loss', float('nan')):.4g} | {self._fmt_metric(p.get('val_metric'))} | "
                         f"{p.get('seconds', 0):.1f} |")
        lines += latency_markdown(self.measured_latency) + plot_links(self.files, self.report_folder)
        if self.files:
            lines += [""] + [f"- {k}: `{v}`" for k, v in self.files.items()]
        return "\n".join(lines) + "\n"

    @property
    def report_folder(self) -> Path:
        """Where the markdown report lies (its links to the plots are relative to it)."""
        return Path(self.files.get("report_md", self.output)).parent

    def print(self, console=None) -> None:
        """The layer table and the headline on ``console`` (default: stdout)."""
        from rich.console import Console
        from rich.table import Table
        if console is None:
            console = Console()
            if not console.is_terminal:   # logs: wide enough for the whole table
                console = Console(width=120)
        table = Table(title=f"{Path(self.output).name}: {self.method} ({self.task})")
        for col in ("layer", "op", "in", "out", "kernel", "params", "MACs"):
            table.add_column(col, justify="left" if col in ("layer", "op") else "right")
        for row in self.layers:
            table.add_row(row["name"], row["op"], f"{row['in_after']}/{row['in_before']}",
                          f"{row['out_after']}/{row['out_before']}", f"{row['kernel_after']}/{row['kernel_before']}",
                          f"{row['params_after']:,}/{row['params_before']:,}", f"{row['macs_after']:,}/{row['macs_before']:,}")
        table.add_row("total", "", "", "", "", f"{self.after['params']:,}/{self.before['params']:,}",
                      f"{self.after['macs']:,}/{self.before['macs']:,}", style="bold")
        console.print(table)
        if self.quantization:
            console.print(quantization_table(self.quantization))
            console.print(summary_line(self.quantization), highlight=False)
        mapping = mapping_table(self.architecture)
        if mapping is not None:
            console.print(mapping)
            console.print(mapping_latency_line(self.architecture), highlight=False)
        if self.constraints:
            console.print(constraints_table(self.constraints, self.regularizer))
        console.print(self.headline(), highlight=False)
        for line in latency_lines(self.measured_latency):
            console.print(line, highlight=False)
        for note in self.notes:
            console.print(f"note: {note}", highlight=False)
        for key, value in self.files.items():
            console.print(f"  {key}: {value}", highlight=False)

    def write(self, json_path: "str | Path", markdown_path: "str | Path") -> None:
        """``to_json()`` and ``to_markdown()`` to their files, each written atomically."""
        write_text(json_path, dumps(self.to_json(), indent=2))
        write_text(markdown_path, self.to_markdown())


def constraints_table(constraints: list[dict], regularizer: str | None):
    """Every constrained cost against its target, for the console (rich)."""
    from rich.table import Table

    table = Table(title=f"targets ({regularizer} regularizer)")
    for col in ("cost", "before", "after", "target", "met"):
        table.add_column(col, justify="left" if col in ("cost", "met") else "right")
    for c in constraints:
        table.add_row(f"{c['kind']} ({c['unit']})", f"{format_cost(c['before'])}",
                      f"{format_cost(c['after'])} ({percent(c['after'], c['before'])})", f"{format_cost(c['target'])} ({c['given']})",
                      "yes" if c["met"] else "[red]no[/red]")
    return table


def _mapping_of(architecture: dict) -> tuple[dict, dict, list[str]] | None:
    """(mapping, latencies, unit names) of an accelerator mapping (ODiMO); None for other methods."""
    mapping, latency = architecture.get("mapping"), architecture.get("latency")
    if not isinstance(mapping, dict) or not isinstance(latency, dict) or not mapping:
        return None
    return mapping, latency, list(architecture.get("accelerators") or next(iter(mapping.values())))


def mapping_latency_line(architecture: dict) -> str | None:
    """The modelled latency of an accelerator mapping against every unit alone, in one line;
    None for a method that maps nothing."""
    found = _mapping_of(architecture)
    if found is None:
        return None
    latency = found[1]
    alone = ", ".join(f"all on {key[4:]} {format_cost(value)}" for key, value in latency.items() if key != "mapping")
    return f"modelled latency of the mapping {format_cost(latency['mapping'])} ({alone})"


def mapping_markdown(architecture: dict) -> list[str]:
    """An accelerator mapping's section (ODiMO: output channels per unit and layer, and the
    modelled latency of the mapping against every unit alone); none for other methods."""
    found = _mapping_of(architecture)
    if found is None:
        return []
    mapping, _, units = found
    lines = ["", "## Accelerator mapping", "", "| layer | " + " | ".join(units) + " |",
             "|---|" + "---:|" * len(units)]
    lines += [f"| {layer} | " + " | ".join(str(counts.get(unit, 0)) for unit in units) + " |"
              for layer, counts in mapping.items()]
    return lines + ["", mapping_latency_line(architecture)]


def mapping_table(architecture: dict):
    """The accelerator mapping for the console (rich): output channels per unit and layer, and
    per unit over all layers; None for a method that maps nothing."""
    from rich.table import Table

    found = _mapping_of(architecture)
    if found is None:
        return None
    mapping, _, units = found
    table = Table(title="accelerator mapping (channels)")
    for col in ("layer", *units):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for layer, counts in mapping.items():
        table.add_row(layer, *[str(counts.get(unit, 0)) for unit in units])
    total = {unit: sum(int(counts.get(unit, 0)) for counts in mapping.values()) for unit in units}
    table.add_row("total", *[str(total[unit]) for unit in units], style="bold")
    return table


def percent(a: float, b: float) -> str:
    """``a`` as a percentage of ``b`` ("n/a" for b = 0)."""
    return f"{100.0 * a / b:.1f}%" if b else "n/a"


def _joined_sub_layers(after: Graph, final: dict, name: str):
    """An ODiMO layer split into one sub-layer per accelerator (``odimo.mapping``), as one spec:
    its sub-layers' output channels together (they share input and kernel)."""
    parts = json.loads(after.metadata.get(MAPPING_KEY, "{}")).get("layers", {}).get(name, {})
    subs = [final[part] for part in parts if part in final]
    if not subs:
        return None
    return subs[0].with_(name=name, out_channels=sum(int(s.out_channels) for s in subs),
                         bias=any(s.bias for s in subs))


def layer_rows(before: Graph, after: Graph) -> list[dict]:
    """Every layer of ``before`` with its channels, kernel, params and MACs before and after."""
    final = {spec.name: spec for spec in layer_specs(after)}
    rows = []
    for spec in layer_specs(before):
        new = final.get(spec.name) or _joined_sub_layers(after, final, spec.name)
        rows.append({
            "name": spec.name, "op": spec.op,
            "in_before": int(spec.in_channels), "in_after": int(new.in_channels) if new else 0,
            "out_before": int(spec.out_channels), "out_after": int(new.out_channels) if new else 0,
            "kernel_before": int(spec.kernel_size), "kernel_after": int(new.kernel_size) if new else 0,
            "params_before": int(params_cost(spec)), "params_after": int(params_cost(new)) if new else 0,
            "macs_before": int(macs_cost(spec)), "macs_after": int(macs_cost(new)) if new else 0,
        })
    return rows
