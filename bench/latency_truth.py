"""Are PIT exports faster than their input in ONNX Runtime? Random-mask exports of every zoo model
at several channel multiples, timed against the original.

For each model of ``models/`` and each channel multiple N: ``--variants`` PIT exports with random
masks (each mask entry — a channel for N = 1, a block of N channels otherwise — pruned with
probability ``--pruned``), each timed alternately with the original model in one run
(`_timing.paired_ratio`: medians of blocks of about 10 ms of calls) in ONNX Runtime on CPU,
default graph optimization (ORT_ENABLE_ALL), one thread, batch 1. One thread runs in the calling
thread, so the clock is that thread's CPU time (``--clock cpu``, the default): on a shared
machine, the time other processes hold the core is not counted (``--clock wall`` counts it). Prints per model and N the original and
pruned latency (medians over the variants), the latency ratio pruned / original (median and
worst variant) and the MAC ratio.

    nice python bench/latency_truth.py [--models dscnn resnet8] [--multiples 1 8 16] \
        [--variants 3]

A ratio above 1 means the pruned model is slower than its input. Timings on a shared machine
stay noisy (caches, frequency): compare ratios of one run, and rerun a model whose worst variant
looks off.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from _timing import paired_ratio  # noqa: E402


def _session(model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _runner(model, feeds):
    session = _session(model)
    return lambda: session.run(None, feeds)


def _steps(run, clock, target_s: float = 0.01) -> int:
    """Calls per timed block: about ``target_s`` seconds (after a few warm-up calls)."""
    for _ in range(3):
        run()
    start = clock()
    for _ in range(5):
        run()
    return max(1, min(1000, int(target_s * 5 / max(clock() - start, 1e-7))))


def _random_masks(model, rng: np.random.Generator, pruned: float) -> None:
    """Each entry of every PIT channel mask parameter below the threshold with probability ``pruned``."""
    with torch.no_grad():
        for name in model.pit.mask_names():
            alpha = model.tensor(name)
            values = np.where(rng.random(alpha.shape) < pruned, 0.2, 1.0).astype(np.float32)
            alpha.copy_(torch.from_numpy(values))


def measure(name: str, multiple: int, variants: int, pruned: float, rounds: int, clock=time.thread_time) -> dict:
    import plinio_onnx as po
    from plinio_onnx.cost import macs, total
    from plinio_onnx.data import random_inputs

    path = ROOT / "models" / f"{name}.onnx"
    original = po.load(path)
    feeds = random_inputs(original, batch=1, seed=0)
    base_run = _runner(original.to_onnx(), feeds)
    base_macs = total(original, macs)
    rng = np.random.default_rng(multiple)
    rows = []
    for _ in range(variants):
        model = po.PIT(path, channel_multiple=multiple, cost="macs")
        _random_masks(model, rng, pruned)
        exported = model.export()
        run = _runner(exported.to_onnx(), feeds)
        steps = _steps(base_run, clock)
        timed = paired_ratio(run, base_run, rounds=rounds, steps=steps, warmup=3, clock=clock)
        rows.append({**timed, "macs": total(exported, macs) / base_macs,
                     "channels": [kept for kept, _ in model.kept_channels().values()]})
    return {"original_ms": statistics.median(r["baseline_ms"] for r in rows),
            "pruned_ms": statistics.median(r["candidate_ms"] for r in rows),
            "ratio": statistics.median(r["ratio"] for r in rows), "worst": max(r["ratio"] for r in rows),
            "macs": statistics.median(r["macs"] for r in rows), "channels": rows[0]["channels"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None, help="zoo model names (default: every models/*.onnx)")
    ap.add_argument("--multiples", nargs="+", type=int, default=[1, 8, 16])
    ap.add_argument("--variants", type=int, default=3, help="random-mask exports per model and multiple")
    ap.add_argument("--pruned", type=float, default=0.5, help="probability that a mask entry is pruned")
    ap.add_argument("--rounds", type=int, default=21, help="alternating timed blocks per export")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: the calling thread's CPU time (default); wall: elapsed time")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = args.models or sorted(p.stem for p in (ROOT / "models").glob("*.onnx"))
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    print(f"ONNX Runtime {ort.__version__} CPU, ORT_ENABLE_ALL, 1 thread, batch 1, {args.clock} clock; "
          f"{args.variants} random-mask exports per row (entries pruned with p={args.pruned})")
    print(f"{'model':18} {'N':>3} {'original ms':>12} {'pruned ms':>10} {'ratio':>6} {'worst':>6} {'MACs':>6}"
          "  kept channels (first export)")
    for name in names:
        for multiple in args.multiples:
            r = measure(name, multiple, args.variants, args.pruned, args.rounds, clock)
            channels = ", ".join(map(str, r["channels"][:8])) + (", …" if len(r["channels"]) > 8 else "")
            print(f"{name:18} {multiple:>3} {r['original_ms']:>12.3f} {r['pruned_ms']:>10.3f} {r['ratio']:>6.2f} "
                  f"{r['worst']:>6.2f} {r['macs']:>6.2f}  {channels}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
