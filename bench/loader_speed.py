"""Loader speed: a training step of ``to_torch(load(onnx))`` vs the same architecture in torch.

    python bench/loader_speed.py [--batch 32] [--rounds 15]

Both sides get the same weights, input, loss and optimizer (SGD with momentum); the ONNX is
exported from the torch module with BatchNormalization kept, so both compute the same network.
The "fresh" rows export a freshly initialised network (BatchNorm scales and running variances all
ones, shifts and means all zeros), which the exporter writes as Identity-tied initializers: the
loaded module must still train every weight and BN affine parameter, statistics as buffers.
Steps are timed alternately in one run; the printed ratio is median(ONNX) / median(torch).
Target: ≤ 1.03.
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
    parser.add_argument("--fresh", nargs="*", default=["mobilenetv2_tiny"],
                        help="models also measured freshly initialised (Identity-tied exports)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    runs = [(name, False) for name in args.models] + [(name, True) for name in args.fresh]
    for name, fresh in runs:
        reference = (ZOO[name].build() if fresh else make(name)).train()
        shape = (args.batch,) + tuple(ZOO[name].input_shape[1:])
        x = torch.randn(shape)
        with torch.no_grad():
            classes = reference.eval()(x[:1]).shape[-1]
        y = torch.randint(0, classes, (args.batch,))
        loaded = po.to_torch(po.load(_export(copy.deepcopy(reference).eval(), x[:1])))
        _check_same_training_state(loaded, reference, name)
        result = paired_ratio(sgd_training_step(loaded, x, y), sgd_training_step(reference, x, y),
                              rounds=args.rounds)
        label = f"{name} (fresh)" if fresh else name
        print(f"{label}: to_torch step {result['candidate_ms']:.2f} ms, torch step "
              f"{result['baseline_ms']:.2f} ms, ratio {result['ratio']:.3f} (target <= 1.03)")


def _check_same_training_state(loaded: torch.nn.Module, reference: torch.nn.Module, name: str) -> None:
    """Every weight and BN affine parameter trainable, running statistics buffers: as in torch."""
    params = sum(p.numel() for p in loaded.parameters() if p.requires_grad)
    expected = sum(p.numel() for p in reference.parameters())
    stats = sum(b.numel() for b in loaded.buffers() if b.is_floating_point())
    expected_stats = sum(b.numel() for n, b in reference.named_buffers() if "running" in n)
    if (params, stats) != (expected, expected_stats):
        raise SystemExit(f"{name}: loaded module trains {params} parameters with {stats} statistics; "
                         f"torch has {expected} and {expected_stats}")


if __name__ == "__main__":
    main()
