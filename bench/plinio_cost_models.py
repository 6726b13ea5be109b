"""Does `plinio-onnx inspect --hardware` give the totals PLiNIO's own cost models give for the same
torch network? One small network (a dense 3×3 conv, a depthwise 3×3 conv, a pointwise conv, a
linear layer — every pattern the four models describe), costed by PLiNIO (`gap8_latency` through
its `PIT` wrapper; `ne16_latency`, `diana_latency`, `mpic_latency` and `mpic_energy` through `MPS`
at a single 8-bit precision for weights and activations, two mismatches between PLiNIO's formulas
and its MPS wrapper bridged by `_adapted`), then exported to ONNX and
inspected by `plinio_onnx.inspect.inspect_model(..., hardware=NAME)`, which reports at 8 bits for a
float model. Prints both totals per model and whether they agree (relative difference ≤ 1e-6).

PLiNIO (github.com/eml-eda/plinio) is not on the package index, so it is no extra of this
project: give a checkout (``--plinio PATH``, or have it importable), with its dependencies
``networkx``, ``tdigest`` (+ ``accumulation-tree``, ``pyudorandom``) installed without letting them
change torch — e.g. a throwaway venv that sees this project's packages (a ``.pth`` line with its
site-packages) and ``pip install --no-deps tdigest accumulation-tree pyudorandom PATH``.

    python bench/plinio_cost_models.py --plinio /path/to/plinio

Exit status 1 when a total differs. `tests/test_plinio_parity.py` checks the same network against
the totals this script printed (PLiNIO commit 3d6b5e0), so the comparison holds without PLiNIO.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

INPUT_SHAPE = (3, 16, 16)
#: (inspect's profile name, PLiNIO's cost model name, the key of inspect's total)
MODELS = (("gap8", "gap8_latency", "latency"), ("ne16", "ne16_latency", "latency"),
          ("diana", "diana_latency", "latency"), ("mpic", "mpic_latency", "latency"),
          ("mpic", "mpic_energy", "energy"))


def network() -> nn.Module:
    """The compared network: conv 3→16 3×3 → depthwise 16 3×3 → conv 16→32 1×1 → pool → linear 32→10."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
        nn.Conv2d(16, 32, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def plinio_totals() -> dict[str, float]:
    """PLiNIO's total of every cost model on `network`: the shape-only GAP8 model through its `PIT`
    wrapper (every channel kept; under MPS, PLiNIO's GAP8 linear model gets integer counts that
    its FloorSTE cannot take), the bit-width dependent ones through `MPS` at 8 bits only (one
    choice per layer: exact)."""
    from plinio import cost as plinio_cost
    from plinio.methods import MPS, PIT
    from plinio.methods.mps import get_default_qinfo

    out = {}
    for _, name, _ in MODELS:
        if name == "gap8_latency":
            model = PIT(network(), cost=plinio_cost.gap8_latency, input_shape=INPUT_SHAPE)
        else:
            model = MPS(network(), cost=_adapted(getattr(plinio_cost, name)), input_shape=INPUT_SHAPE,
                        qinfo=get_default_qinfo(w_precision=(8,), a_precision=(8,)))
        out[name] = float(model.cost.detach())
    return out


def _adapted(spec):
    """PLiNIO's cost model ``spec`` with two mismatches between its formulas and its `MPS` wrapper
    bridged (the formulas themselves untouched): `FloorSTE` (a torch autograd function) gets
    channel and feature counts as tensors (MPS passes a Linear's as ints), and the DIANA model's
    ``'a_precision'`` (MPS fills ``'in_precision'``) is given."""
    from plinio.cost import CostSpec

    counts = ("in_channels", "out_channels", "in_features", "out_features")

    def bridged(layer: dict) -> dict:
        layer = {k: torch.as_tensor(float(v)) if k in counts and not torch.is_tensor(v) else v for k, v in layer.items()}
        return {**layer, "a_precision": layer["in_precision"]}

    adapted = CostSpec(shared=spec.shared)
    for pattern, entries in spec.data.items():
        for constraint, fn in entries:
            adapted[pattern, constraint] = lambda layer, fn=fn: fn(bridged(layer))
    return adapted


def ours(path: Path) -> dict[str, float]:
    """`inspect --hardware`'s totals of the exported network, by PLiNIO's cost model name."""
    from plinio_onnx.inspect import inspect_model

    return {name: float(inspect_model(path, hardware=profile)[key]) for profile, name, key in MODELS}


def export(path: Path) -> Path:
    torch.onnx.export(network(), (torch.zeros(1, *INPUT_SHAPE),), str(path), input_names=["x"],
                      output_names=["y"], opset_version=17, dynamo=False)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plinio", help="a PLiNIO checkout (its folder holding the plinio package)")
    args = parser.parse_args()
    if args.plinio:
        sys.path.insert(0, str(Path(args.plinio).resolve()))
    theirs = plinio_totals()
    with tempfile.TemporaryDirectory() as folder:
        mine = ours(export(Path(folder) / "net.onnx"))
    failed = False
    print(f"{'PLiNIO cost model':<16} {'PLiNIO':>16} {'inspect --hardware':>20}  agree")
    for name in theirs:
        agree = abs(mine[name] - theirs[name]) <= 1e-6 * max(abs(theirs[name]), 1e-30)
        failed |= not agree
        print(f"{name:<16} {theirs[name]:>16.10g} {mine[name]:>20.10g}  {'yes' if agree else 'NO'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
