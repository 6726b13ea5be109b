"""MPS's weight mixture: the native kernel (`plinio_onnx.functions.mps_native_weight`) against the
ATen path, per quantizer and per search step.

    python bench/mps_weight_kernel.py [--threads 2] [--rounds 15] [--steps-only | --quantizers-only]
        [--threads 1 --clock cpu]   (a shared machine: CPU time of one thread)

Quantizers: one `MixedWeightQuant` forward + backward (3 precisions, per-channel θ and scales) on
the digits CNN's weight shapes and on a large conv, the two paths alternated in one run; the
printed ratio is median(ATen) / median(native). Steps: the search step of ``bench/mps_overhead.py``
(MPS, 3 precisions) and ``bench/odimo_overhead.py`` (ODiMO) on the digits CNN with the weight
kernel on and off, alternated with the plain step in one run (`_timing.paired_ratio`); the
activation mixtures run whatever `plinio_onnx.functions.mps_train.native_available` says.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import plinio_onnx as po  # noqa: E402
from _timing import paired_ratio, sgd_training_step  # noqa: E402
from mps_overhead import CLOCKS, _mps_step  # noqa: E402
from plinio_onnx.functions import mps_weights  # noqa: E402
from plinio_onnx.functions.mps_weights import MixedWeightQuant, WeightPlan  # noqa: E402

SHAPES = {"conv1 [16,1,3,3]": ((16, 1, 3, 3), 0), "conv2 [32,16,3,3]": ((32, 16, 3, 3), 0),
          "conv3 [32,32,3,3]": ((32, 32, 3, 3), 0), "fc1 [64,512]": ((64, 512), 0),
          "MatMul [512,64] (axis 1)": ((512, 64), 1), "conv [256,256,3,3]": ((256, 256, 3, 3), 0)}


@contextlib.contextmanager
def _aten_weights(on: bool):
    """Inside: the weight mixtures take the ATen path (``on``) or whatever they take anyway."""
    native = mps_weights._native_weights
    if on:
        mps_weights._native_weights = lambda *args: None
    try:
        yield
    finally:
        mps_weights._native_weights = native


def _quantizer_step(shape, axis: int, aten: bool):
    weight = (torch.randn(shape) * 0.3).requires_grad_()
    theta = torch.softmax(torch.randn(3, shape[axis]), 0).requires_grad_()
    plan = WeightPlan((2, 4, 8), axis, tuple(a for a in range(len(shape)) if a != axis))
    grads = None

    def step() -> None:
        nonlocal grads
        with _aten_weights(aten):
            value, scale = MixedWeightQuant.apply(weight, theta, plan)
            if grads is None:
                grads = (torch.randn_like(value), torch.randn_like(scale))
            torch.autograd.backward([value, scale], list(grads))
    return step


def quantizers(rounds: int, clock) -> None:
    for name, (shape, axis) in SHAPES.items():
        steps = 2 if shape[0] >= 256 else 50
        result = paired_ratio(_quantizer_step(shape, axis, True), _quantizer_step(shape, axis, False),
                              rounds=rounds, steps=steps, clock=clock)
        print(f"{name}: forward+backward ATen {result['candidate_ms'] * 1e3:.1f} µs, native "
              f"{result['baseline_ms'] * 1e3:.1f} µs, ATen/native {result['ratio']:.2f}", flush=True)


def steps(rounds: int, batch: int, clock) -> None:
    path = ROOT / "models" / "digits_cnn.onnx"
    x = torch.randn([batch] + [int(d) for d in po.load(path).gs.inputs[0].shape[1:]])
    plain = po.to_torch(po.load(path))
    y = torch.randint(0, 10, (batch,))
    builds = {"MPS": lambda: po.MPS(path, w_precisions=(2, 4, 8), a_precisions=(2, 4, 8), per_channel=True),
              "ODiMO": lambda: po.ODiMO(path)}
    for label, build in builds.items():
        model = build()
        model.calibrate(x)
        step, plain_step = _mps_step(model, x, y), sgd_training_step(plain, x, y)

        def aten_step() -> None:
            with _aten_weights(True):
                step()
        times = {"native": [], "ATen": []}
        for r in range(rounds):  # alternate: native vs plain, ATen vs plain
            for kind, fn in (("native", step), ("ATen", aten_step)):
                times[kind].append(paired_ratio(fn, plain_step, rounds=2, steps=3, warmup=1 if r else 3,
                                                         clock=clock))
        summary = {kind: (statistics.median(t["candidate_ms"] for t in runs),
                          statistics.median(t["baseline_ms"] for t in runs),
                          statistics.median(t["ratio"] for t in runs)) for kind, runs in times.items()}
        (native_ms, plain_ms, native_ratio), (aten_ms, _, aten_ratio) = summary["native"], summary["ATen"]
        print(f"digits_cnn {label}: weight kernel native {native_ms:.2f} ms (ratio {native_ratio:.2f}), "
              f"ATen {aten_ms:.2f} ms (ratio {aten_ratio:.2f}), plain {plain_ms:.2f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--steps-only", action="store_true")
    parser.add_argument("--quantizers-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock; weight kernel: "
          f"{'native' if mps_weights.native_weights_available() else 'not available (ATen on both sides)'}")
    start = time.perf_counter()
    if not args.steps_only:
        quantizers(args.rounds, CLOCKS[args.clock])
    if not args.quantizers_only:
        steps(args.rounds, args.batch, CLOCKS[args.clock])
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
