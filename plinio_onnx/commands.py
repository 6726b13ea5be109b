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
    p.add_argument("--method", default="pit", metavar="NAME",
                   help="search method: pit (default), mps, qat, pit+mps, supernet, supernet+pit")
    p.add_argument("--data", required=True, metavar="DATA.npz", help="DATA.npz with x (or one array per graph input) and optional y")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="output .onnx file")
    p.add_argument("--cost", default=None, metavar="NAME", help="cost model of the regularizer: params (default), macs, ops, "
                                                "params_no_bias; with a target, the target's kind")
    p.add_argument("--strength", type=float, default=None, metavar="S",
                   help="regularization strength S in loss = task + S*cost (default: initial task loss / cost)")
    p.add_argument("--target-params", default=None, metavar="N",
                   help="parameter budget: a number (12000, 12k) or a percentage of the input model (50%%)")
    p.add_argument("--target-macs", default=None, metavar="N",
                   help="MAC budget: a number (1.5M) or a percentage of the input model (25%%)")
    p.add_argument("--epochs", type=int, default=None, metavar="N", help="search epochs (default 100, early stopping)")
    p.add_argument("--warmup-epochs", type=int, default=None, metavar="N",
                   help="warm-up epochs (default 100 with early stopping; 0 skips it; distillation: 0)")
    p.add_argument("--finetune-epochs", type=int, default=None, metavar="N",
                   help="fine-tune epochs after export (default 100 with early stopping; 0 skips it)")
    p.add_argument("--labels", default="auto", metavar="MODE", help="auto (default), classification, regression or distill "
                                                    "(match the input model's outputs; the default without y)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help="batch size (default 32)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the splits and the shuffling (default 0)")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="checkpoint folder (default: OUT.ckpt next to the output)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: 1 for small models or a busy machine, else the idle cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no summary")
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
    from .search import optimize
    report = optimize(args.model, args.data, output=args.output, method=args.method, cost=args.cost,
                      strength=args.strength, target_params=args.target_params,
                      target_macs=args.target_macs, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                      finetune_epochs=args.finetune_epochs, batch_size=args.batch_size, seed=args.seed,
                      labels=args.labels, checkpoint_dir=args.checkpoint_dir, progress=not args.quiet,
                      quiet=args.quiet, threads=args.threads)
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
        from .search import export_searchable
        graph, method = export_searchable(args.model, args.output)
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
