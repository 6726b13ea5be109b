"""Train an ONNX model in torch and write the trained ONNX back: load → to_torch → train → sync.

    python examples/01_train_onnx_in_torch.py [--epochs 5] [--out runs/digits_trained.onnx]

Uses the bundled digits CNN and scikit-learn's digits (real 8×8 handwritten digits).
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
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "runs" / "digits_trained.onnx"))
    args = parser.parse_args()
    torch.manual_seed(0)

    data = np.load(ROOT / "models" / "digits.npz")
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    train, test = slice(0, 1400), slice(1400, None)

    graph = po.load(ROOT / "models" / "digits_cnn.onnx")
    model = po.to_torch(graph)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(1400)
        for i in range(0, 1400, 32):
            idx = order[i:i + 32]
            loss = torch.nn.functional.cross_entropy(model(x[train][idx]), y[train][idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {accuracy:.3f}")

    po.sync(graph, model)
    out = graph.save(args.out)
    logits = ort_session(po.load(out).to_onnx()).run(None, {"input": data["x"][test]})[0]
    ort_accuracy = float((logits.argmax(1) == data["y"][test]).mean())
    print(f"wrote {out}; ONNX Runtime test accuracy {ort_accuracy:.3f}")


if __name__ == "__main__":
    main()
