"""Export every zoo model to ONNX and verify it.

Usage::

    python models/export.py [--out models/] [--only resnet8 dscnn ...]

For each entry of ``models.zoo.ZOO`` this

1. builds the model with a fixed seed and random (non-identity) BatchNorm
   running statistics / affine parameters, in eval mode;
2. exports it with the TorchScript exporter (``dynamo=False``), opset 17,
   constant folding, input ``"input"`` / output ``"output"`` with a symbolic
   batch dimension ``"batch"``;
   entries with ``preserve_bn=True`` are exported with
   ``training=TrainingMode.PRESERVE`` so the exporter's eval-mode Conv+BN
   fusion is skipped and explicit ``BatchNormalization`` nodes remain;
3. sets ``ir_version = 10`` and re-saves to ``<out>/<name>.onnx``;
4. checks the file with ``onnx.checker.check_model(full_check=True)`` and
   compares onnxruntime (batch 2) against the torch eval output
   (max abs err < 1e-4).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import warnings
from collections import Counter
from typing import Dict

import numpy as np
import onnx
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(_HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(_HERE))

from models.zoo import ZOO, example_input, make, num_params  # noqa: E402

OPSET = 17
IR_VERSION = 10
ATOL = 1e-4


def export_model(name: str, out_dir: str) -> Dict[str, object]:
    entry = ZOO[name]
    model = make(name)
    dummy = example_input(name, batch=1)
    dyn = {"input": {0: "batch"}, "output": {0: "batch"}}
    training = torch.onnx.TrainingMode.PRESERVE if entry.preserve_bn else torch.onnx.TrainingMode.EVAL

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation notices
        torch.onnx.export(
            model,
            (dummy,),
            buf,
            dynamo=False,
            opset_version=OPSET,
            do_constant_folding=True,
            training=training,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes=dyn,
        )
    assert not model.training, "model must still be in eval mode after export"
    onnx_model = onnx.load_from_string(buf.getvalue())
    onnx_model.ir_version = IR_VERSION
    path = os.path.join(out_dir, f"{name}.onnx")
    onnx.save(onnx_model, path)

    # --- checks -----------------------------------------------------------
    onnx_model = onnx.load(path)
    onnx.checker.check_model(onnx_model, full_check=True)
    assert onnx_model.ir_version == IR_VERSION
    in_dims = onnx_model.graph.input[0].type.tensor_type.shape.dim
    out_dims = onnx_model.graph.output[0].type.tensor_type.shape.dim
    assert in_dims[0].dim_param == "batch" and out_dims[0].dim_param == "batch", "batch dim not symbolic"

    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x2 = example_input(name, batch=2)
    with torch.no_grad():
        ref = model(x2).numpy()
    got = sess.run(["output"], {"input": x2.numpy()})[0]
    assert got.shape == ref.shape, (got.shape, ref.shape)
    err = float(np.max(np.abs(got - ref)))
    assert err < ATOL, f"{name}: onnxruntime vs torch max abs err {err:.3g} >= {ATOL}"

    ops = Counter(n.op_type for n in onnx_model.graph.node)
    if entry.preserve_bn:
        assert ops.get("BatchNormalization", 0) > 0, f"{name}: BatchNormalization nodes were folded"
    return {
        "name": name,
        "params": num_params(model),
        "nodes": len(onnx_model.graph.node),
        "ops": ops,
        "bytes": os.path.getsize(path),
        "err": err,
        "path": path,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=_HERE, help="output directory (default: models/)")
    ap.add_argument("--only", nargs="*", default=None, help="export only these zoo models")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    names = args.only or list(ZOO)
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        ap.error(f"unknown model(s): {unknown}; known: {list(ZOO)}")

    total = 0
    for name in names:
        r = export_model(name, args.out)
        total += r["bytes"]
        ops = ", ".join(f"{k}x{v}" for k, v in sorted(r["ops"].items()))
        print(f"{name:18s} params={r['params']:7d} nodes={r['nodes']:4d} "
              f"size={r['bytes'] / 1024:7.1f}KiB maxerr={r['err']:.2e}  [{ops}]")
    print(f"total size: {total / 1024 / 1024:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
