"""Runs a QONNX model in qonnx's reference executor or through hls4ml (convert + C simulation).

Executed by the deploy tests with the interpreter of the separate qonnx environment
(`qonnx_env.py`): qonnx and hls4ml need plain ``onnxruntime``, which must not enter the
project's environment. Only the standard library, numpy, qonnx and hls4ml are imported here.

    python qonnx_runner.py qonnx|hls4ml MODEL.onnx INPUTS.npz OUTPUTS.npz [WORKDIR]

INPUTS.npz holds one array per graph input, in the graph's order; OUTPUTS.npz receives
``output0``, ``output1`` … in the graph's order (hls4ml: its single output). hls4ml takes the
model through its documented preparation (qonnx cleanup → channels last → Gemm to MatMul →
cleanup) and channels-last inputs; it also writes what its converted model holds, for the tests
to compare with the export: OUTPUTS.npz's ``layer{i}.{weight}`` arrays (each hls4ml layer's
weights and biases, ApplyAlpha's scale and bias) and ``layers``, a JSON string (per layer: class,
name, inputs, outputs, each weight's precision).
"""
import json
import sys

import numpy as np


def prepared(path: str, batch: int | None):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.cleanup import cleanup_model
    model = ModelWrapper(path)
    if batch is not None:   # qonnx's executor checks the declared input shapes
        for tensor in model.graph.input:
            shape = model.get_tensor_shape(tensor.name)
            model.set_tensor_shape(tensor.name, [batch] + list(shape[1:]))
    return cleanup_model(model)


def run_qonnx(path: str, inputs: dict) -> dict:
    import qonnx.core.onnx_exec as oxe
    batch = len(next(iter(inputs.values())))
    model = prepared(path, batch)
    # cleanup renames every tensor (global_in, global_out …): inputs and outputs go by position
    feeds = {t.name: value for t, value in zip(model.graph.input, inputs.values())}
    context = oxe.execute_onnx(model, feeds)
    return {f"output{i}": context[t.name] for i, t in enumerate(model.graph.output)}


def run_hls4ml(path: str, inputs: dict, workdir: str) -> dict:
    import hls4ml
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
    from qonnx.transformation.gemm_to_matmul import GemmToMatMul
    from qonnx.util.cleanup import cleanup_model
    model = prepared(path, None)
    model = model.transform(ConvertToChannelsLastAndClean())
    model = cleanup_model(model.transform(GemmToMatMul()))
    # Quantized tensors take the Quant nodes' precisions; the others (accumulators, the rescaling
    # ApplyAlpha layers of non-power-of-two scales) this default: with fixed<32,16> the mixed 4/8-bit
    # digits CNN disagreed with ONNX Runtime on 1.4 % of the test split, with fixed<48,24> on none.
    config = hls4ml.utils.config.config_from_onnx_model(model, granularity="name", backend="Vitis",
                                                        default_precision="fixed<48,24>")
    hls = hls4ml.converters.convert_from_onnx_model(model, output_dir=workdir, io_type="io_parallel",
                                                    backend="Vitis", hls_config=config)
    layers = _layers(hls)
    hls.compile()
    (name, x), = inputs.items()
    if x.ndim > 2:   # channels first → channels last
        x = np.moveaxis(x, 1, -1)
    out = np.asarray(hls.predict(np.ascontiguousarray(x, dtype=np.float32)))
    return {"output0": out.reshape(len(x), -1), **layers}


def _layers(hls) -> dict:
    """The converted model's layers: ``layers`` (their descriptions, as JSON) and ``layer{i}.{w}``
    (their weights as hls4ml holds them)."""
    described, arrays = [], {}
    for i, layer in enumerate(hls.get_layers()):
        weights = {}
        for key, weight in layer.weights.items():
            arrays[f"layer{i}.{key}"] = np.asarray(weight.data, dtype=np.float64)
            weights[key] = str(weight.type.precision)
        described.append({"class": type(layer).__name__, "name": layer.name, "inputs": list(layer.inputs),
                          "outputs": list(layer.outputs), "weights": weights})
    return {"layers": np.array(json.dumps(described)), **arrays}


def main(argv: list[str]) -> int:
    mode, model, inputs_path, outputs_path = argv[:4]
    inputs = {k: v for k, v in np.load(inputs_path).items()}
    if mode == "qonnx":
        outputs = run_qonnx(model, inputs)
    elif mode == "hls4ml":
        outputs = run_hls4ml(model, inputs, argv[4])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    np.savez(outputs_path, **outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
