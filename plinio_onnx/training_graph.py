"""The forward graph that ONNX Runtime's training API fine-tunes, made from a deployable model.

ONNX Runtime builds the gradient graph of a model offline (`onnxruntime.training.artifacts`).
`prepare_for_training` rewrites what would make the trained forward differ from the deployed
one, or what ORT 1.19's gradient kernels cannot take, into equal forms:

* ``BatchNormalization`` becomes a training-mode batch norm in ORT's gradient graph (batch
  statistics, running statistics never written back). Fine-tuning on a device with small
  batches should not move the statistics, so each inference-mode BN is written as
  ``x · factor + shift`` with ``factor = scale / √(var + ε)`` and ``shift = B − mean · factor``
  (per channel); factor and shift train, the statistics are frozen inside them.
* QDQ graphs (MPS / QAT exports) store weights as integers, which cannot train, and ORT 1.19's
  own Q → DQ → FakeQuant fusion breaks on initializer zero points while generating artifacts.
  So every quantizer is written as ORT's training op ``FakeQuant`` (domain ``com.microsoft``:
  s·(clamp(round(x/s) + z, low, high) − z) forward, the straight-through gradient masked
  outside [low, high] backward), with the exported scales, zero points and integer ranges
  (frozen): an activation's ``QuantizeLinear → [Clip] → DequantizeLinear`` becomes one
  FakeQuant; an integer weight under a (per-channel) ``DequantizeLinear`` becomes its float
  value ``W`` → ``W / s → FakeQuant(1, 0, range) → · s`` (FakeQuant takes one scale per
  tensor; dividing first gives the per-channel rounding), each channel clamped to its recorded
  bit-width (``mps.bit_widths``; the container's range without it); an int32 bias the same way
  in its accumulator scale, so the trained forward is exactly the integer model's. The eval
  and inference models keep FakeQuant, which ONNX Runtime training builds (the ones that run
  on-device training) execute; `plinio_onnx.requantize` writes standard QDQ back.
* ``AveragePool`` becomes the equal depthwise ``Conv`` with a frozen 1/k kernel (ORT's
  AveragePoolGrad sizes its result from static shapes and crashes on a symbolic batch);
  ``LayerNormalization`` gets its optional statistics outputs, which its gradient reads.

Every other node is kept as it is. The result is ONNX at the input's opset (plus the
``com.microsoft`` domain for FakeQuant in quantized models).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import PlinioOnnxError
from .graph import Graph
from .records import BitWidths

#: Input positions of an op that hold a layer's weights or biases: a float initializer read only
#: at such positions trains; every other float initializer (clip bounds, resize scales,
#: quantization scales, constants of a scalar) stays frozen.
PARAMETER_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
    "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2), "PRelu": (1,),
    "Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1),
}
#: Elementwise ops whose constant operand is a parameter only when it holds a vector (a bias,
#: a per-channel scale); a scalar there is a fixed constant of the architecture.
_ELEMENTWISE = ("Add", "Sub", "Mul")
#: Inputs of a layer that read its weights and bias (a fake-quantized integer tensor goes there).
_QUANTIZED_PARAMETER_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1)}
#: ONNX Runtime's contrib domain, where its training op FakeQuant lives.
_MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class TrainingGraph:
    """A model ready for ONNX Runtime's artifact generation.

    ``trainable``: initializers that get gradients; ``frozen``: every other float initializer;
    ``quantized``: the model came from a QDQ export (its quantizers are fake-quant now).
    """

    model: onnx.ModelProto
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    quantized: bool


def prepare_for_training(graph: Graph, *, frozen: tuple[str, ...] = ()) -> TrainingGraph:
    """Rewrite a deployable ``graph`` (not edited) into the forward graph ORT fine-tunes.

    ``frozen`` names initializers that should not train although they are weights. Raises
    `PlinioOnnxError` naming the node and op for what ORT's training API cannot differentiate
    (QONNX ``Quant`` nodes, ``ai.plinio`` nodes, quantizers of another shape than Q → DQ).
    """
    graph = graph.copy()
    _refuse_foreign_domains(graph)
    _name_nodes(graph)
    quantized = any(node.op in ("QuantizeLinear", "DequantizeLinear") for node in graph.nodes)
    weights: set[str] = set()
    fixed: set[str] = set()   # constants the rewrites add that must not train
    if quantized:
        weights, fixed = _fake_quantize_weights(graph, _weight_bits(graph))
        fixed |= _fake_quantize_activations(graph)
    _freeze_batchnorm(graph)
    fixed |= _average_pools_as_convolutions(graph)
    _layer_norm_statistics(graph)
    model = graph.to_onnx(check=False)
    if quantized and all(o.domain != _MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(_MS_DOMAIN, 1))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise PlinioOnnxError(f"the graph prepared for training fails the ONNX checker: "
                              f"{' '.join(str(err).split())[:300]}", file=graph.source) from None
    trainable, frozen_names = _split_parameters(model, set(frozen), fixed, weights)
    return TrainingGraph(model, tuple(trainable), tuple(frozen_names), quantized)


def _name_nodes(graph: Graph) -> None:
    """Every node gets a name: the rewrites name what they write after the node they replace."""
    for index, node in enumerate(graph.nodes):
        if not node.name:
            node.name = f"{node.op}_{index}"


def _refuse_foreign_domains(graph: Graph) -> None:
    foreign = [n for n in graph.nodes if (n.domain or "") not in ("", "ai.onnx")]
    if foreign:
        node = foreign[0]
        what = ("a searchable model: export it first" if node.domain == "ai.plinio" else
                "QONNX Quant nodes have no gradient in ONNX Runtime: export the QDQ format "
                "(format='qdq') for fine-tuning" if node.op == "Quant" else
                f"ops of domain {node.domain!r} have no gradient in ONNX Runtime")
        raise PlinioOnnxError(f"{len(foreign)} node(s) outside the ONNX domain; {what}",
                              file=graph.source, node=node.name, op=node.op)


# -- ops whose ORT gradient needs another form -----------------------------------------------------
def _average_pools_as_convolutions(graph: Graph) -> set[str]:
    """AveragePool → a depthwise Conv with a frozen 1/k kernel (the same sums and divisor).

    ORT 1.19's AveragePoolGrad sizes its result from the graph's static shapes, so a symbolic
    batch dimension crashes it; ConvGrad takes the runtime shape. Exact where the divisor is the
    kernel size: count_include_pad=1 or no padding, and no ceil_mode. Returns the kernels' names.
    """
    kernels: set[str] = set()
    for node in [n for n in graph.gs.nodes if n.op == "AveragePool"]:
        x = node.inputs[0]
        kernel = list(node.attrs["kernel_shape"])
        pads = list(node.attrs.get("pads", [0] * 2 * len(kernel)))
        auto_pad = node.attrs.get("auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        padded = any(pads) or auto_pad not in ("NOTSET", "VALID")
        channels = x.shape[1] if x.shape is not None and len(x.shape) > 1 else None
        if (padded and not node.attrs.get("count_include_pad", 0)) or node.attrs.get("ceil_mode", 0) \
                or not isinstance(channels, (int, np.integer)):
            raise PlinioOnnxError(
                "ONNX Runtime training differentiates AveragePool only with a static batch size; "
                "as a convolution it needs a known channel count, no ceil_mode and, with "
                "padding, count_include_pad=1", file=graph.source, node=node.name, op=node.op)
        weight = gs.Constant(f"{node.name}.averaging_kernel", np.full(
            [int(channels), 1] + kernel, 1.0 / float(np.prod(kernel)), dtype=np.float32))
        attrs = {"kernel_shape": kernel, "strides": list(node.attrs.get("strides", [1] * len(kernel))),
                 "dilations": list(node.attrs.get("dilations", [1] * len(kernel))), "group": int(channels)}
        attrs.update({"pads": pads} if auto_pad == "NOTSET" else {"auto_pad": auto_pad})
        graph.gs.nodes.append(gs.Node("Conv", node.name, inputs=[x, weight], outputs=list(node.outputs),
                                      attrs=attrs))
        node.inputs.clear()
        node.outputs.clear()
        kernels.add(weight.name)
    graph.gs.cleanup().toposort()
    return kernels


def _layer_norm_statistics(graph: Graph) -> None:
    """LayerNormalization's optional Mean and InvStdDev outputs, which its ORT gradient reads."""
    for node in [n for n in graph.gs.nodes if n.op == "LayerNormalization" and len(n.outputs) < 3]:
        while len(node.outputs) < 3:
            node.outputs.append(gs.Variable(f"{node.name}.statistic{len(node.outputs)}", dtype=np.float32))


