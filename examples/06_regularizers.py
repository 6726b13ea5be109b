"""Several costs at once in your own training loop: named costs and a regularizer.

    python examples/06_regularizers.py [--regularizer constraint|duccio|adaptive|linear]
        [--warmup-epochs 2] [--epochs 4] [--params 40%] [--macs 60%] [--out runs/regularized.onnx]

Trains the bundled digits CNN (an untrained ONNX file) for a few warm-up epochs, then searches
PIT masks under two targets at once — a parameter budget and a MAC budget — and exports the
pruned model, checked in ONNX Runtime.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import plinio_onnx as po
from plinio_onnx.runtime import ort_session

ROOT = Path(__file__).resolve().parent.parent


def make_regularizer(kind: str, targets: dict, task_loss: float, total_steps: int):
    """One of `po.regularizers`, aimed at ``targets``."""
    if kind == "constraint":   # a penalty only above the targets (aiming 5 % below them)
        return po.regularizers.Constraint(targets, strength=0.5, margin=0.95)
    if kind == "duccio":       # strengths from the warm-up task loss, ramped over the epochs
        return po.regularizers.DUCCIO(targets, task_loss=task_loss, ramp=0.5)
    if kind == "adaptive":     # moving targets, λ adapting every step (what `optimize` does)
        return po.regularizers.AdaptiveTarget(targets, total_steps, strength=task_loss, ramp=0.5)
    return po.regularizers.Linear({"params": 1e-5, "macs": 1e-6})   # costs as objectives


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regularizer", choices=["constraint", "duccio", "adaptive", "linear"], default="constraint")
    parser.add_argument("--warmup-epochs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4, help="search epochs")
    parser.add_argument("--params", default="40%", help="parameter target: a number or a percentage")
    parser.add_argument("--macs", default="60%", help="MAC target: a number or a percentage")
    parser.add_argument("--out", default=str(ROOT / "runs" / "regularized.onnx"))
    args = parser.parse_args()
    torch.manual_seed(0)
    data = np.load(ROOT / "models" / "digits.npz")
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    train, test = slice(0, 1400), slice(1400, None)
    batch, steps_per_epoch = 32, (1400 + 31) // 32

    # Named costs: `model.cost_of("params")`, `model.cost_of("macs")`; `model.cost` is the first.
    model = po.PIT(ROOT / "models" / "digits_cnn.onnx", cost={"params": po.cost.params, "macs": po.cost.macs})
    weights = torch.optim.Adam(model.net_parameters(), lr=2e-3)
    masks = torch.optim.Adam(model.nas_parameters(), lr=5e-3)

    def epoch_of_training(regularize=None, after_step=None) -> None:
        """One epoch over the training split: task loss (+ ``regularize()``, stepping the masks too)."""
        model.train()
        order = torch.randperm(1400)
        for i in range(0, 1400, batch):
            idx = order[i:i + batch]
            task = torch.nn.functional.cross_entropy(model(x[train][idx]), y[train][idx])
            loss = task if regularize is None else task + regularize()
            weights.zero_grad()
            masks.zero_grad()
            loss.backward()
            weights.step()
            if regularize is not None:
                masks.step()
            if after_step is not None:
                after_step()

    for _ in range(args.warmup_epochs):   # plain training: the masks stay at 1
        epoch_of_training()
    model.eval()
    with torch.no_grad():
        task_loss = float(torch.nn.functional.cross_entropy(model(x[train]), y[train]))
    print(f"warm-up task loss {task_loss:.3f}")
    regularizer = make_regularizer(args.regularizer, {"params": args.params, "macs": args.macs},
                                   task_loss, args.epochs * steps_per_epoch)
    if args.regularizer != "linear":
        regularizer.start(model)   # measures the initial costs: "40%" is of these
        print("targets:", {name: f"{value:,.0f}" for name, value in regularizer.targets.items()})

    for epoch in range(args.epochs):
        if args.regularizer == "duccio":     # DUCCIO's strengths ramp with the epoch
            epoch_of_training(lambda: regularizer(model, epoch, args.epochs))
        elif args.regularizer == "adaptive":  # λ and the moving targets advance every step
            epoch_of_training(lambda: regularizer(model), regularizer.after_step)
        else:
            epoch_of_training(lambda: regularizer(model))
        model.eval()
        with torch.no_grad():
            accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
            print(f"epoch {epoch + 1}: accuracy {accuracy:.3f}, params {model.cost_of('params').item():,.0f}, "
                  f"MACs {model.cost_of('macs').item():,.0f}")

    exported = model.export(args.out)
    logits = ort_session(exported.to_onnx()).run(None, {"input": data["x"][test]})[0]
    print(model.summary())
    print(f"wrote {args.out}: params {po.cost.total(exported):,} MACs {po.cost.total(exported, po.cost.macs):,} "
          f"ONNX Runtime accuracy {float((logits.argmax(1) == data['y'][test]).mean()):.3f}")


if __name__ == "__main__":
    main()
