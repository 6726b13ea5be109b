"""Latency of the exports in each deployment compiler beside ONNX Runtime's (batch 1, one thread).

    nice python bench/deploy_latency.py [--models resnet8,digits_cnn]

For each model: the PIT float export and the QAT int8 QDQ export (random architecture, as in
tests/deploy), compiled by OpenVINO, TVM (Relax, llvm) and IREE (llvm-cpu, local-sync); each
compiler's step is timed alternately with ONNX Runtime's in one run (`_timing.paired_ratio`),
so the ratio is what to read on a shared machine. Needs the ``deploy`` extra.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests" / "deploy")]

from _timing import paired_ratio  # noqa: E402


def _steps(path: Path, feeds: dict) -> dict:
    """compiler → a function running the compiled model once on ``feeds``."""
    import iree.compiler as compiler
    import iree.runtime as runtime
    import onnx
    import onnxruntime as ort
    import openvino as ov
    import subprocess
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    core = ov.Core()
    read = core.read_model(str(path))   # static shapes, as the deploy tests (tests/deploy/openvino_gap.py)
    read.reshape({port: list(feeds[port.get_any_name()].shape) for port in read.inputs})
    ov_model = core.compile_model(read, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})
    proto = onnx.load(str(path))
    module = from_onnx(proto, shape_dict={k: list(v.shape) for k, v in feeds.items()}, keep_params_in_input=False)
    module = relax.transform.LegalizeOps()(relax.transform.DecomposeOpsForInference()(module))
    vm = relax.VirtualMachine(tvm.compile(module, target="llvm"), tvm.cpu())
    tvm_inputs = [tvm.runtime.tensor(v) for v in feeds.values()]
    mlir, vmfb = path.with_suffix(".mlir"), path.with_suffix(".vmfb")
    subprocess.run([sys.executable, "-m", "iree.compiler.tools.import_onnx", str(path), "-o", str(mlir)], check=True)
    compiler.compile_file(str(mlir), output_file=str(vmfb), target_backends=["llvm-cpu"],
                          extra_args=["--iree-llvmcpu-target-cpu=host"])
    context = runtime.SystemContext(config=runtime.Config("local-sync"))
    context.add_vm_module(runtime.VmModule.copy_buffer(context.instance, vmfb.read_bytes()))
    iree_main = context.modules.module["main_graph"]
    values = list(feeds.values())
    return {"onnxruntime": lambda: session.run(None, feeds), "openvino": lambda: ov_model(feeds),
            "tvm": lambda: vm["main"](*tvm_inputs), "iree": lambda: iree_main(*values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet8,digits_cnn")
    args = parser.parse_args()
    from exports import ExportCache
    cache = ExportCache(Path(tempfile.mkdtemp()))
    print("| model | export | ONNX Runtime ms | OpenVINO ms | TVM ms | IREE ms |\n|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for method, fmt in (("pit", "float"), ("qat", "qdq")):
            export = cache.get(name, method, fmt, batch=1)
            steps = _steps(export.path, export.feeds)
            cells = {}
            for compiler in ("openvino", "tvm", "iree"):
                timed = paired_ratio(steps[compiler], steps["onnxruntime"], rounds=11, steps=20)
                cells[compiler] = f"{timed['candidate_ms']:.3f} ({timed['ratio']:.2f}×)"
                cells.setdefault("onnxruntime", f"{timed['baseline_ms']:.3f}")
            print(f"| {name} | {method} {fmt} | {cells['onnxruntime']} | {cells['openvino']} | {cells['tvm']} | "
                  f"{cells['iree']} |", flush=True)
    sys.stdout.flush()
    os._exit(0)   # the compilers' libraries can crash in their exit handlers once the work is done


if __name__ == "__main__":
    main()