# -- batch normalization -------------------------------------------------------------------------
def _freeze_batchnorm(graph: Graph) -> None:
    """Each inference-mode BatchNormalization → Mul(factor) → Add(shift), statistics folded in."""
    g = graph.gs
    for node in [n for n in g.nodes if n.op == "BatchNormalization"]:
        x, y = node.inputs[0], node.outputs[0]
        if node.attrs.get("training_mode", 0) or len(node.outputs) > 1:
            raise PlinioOnnxError("BatchNormalization in training mode cannot be frozen",
                                  file=graph.source, node=node.name, op=node.op)
        params = node.inputs[1:5]
        if not all(isinstance(t, gs.Constant) for t in params) or x.shape is None:
            raise PlinioOnnxError("BatchNormalization needs constant scale, bias, mean and variance "
                                  "and an input of known rank to be frozen",
                                  file=graph.source, node=node.name, op=node.op)
        scale, bias, mean, var = (np.asarray(t.values, dtype=np.float64) for t in params)
        factor = scale / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
        shift = bias - mean * factor
        # per channel on axis 1 of an N×C×... input
        broadcast = (-1,) + (1,) * (len(x.shape) - 2)
        dtype = np.asarray(params[0].values).dtype
        factor_c = gs.Constant(f"{node.name}.factor", factor.reshape(broadcast).astype(dtype))
        shift_c = gs.Constant(f"{node.name}.shift", shift.reshape(broadcast).astype(dtype))
        scaled = gs.Variable(f"{node.name}.scaled", dtype=y.dtype, shape=y.shape)
        g.nodes.append(gs.Node("Mul", f"{node.name}.mul", inputs=[x, factor_c], outputs=[scaled]))
        g.nodes.append(gs.Node("Add", f"{node.name}.add", inputs=[scaled, shift_c], outputs=[y]))
        node.outputs.clear()
        node.inputs.clear()
    g.cleanup().toposort()


