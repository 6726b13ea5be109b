"""PIT on the 8x8 digits CNN: accuracy/params Pareto points of ``plinio-onnx optimize``.

For every seed: ``optimize`` (default options otherwise) at a few fixed strengths and at
``--target-params 50%`` and ``20%``, next to the unpruned model trained the same way (the
warm-up recipe for the same total number of epochs, best validation checkpoint). The splits are
the tool's own (the test split is never seen by any phase); every accuracy is measured on the
ONNX file in ONNX Runtime.

    python bench/pit_digits.py                       # seeds 0 1 2, strengths and 50% / 20%
    python bench/pit_digits.py --seeds 0 --targets 50% --strengths

The bar (issue): at 50 % and 20 % of the base params, ≤ 1 point below the unpruned model.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_cnn.onnx"
DATA = ROOT / "models" / "digits.npz"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--strengths", type=float, nargs="*", default=[3e-7, 1e-6, 5e-6, 2e-5])
    ap.add_argument("--targets", nargs="*", default=["50%", "20%"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest for this model)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    from plinio_onnx.optimize import baseline, optimize

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            runs = [("strength", s, {"strength": s}) for s in args.strengths]
            runs += [("target", t, {"target_params": t}) for t in args.targets]
            results = []
            for kind, value, options in runs:
                start = time.perf_counter()
                report = optimize(MODEL, DATA, output=Path(tmp) / f"s{seed}-{kind}-{value}.onnx", seed=seed,
                                  checkpoint_dir=False, progress=False, quiet=True, **options)
                seconds = time.perf_counter() - start
                epochs = sum(int(p.get("epochs") or 0) for p in report.phases.values())
                results.append((kind, value, report, seconds, epochs))
                print(f"  seed {seed} {kind} {value}: {report.headline()} ({epochs} epochs, {seconds:.1f} s)",
                      file=sys.stderr, flush=True)
            start = time.perf_counter()
            base = baseline(MODEL, DATA, epochs=max(r[4] for r in results), seed=seed)
            base_seconds = time.perf_counter() - start
            for kind, value, report, seconds, epochs in results:
                unpruned = base["test_by_epoch"][epochs]
                rows.append({
                    "seed": seed, "run": f"{kind} {value}", "params": report.after["params"],
                    "params_pct": 100.0 * report.after["params"] / report.before["params"],
                    "macs": report.after["macs"], "test_acc": 100.0 * report.after["test"]["accuracy"],
                    "warmup_acc": 100.0 * report.before["test"]["accuracy"],
                    "unpruned_acc": 100.0 * unpruned, "delta": 100.0 * (report.after["test"]["accuracy"] - unpruned),
                    "epochs": epochs, "seconds": seconds,
                    "phase_epochs": {k: p.get("epochs") for k, p in report.phases.items()},
                })
            rows.append({"seed": seed, "run": "unpruned", "params": base["params"], "params_pct": 100.0,
                         "macs": base["macs"], "test_acc": 100.0 * base["test"]["accuracy"],
                         "warmup_acc": None, "unpruned_acc": 100.0 * base["test"]["accuracy"], "delta": 0.0,
                         "epochs": len(base["test_by_epoch"]) - 1, "seconds": base_seconds})

    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"PIT on digits_cnn ({len(args.seeds)} seed(s); test split never seen by the search; "
                        "accuracy in ONNX Runtime)")
    for col in ("seed", "run", "params", "% base", "MACs", "test acc", "unpruned (same epochs)", "Δ points",
                "epochs", "wall s"):
        table.add_column(col, justify="left" if col in ("run",) else "right")
    for r in rows:
        table.add_row(str(r["seed"]), r["run"], f"{r['params']:,}", f"{r['params_pct']:.1f}", f"{r['macs']:,}",
                      f"{r['test_acc']:.2f}", f"{r['unpruned_acc']:.2f}", f"{r['delta']:+.2f}", str(r["epochs"]),
                      f"{r['seconds']:.1f}")
    console = Console(width=140)
    console.print(table)
    summary = Table(title="mean over seeds")
    for col in ("run", "% base params", "test acc", "Δ points (mean)", "Δ points (worst)", "wall s"):
        summary.add_column(col, justify="left" if col == "run" else "right")
    for run in dict.fromkeys(r["run"] for r in rows):
        sel = [r for r in rows if r["run"] == run]
        summary.add_row(run, f"{statistics.mean(r['params_pct'] for r in sel):.1f}",
                        f"{statistics.mean(r['test_acc'] for r in sel):.2f}",
                        f"{statistics.mean(r['delta'] for r in sel):+.2f}", f"{min(r['delta'] for r in sel):+.2f}",
                        f"{statistics.mean(r['seconds'] for r in sel):.1f}")
    console.print(summary)
    targets = [r for r in rows if r["run"].startswith("target")]
    ok = all(r["delta"] >= -1.0 for r in targets)
    console.print(f"bar (targets lose ≤ 1 point vs the unpruned model): {'PASS' if ok else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
