"""The ``plinio-onnx`` command line: inspect, verify (and, per method, optimize/export).

Every failure is one readable line on stderr and a non-zero exit; never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


from .errors import PlinioOnnxError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except PlinioOnnxError as err:
        print(f"plinio-onnx: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("plinio-onnx: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug of ours: still one line, with where to report it
        print(f"plinio-onnx: internal error: {type(err).__name__}: {' '.join(str(err).split())[:500]}",
              file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plinio-onnx", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("inspect", help="graph summary and per-layer parameters and MACs")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--hardware", metavar="NAME", help="also each layer's modelled latency (and energy) on a "
                   "hardware profile: gap8, ne16, diana, mpic, simd-mcu, ort-cpu or openvino-cpu (the model's "
                   "measured table: plinio-onnx profile), or FILE.py:NAME")
    _input_shape_option(p)
    p.set_defaults(run=_inspect)

    p = sub.add_parser("verify", help="compare the torch module with ONNX Runtime on the same inputs")
    p.add_argument("model")
    p.add_argument("--data", help="an .npz with x (or one array per graph input)")
    p.add_argument("--batch", type=int, default=4, help="batch size of random inputs (default 4)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max abs error relative to the output scale (default 1e-4; 1e-2 for "
                        "quantized graphs, where a rounding tie can resolve one step apart)")
    _input_shape_option(p)
    p.set_defaults(run=_verify)

    from .commands import register_commands
    register_commands(sub)
    return parser


def _input_shape_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-shape", action="append", metavar="[NAME:]DIMS",
                        help="shape of an input with symbolic sizes, e.g. 1x3x32x32 (repeat it "
                             "as NAME:DIMS for several inputs; verify --data uses the data's)")


def _input_shapes(args: argparse.Namespace) -> dict:
    if not args.input_shape:
        return {}
    from .data import parse_input_shapes
    from .load import load
    return parse_input_shapes(args.input_shape, load(args.model), args.model)


# -- inspect ----------------------------------------------------------------------------------
def _inspect(args: argparse.Namespace) -> int:
    from .inspect import inspect_model
    report = inspect_model(args.model, hardware=args.hardware, input_shapes=_input_shapes(args))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table
    console = Console()
    console.print(f"[bold]{report['file']}[/bold]: {report['nodes']} nodes, opset {report['opset']}")
    for kind in ("inputs", "outputs"):
        console.print(f"  {kind}: " + ", ".join(f"{t['name']} {t['shape']} {t['dtype']}" for t in report[kind]))
    console.print("  ops: " + ", ".join(f"{op}×{n}" for op, n in report["op_counts"].items()))
    table = Table(title="layers")
    hw = report.get("hardware")
    modelled = [k for k in ("latency", "energy") if hw and report[k] is not None]
    for col in ("layer", "op", "in", "out", "kernel", "groups", "params", "MACs", *modelled):
        table.add_column(col, justify="right" if col not in ("layer", "op") else "left")
    for row in report["layers"]:
        table.add_row(row["name"], row["op"], str(row["in_channels"]), str(row["out_channels"]),
                      str(row["kernel_size"]), str(row["groups"]), f"{row['params']:,}", f"{row['macs']:,}",
                      *(_figure(row[k]) for k in modelled))
    table.add_row("total", "", "", "", "", "", f"{report['params']:,}", f"{report['macs']:,}",
                  *(_figure(report[k]) for k in modelled), style="bold")
    if hw:
        table.caption = (f"{hw['hardware']}: latency in {hw['latency_unit']}" + (
            f", energy in {hw['energy_unit']}" if "energy" in modelled else "") + f"; float layers at "
            f"{hw['default_bits']} bits; channel multiple {hw['channel_multiple']}; after {hw['source']}")
    console.print(table)
    console.print(f"  all float parameters (incl. normalization): {report['all_parameters']:,}")
    pit = report["searchable"]["pit"]
    console.print(f"  PIT could prune {pit['channels']:,} channels in {pit['groups']} groups "
                  f"({len(pit['layers'])} layers); kept whole: " + (
                      "; ".join(f"{k['group']} ({k['reason']})" for k in pit["kept_whole"][:8])
                      + (" …" if len(pit["kept_whole"]) > 8 else "") if pit["kept_whole"] else "none"))
    console.print(f"  MPS could quantize {report['searchable']['mps']['layers']} layers; SuperNet could "
                  f"give alternatives to {report['searchable']['supernet']['layers']}")
    if report["unsupported"]:
        console.print("[red]unsupported by the loader:[/red] " + "; ".join(
            f"{u['node']} ({u['op']}): {u['reason']}" for u in report["unsupported"]))
    return 0


def _figure(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


# -- verify -----------------------------------------------------------------------------------
def _verify(args: argparse.Namespace) -> int:
    from .verify import verify_model
    result = verify_model(args.model, data=args.data, batch=args.batch,
                          input_shapes=_input_shapes(args))
    if args.tolerance is None:
        args.tolerance = 1e-2 if result["quantized"] else 1e-4
    ok = result["relative_error"] <= args.tolerance
    for name, err in result["per_output"].items():
        print(f"{name}: max abs error {err['max_abs_error']:.3g} (output scale {err['scale']:.3g})")
    chunks = f" (in batches of {result['chunk']}: the model's batch is fixed)" if result["chunk"] else ""
    print(f"{'OK' if ok else 'MISMATCH'}: max relative error {result['relative_error']:.3g} "
          f"(tolerance {args.tolerance:g}) on {result['samples']} samples{chunks}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
