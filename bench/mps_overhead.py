"""MPS search overhead: a training step of ``po.MPS`` (3 precisions) vs the plain model's step.

    python bench/mps_overhead.py [--batch 32] [--rounds 15] [--models resnet8 mobilenetv2_tiny]
        [--threads 1 --clock cpu]   (a shared machine: CPU time of one thread)

Both sides load the same ONNX file. The plain side is ``po.to_torch(po.load(f))`` (forward,
backward, SGD with momentum); the MPS side is ``po.MPS(f, w_precisions=(2,4,8),
a_precisions=(2,4,8))`` with per-channel weight precisions in soft sampling (every precision is
computed every step), the same loss plus ``strength · model.cost`` and an Adam step on the
architecture logits. Steps are timed alternately in one run (`_timing.paired_ratio`); the
printed ratio is median(MPS) / median(plain). Target: ≤ 2.5 (issue 16; DESIGN.md: ≤ 3). The header
says whether the activation and weight mixtures ran the native kernels
(`plinio_onnx.functions.mps_native`, `plinio_onnx.functions.mps_native_weight`;
``PLINIO_ONNX_NATIVE=0`` measures the ATen path).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import plinio_onnx as po  # noqa: E402
from _timing import paired_ratio, sgd_training_step  # noqa: E402
from plinio_onnx.functions import mps_train, mps_weights  # noqa: E402

MODELS = ROOT / "models"
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _mps_step(model: po.MPS, x: torch.Tensor, y: torch.Tensor):
    weights = torch.optim.SGD(model.net_parameters(), lr=1e-3, momentum=0.9)
    logits = torch.optim.Adam(model.nas_parameters(), lr=5e-4)
    model.train()

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y) + 1e-6 * model.cost
        weights.zero_grad(set_to_none=True)
        logits.zero_grad(set_to_none=True)
        loss.backward()
        weights.step()
        logits.step()
    return step


def overhead(description: str, label: str, build: Callable[[Path], torch.nn.Module], target: float) -> None:
    """Print, per model, ``label``'s search step against the plain step (``build(path)`` makes the
    searchable model); shared by the MPS and ODiMO benches."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time (on a shared machine; with --threads 1 "
                             "it leaves out the time other processes held the core)")
    parser.add_argument("--models", nargs="*", default=["resnet8", "mobilenetv2_tiny", "digits_cnn"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kernel = "native" if mps_train.native_available() else "ATen"
    weights = "native" if mps_weights.native_weights_available() else "ATen"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.clock} clock, "
          f"activation mixture: {kernel} kernel, weight mixture: {weights} kernel")
    for name in args.models:
        path = MODELS / f"{name}.onnx"
        graph = po.load(path)
        shape = [args.batch] + [int(d) for d in graph.gs.inputs[0].shape[1:]]
        x = torch.randn(shape)
        plain = po.to_torch(graph)
        with torch.no_grad():
            classes = plain.eval()(x[:1]).shape[-1]
        y = torch.randint(0, classes, (args.batch,))
        model = build(path)
        model.calibrate(x)
        result = paired_ratio(_mps_step(model, x, y), sgd_training_step(plain, x, y), rounds=args.rounds,
                              clock=CLOCKS[args.clock])
        print(f"{name}: {label} step {result['candidate_ms']:.2f} ms, plain step {result['baseline_ms']:.2f} ms, "
              f"ratio {result['ratio']:.2f} (target <= {target:g})", flush=True)


def main() -> None:
    overhead(__doc__, "MPS", lambda path: po.MPS(path, w_precisions=(2, 4, 8), a_precisions=(2, 4, 8),
                                                  per_channel=True), 2.5)


if __name__ == "__main__":
    main()
