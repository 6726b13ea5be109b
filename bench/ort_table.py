"""How well a measured ort-cpu latency table predicts layers at channel counts it did not time.

For each model: its table (`plinio_onnx.hardware.measured`, channel multiple 8, one thread),
then PIT exports with random masks (odd channel counts, off the table's grid; ``--on-grid``:
counts on the grid, as a search on channel blocks keeps them); every layer of an
export is timed alone the way the table was, and compared with the table's interpolation at
that layer's channel counts. Prints, per model, the share of exports whose summed layer latency
is predicted within ±10 %, the median and worst error of the sum, and the same per layer.

    python bench/ort_table.py [--models digits_cnn dscnn] [--variants 10] [--repeats 20]

What it does not measure: the whole model in ONNX Runtime (activations, pools, adds and the
session's own overhead are not layers of the table), and timing noise: run it on an idle machine.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from latency_prediction import random_blocks  # noqa: E402  (the same random block counts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["digits_cnn", "dscnn"])
    ap.add_argument("--variants", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--multiple", type=int, default=8)
    ap.add_argument("--on-grid", action="store_true",
                    help="keep a multiple of --multiple channels per group (as a search on channel blocks would)")
    args = ap.parse_args(argv)

    import plinio_onnx as po
    from _util import random_architecture
    from plinio_onnx.hardware import measured

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = Path(tmp) / f"{name}.onnx"
            shutil.copy(ROOT / "models" / f"{name}.onnx", path)  # the table is cached beside it
            table = measured.load_or_measure(path, channel_multiple=args.multiple, repeats=args.repeats)
            sums, layers = [], []
            for seed in range(args.variants):
                model = po.PIT(path)
                if args.on_grid:
                    random_blocks(model, seed, args.multiple)
                else:
                    random_architecture(model, seed, logits=(), masks=(".pit_alpha",), below=0.4)
                exported = Path(tmp) / f"{name}.{seed}.onnx"
                model.export(exported)
                # each exported layer timed alone at its own size (a grid of one point)
                timed = measured.measure(exported, channel_multiple=10 ** 9, repeats=args.repeats)
                specs = {s.name: s for s in po.cost.layer_specs(po.load(exported))}
                predicted = {n: table.layers[n].latency(specs[n].in_channels, specs[n].out_channels)
                             for n in timed.layers if n in table.layers}
                actual = {n: timed.layers[n].seconds[0][0] for n in predicted}
                layers += [predicted[n] / actual[n] - 1 for n in predicted]
                sums.append(sum(predicted.values()) / sum(actual.values()) - 1)
            within = sum(abs(e) <= 0.10 for e in sums) / len(sums)
            print(f"{name}: {len(sums)} exports, sum of layers within ±10%: {within:.0%}, median error "
                  f"{statistics.median(sums):+.1%}, worst {max(sums, key=abs):+.1%}; per layer median "
                  f"{statistics.median(layers):+.1%}, |error| ≤ 10% for {np.mean(np.abs(layers) <= 0.1):.0%}")
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    raise SystemExit(main())
