"""How well a model's measured ort-cpu profile predicts the whole-model latency of pruned variants.

For each zoo model: its latency table (`plinio-onnx profile MODEL --hardware ort-cpu`, one
thread, channel multiple ``--multiple``: by default the CPU's NCHWc block, 16 with AVX-512, else
8; the seconds it took are printed), then ``--variants`` PIT exports with random masks that keep
a multiple of it per channel group (or all the channels), as a search on channel blocks leaves
them. **Clean split**: the table's calibration was fitted on the model itself, its half-width
anchor and random-mask models drawn from a seed stream of their own
(`plinio_onnx.hardware.timing.CALIBRATION_SEED`); the variants here come from
``numpy.random.default_rng(0, 1, …)``, and a variant whose layer shapes equal the model's or any
calibration point's is skipped (and counted) until ``--variants`` unseen ones are drawn. The
original and every variant are then timed whole in ONNX Runtime (ORT_ENABLE_ALL, one thread, on
the calling thread's CPU time as the table: `plinio_onnx.runtime.latency_clock`), alternately in
one run (blocks of ~5 ms, the order reversed every round); a model's measured latency is the
table's percentile of its samples (`TIMING_QUANTILE`, the 20th: the undisturbed time on a shared
machine; the median is printed beside it and scored too). Prints every variant's error against
the prediction (`LatencyTable.predict`) for the table's calibrations, each model's share within
±10 %, and the share over all variants:

* ``fit`` (the default cost model): ``fixed + k · Σ net`` through the profiled model, its slope
  fitted on the anchor and the random-mask models, all timed whole when the table was made;
* ``scale``: the layers' net seconds scaled so the profiled model's sum is its measured latency
  (non-tabulated ops and reorders scale with the layers);
* ``add``: the non-tabulated time as a constant;
* ``none``: the plain sum of the single-layer timings (each pays a run's fixed cost, reorders);
* ``fit×drift`` (a reference, not a prediction): ``fit`` rescaled by the original's latency now
  over its latency when profiled — what is left once the machine's drift between profiling and
  timing is taken out.

Per model it prints the error decomposition: the calibrated fixed cost and slope, the share of
the original's latency that is fixed, the calibration points' own residuals, the plain sum of
the single-layer timings against the whole model (what a layer alone pays that the chain does
not: a run's fixed cost, NCHWc reorders around it; what the chain pays that no table holds:
pooling, adds, unfused activations), and the drift of the original since profiling.

    python bench/latency_prediction.py [--models dscnn resnet8] [--variants 10] [--rounds 31]

Timings on a shared machine are noisy: run it with ``nice`` and say the load beside the figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
ZOO = ("digits_cnn", "dscnn", "resnet8", "mobilenetv1_025", "mobilenetv2_tiny", "densenet_tiny", "tcn",
       "fc_autoencoder", "transformer_tiny")
CALIBRATIONS = ("fit", "scale", "add", "none")
SCORES = (*CALIBRATIONS, "fit vs median", "fit×drift")


def main(argv=None) -> int:
    from plinio_onnx.hardware.timing import CALIBRATION_SEED, TIMING_QUANTILE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(ZOO))
    ap.add_argument("--variants", type=int, default=10, help="unseen variants per model")
    ap.add_argument("--multiple", type=int, default=None,
                    help="channel multiple of the table and the variants (default: the CPU's NCHWc block, 16 with AVX-512, else 8)")
    ap.add_argument("--repeats", type=int, default=20, help="samples per table entry")
    ap.add_argument("--rounds", type=int, default=41, help="alternating rounds of the whole-model timing")
    ap.add_argument("--budget", type=float, default=8.0, help="seconds of whole-model timing per model")
    ap.add_argument("--quiet", action="store_true", help="only the summaries")
    args = ap.parse_args(argv)
    if args.multiple is None:
        from plinio_onnx.hardware import nchwc_block
        args.multiple = nchwc_block()
    print(f"channel multiple {args.multiple}, {args.variants} unseen variants per model (seeds 0, 1, …; "
          f"calibration masks from seed stream {CALIBRATION_SEED:#x}); measured latency: percentile "
          f"{TIMING_QUANTILE:g} of the samples; load average {os.getloadavg()[0]:.1f} at start")

    errors: dict[str, list[float]] = {c: [] for c in SCORES}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            try:
                model_errors = _model(name, Path(tmp), args)
            except Exception as err:   # a model PIT or the table cannot take: said, not hidden
                print(f"{name}: skipped ({type(err).__name__}: {' '.join(str(err).split())[:160]})")
                continue
            for key, values in model_errors.items():
                errors[key] += values
    print(f"\nall unseen variants (load average {os.getloadavg()[0]:.1f} at the end):")
    for key, values in errors.items():
        if values:
            print(f"  {key:>13}: {len(values)} variants, within ±10%: {_share(values):.0%}, median |error| "
                  f"{statistics.median(np.abs(values)):.1%}, worst {max(values, key=abs):+.1%}")
    return 0


def _model(name: str, tmp: Path, args) -> dict[str, list[float]]:
    import plinio_onnx as po
    from plinio_onnx.hardware import measured

    path = tmp / f"{name}.onnx"
    shutil.copy(ROOT / "models" / f"{name}.onnx", path)   # the table is cached beside it
    start = time.perf_counter()
    table = measured.load_or_measure(path, channel_multiple=args.multiple, repeats=args.repeats)
    profile_s = time.perf_counter() - start
    variants, skipped = _unseen_variants(path, table, tmp, args)
    samples = _samples({"original": path, **variants}, args)
    from plinio_onnx.hardware.timing import TIMING_QUANTILE
    seconds = {key: float(np.percentile(values, TIMING_QUANTILE)) for key, values in samples.items()}
    medians = {key: float(np.median(values)) for key, values in samples.items()}
    tables = {c: dataclasses.replace(table, calibration=c) for c in CALIBRATIONS}
    drift = seconds["original"] / table.whole_seconds
    _decomposition(name, table, profile_s, skipped, seconds["original"], po.load(path))
    out: dict[str, list[float]] = {c: [] for c in SCORES}
    macs_original = po.cost.total(po.load(path), po.cost.macs)
    for key, file in variants.items():
        graph = po.load(file)
        predicted = {c: t.predict(graph) for c, t in tables.items()}
        actual = seconds[key]
        for c, value in predicted.items():
            out[c].append(value / actual - 1)
        out["fit vs median"].append(predicted["fit"] / medians[key] - 1)
        out["fit×drift"].append(predicted["fit"] * drift / actual - 1)
        if not args.quiet:
            macs = po.cost.total(graph, po.cost.macs) / macs_original
            print(f"  {key}: MACs {macs:4.0%}, measured {1e3 * actual:.4f} ms (median {1e3 * medians[key]:.4f}), "
                  "predicted " + ", ".join(f"{c} {1e3 * v:.4f} ({v / actual - 1:+.0%})" for c, v in predicted.items())
                  + f", fit×drift {predicted['fit'] * drift / actual - 1:+.0%}")
    if variants:
        print("  within ±10%: " + ", ".join(f"{c} {_share(v):.0%}" for c, v in out.items()))
    else:
        print("  no unseen variant: every shape drawn is the model's or a calibration point's")
    return out


def _decomposition(name: str, table, profile_s: float, skipped: int, original_now: float, graph) -> None:
    """Where a prediction's error can come from, for one model (see the module docstring)."""
    fixed, k, base = table.calibrated()
    whole = table.whole_seconds
    plain = dataclasses.replace(table, calibration="none").predict(graph)
    residuals = []
    for channels, seconds in table.calibration_points():
        variable = table._variable(base, channels)
        residuals.append((fixed + k * variable) / seconds - 1)
    print(f"{name}: {len(table.layers)} layers, profiled in {profile_s:.1f} s; original {1e3 * whole:.4f} ms when "
          f"profiled, {1e3 * original_now:.4f} ms now ({original_now / whole - 1:+.1%} drift); "
          f"{skipped} drawn variants skipped (the shape of a calibration point)")
    print(f"  calibration: fixed {1e3 * fixed:.4f} ms ({fixed / whole:.0%} of the model), slope k {k:.3f} on "
          f"Σ net {1e3 * (whole - fixed) / max(k, 1e-12):.4f} ms; the single-layer timings sum to "
          f"{1e3 * plain:.4f} ms ({plain / whole:.2f}× the whole model); residuals at its "
          f"{len(residuals)} points: " + " ".join(f"{r:+.1%}" for r in residuals))