# -- QDQ ------------------------------------------------------------------------------------------
def _weight_bits(graph: Graph) -> dict[str, np.ndarray]:
    """Layer name → its weights' bit-width(s) from the MPS export metadata (empty without it)."""
    bits = BitWidths.of(graph)
    if bits is None:
        return {}
    return {name: np.asarray(entry.weight_bits, dtype=np.int64) for name, entry in bits.layers.items()}


def _fake_quant(g: gs.Graph, name: str, x: gs.Tensor, y: gs.Tensor, scale: gs.Constant,
                zero_point: float, low: int, high: int) -> gs.Constant:
    """``y = FakeQuant(x)``: s·(clamp(round(x/s) + z, low, high) − z); returns its zero point."""
    zero = gs.Constant(f"{name}.zero_point", np.array(zero_point, np.float32))
    mask = gs.Variable(f"{name}.mask", dtype=np.bool_, shape=y.shape)
    g.nodes.append(gs.Node("FakeQuant", name, inputs=[x, scale, zero], outputs=[y, mask],
                           attrs={"quant_min": int(low), "quant_max": int(high)},
                           domain=_MS_DOMAIN))
    return zero


def _fake_quantize_activations(graph: Graph) -> set[str]:
    """Q → [Clip] → DQ on an activation → one FakeQuant with the same scale, zero point and
    integer range; returns the names of the constants it wrote (frozen)."""
    g = graph.gs
    constants: set[str] = set()
    for q in [n for n in g.nodes if n.op == "QuantizeLinear"]:
        chain, clip = _quantize_chain(graph, q)
        scale = np.asarray(q.inputs[1].values, dtype=np.float32)
        if scale.size != 1:
            raise PlinioOnnxError("fine-tuning takes per-tensor activation quantizers only",
                                  file=graph.source, node=q.name, op=q.op)
        zero = np.asarray(q.inputs[2].values) if len(q.inputs) > 2 else np.array(0, np.uint8)
        low, high = _integer_range(graph, q.inputs[2] if len(q.inputs) > 2 else None, zero.dtype) \
            if clip is None else \
            (int(np.asarray(clip.inputs[1].values)), int(np.asarray(clip.inputs[2].values)))
        scale_c = gs.Constant(f"{q.name}.fake_quant_scale", scale.reshape(()))
        x, y = q.inputs[0], chain[-1].outputs[0]
        for node in chain:
            node.inputs.clear()
            node.outputs.clear()
        zero_c = _fake_quant(g, f"{q.name}.fake_quant", x, y, scale_c, float(zero.reshape(-1)[0]), low, high)
        constants |= {scale_c.name, zero_c.name}
    g.cleanup().toposort()
    return constants


