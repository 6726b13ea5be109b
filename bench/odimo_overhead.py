"""ODiMO search overhead: a training step of ``po.ODiMO`` (two accelerators) vs the plain model's step.

    python bench/odimo_overhead.py [--batch 32] [--rounds 15] [--models resnet8 mobilenetv2_tiny]
        [--threads 1 --clock cpu]   (a shared machine: CPU time of one thread)

Both sides load the same ONNX file. The plain side is ``po.to_torch(po.load(f))`` (forward,
backward, SGD with momentum); the ODiMO side is ``po.ODiMO(f)`` with the default accelerators
(DIANA's 8-bit digital and 2-bit analog units: per-channel softmax over the two, both
quantizations computed every step), the same loss plus ``strength · model.cost`` (the parallel
latency) and an Adam step on the mapping logits. Steps are timed alternately in one run
(`_timing.paired_ratio`); the printed ratio is median(ODiMO) / median(plain).
Target (DESIGN.md): ≤ 3.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import plinio_onnx as po  # noqa: E402
from mps_overhead import overhead  # noqa: E402  (the same step: weights, logits, cost; the same timing)


def main() -> None:
    overhead(__doc__, "ODiMO", po.ODiMO, 3)


if __name__ == "__main__":
    main()
