"""Snapshot the pass → method → finalizer contract: searchable graphs and exports, fixed seeds.

    python bench/contract_snapshot.py OUT_DIR            # write the snapshot
    python bench/contract_snapshot.py OUT_DIR --compare REF_DIR

For a few zoo models and every method (PIT, MPS QDQ / QONNX / zero-bit, PIT+MPS, SuperNet,
SuperNet+PIT) it builds the searchable graph, sets random architecture parameters (fixed seed),
and writes ``<model>.<method>.searchable.onnx`` and ``<model>.<method>.export.onnx``. With
``--compare`` it reports, per file, whether it is byte-identical to the reference, else whether
the graphs are identical once the metadata records are ignored (a record may gain a schema
version), else the first difference.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx
import torch

import plinio_onnx as po

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from _util import random_architecture  # noqa: E402  (the tests' helper, so both draw alike)

MODELS = ("digits_cnn", "resnet8", "mobilenetv2_tiny", "tcn")
LOGITS = (".mps_w_alpha", ".mps_a_alpha", ".supernet_logits")
MASKS = (".pit_alpha", ".pit_beta", ".pit_gamma")


def _methods() -> dict:
    small = {"w_precisions": (2, 4, 8), "a_precisions": (4, 8)}
    return {
        "pit": (lambda path: po.PIT(path, masks=("channels", "time", "dilation")), {}),
        "mps_qdq": (lambda path: po.MPS(path, **small), {"format": "qdq"}),
        "mps_qonnx": (lambda path: po.MPS(path, **small), {"format": "qonnx"}),
        "mps_zero_bit": (lambda path: po.MPS(path, zero_bit=True, **small), {}),
        "pit_mps": (lambda path: po.MPS(path, pit=True, **small), {}),
        "supernet": (lambda path: po.SuperNet(path), {}),
        "supernet_pit": (lambda path: po.SuperNet(path, pit=True), {}),
    }


def snapshot(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for model_name in MODELS:
        for index, (method, (build, options)) in enumerate(_methods().items()):
            torch.manual_seed(0)
            model = build(ROOT / "models" / f"{model_name}.onnx")
            random_architecture(model, 100 + index, LOGITS, MASKS, below=0.4)
            model.searchable_graph().save(out / f"{model_name}.{method}.searchable.onnx")
            model.export(out / f"{model_name}.{method}.export.onnx", **options)
            print(f"{model_name:18s} {method:14s} written", flush=True)


def _without_records(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    records = {p.key: p.value for p in model.metadata_props}
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    del stripped.metadata_props[:]
    return stripped, records


def _same_records(meta_a: dict, meta_b: dict, keys: list[str]) -> bool:
    """Whether the differing metadata records read (and upgraded) to equal typed records."""
    from plinio_onnx.records import MPSRecord, PITRecord, SuperNetRecord
    kinds = {kind.KEY: kind for kind in (PITRecord, MPSRecord, SuperNetRecord)}
    return all(key in kinds and key in meta_a and key in meta_b
               and kinds[key].from_json(meta_a[key]) == kinds[key].from_json(meta_b[key]) for key in keys)


def compare(out: Path, reference: Path) -> int:
    differing = 0
    for ref in sorted(reference.glob("*.onnx")):
        new = out / ref.name
        if not new.exists():
            print(f"MISSING    {ref.name}")
            differing += 1
            continue
        if new.read_bytes() == ref.read_bytes():
            print(f"identical  {ref.name}")
            continue
        a, meta_a = _without_records(onnx.load(str(ref)))
        b, meta_b = _without_records(onnx.load(str(new)))
        if a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True):
            keys = sorted(k for k in set(meta_a) | set(meta_b) if meta_a.get(k) != meta_b.get(k))
            same = _same_records(meta_a, meta_b, keys)
            print(f"graph-same {ref.name} (metadata differs: {', '.join(keys)}; "
                  f"records {'equal' if same else 'DIFFERENT'} once read)")
            differing += not same
            continue
        differing += 1
        print(f"DIFFERENT  {ref.name}")
    return differing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--compare", type=Path, help="reference snapshot directory")
    args = parser.parse_args()
    snapshot(args.out)
    if args.compare is not None:
        differing = compare(args.out, args.compare)
        print(f"{differing} file(s) differ in their graphs")
        return 1 if differing else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
