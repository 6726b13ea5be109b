"""Data-parallel search overhead: the optimize flow's training step (`Run.objective`: the loss
module DDP wraps; fused Adam) of the plain model and of the PIT-searchable model, in one process
and on N processes under torchrun, on one device kind.

    python bench/ddp_overhead.py [--model digits_cnn] [--nproc 2] [--device cpu] [--batch 32]

The script measures the single-process pair itself, then re-launches itself with
``python -m torch.distributed.run --standalone --nproc-per-node N`` for the same pair under DDP
(gloo on the CPU, NCCL on GPUs; each rank its own batch of ``--batch``), and prints per-step
medians and the ratios (measured alternately in each run, `bench/_timing.py`):

- PIT / plain, one process and under DDP (target ≤ 1.2 in both: DDP must not add to the search's
  own overhead);
- plain under DDP / plain in one process: the price of averaging the gradients (on one machine's
  CPU cores it includes the processes sharing the cores; each rank runs one thread).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import plinio_onnx as po  # noqa: E402
from _timing import paired_ratio  # noqa: E402
from plinio_onnx.data import random_inputs  # noqa: E402
from plinio_onnx.optimize import Recipe, adam  # noqa: E402
from plinio_onnx.optimize.checkpoint import Checkpoint  # noqa: E402
from plinio_onnx.optimize.data import Split, Task  # noqa: E402
from plinio_onnx.optimize.distributed import start  # noqa: E402
from plinio_onnx.optimize.progress import Progress  # noqa: E402
from plinio_onnx.optimize.training import Run  # noqa: E402


def _step(module, dist, x, y, cost: bool):
    """One training step of ``module`` as the optimize flow runs it (its own `Run`: one DDP wrapper each)."""
    task = Task("classification", "accuracy", True)
    split = Split([x.cpu()], [y.cpu()])
    run = Run(Recipe(batch_size=len(y)), task, split, split, Checkpoint(None, ""), Progress(False), 0, dist=dist)
    module = run.place(module)
    objective, optimizer = run.objective(module), adam(module.parameters(), lr=1e-4)
    inputs, target = [x.to(dist.device)], [y.to(dist.device)]
    regularizer = (lambda: 1e-9 * module.cost) if cost else None
    module.train()

    def step() -> None:
        loss = objective(inputs, target, regularizer)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if dist.device.type == "cuda":
            torch.cuda.synchronize(dist.device)
    return step


def measure(model: str, device: str, batch: int, rounds: int) -> dict:
    dist = start(device)
    graph = po.load(ROOT / "models" / f"{model}.onnx")
    torch.manual_seed(dist.rank)
    x = torch.from_numpy(next(iter(random_inputs(graph, batch=batch, seed=dist.rank).values())))
    plain = po.to_torch(graph)
    y = torch.randint(0, plain.eval()(x[:1]).shape[-1], (batch,))
    result = paired_ratio(_step(po.PIT(graph), dist, x, y, True), _step(plain, dist, x, y, False), rounds=rounds)
    result.update(world=dist.world, device=str(dist.device))
    dist.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits_cnn")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", help=argparse.SUPPRESS)   # a rank-0 result file (the re-launched run)
    args = parser.parse_args()
    if args.out:   # one rank of the torchrun run
        result = measure(args.model, args.device, args.batch, args.rounds)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.out).write_text(json.dumps(result))
        return
    torch.set_num_threads(1)   # as each torchrun rank
    alone = measure(args.model, args.device, args.batch, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                        str(args.nproc), __file__, "--model", args.model, "--device", args.device, "--batch",
                        str(args.batch), "--rounds", str(args.rounds), "--out", str(out)],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
        ddp = json.loads(out.read_text())
    print(f"{args.model}, batch {args.batch} per process, on {alone['device']} / {ddp['device']} (rank 0):")
    for label, r in (("1 process", alone), (f"{ddp['world']} processes (DDP)", ddp)):
        print(f"  {label:22s} PIT {r['candidate_ms']:7.2f} ms  plain {r['baseline_ms']:7.2f} ms  "
              f"PIT/plain {r['ratio']:.3f} (target <= 1.2)")
    print(f"  plain step under DDP / alone: {ddp['baseline_ms'] / alone['baseline_ms']:.3f}; "
          f"PIT: {ddp['candidate_ms'] / alone['candidate_ms']:.3f}")


if __name__ == "__main__":
    main()