def _shape(graph) -> tuple:
    from plinio_onnx.cost import layer_specs
    return tuple(sorted((s.name, int(s.in_channels), int(s.out_channels)) for s in layer_specs(graph)))


def _unseen_variants(path: Path, table, tmp: Path, args) -> tuple[dict, int]:
    """Up to ``args.variants`` random-mask exports (seeds 0, 1, … below 20 · ``args.variants``)
    whose layer shapes are neither the model's nor a calibration point's, nor another variant's;
    and how many drawn were skipped as a calibration shape."""
    import plinio_onnx as po
    layers = set(table.layers)

    def shape_of(channels: dict) -> tuple:
        return tuple(sorted((n, int(c[0]), int(c[1])) for n, c in channels.items() if n in layers))
    seen = {tuple(x for x in _shape(po.load(path)) if x[0] in layers)}
    seen |= {shape_of(channels) for channels, _ in table.calibration_points()}
    variants, skipped, masks = {}, 0, set()
    for seed in range(20 * args.variants):
        if len(variants) == args.variants:
            break
        model = po.PIT(path)
        kept = random_blocks(model, seed, args.multiple)
        if kept in masks:      # the same masks as an earlier seed
            continue
        masks.add(kept)
        file = tmp / f"{path.stem}.v{seed}.onnx"
        model.export(file)
        shape = tuple(x for x in _shape(po.load(file)) if x[0] in layers)
        if shape in seen:
            skipped += 1
            continue
        seen.add(shape)
        variants[f"v{seed}"] = file
    return variants, skipped


