"""Compile and run ONNX files with OpenVINO, TVM (Relax ONNX frontend) and IREE (llvm-cpu).

Run as a script, in a subprocess of the tests, one per compiler and session::

    python compilers.py openvino|tvm|iree JOBS.json

JOBS.json lists ``{"model": PATH, "inputs": NPZ, "outputs": NPZ, "error": TXT}``; for each job the
model is compiled for the CPU and run on the inputs (one array per graph input, in order), and
either OUTPUTS.npz (``output0`` …) or ERROR.txt (the compiler's own message) is written. The
process ends with ``os._exit``: these libraries, loaded together, can crash in their exit
handlers after the work is done, which is no result of the model.

Each function below is also the recipe the README gives for that compiler.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np


def run_openvino(model: Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    import openvino as ov
    core = ov.Core()   # f32: the CPU plugin would otherwise pick bf16/f16 where the CPU has them
    read = core.read_model(str(model))
    # static shapes: with a dynamic batch, OpenVINO 2026.4 miscomputes int8 QDQ (openvino_gap.py)
    read.reshape({read.input(i): list(x.shape) for i, x in enumerate(inputs)})
    compiled = core.compile_model(read, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(inputs)
    return [np.asarray(result[compiled.output(i)]) for i in range(len(compiled.outputs))]


def run_tvm(model: Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    import onnx
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx
    proto = onnx.load(str(model))
    shapes = {t.name: list(x.shape) for t, x in zip(proto.graph.input, inputs)}
    module = from_onnx(proto, shape_dict=shapes, keep_params_in_input=False)
    module = relax.transform.LegalizeOps()(relax.transform.DecomposeOpsForInference()(module))
    machine = relax.VirtualMachine(tvm.compile(module, target="llvm"), tvm.cpu())
    out = machine["main"](*[tvm.runtime.tensor(x) for x in inputs])
    return [o.numpy() for o in out] if isinstance(out, (list, tuple)) or not hasattr(out, "numpy") else [out.numpy()]


def run_iree(model: Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    import iree.compiler as compiler
    import iree.runtime as runtime
    mlir, vmfb = model.with_suffix(".mlir"), model.with_suffix(".vmfb")
    imported = subprocess.run([sys.executable, "-m", "iree.compiler.tools.import_onnx", str(model), "-o", str(mlir)],
                              capture_output=True, text=True)
    if imported.returncode:
        raise RuntimeError(imported.stderr.strip() or imported.stdout.strip())
    compiler.compile_file(str(mlir), output_file=str(vmfb), target_backends=["llvm-cpu"],
                          extra_args=["--iree-llvmcpu-target-cpu=host"])
    context = runtime.SystemContext(config=runtime.Config("local-task"))
    context.add_vm_module(runtime.VmModule.copy_buffer(context.instance, vmfb.read_bytes()))
    out = context.modules.module["main_graph"](*inputs)
    return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


RUNNERS = {"openvino": run_openvino, "tvm": run_tvm, "iree": run_iree}


def main(compiler: str, jobs_file: str) -> None:
    run = RUNNERS[compiler]
    for job in json.loads(Path(jobs_file).read_text()):
        inputs = list(np.load(job["inputs"]).values())
        try:
            outputs = run(Path(job["model"]), inputs)
        except Exception as err:   # the compiler's own message, for the test to compare
            Path(job["error"]).write_text(f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")
            continue
        np.savez(job["outputs"], **{f"output{i}": o for i, o in enumerate(outputs)})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
