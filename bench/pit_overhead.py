"""PIT overhead: a PIT training step vs the plain model's step, and the time of the graph passes.

    python bench/pit_overhead.py [--batch N] [--rounds 15]

1. Training step (forward + backward + the search's fused Adam, the loss + 1e-9·cost) of `po.PIT(model)` over the
   same step of `po.to_torch(model)`, measured alternately in one run, at the batch size the
   optimize flow trains with (`Recipe.batch_size`, 32), with every mask kept (a fresh search)
   and with about half of them pruned (mid-search); target ≤ 1.2 (PLiNIO's own PIT step:
   1.19× on a small CNN).
2. load + PIT pass + finalize wall time for the zoo and the architectures ONNX ships (weights
   saved at opset 17 first, so opset conversion is not counted), with the time per node, to show
   how it grows with graph size; target < 1 s for ~400 nodes (ResNet-50).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import plinio_onnx as po  # noqa: E402
from _timing import paired_ratio  # noqa: E402
from plinio_onnx.data import random_inputs  # noqa: E402
from plinio_onnx.optimize import adam  # noqa: E402


def _step(module, x, y, parameters):
    optimizer = adam(parameters, lr=1e-4)  # the optimizer the search uses, for both steps
    module.train()

    def step() -> None:
        out = module(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        if isinstance(module, po.PIT):
            loss = loss + 1e-9 * module.cost
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def training_overhead(names, batch: int, rounds: int, channel_multiple: int = 1) -> None:
    print(f"PIT training step / plain training step, batch {batch}:")
    for name in names:
        path = ROOT / "models" / f"{name}.onnx"
        graph = po.load(path)
        feeds = random_inputs(graph, batch=batch)
        x = torch.from_numpy(next(iter(feeds.values())))
        plain = po.to_torch(graph)
        classes = plain.eval()(x[:1]).shape[-1]
        y = torch.randint(0, classes, (batch,))
        pit = po.PIT(graph, channel_multiple=channel_multiple)
        result = paired_ratio(_step(pit, x, y, list(pit.parameters())),
                              _step(plain, x, y, list(plain.parameters())), rounds=rounds)
        # Mid-search: about half of every group's channels (and taps) pruned.
        pruned = po.PIT(graph, channel_multiple=channel_multiple)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in pruned.nas_parameters():
                param.copy_(torch.where(torch.rand(param.shape, generator=generator) < 0.5, 0.3, 1.0))
        mid = paired_ratio(_step(pruned, x, y, list(pruned.parameters())),
                           _step(plain, x, y, list(plain.parameters())), rounds=rounds)
        print(f"  {name:18s} PIT {result['candidate_ms']:7.2f} ms  plain {result['baseline_ms']:7.2f} ms"
              f"  ratio {result['ratio']:.3f}, half pruned {mid['ratio']:.3f} (target <= 1.2)")


def pass_speed(paths) -> None:
    print("load + PIT pass + finalize (opset-17 copies, weights included):")
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            saved = Path(tmp) / path.name
            po.load(path).save(saved)
            timings = []
            for _ in range(3):
                start = time.perf_counter()
                graph = po.load(saved)
                t_load = time.perf_counter()
                searchable = po.passes.pit(graph)
                t_pass = time.perf_counter()
                po.finalize(searchable)
                t_end = time.perf_counter()
                timings.append((t_end - start, t_load - start, t_pass - t_load, t_end - t_pass))
            total, t_load, t_pass, t_final = min(timings)
            nodes = len(graph.nodes)
            size = sum(np.asarray(t.values).nbytes for t in graph.initializers().values()) / 2**20
            print(f"  {path.stem:20s} {nodes:5d} nodes {size:7.1f} MiB  total {total:6.3f} s "
                  f"(load {t_load:.3f}, pass {t_pass:.3f}, finalize {t_final:.3f})  "
                  f"{1e3 * total / nodes:.2f} ms/node")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from plinio_onnx.optimize import Recipe
    parser.add_argument("--batch", type=int, default=Recipe().batch_size)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--models", nargs="*", default=["digits_cnn", "resnet8", "tcn", "dscnn"])
    parser.add_argument("--skip-passes", action="store_true")
    parser.add_argument("--channel-multiple", type=int, default=1, help="PIT's channel blocks (default 1)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    training_overhead(args.models, args.batch, args.rounds, args.channel_multiple)
    if not args.skip_passes:
        light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
        paths = sorted((ROOT / "models").glob("*.onnx")) + [
            light / f"light_{n}.onnx" for n in ("squeezenet", "inception_v1", "resnet50", "inception_v2",
                                                "densenet121")]
        pass_speed(paths)


if __name__ == "__main__":
    main()
