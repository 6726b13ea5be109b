"""How well a model's measured ort-cpu profile predicts the whole-model latency of pruned variants.

For each zoo model: its latency table (`plinio-onnx profile MODEL --hardware ort-cpu`, one
thread, channel multiple ``--multiple``: by default the CPU's NCHWc block, 16 with AVX-512, else
8), then ``--variants`` PIT exports with random masks that keep a multiple of it per channel
group (or all the channels), as a search on channel blocks leaves them: shapes the
table did not time as whole models. The original and every variant are then timed whole in ONNX
Runtime (ORT_ENABLE_ALL, one thread, on the calling thread's CPU time as the table:
`plinio_onnx.runtime.latency_clock`), alternately in one run (medians of blocks of ~5 ms; the
order reversed every round), and each variant's measured latency is compared with the table's
prediction (`LatencyTable.predict`). Prints every variant's error, each model's share within
±10 %, and the share over all variants, for the table's calibrations:

* ``fit`` (the default cost model): ``fixed + k · Σ net`` through the profiled model and its
  half-size anchor, both timed whole when the table was made;
* ``scale``: the layers' net seconds scaled so the profiled model's sum is its measured latency
  (non-tabulated ops and reorders scale with the layers);
* ``add``: the non-tabulated time as a constant;
* ``none``: the plain sum of the single-layer timings (each pays a run's fixed cost, reorders);
* ``fit@run``: ``fit`` re-anchored on the original's latency measured in the same run as the
  variants, which takes out a shared machine's drift between profiling and validation.

    python bench/latency_prediction.py [--models dscnn resnet8] [--variants 10] [--rounds 31]

Timings on a shared machine are noisy: run it on an idle one, and read ``fit@run`` beside
``fit`` when the load changed between profiling and timing.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
ZOO = ("digits_cnn", "dscnn", "resnet8", "mobilenetv1_025", "mobilenetv2_tiny", "densenet_tiny", "tcn",
       "fc_autoencoder", "transformer_tiny")
CALIBRATIONS = ("fit", "scale", "add", "none")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(ZOO))
    ap.add_argument("--variants", type=int, default=10)
    ap.add_argument("--multiple", type=int, default=None,
                    help="channel multiple of the table and the variants (default: the CPU's NCHWc block, 16 with AVX-512, else 8)")
    ap.add_argument("--repeats", type=int, default=20, help="samples per table entry")
    ap.add_argument("--rounds", type=int, default=31, help="alternating rounds of the whole-model timing")
    ap.add_argument("--budget", type=float, default=6.0, help="seconds of whole-model timing per model")
    ap.add_argument("--quiet", action="store_true", help="only the summaries")
    args = ap.parse_args(argv)
    if args.multiple is None:
        from plinio_onnx.hardware import nchwc_block
        args.multiple = nchwc_block()
    print(f"channel multiple {args.multiple}, {args.variants} variants per model")

    errors: dict[str, list[float]] = {c: [] for c in (*CALIBRATIONS, "fit@run")}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            try:
                model_errors = _model(name, Path(tmp), args)
            except Exception as err:   # a model PIT or the table cannot take: said, not hidden
                print(f"{name}: skipped ({type(err).__name__}: {' '.join(str(err).split())[:160]})")
                continue
            for key, values in model_errors.items():
                errors[key] += values
    print("\nall variants:")
    for key, values in errors.items():
        if values:
            print(f"  {key:>9}: {len(values)} variants, within ±10%: {_share(values):.0%}, median |error| "
                  f"{statistics.median(np.abs(values)):.1%}, worst {max(values, key=abs):+.1%}")
    return 0


def _model(name: str, tmp: Path, args) -> dict[str, list[float]]:
    import plinio_onnx as po
    from plinio_onnx.hardware import measured
    from plinio_onnx.runtime import alternate_seconds, latency_clock, ort_runner

    path = tmp / f"{name}.onnx"
    shutil.copy(ROOT / "models" / f"{name}.onnx", path)   # the table is cached beside it
    table = measured.load_or_measure(path, channel_multiple=args.multiple, repeats=args.repeats)
    variants = {}
    for seed in range(args.variants):
        model = po.PIT(path)
        _blocks(model, seed, args.multiple)
        variants[f"v{seed}"] = tmp / f"{name}.v{seed}.onnx"
        model.export(variants[f"v{seed}"])
    runners = {"original": ort_runner(path, measured.random_feeds(_proto(path)))}
    runners.update({key: ort_runner(file, measured.random_feeds(_proto(file))) for key, file in variants.items()})
    seconds = alternate_seconds(runners, rounds=args.rounds, budget_s=args.budget, clock=latency_clock("ort-cpu", 1))
    tables = {c: dataclasses.replace(table, calibration=c) for c in CALIBRATIONS}
    drift = seconds["original"] / table.whole_seconds
    out: dict[str, list[float]] = {c: [] for c in (*CALIBRATIONS, "fit@run")}
    print(f"{name}: {len(table.layers)} layers; original {1e3 * table.whole_seconds:.3f} ms when profiled, "
          f"{1e3 * seconds['original']:.3f} ms now")
    for key, file in variants.items():
        graph = po.load(file)
        predicted = {c: t.predict(graph) for c, t in tables.items()}
        predicted["fit@run"] = predicted["fit"] * drift
        actual = seconds[key]
        for c, value in predicted.items():
            out[c].append(value / actual - 1)
        macs = po.cost.total(graph, po.cost.macs) / po.cost.total(po.load(path), po.cost.macs)
        if not args.quiet:
            print(f"  {key}: MACs {macs:.0%}, measured {1e3 * actual:.3f} ms, predicted "
                  + ", ".join(f"{c} {1e3 * v:.3f} ({v / actual - 1:+.0%})" for c, v in predicted.items()))
    print("  within ±10%: " + ", ".join(f"{c} {_share(v):.0%}" for c, v in out.items()))
    return out


def _proto(path: Path):
    import onnx
    return onnx.load(str(path))


def _share(errors: list[float]) -> float:
    return float(np.mean(np.abs(errors) <= 0.10))


def _blocks(model, seed: int, multiple: int) -> None:
    """Every PIT mask keeps a random count on the grid of ``multiple`` (its last entries; the
    entries before them set below the threshold), as a search on channel blocks would."""
    from plinio_onnx.hardware.measured import channel_grid
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name in model.module.initializer_names.values():
            if name.endswith(".pit_alpha"):
                alpha = model.tensor(name)
                kept = int(rng.choice(channel_grid(alpha.numel(), multiple)))
                alpha[:alpha.numel() - kept] = 0.2


if __name__ == "__main__":
    torch.manual_seed(0)
    raise SystemExit(main())
