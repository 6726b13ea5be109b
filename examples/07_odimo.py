"""ODiMO: map each layer's channels onto two accelerators running in parallel, then run the split
model in ONNX Runtime.

    python examples/07_odimo.py [--epochs 6] [--strength 1.0] [--out runs/odimo.onnx]

Trains the bundled digits CNN in float, then searches, for every output channel, whether DIANA's
8-bit digital unit or its ternary (2-bit) analog unit computes it, with cost = the modelled
latency (per layer the slower of the two units, summed over layers). The export splits every
layer into one QDQ sub-layer per unit (``<layer>/odimo/<unit>``), joined in the original channel
order; ``odimo.mapping`` in the model's metadata says which node runs where.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import plinio_onnx as po
from plinio_onnx.runtime import ort_session

ROOT = Path(__file__).resolve().parent.parent


def _epoch(model, optimizers, x, y, penalty=None):
    model.train()
    order = torch.randperm(len(y))
    for i in range(0, len(y), 32):
        idx = order[i:i + 32]
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        if penalty is not None:
            loss = loss + penalty()
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--out", default=str(ROOT / "runs" / "odimo.onnx"))
    args = parser.parse_args()
    torch.manual_seed(0)
    data = np.load(ROOT / "models" / "digits.npz")
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    train, test = slice(0, 1400), slice(1400, None)

    graph = po.load(ROOT / "models" / "digits_cnn.onnx")
    float_model = po.to_torch(graph)
    optimizer = torch.optim.Adam(float_model.parameters(), lr=2e-3)
    for _ in range(args.epochs):
        _epoch(float_model, [optimizer], x[train], y[train])
    po.sync(graph, float_model)

    model = po.ODiMO(graph)                 # default: po.odimo.DIGITAL and po.odimo.ANALOG (DIANA)
    model.calibrate(x[train][:256])         # activation clips from data
    reference = model.single_accelerator_latency("digital")   # cycles, all on the digital unit
    search = torch.optim.Adam(model.nas_parameters(), lr=1e-2)
    weights = torch.optim.Adam(model.net_parameters(), lr=1e-3)
    for _ in range(args.epochs):
        _epoch(model, [search, weights], x[train], y[train], lambda: args.strength * model.cost / reference)
        model.anneal(0.9)
    model.freeze()                          # fine-tune the chosen mapping
    _epoch(model, [torch.optim.Adam(model.net_parameters(), lr=5e-4)], x[train], y[train])

    exported = model.export(args.out)
    for layer, counts in model.mapping().items():
        print(f"{layer}: " + ", ".join(f"{unit} {n}" for unit, n in counts.items()))
    latency = model.architecture()["latency"]
    print(f"latency (cycles): mapping {latency['mapping']:.0f}, all digital {latency['all_digital']:.0f}, "
          f"all analog {latency['all_analog']:.0f}")
    nodes = json.loads(exported.metadata["odimo.mapping"])["nodes"]
    print("sub-layers: " + ", ".join(f"{node} → {unit}" for node, unit in nodes.items()))
    logits = ort_session(exported.to_onnx()).run(None, {"input": data["x"][test]})[0]
    print(f"ONNX Runtime accuracy {float((logits.argmax(1) == data['y'][test]).mean()):.3f}")


if __name__ == "__main__":
    main()
