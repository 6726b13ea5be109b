"""PIT in your own training loop, PLiNIO style: three lines change.

    python examples/02_pit_training_loop.py [--epochs 10] [--strength 5e-6] [--out runs/pit.onnx]

Trains the bundled digits CNN (an ONNX file) with PIT masks on scikit-learn's digits, then
exports the pruned ONNX model and checks it in ONNX Runtime.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import plinio_onnx as po
from plinio_onnx.runtime import ort_session

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--strength", type=float, default=5e-6)
    parser.add_argument("--out", default=str(ROOT / "runs" / "pit.onnx"))
    args = parser.parse_args()
    torch.manual_seed(0)
    data = np.load(ROOT / "models" / "digits.npz")
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    train, test = slice(0, 1400), slice(1400, None)

    model = po.PIT(ROOT / "models" / "digits_cnn.onnx", cost=po.cost.params)     # 1
    weights = torch.optim.Adam(model.net_parameters(), lr=2e-3)
    masks = torch.optim.Adam(model.nas_parameters(), lr=1e-2)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(1400)
        for i in range(0, 1400, 32):
            idx = order[i:i + 32]
            task = torch.nn.functional.cross_entropy(model(x[train][idx]), y[train][idx])
            loss = task + args.strength * model.cost                               # 2
            weights.zero_grad()
            masks.zero_grad()
            loss.backward()
            weights.step()
            masks.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
            print(f"epoch {epoch + 1}: accuracy {accuracy:.3f}, params {model.cost.item():,.0f}")

    exported = model.export(args.out)                                               # 3
    logits = ort_session(exported.to_onnx()).run(None, {"input": data["x"][test]})[0]
    print(model.summary())
    print(f"wrote {args.out}: {po.cost.total(exported):,} params "
          f"(from {po.cost.total(po.load(ROOT / 'models' / 'digits_cnn.onnx')):,}), "
          f"ONNX Runtime accuracy {float((logits.argmax(1) == data['y'][test]).mean()):.3f}")


if __name__ == "__main__":
    main()