def _integer_range(graph: Graph, tensor: gs.Tensor | None, dtype: np.dtype) -> tuple[int, int]:
    """The integer range of a quantized tensor's type (int4/uint4 are held as int8/uint8)."""
    narrow = graph.gs.__dict__.get("sub_byte_types", {}).get(tensor.name) if tensor is not None else None
    if narrow == onnx.TensorProto.INT4:
        return -8, 7
    if narrow == onnx.TensorProto.UINT4:
        return 0, 15
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def _quantize_chain(graph: Graph, q: gs.Node) -> tuple[list[gs.Node], gs.Node | None]:
    """The nodes Q → [Clip] → DQ from ``q`` (and the Clip); an error for any other shape."""
    chain, clip = [q], None
    node = q
    while True:
        readers = list(node.outputs[0].outputs)
        if len(readers) != 1 or node.outputs[0] in graph.gs.outputs:
            break
        node = readers[0]
        chain.append(node)
        if node.op == "Clip" and clip is None and len(node.inputs) == 3:
            clip = node
            continue
        if node.op == "DequantizeLinear":
            return chain, clip
        break
    raise PlinioOnnxError("fine-tuning needs every QuantizeLinear read by one DequantizeLinear "
                          "(optionally through one Clip)", file=graph.source, node=q.name, op=q.op)


def _fake_quantize_weights(graph: Graph, bits: dict[str, np.ndarray]) -> tuple[set[str], set[str]]:
    """Integer constants under DequantizeLinear → float initializers: a layer's weights and
    bias fake-quantized, any other constant plain. Returns (parameters, quantizer constants)."""
    g = graph.gs
    weights: set[str] = set()
    constants: set[str] = set()
    for dq in [n for n in g.nodes if n.op == "DequantizeLinear" and isinstance(n.inputs[0], gs.Constant)]:
        stored = dq.inputs[0]
        scale = np.asarray(dq.inputs[1].values, dtype=np.float32)
        zero = np.asarray(dq.inputs[2].values) if len(dq.inputs) > 2 else np.zeros((), np.int64)
        q = np.asarray(stored.values)
        along = [1] * q.ndim
        if scale.size > 1:
            along[int(dq.attrs.get("axis", 1)) % q.ndim] = -1
        zero_b = zero.astype(np.float32).reshape(along if zero.size > 1 else ())
        # the exact float values DequantizeLinear computes
        value = gs.Constant(f"{stored.name}.float", ((q.astype(np.float32) - zero_b) * scale.reshape(
            along if scale.size > 1 else ())).astype(np.float32))
        readers = list(dq.outputs[0].outputs)
        is_parameter = q.dtype in (np.int8, np.uint8, np.int32) and readers and all(
            i in _QUANTIZED_PARAMETER_INPUTS.get(r.op, ()) for r in readers
            for i, t in enumerate(r.inputs) if t is dq.outputs[0])
        if not is_parameter:  # another constant: a plain float initializer
            _replace(dq, value)
            continue
        if np.any(zero != 0):
            raise PlinioOnnxError("fine-tuning needs symmetric weight quantization (zero point 0)",
                                  file=graph.source, node=dq.name, op=dq.op)
        weights.add(value.name)
        # the recorded bit-widths are the weights'; a bias (int32) keeps its container's range
        layer_bits = bits.get(readers[0].name) if q.dtype != np.int32 else None
        constants |= _write_weight_fake_quant(g, dq, value, scale, along, layer_bits,
                                              _integer_range(graph, stored, q.dtype))
    g.cleanup().toposort()
    return weights, constants


