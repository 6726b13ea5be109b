"""Loader speed: a training step of ``to_torch(load(onnx))`` vs the same architecture in torch.

    python bench/loader_speed.py [--batch 32] [--rounds 15]

Both sides get the same weights, input, loss and optimizer (SGD with momentum); the ONNX is
exported from the torch module with BatchNormalization kept, so both compute the same network.
Steps are timed alternately in one run; the printed ratio is median(ONNX) / median(torch).
Target: ≤ 1.05.
"""
from __future__ import annotations

import argparse
import copy
import io
import sys
from pathlib import Path

import onnx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import plinio_onnx as po  # noqa: E402
from _timing import paired_ratio, sgd_training_step  # noqa: E402
from models.zoo import ZOO, make  # noqa: E402


def _export(module: torch.nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=17,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--models", nargs="*", default=["resnet8", "mobilenetv2_tiny"])
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    for name in args.models:
        reference = make(name).train()
        shape = (args.batch,) + tuple(ZOO[name].input_shape[1:])
        x = torch.randn(shape)
        with torch.no_grad():
            classes = reference.eval()(x[:1]).shape[-1]
        y = torch.randint(0, classes, (args.batch,))
        loaded = po.to_torch(po.load(_export(copy.deepcopy(reference).eval(), x[:1])))
        result = paired_ratio(sgd_training_step(loaded, x, y), sgd_training_step(reference, x, y),
                              rounds=args.rounds)
        print(f"{name}: to_torch step {result['candidate_ms']:.2f} ms, torch step "
              f"{result['baseline_ms']:.2f} ms, ratio {result['ratio']:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