def _samples(files: dict, args) -> dict[str, list[float]]:
    """Every model's per-run seconds, timed alternately (blocks of ~5 ms, the order reversed every
    round, ``args.rounds`` rounds within ~``args.budget`` seconds) on the table's clock."""
    from plinio_onnx.hardware import measured
    from plinio_onnx.runtime import latency_clock, median_seconds, ort_runner
    clock = latency_clock("ort-cpu", 1)
    runners = {key: ort_runner(file, measured.random_feeds(_proto(file))) for key, file in files.items()}
    one = {key: median_seconds(run, repeats=3, clock=clock) for key, run in runners.items()}
    steps = {key: max(1, int(0.005 / max(value, 1e-7))) for key, value in one.items()}
    per_round = sum(one[key] * steps[key] for key in runners)
    rounds = max(5, min(args.rounds, int(args.budget / max(per_round, 1e-9))))
    samples: dict[str, list[float]] = {key: [] for key in runners}
    order = list(runners)
    for index in range(rounds):
        for key in (order if index % 2 == 0 else order[::-1]):
            begin = clock()
            for _ in range(steps[key]):
                runners[key]()
            samples[key].append((clock() - begin) / steps[key])
    return samples


def _proto(path: Path):
    import onnx
    return onnx.load(str(path))


def _share(errors: list[float]) -> float:
    return float(np.mean(np.abs(errors) <= 0.10))


def random_blocks(model, seed: int, multiple: int) -> tuple[int, ...]:
    """Every PIT mask keeps a random count on the grid of ``multiple`` (its last entries; the
    entries before them set below the threshold), as a search on channel blocks would; the counts."""
    from plinio_onnx.hardware.measured import channel_grid
    rng = np.random.default_rng(seed)
    counts = []
    with torch.no_grad():
        for name in model.module.initializer_names.values():
            if name.endswith(".pit_alpha"):
                alpha = model.tensor(name)
                kept = int(rng.choice(channel_grid(alpha.numel(), multiple)))
                alpha[:alpha.numel() - kept] = 0.2
                counts.append(kept)
    return tuple(counts)


if __name__ == "__main__":
    torch.manual_seed(0)
    raise SystemExit(main())
