"""Mixed-precision search on an ONNX model, then the QDQ model in ONNX Runtime: size and latency.

    python examples/04_mps_to_onnxruntime.py [--epochs 6] [--strength 0.05] [--out runs/mps.onnx]

Trains the bundled digits CNN in float, searches per-channel weight precisions in {2, 4, 8} and
per-layer activation precisions with cost = weight bytes, fine-tunes the chosen network, exports
QDQ (QuantizeLinear/DequantizeLinear, weights stored quantized) and QONNX, and runs the QDQ file
in ONNX Runtime next to the float model.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import plinio_onnx as po
from plinio_onnx.runtime import ort_session

ROOT = Path(__file__).resolve().parent.parent


def _train(model, parameters, x, y, epochs, lr):
    optimizer = torch.optim.Adam(parameters, lr=lr)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y))
        for i in range(0, len(y), 32):
            idx = order[i:i + 32]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            if isinstance(model, po.MPS) and model.strength:
                loss = loss + model.strength * model.cost / model.reference_cost
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def _latency_ms(session, x, repeats=200):
    session.run(None, {"input": x})
    start = time.perf_counter()
    for _ in range(repeats):
        session.run(None, {"input": x})
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--strength", type=float, default=0.05)
    parser.add_argument("--out", default=str(ROOT / "runs" / "mps.onnx"))
    args = parser.parse_args()
    torch.manual_seed(0)
    data = np.load(ROOT / "models" / "digits.npz")
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    train, test = slice(0, 1400), slice(1400, None)

    graph = po.load(ROOT / "models" / "digits_cnn.onnx")
    float_model = po.to_torch(graph)
    _train(float_model, float_model.parameters(), x[train], y[train], args.epochs, 2e-3)
    po.sync(graph, float_model)
    float_path = graph.save(Path(args.out).with_name("float.onnx"))

    model = po.MPS(graph, cost="size")                       # weight bytes, differentiable
    model.calibrate(x[train][:256])                          # activation clips from data
    model.strength = args.strength
    with torch.no_grad():
        model.eval()
        model.reference_cost = float(model.cost)             # int8-or-above start, normalizes λ
    search = torch.optim.Adam(model.nas_parameters(), lr=1e-2)
    weights = torch.optim.Adam(model.net_parameters(), lr=1e-3)
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(1400)
        for i in range(0, 1400, 32):
            idx = order[i:i + 32]
            loss = torch.nn.functional.cross_entropy(model(x[train][idx]), y[train][idx]) \
                + args.strength * model.cost / model.reference_cost
            search.zero_grad()
            weights.zero_grad()
            loss.backward()
            search.step()
            weights.step()
        model.anneal(0.9)
    model.freeze()                                           # fine-tune the chosen precisions
    model.strength = 0.0
    _train(model, list(model.net_parameters()), x[train], y[train], max(1, args.epochs // 2), 5e-4)

    qdq = model.export(args.out, format="qdq")
    model.export(Path(args.out).with_suffix(".qonnx.onnx"), format="qonnx")
    print(model.summary())
    sessions = {"float": ort_session(po.load(float_path).to_onnx(), threads=1),
                "qdq": ort_session(qdq.to_onnx(), threads=1)}
    batch = data["x"][:1]
    for name, path in (("float", float_path), ("qdq", Path(args.out))):
        logits = sessions[name].run(None, {"input": data["x"][test]})[0]
        accuracy = float((logits.argmax(1) == data["y"][test]).mean())
        print(f"{name:5s}: file {path.stat().st_size / 1024:7.1f} KiB, ONNX Runtime accuracy "
              f"{accuracy:.3f}, latency (batch 1, 1 thread) {_latency_ms(sessions[name], batch):.3f} ms")
    print(f"weights: {po.cost.bits.total_of(qdq, po.cost.size):,.0f} bytes quantized "
          f"(one byte per parameter: {po.cost.total(qdq, po.cost.params):,})")


if __name__ == "__main__":
    main()
