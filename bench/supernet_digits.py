"""SuperNet on the 8x8 digits CNN: accuracy and MACs of the searched model at a few strengths.

Flow (docs/methods.md#optimize-phases): train the float model (the warm-up), then for every strength
build ``po.SuperNet`` on the trained ONNX model (default menu: other kernel sizes, depthwise-
separable, grouped and identity alternatives for the convs, low-rank ones for the dense
layers, all inheriting the trained weights), search (task loss + strength · MACs / MACs₀,
temperature annealed 1 → 0.05), export the argmax architecture and fine-tune it. The unsearched
model is fine-tuned for the same number of epochs as the reference. Splits: 64 % train, 16 %
validation (the best warm-up / fine-tune epoch), 20 % test (never seen before the final
measurement), from the dataset's fixed permutation (``--seed 0``) or a seeded one; every run of
one seed sees the same batches. Every accuracy is measured on the ONNX file in ONNX Runtime.

    python bench/supernet_digits.py                      # strengths 0.1 0.3 3 10 100, seed 0
    python bench/supernet_digits.py --strengths 0.5 --search-epochs 20 --json out.json
    python bench/supernet_digits.py --pit                # also SuperNet + PIT jointly, same strengths

The expected direction: a larger strength gives fewer MACs, at some accuracy (digits is easy:
small strengths already cut most MACs within test noise — one test sample is 0.28 points —
and accuracy falls clearly only at the largest strengths).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_cnn.onnx"
DATA = ROOT / "models" / "digits.npz"


def _splits(seed: int):
    data = np.load(DATA)
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    perm = np.random.default_rng(seed).permutation(len(y)) if seed else data["perm"]
    n_test, n_val = int(0.2 * len(y)), int(0.16 * len(y))
    test, val, train = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
    return (x[train], y[train]), (x[val], y[val]), (data["x"][test], data["y"][test])


def _batches(n: int, batch: int, gen: torch.Generator):
    order = torch.randperm(n, generator=gen)
    return [order[i:i + batch] for i in range(0, n, batch)]


def _evaluate(model, split) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(split[0])
        return float(F.cross_entropy(logits, split[1])), float((logits.argmax(1) == split[1]).float().mean())


def train_plain(graph, train, val, epochs: int, gen: torch.Generator):
    """SGD (lr 0.01, momentum 0.9, wd 1e-4, batch 32); keeps the best validation-loss epoch."""
    import plinio_onnx as po
    module = po.to_torch(graph)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    best = (_evaluate(module, val)[0], copy.deepcopy(module.state_dict()))
    for _ in range(epochs):
        module.train()
        for idx in _batches(len(train[1]), 32, gen):
            loss = F.cross_entropy(module(train[0][idx]), train[1][idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        val_loss = _evaluate(module, val)[0]
        if val_loss < best[0]:
            best = (val_loss, copy.deepcopy(module.state_dict()))
    module.load_state_dict(best[1])
    return po.sync(graph.copy(), module)


def search(trained, train, val, strength: float, epochs: int, gen: torch.Generator, pit: bool = False):
    """SuperNet search: Adam on weights (lr 1e-3) and logits (lr 0.05), every training batch,
    loss = CE + strength · MACs / MACs₀, T annealed geometrically from 1 to 0.05. The architecture
    is the one at the end (the mix is then nearly the argmax network its weights were trained
    in; measured on 3 seeds, steadier after fine-tuning than the best-validation epoch).
    ``pit``: PIT masks searched jointly (``po.SuperNet(..., pit=True)``), Adam lr 5e-3 on them."""
    import plinio_onnx as po
    from plinio_onnx.methods.supernet import exponential_temperature
    model = po.SuperNet(trained, cost=po.cost.macs, pit=pit)
    base = float(po.cost.total(trained, po.cost.macs))
    net_opt = torch.optim.Adam(model.net_parameters(), lr=1e-3, weight_decay=1e-4)
    logits = [model.logits(choice.id) for choice in model.info.choices]
    masks = [p for p in model.nas_parameters() if all(p is not q for q in logits)]
    nas_opt = torch.optim.Adam([{"params": logits, "lr": 0.05}] + ([{"params": masks, "lr": 5e-3}] if masks else []))
    steps, step = epochs * -(-len(train[1]) // 32), 0
    for epoch in range(epochs):
        model.train()
        for idx in _batches(len(train[1]), 32, gen):
            model.set_temperature(exponential_temperature(step, steps, 1.0, 0.05))
            loss = F.cross_entropy(model(train[0][idx]), train[1][idx]) + strength * model.cost / base
            net_opt.zero_grad()
            nas_opt.zero_grad()
            loss.backward()
            net_opt.step()
            nas_opt.step()
            step += 1
    val_loss, val_acc = _evaluate(model, val)   # eval: the argmax network, as exported
    return model, val_acc


def ort_accuracy(graph, test) -> float:
    from plinio_onnx.runtime import ort_session
    session = ort_session(graph.to_onnx())
    logits = session.run(None, {graph.gs.inputs[0].name: test[0]})[0]
    return float((logits.argmax(1) == test[1]).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strengths", type=float, nargs="*", default=[0.1, 0.3, 3.0, 10.0, 100.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup-epochs", type=int, default=30)
    ap.add_argument("--search-epochs", type=int, default=15)
    ap.add_argument("--finetune-epochs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest for this model)")
    ap.add_argument("--pit", action="store_true", help="also search SuperNet + PIT jointly at every strength")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    import plinio_onnx as po
    train, val, test = _splits(args.seed)

    def gen() -> torch.Generator:
        """The same batch order for every run, so runs differ by their strength only."""
        torch.manual_seed(args.seed)   # Gumbel noise, if a sampling uses it
        return torch.Generator().manual_seed(args.seed)

    start = time.perf_counter()
    original = po.load(MODEL)
    trained = train_plain(original, train, val, args.warmup_epochs, gen())
    print(f"  warm-up: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    rows = []
    t0 = time.perf_counter()
    reference = train_plain(trained, train, val, args.finetune_epochs, gen())
    rows.append({"run": "original", "strength": None, "params": po.cost.total(reference, po.cost.params),
                 "macs": po.cost.total(reference, po.cost.macs), "test_acc": 100 * ort_accuracy(reference, test),
                 "seconds": time.perf_counter() - t0, "chosen": {}})
    for method in ("supernet", "supernet+pit") if args.pit else ("supernet",):
        for strength in args.strengths:
            t0 = time.perf_counter()
            model, searched_acc = search(trained, train, val, strength, args.search_epochs, gen(),
                                         pit=method == "supernet+pit")
            chosen = {k: v for k, v in model.chosen().items() if v != "original"}
            tuned = train_plain(model.export(), train, val, args.finetune_epochs, gen())
            rows.append({"run": f"{method} {strength:g}", "method": method, "strength": strength,
                         "params": po.cost.total(tuned, po.cost.params), "macs": po.cost.total(tuned, po.cost.macs),
                         "test_acc": 100 * ort_accuracy(tuned, test), "seconds": time.perf_counter() - t0,
                         "val_acc_searched": 100 * searched_acc, "chosen": chosen,
                         "kept_channels": {k: list(v) for k, v in model.kept_channels().items()}})
            print(f"  {method} {strength:g}: {rows[-1]['macs']:,} MACs, {rows[-1]['test_acc']:.2f} % "
                  f"({rows[-1]['seconds']:.1f} s)", file=sys.stderr, flush=True)

    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"SuperNet on digits_cnn (seed {args.seed}; cost = MACs; test split unseen; "
                        "accuracy in ONNX Runtime)")
    for col in ("run", "MACs", "% MACs", "params", "test acc %", "Δ points", "wall s", "changed layers"):
        table.add_column(col, justify="left" if col in ("run", "changed layers") else "right")
    base = rows[0]
    for r in rows:
        table.add_row(r["run"], f"{r['macs']:,}", f"{100 * r['macs'] / base['macs']:.1f}", f"{r['params']:,}",
                      f"{r['test_acc']:.2f}", f"{r['test_acc'] - base['test_acc']:+.2f}", f"{r['seconds']:.1f}",
                      ", ".join(f"{k.split('/')[1]}→{v}" for k, v in r["chosen"].items()) or "—")
    console = Console(width=160)
    console.print(table)
    searched = [r for r in rows if r["strength"] is not None and r["method"] == "supernet"]
    cheaper = all(r["macs"] < base["macs"] for r in searched)
    trend = len(searched) < 2 or (searched[-1]["macs"] < searched[0]["macs"]
                                  and searched[-1]["test_acc"] <= searched[0]["test_acc"])
    monotone = all(a["macs"] >= b["macs"] for a, b in zip(searched, searched[1:]))
    console.print(f"every searched model cheaper than the original: {'yes' if cheaper else 'NO'}; "
                  f"the strongest search has fewer MACs and no better accuracy than the weakest: "
                  f"{'yes' if trend else 'NO'}; MACs monotone in the strength: {'yes' if monotone else 'no'}; "
                  f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if cheaper and trend else 1


if __name__ == "__main__":
    raise SystemExit(main())
