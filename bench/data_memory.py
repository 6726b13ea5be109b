"""Peak host memory of `optimize` on data held in memory (one ``.npz``) vs streamed (shards).

    nice python bench/data_memory.py [--megabytes 200] [--shards 8]

Writes a synthetic data set of 3×32×32 float32 images (``--megabytes`` of inputs, 10 classes)
once as one ``.npz`` and once as ``.npz`` shards, and a small CNN for it; runs one short
`optimize` on each in a fresh process and prints each run's peak resident memory (the process's
``ru_maxrss``, what ``/usr/bin/time -v`` reports as "Maximum resident set size"), the memory after
the imports alone, and the ratio of the data-related parts (peak − imports).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent

_RUN = """
import json, resource, sys, time
import plinio_onnx as po
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[2] != "-":
    start = time.perf_counter()
    po.optimize(sys.argv[1], sys.argv[2], output=sys.argv[3], target_params="50%", warmup_epochs=1, epochs=1,
                finetune_epochs=1, batch_size=256, threads=1, quiet=True, checkpoint_dir=False)
    seconds = time.perf_counter() - start
else:
    seconds = 0.0
print(json.dumps({"imports_kb": base, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "seconds": seconds}))
"""


def _model(path: Path) -> None:
    """Conv(3→16, s2) → ReLU → Conv(16→32, s2) → ReLU → GlobalAveragePool → Gemm(32→10)."""
    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="pool"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["output"], name="fc", transB=1)]
    graph = helper.make_graph(
        nodes, "cnn32", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 10])],
        [weight("w1", 16, 3, 3, 3), weight("b1", 16), weight("w2", 32, 16, 3, 3), weight("b2", 32),
         weight("w3", 10, 32), weight("b3", 10)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)


def _data(folder: Path, megabytes: int, shards: int) -> tuple[Path, Path]:
    """One .npz and the same samples as ``shards`` .npz shards, written a shard at a time."""
    per_sample = 3 * 32 * 32 * 4
    n = megabytes * (1 << 20) // per_sample
    rng = np.random.default_rng(0)
    means = rng.standard_normal((10, 3, 1, 1)).astype(np.float32)
    parts = []
    shard_folder = folder / "shards"
    shard_folder.mkdir()
    for i, rows in enumerate(np.array_split(np.arange(n), shards)):
        y = rng.integers(0, 10, len(rows))
        x = (rng.standard_normal((len(rows), 3, 32, 32), dtype=np.float32) + means[y]).astype(np.float32)
        np.savez(shard_folder / f"shard_{i:03d}.npz", x=x, y=y)
        parts.append(rows)
    whole = folder / "whole.npz"
    xs = [np.load(shard_folder / f"shard_{i:03d}.npz")["x"] for i in range(shards)]
    ys = [np.load(shard_folder / f"shard_{i:03d}.npz")["y"] for i in range(shards)]
    np.savez(whole, x=np.concatenate(xs), y=np.concatenate(ys))
    return whole, shard_folder


def _measure(model: Path, data: str, output: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", _RUN, str(model), data, str(output)], check=True,
                            capture_output=True, text=True, cwd=ROOT)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--write", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        _data(Path(args.write), args.megabytes, args.shards)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = folder / "cnn32.onnx"
        _model(model)
        # Written by another process: Linux carries a process's peak memory over fork and exec,
        # so the measuring children start from this process's (small) footprint.
        subprocess.run([sys.executable, __file__, "--write", tmp, "--megabytes", str(args.megabytes),
                        "--shards", str(args.shards)], check=True)
        whole, shards = folder / "whole.npz", folder / "shards"
        imports = _measure(model, "-", folder / "none.onnx")
        memory = _measure(model, str(whole), folder / "memory.onnx")
        streamed = _measure(model, str(shards), folder / "streamed.onnx")
    mb = 1 / 1024
    print(f"data: {args.megabytes} MB of 3x32x32 float32 inputs, {args.shards} .npz shards; "
          "peak resident memory (ru_maxrss) of one optimize run each")
    print(f"imports only:          peak {imports['peak_kb'] * mb:8.1f} MB")
    for name, run in (("in memory (one .npz)", memory), ("streamed (shards)", streamed)):
        print(f"{name:22s} peak {run['peak_kb'] * mb:8.1f} MB  (data part {(run['peak_kb'] - imports['peak_kb']) * mb:8.1f} MB)"
              f"  {run['seconds']:6.1f} s")
    ratio = (streamed["peak_kb"] - imports["peak_kb"]) / max(1, memory["peak_kb"] - imports["peak_kb"])
    print(f"streamed / in-memory, data part: {ratio:.2f}")


if __name__ == "__main__":
    main()
