"""Subcommands contributed by the search methods and the hardware profiles: ``optimize``,
``export`` and ``profile``."""
from __future__ import annotations

import argparse
import sys


def register_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``optimize``, ``export`` and ``profile`` to the CLI parser."""
    p = sub.add_parser(
        "optimize", help="search a smaller model (PIT) on your data; write the deployable ONNX",
        description="Warm-up, search, export and fine-tune MODEL on DATA.npz (x or one array per "
                    "graph input, optional y); write OUT.onnx, OUT.report.json and OUT.report.md. "
                    "The data are split into train/validation/test by the tool (test never seen by "
                    "the search). Rerunning the same command resumes from the checkpoint.")
    p.add_argument("model", metavar="MODEL", help="the input .onnx model (never modified)")
    p.add_argument("--data", required=True, metavar="DATA",
                   help="DATA.npz with x (or one array per graph input) and optional y; or a folder, "
                        "streamed: .npz shards (shard_000.npz, ...), .npy arrays (x.npy, y.npy: "
                        "memory-mapped) or shard folders of .npy arrays")
    from .optimize.config import cli_arguments
    for flags, options in cli_arguments():   # every other flag is an `OptimizeConfig` field
        p.add_argument(*flags, **options)
    p.set_defaults(run=_optimize)
    _one_line_errors(p)

    p = sub.add_parser("export", help="turn a searchable checkpoint into the deployable ONNX model",
                       description="SEARCHABLE.onnx (e.g. OUT.ckpt/search.best.onnx) → finalized, "
                                   "deployable OUT.onnx (masks applied, no ai.plinio nodes); with "
                                   "--training-artifacts, ONNX Runtime on-device training artifacts "
                                   "of the exported (or a deployable) model; a QDQ model fine-tuned "
                                   "with them (FakeQuant nodes) → standard QDQ OUT.onnx.")
    p.add_argument("model", metavar="SEARCHABLE_OR_DEPLOYABLE.onnx",
                   help="a searchable .onnx checkpoint (or, with --training-artifacts, a deployable model)")
    p.add_argument("-o", "--output", default=None, metavar="OUT.onnx",
                   help="output .onnx file (required without --training-artifacts)")
    p.add_argument("--format", default="qdq", choices=("qdq", "qonnx"),
                   help="quantized models: qdq (default; QuantizeLinear/DequantizeLinear) or qonnx "
                        "(Quant nodes, for FINN, hls4ml and qonnx)")
    p.add_argument("--int4", default="off", choices=("off", "auto", "on"),
                   help="QDQ weights of layers that chose ≤ 4 bits: off (default: int8 containers, read "
                        "by every compiler), auto (INT4 where the model's opset is ≥ 21), on (INT4, "
                        "raising the opset to 21)")
    p.add_argument("--training-artifacts", default=None, metavar="DIR",
                   help="write ONNX Runtime training artifacts (training, eval and optimizer models, "
                        "checkpoint) into DIR for on-device fine-tuning")
    p.add_argument("--loss", default="cross_entropy", metavar="NAME",
                   help="loss of the training artifacts: cross_entropy (default), mse, bce_with_logits, l1")
    p.add_argument("--optimizer", default="adamw", metavar="NAME",
                   help="optimizer of the training artifacts: adamw (default) or sgd")
    p.set_defaults(run=_export)
    _one_line_errors(p)
    _register_profile(sub)


def _register_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="time each layer of MODEL in a runtime on this machine (a measured "
                                       "hardware profile for --hardware ort-cpu)",
                       description="Time every Conv/Gemm/MatMul layer of MODEL alone at the channel counts a "
                                   "search on blocks of --channel-multiple can reach, and the whole model, in "
                                   "ONNX Runtime (or OpenVINO) on this machine; cache the table beside the "
                                   "model (MODEL.ort-cpu.json) for optimize --hardware and inspect --hardware.")
    p.add_argument("model", metavar="MODEL", help="the .onnx model (never modified)")
    p.add_argument("--hardware", default="ort-cpu", metavar="NAME",
                   help="the runtime to time in: ort-cpu (default) or openvino-cpu (needs `pip install openvino`)")
    p.add_argument("--channel-multiple", type=int, default=None, metavar="N",
                   help="the channel grid: multiples of N below each layer's size, and the size (default: "
                        "ONNX Runtime's NCHWc block on this CPU, 16 with AVX-512, else 8)")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="runtime threads (default 1)")
    p.add_argument("--repeats", type=int, default=20, metavar="N",
                   help="timed samples per entry, their median kept (default 20)")
    p.add_argument("--force", action="store_true", help="time again even when a cached table fits")
    p.add_argument("--json", action="store_true", help="the summary as JSON")
    p.set_defaults(run=_profile)
    _one_line_errors(p)


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Usage mistakes as one line too (argparse prints the usage block by default)."""
    def error(message: str):
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)
    parser.error = error  # type: ignore[method-assign]