def _write_weight_fake_quant(g: gs.Graph, dq: gs.Node, weight: gs.Constant, scale: np.ndarray,
                             along: list[int], bits: np.ndarray | None,
                             container: tuple[int, int]) -> set[str]:
    """W / s → FakeQuant(1, 0, range) [→ Max/Min per channel] → · s, in place of ``dq``.

    FakeQuant takes one scale per tensor: dividing by the per-channel scales first gives the
    same rounding as the per-channel quantizer. Returns the quantizer's constant names."""
    base, out = dq.name, dq.outputs[0]
    if bits is None:  # no recorded bit-width: the container's range
        low, high = np.array([container[0]]), np.array([container[1]])
    else:
        half = np.where(np.atleast_1d(bits) > 0, 2.0 ** (np.atleast_1d(bits) - 1), 0.0)
        low, high = -half, np.maximum(half - 1, 0)
    per_channel = scale.size > 1
    scale_c = gs.Constant(f"{base}.scale", scale.reshape(along if per_channel else ()))
    unit = gs.Constant(f"{base}.unit_scale", np.array(1.0, np.float32))

    def tensor(suffix: str) -> gs.Variable:
        return gs.Variable(f"{base}.{suffix}", dtype=np.float32, shape=list(weight.shape))

    normalized, rounded = tensor("normalized"), tensor("rounded")
    g.nodes.append(gs.Node("Div", f"{base}.normalize", inputs=[weight, scale_c], outputs=[normalized]))
    zero = _fake_quant(g, f"{base}.fake_quant", normalized, rounded, unit, 0.0,
                       int(low.min()), int(high.max()))
    constants = {scale_c.name, unit.name, zero.name}
    if low.size > 1 and (np.any(low != low.min()) or np.any(high != high.max())):
        # channels of different bit-widths: each clamped to its own range
        lo_c = gs.Constant(f"{base}.low", low.astype(np.float32).reshape(along))
        hi_c = gs.Constant(f"{base}.high", high.astype(np.float32).reshape(along))
        above, clamped = tensor("above_low"), tensor("clamped")
        g.nodes.append(gs.Node("Max", f"{base}.max", inputs=[rounded, lo_c], outputs=[above]))
        g.nodes.append(gs.Node("Min", f"{base}.min", inputs=[above, hi_c], outputs=[clamped]))
        rounded = clamped
        constants |= {lo_c.name, hi_c.name}
    g.nodes.append(gs.Node("Mul", f"{base}.rescale", inputs=[rounded, scale_c], outputs=[out]))
    dq.outputs.clear()
    dq.inputs.clear()
    return constants


def _replace(node: gs.Node, constant: gs.Constant) -> None:
    """Every reader of ``node``'s output reads ``constant`` instead."""
    out = node.outputs[0]
    for reader in list(out.outputs):
        for i, tensor in enumerate(reader.inputs):
            if tensor is out:
                reader.inputs[i] = constant
    node.outputs.clear()
    node.inputs.clear()


# -- which parameters train ---------------------------------------------------------------------
def _split_parameters(model: onnx.ModelProto, frozen: set[str], fixed: set[str],
                      weights: set[str]) -> tuple[list[str], list[str]]:
    """Float initializers read only at weight/bias positions (and the fake-quantized
    ``weights``) train; the others, the user's ``frozen`` and the rewrites' ``fixed`` constants
    (quantizers, averaging kernels) not."""
    floats = {t.name: t for t in model.graph.initializer
              if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                                 onnx.TensorProto.FLOAT16)}
    unknown = frozen - set(floats)
    if unknown:
        raise PlinioOnnxError(f"no float initializer named {sorted(unknown)} to freeze",
                              file=model.graph.name)
    trainable_positions: dict[str, bool] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name not in floats:
                continue
            tensor = floats[name]
            ok = i in PARAMETER_INPUTS.get(node.op_type, ()) and not (
                node.op_type in _ELEMENTWISE and int(np.prod(tensor.dims)) <= 1)
            ok = ok or name in weights
            trainable_positions[name] = trainable_positions.get(name, True) and ok
    trainable = [name for name, ok in trainable_positions.items()
                 if ok and name not in frozen and name not in fixed]
    return trainable, [name for name in floats if name not in trainable]
