"""Your own hardware target: a latency model and a channel multiple, as the cost of PIT and MPS.

    python examples/05_custom_hardware.py [--steps 40] [--strength 0.5]

Defines the profile of a made-up board (a cycles model written as a plain function of a layer,
the channel block its kernels compute in, the bit-widths it runs), prints what it predicts for
the bundled digits CNN, then runs a few steps of PIT and of MPS on scikit-learn's digits with
that latency as the cost. Save such a profile in a file and the CLI takes it too:
``plinio-onnx inspect models/digits_cnn.onnx --hardware examples/05_custom_hardware.py:MY_BOARD``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import plinio_onnx as po
from plinio_onnx.hardware import HardwareProfile, rounding

ROOT = Path(__file__).resolve().parent.parent


def my_board_cycles(spec: po.cost.LayerSpec):
    """Cycles of one layer on the board: its int kernels compute output channels 8 at a time and
    retire 32 bits of MACs per cycle (4 int8, 8 int4, 16 int2), plus 50 cycles per output channel
    (requantization) and 300 per layer (call, DMA set-up).

    Arithmetic only, plus `rounding.ceil_div` for the channel blocks: the same function counts
    exactly on a graph and is differentiable in PIT's effective channels and MPS's bit-widths."""
    if spec.kind not in ("conv", "linear"):
        return 0
    blocked = rounding.ceil_div(spec.out_channels, 8) * 8
    macs = po.cost.macs(spec.with_(out_channels=blocked))
    return macs * spec.weight_bits / 32 + 50 * spec.out_channels + 300  # float layers: 8 bits (below)


MY_BOARD = HardwareProfile("my-board", latency=my_board_cycles, channel_multiple=8,
                           weight_bits=(2, 4, 8), activation_bits=(8,), default_bits=8,
                           description="a made-up 32-bit MCU with 8-channel int kernels")


def search(model, x, y, steps: int, strength: float, reference: float) -> tuple[float, float]:
    """A few steps of task loss + strength · cycles / reference; the cost before and after."""
    weights = torch.optim.Adam(model.net_parameters(), lr=1e-3)
    architecture = torch.optim.Adam(model.nas_parameters(), lr=0.05)
    before = float(model.cost.detach())
    for step in range(steps):
        idx = torch.randint(0, len(y), (32,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx]) + strength * model.cost / reference
        weights.zero_grad()
        architecture.zero_grad()
        loss.backward()
        weights.step()
        architecture.step()
    return before, float(model.cost.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--strength", type=float, default=0.5)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = np.load(ROOT / "models" / "digits.npz")
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    path = ROOT / "models" / "digits_cnn.onnx"

    latency = MY_BOARD.cost("latency")  # float layers costed at the board's 8 bits
    reference = po.cost.total(po.load(path), latency)
    print(f"{MY_BOARD.name}: digits CNN {reference:,} cycles (channel multiple {MY_BOARD.channel_multiple})")

    pit = po.PIT(path, cost=latency)
    before, after = search(pit, x, y, args.steps, args.strength, reference)
    print(f"pit: {before:,.0f} -> {after:,.0f} cycles")

    mps = po.MPS(path, cost=latency, w_precisions=MY_BOARD.weight_bits, a_precisions=MY_BOARD.activation_bits)
    before, after = search(mps, x, y, args.steps, args.strength, reference)
    print(f"mps: {before:,.0f} -> {after:,.0f} cycles")


if __name__ == "__main__":
    main()