def _optimize(args: argparse.Namespace) -> int:
    from .optimize import optimize
    from .optimize.config import config_from_cli
    report = optimize(args.model, args.data, config_from_cli(vars(args)))
    return 0 if report is not None else 1


def _export(args: argparse.Namespace) -> int:
    if args.output is None and args.training_artifacts is None:
        print("plinio-onnx export: error: give -o OUT.onnx, --training-artifacts DIR or both",
              file=sys.stderr)
        return 2
    model = args.model
    from .requantize import holds_fake_quantizers
    if args.output is not None and holds_fake_quantizers(args.model):
        from .requantize import requantize   # a fine-tuned QDQ model back to standard QDQ
        requantize(args.model).save(args.output)
        print(f"{args.output}: fine-tuned QDQ model, FakeQuant → QuantizeLinear/DequantizeLinear")
        model = args.output
    elif args.output is not None:
        from .optimize import export_searchable
        graph, method = export_searchable(args.model, args.output, format=args.format, int4=args.int4)
        from .cost import params, macs, total
        print(f"{args.output}: {method} → {total(graph, params):,} params, {total(graph, macs):,} MACs")
        model = args.output
    if args.training_artifacts is not None:
        from .training_artifacts import training_artifacts
        result = training_artifacts(model, args.training_artifacts, loss=args.loss, optimizer=args.optimizer)
        print(f"{result.directory}: ONNX Runtime training artifacts, {len(result.trainable)} trainable "
              f"tensors ({'QDQ quantizers as fake-quant' if result.quantized else 'float'}), "
              f"loss {result.loss} on {result.loss_output!r} with labels {result.label_input!r}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    import json

    from .hardware import for_model, is_measured, measured, nchwc_block
    from .load import load
    if not is_measured(args.hardware):
        print(f"plinio-onnx profile: error: --hardware {args.hardware!r} is not a measured runtime; choose "
              f"from {', '.join(measured.RUNTIMES)} (analytical profiles need no profiling: "
              f"plinio-onnx inspect MODEL --hardware NAME)", file=sys.stderr)
        return 2
    multiple = args.channel_multiple or nchwc_block()
    if multiple < 1 or args.threads < 1 or args.repeats < 1:
        print("plinio-onnx profile: error: --channel-multiple, --threads and --repeats must be at least 1",
              file=sys.stderr)
        return 2
    cached = None if args.force else measured.cached_table(args.model, runtime=args.hardware,
                                                           channel_multiple=multiple, threads=args.threads)
    if cached is None:
        table = _measure_with_progress(args, multiple)
    else:
        table = cached
    profile = for_model(args.hardware, args.model, channel_multiple=multiple, threads=args.threads)
    summary = {"model": args.model, "hardware": args.hardware, "runtime_version": table.runtime_version,
               "table": str(measured.table_path(args.model, args.hardware)), "reused": cached is not None,
               "layers": len(table.layers), "channel_multiple": table.channel_multiple, "threads": table.threads,
               "predicted_ms": 1e3 * table.predict(load(args.model)),
               "measured_ms": None if table.whole_seconds is None else 1e3 * table.whole_seconds,
               "run_ms": 1e3 * table.run_seconds}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    measured_ms = "n/a" if summary["measured_ms"] is None else f"{summary['measured_ms']:.3f} ms"
    print(f"{args.model}: {summary['layers']} layers timed in {profile.description} on the grid of "
          f"{table.channel_multiple} channels{' (cached table reused; --force times again)' if cached else ''}")
    print(f"  predicted {summary['predicted_ms']:.3f} ms (sum of the layers, calibrated); "
          f"measured whole model {measured_ms}; fixed cost of a run {summary['run_ms']:.4f} ms")
    print(f"  table: {summary['table']}")
    return 0


def _measure_with_progress(args: argparse.Namespace, multiple: int):
    """Time the model's table now, with a progress bar on stderr (on a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .hardware import measured
    console = Console(stderr=True)
    with Progress(TextColumn("[bold]profile"), BarColumn(bar_width=28), MofNCompleteColumn(),
                  TextColumn("{task.fields[layer]}"), TimeElapsedColumn(), console=console,
                  disable=not console.is_terminal) as bar:
        task = bar.add_task("profile", total=None, layer="")

        def progress(done: int, total: int, layer: str) -> None:
            bar.update(task, completed=done, total=total, layer=layer)
        return measured.load_or_measure(args.model, runtime=args.hardware, channel_multiple=multiple,
                                        threads=args.threads, repeats=args.repeats, progress=progress, force=True)
