"""Big models: step time, throughput, and the host memory and time of building and exporting.

    python bench/scale.py [--models resnet50 bvlc_alexnet densenet121] [--device cpu|cuda] [--batch 8]
                          [--rounds 5] [--steps 2] [--skip-step] [--methods pit mps supernet]

The models are the architectures ONNX ships (``onnx/backend/test/data/light``: weights replaced by
constants) given random weights and saved once at opset 17 in a cache folder
(``$PLINIO_SCALE_CACHE``, default the system's temp folder), so they load as a user's file would.

1. Training step (forward + backward + SGD) of `po.PIT` over the plain model's (`po.to_torch`) on
   synthetic 224×224 data, measured alternately in one run (target ≤ 1.15), and images/s of each
   on the device.
2. For every model and method (`po.PIT`, `po.MPS`, `po.SuperNet`): the peak host memory and the
   time of building the searchable model from the file, then of exporting it (`.export(path)`:
   sync, finalize, save), against the searchable model's weight bytes (SuperNet's alternatives
   included). Peak = the process's resident high-water mark above what it held after importing
   torch and plinio_onnx (the searchable model itself included while exporting); target ≤ 3×
   the weight bytes; and the CPU time of each (all threads), steadier than the wall clock on a
   shared machine, with the build's per 100 MB of weights. Every measurement runs in its own
   process, so peaks do not mix.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from _memory import measured, rss_bytes, run_phase  # noqa: E402

METHODS = ("pit", "mps", "supernet")
#: Peak host memory of a build or an export, in searchable-model weight bytes, at most.
MEMORY_TARGET = 3.0
#: PIT training step over the plain model's, at most.
STEP_TARGET = 1.15


def cache_dir() -> Path:
    return Path(os.environ.get("PLINIO_SCALE_CACHE", Path(tempfile.gettempdir()) / "plinio_scale"))


def weighted_model(name: str, any_batch: bool = False) -> Path:
    """``light_<name>`` of ONNX's test data with random weights, saved at opset 17 (made once);
    ``any_batch``: with a symbolic batch (the shipped models fix it to 1)."""
    path = cache_dir() / f"{name}{'_batch' if any_batch else ''}.onnx"
    if not path.exists():
        run_phase(Path(__file__), "--phase", "make", name, str(int(any_batch)))
    return path


def _free_batch(graph) -> None:
    """Batch axis symbolic: the input's first dimension and every constant Reshape target's
    leading 1 (``[1, 2048]`` → ``[-1, 2048]``)."""
    import numpy as np
    import onnx_graphsurgeon as gs

    for tensor in graph.gs.inputs:
        tensor.shape = ["N"] + list(tensor.shape[1:])
    for node in graph.nodes:
        if node.op == "Reshape" and isinstance(node.inputs[1], gs.Constant):
            shape = np.asarray(node.inputs[1].values)
            if shape.size and shape[0] == 1 and -1 not in shape:
                node.inputs[1] = gs.Constant(node.inputs[1].name + "_any_batch",
                                             np.concatenate([[-1], shape[1:]]).astype(shape.dtype))
    for tensor in graph.gs.outputs:
        tensor.shape = None


def _make(name: str, any_batch: bool) -> dict:
    import numpy as np
    import onnx

    import plinio_onnx as po

    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"
    graph = po.load(light)
    rng = np.random.default_rng(0)
    for tensor in graph.initializers().values():
        values = np.asarray(tensor.values)
        if not np.issubdtype(values.dtype, np.floating) or values.size < 2:
            continue
        if values.ndim == 1:  # BN statistics, scales and biases: positive and near 1
            tensor.values = rng.uniform(0.5, 1.5, values.shape).astype(values.dtype)
        else:
            fan_in = int(np.prod(values.shape[1:]))
            tensor.values = (rng.standard_normal(values.shape, dtype=np.float32)
                             * np.float32(np.sqrt(2.0 / fan_in))).astype(values.dtype)
    if any_batch:
        _free_batch(graph)
        from plinio_onnx.graph import reinfer_shapes
        reinfer_shapes(graph, what="a symbolic batch")
    cache_dir().mkdir(parents=True, exist_ok=True)
    graph.save(cache_dir() / f"{name}{'_batch' if any_batch else ''}.onnx")
    return {"made": name}


def weight_bytes(graph) -> int:
    """Bytes of the graph's initializer data."""
    import numpy as np
    return int(sum(np.asarray(t.values).nbytes for t in graph.initializers().values()))


