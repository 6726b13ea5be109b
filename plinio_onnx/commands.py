"""Subcommands contributed by the search methods: ``optimize`` and ``export``."""
from __future__ import annotations

import argparse
import sys


def register_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``optimize`` and ``export`` to the CLI parser."""
    p = sub.add_parser(
        "optimize", help="search a smaller model (PIT) on your data; write the deployable ONNX",
        description="Warm-up, search, export and fine-tune MODEL on DATA.npz (x or one array per "
                    "graph input, optional y); write OUT.onnx, OUT.report.json and OUT.report.md. "
                    "The data are split into train/validation/test by the tool (test never seen by "
                    "the search). Rerunning the same command resumes from the checkpoint.")
    p.add_argument("model", metavar="MODEL", help="the input .onnx model (never modified)")
    p.add_argument("--data", required=True, metavar="DATA.npz",
                   help="DATA.npz with x (or one array per graph input) and optional y")
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
