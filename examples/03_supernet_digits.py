"""Layer selection with SuperNet on an ONNX model: train → search → export → fine-tune.

    python examples/03_supernet_digits.py [--epochs 10] [--strength 0.5] [--out runs/digits_supernet.onnx] [--pit]

Every conv of the bundled digits CNN gets alternatives (other kernel sizes, depthwise-separable,
grouped, skip) and every dense layer low-rank ones, all starting from the trained weights. The
search minimizes cross-entropy + strength · MACs / MACs₀ while the softmax temperature is annealed;
``model.eval()`` runs the argmax architecture, which is exactly what ``export`` writes.
``--pit`` searches PIT channel masks jointly (``po.SuperNet(..., pit=True)``): the export keeps
the argmax branches and then only the kept channels.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import plinio_onnx as po
from plinio_onnx.methods.supernet import exponential_temperature
from plinio_onnx.runtime import ort_session

ROOT = Path(__file__).resolve().parent.parent


def train(model, x, y, epochs: int, optimizers, extra=None, on_step=None) -> None:
    steps, step = epochs * -(-len(y) // 32), 0
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y))
        for i in range(0, len(y), 32):
            if on_step:
                on_step(step, steps)
            idx = order[i:i + 32]
            loss = F.cross_entropy(model(x[idx]), y[idx]) + (extra() if extra else 0)
            for opt in optimizers:
                opt.zero_grad()
            loss.backward()
            for opt in optimizers:
                opt.step()
            step += 1


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--out", default=str(ROOT / "runs" / "digits_supernet.onnx"))
    parser.add_argument("--pit", action="store_true", help="also prune channels (SuperNet + PIT jointly)")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = np.load(ROOT / "models" / "digits.npz")
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    tr, te = slice(0, 1400), slice(1400, None)

    # 1. Train the float model (an ONNX file in, a trained graph out).
    graph = po.load(ROOT / "models" / "digits_cnn.onnx")
    net = po.to_torch(graph)
    train(net, x[tr], y[tr], args.epochs, [torch.optim.Adam(net.parameters(), lr=2e-3)])
    trained = po.sync(graph, net)
    print(f"trained: {po.cost.total(trained, po.cost.macs):,} MACs, test accuracy {accuracy(net, x[te], y[te]):.3f}")

    # 2. Search: three lines in a normal training loop.
    model = po.SuperNet(trained, cost=po.cost.macs, pit=args.pit)
    base = float(po.cost.total(trained, po.cost.macs))
    logits = [model.logits(choice.id) for choice in model.info.choices]
    masks = [p for p in model.nas_parameters() if all(p is not q for q in logits)]   # PIT's, with --pit
    optimizers = [torch.optim.Adam(model.net_parameters(), lr=1e-3),
                  torch.optim.Adam([{"params": logits, "lr": 0.05}] + ([{"params": masks, "lr": 5e-3}] if masks else []))]
    train(model, x[tr], y[tr], args.epochs, optimizers, extra=lambda: args.strength * model.cost / base,
          on_step=lambda step, steps: model.set_temperature(exponential_temperature(step, steps, 1.0, 0.05)))
    print(model.summary())
    print(f"searched (eval = the exported network): test accuracy {accuracy(model, x[te], y[te]):.3f}")

    # 3. Export the argmax architecture, fine-tune it as a plain model, save.
    chosen = model.export()
    net = po.to_torch(chosen)
    train(net, x[tr], y[tr], args.epochs, [torch.optim.Adam(net.parameters(), lr=1e-3)])
    out = po.sync(chosen, net).save(args.out)
    logits = ort_session(po.load(out).to_onnx()).run(None, {"input": data["x"][te]})[0]
    print(f"wrote {out}: {po.cost.total(chosen, po.cost.macs):,} MACs, "
          f"ONNX Runtime test accuracy {float((logits.argmax(1) == data['y'][te]).mean()):.3f}")


if __name__ == "__main__":
    main()