def _build_export(method: str, path: str) -> dict:
    import plinio_onnx as po

    cls = {"pit": po.PIT, "mps": po.MPS, "supernet": po.SuperNet}[method]
    base = rss_bytes()
    with measured() as build:
        model = cls(path)
    weights = weight_bytes(model.graph)
    with tempfile.TemporaryDirectory() as tmp, measured() as export:
        model.export(Path(tmp) / "out.onnx")
    return {"method": method, "weights": weights, "source_weights": os.path.getsize(path),
            "build_s": build["seconds"], "build_cpu_s": build["cpu_seconds"], "build_peak": build["peak"] - base,
            "export_s": export["seconds"], "export_cpu_s": export["cpu_seconds"], "export_peak": export["peak"] - base,
            "export_added": export["added_peak"]}


def _step(path: str, device: str, batch: int, rounds: int, steps: int) -> dict:
    import torch

    import plinio_onnx as po
    from _timing import paired_ratio

    graph = po.load(path)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, device=device)
    plain = po.to_torch(graph).to(device)
    pit = po.PIT(graph).to(device)
    with torch.no_grad():
        classes = plain.eval()(x[:1]).reshape(1, -1).shape[-1]
    y = torch.randint(0, classes, (batch,), device=device)

    def step_of(module, with_cost: bool):
        optimizer = torch.optim.SGD(module.parameters(), lr=1e-4, momentum=0.9)
        module.train()

        def step() -> None:
            loss = torch.nn.functional.cross_entropy(module(x).reshape(batch, -1), y)
            if with_cost:
                loss = loss + 1e-9 * module.cost
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        return step

    result = paired_ratio(step_of(pit, True), step_of(plain, False), rounds=rounds, steps=steps,
                          warmup=1)
    return {**result, "threads": torch.get_num_threads(), "device": device, "batch": batch,
            "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"}


def _mib(value: float) -> str:
    return f"{value / 2**20:7.1f} MiB"


def _report_step(args) -> None:
    path = weighted_model("resnet50", any_batch=True)
    r = run_phase(Path(__file__), "--phase", "step", str(path), args.device, str(args.batch),
                  str(args.rounds), str(args.steps))
    print(f"ResNet-50 224x224, batch {r['batch']}, {r['device_name']}, {r['threads']} threads:")
    print(f"  training step: PIT {r['candidate_ms']:.1f} ms, plain {r['baseline_ms']:.1f} ms, "
          f"ratio {r['ratio']:.3f} (target <= {STEP_TARGET})")
    print(f"  images/s per device: PIT {1e3 * r['batch'] / r['candidate_ms']:.1f}, "
          f"plain {1e3 * r['batch'] / r['baseline_ms']:.1f}")


def _report_memory(args) -> None:
    print(f"build and export (peak host memory above the imports; target <= {MEMORY_TARGET}x "
          "the searchable model's weights):")
    for name in args.models:
        path = weighted_model(name)
        for method in args.methods:
            r = run_phase(Path(__file__), "--phase", "build", method, str(path))
            w = r["weights"]
            print(f"  {name:13s} {method:8s} file {_mib(r['source_weights'])}, weights {_mib(w)} | "
                  f"build {r['build_s']:6.1f} s (CPU {r['build_cpu_s']:6.1f} s, "
                  f"{r['build_cpu_s'] / (w / 1e8):5.1f} s per 100 MB), peak {_mib(r['build_peak'])} = "
                  f"{r['build_peak'] / w:4.2f}x | export {r['export_s']:6.1f} s (CPU {r['export_cpu_s']:6.1f} s), "
                  f"peak {_mib(r['export_peak'])} = {r['export_peak'] / w:4.2f}x", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--phase":
        phase, rest = sys.argv[2], sys.argv[3:]
        if phase == "make":
            result = _make(rest[0], bool(int(rest[1])))
        elif phase == "build":
            result = _build_export(rest[0], rest[1])
        else:
            result = _step(rest[0], rest[1], *map(int, rest[2:]))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # DenseNet-121: few weights per node (31 MiB over 668 nodes), where the graphs' own structure
    # weighs most against the weights
    parser.add_argument("--models", nargs="*", default=["resnet50", "bvlc_alexnet", "densenet121"])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    if args.device == "cuda" or args.device.startswith("cuda:"):
        import torch
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device here")
    if not args.skip_step:
        _report_step(args)
    if not args.skip_memory:
        _report_memory(args)


if __name__ == "__main__":
    main()
