"""The QDQ writer: MPS quantizers at their chosen precisions as standard ONNX QuantizeLinear /
DequantizeLinear (what ONNX Runtime fuses into integer kernels).

* Weights are stored already quantized: an int8 initializer (sub-8-bit values sit in int8
  restricted to their range) with per-axis (or per-tensor) scales, then ``DequantizeLinear`` →
  the layer. ``int4`` (`INT4_MODES`) decides where a layer whose channels all chose ≤ 4 bits is
  stored as INT4 instead: ``"off"`` (default) never — int8 containers are what ONNX Runtime
  fuses and what TVM and IREE read; ``"auto"`` where the model's opset is already ≥ 21 (INT4 in
  ``DequantizeLinear`` needs opset 21); ``"on"`` always, raising the model to opset 21 with
  onnx's version converter first where it is lower.
* Biases: int32 in the scale s_in·s_w, then ``DequantizeLinear`` (what ONNX Runtime's QDQ
  fusion expects of a Conv/Gemm bias).
* Activations: ``QuantizeLinear`` (uint8 unsigned / int8 signed, zero point 0) →
  ``Clip`` to the chosen range where it is narrower than the container → ``DequantizeLinear``.

int4 weights are written as int8 first and packed by `finish`, after any channel slicing.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx.version_converter
import onnx_graphsurgeon as gs
import torch

from plinio_onnx.errors import PassError
from plinio_onnx.functions import mps as fn
from plinio_onnx.graph import Graph
from plinio_onnx.records import QuantizedLayer

from .precision import ChosenLayer


INT4_MODES = ("off", "auto", "on")
INT4_OPSET = 21


def int4_mode(value: "str | bool | None") -> str:
    """``"off"``, ``"auto"`` or ``"on"`` (True means "auto", False and None "off")."""
    if value is None or isinstance(value, bool):
        return "auto" if value else "off"
    mode = str(value).lower()
    if mode not in INT4_MODES:
        raise PassError(f"int4={value!r}: choose from {', '.join(INT4_MODES)}")
    return mode


def raise_opset_for_int4(graph: Graph) -> None:
    """Convert ``graph`` in place to opset 21 (onnx's version converter), so that its weights may
    be INT4; its functions and metadata are kept."""
    converted = onnx.version_converter.convert_version(graph.to_onnx(check=False), INT4_OPSET)
    sub_byte = dict(graph.gs.__dict__.get("sub_byte_types", {}))
    graph.gs = gs.import_onnx(converted)
    graph.gs.sub_byte_types = sub_byte


class QDQWriter:
    """Writes one quantized graph's QDQ nodes; ``int4``: pack ≤ 4-bit weights as INT4."""

    format = "qdq"

    def __init__(self, *, int4: bool) -> None:
        self.int4 = int4
        self._packed: list[gs.Node] = []  # int4 DequantizeLinear nodes, packed once sliced

    def activation(self, g: gs.Graph, x: gs.Tensor, y: gs.Tensor, scale: torch.Tensor, bits: int,
                   signed: bool, name: str) -> None:
        dtype = np.int8 if signed else np.uint8
        lo, hi = fn.act_range(bits, signed)
        info = np.iinfo(dtype)
        s = gs.Constant(f"{name}/scale", np.array(float(scale[0]), np.float32))
        zp = gs.Constant(f"{name}/zero_point", np.array(0, dtype))
        q = gs.Variable(f"{name}/q", dtype=dtype)
        g.nodes.append(gs.Node("QuantizeLinear", name=f"{name}/quantize", inputs=[x, s, zp], outputs=[q]))
        if lo > info.min or hi < info.max:
            clipped = gs.Variable(f"{name}/q_clip", dtype=dtype)
            g.nodes.append(gs.Node("Clip", name=f"{name}/clip", outputs=[clipped],
                                   inputs=[q, gs.Constant(f"{name}/q_min", np.array(lo, dtype)),
                                           gs.Constant(f"{name}/q_max", np.array(hi, dtype))]))
            q = clipped
        g.nodes.append(gs.Node("DequantizeLinear", name=f"{name}/dequantize", inputs=[q, s, zp], outputs=[y]))

    def weight(self, g: gs.Graph, layer: QuantizedLayer, chosen: ChosenLayer, out: gs.Tensor, name: str) -> None:
        """The weight's DequantizeLinear, with int8 integers (int4: packed in `finish`)."""
        small = self.int4 and int(np.asarray(chosen.bits).max()) <= 4
        base = f"{layer.weight}.{'int4' if small else 'int8'}_{layer.node}"
        per_axis = layer.scale_axis >= 0
        scale = chosen.s_dq
        s = scale.reshape(-1).numpy().astype(np.float32) if per_axis else np.array(float(scale.reshape(-1)[0]), np.float32)
        attrs = {"axis": int(layer.scale_axis)} if per_axis else {}
        dq = gs.Node("DequantizeLinear", name=f"{layer.node}/weight_dequantize", attrs=attrs, outputs=[out],
                     inputs=[gs.Constant(base, chosen.q.numpy().astype(np.int8, copy=False)), gs.Constant(f"{base}/scale", s),
                             gs.Constant(f"{base}/zero_point", np.zeros(s.shape, np.int8))])
        g.nodes.append(dq)
        if small:
            self._packed.append(dq)

    def bias(self, g: gs.Graph, layer: QuantizedLayer, chosen: ChosenLayer, out: gs.Tensor, name: str) -> None:
        _, ints, scale, _ = chosen.bias
        base = f"{layer.bias}.int32_{layer.node}"
        values = ints.numpy().astype(np.int32)
        if scale.numel() > 1:
            s = scale.reshape(-1).numpy().astype(np.float32)
            attrs = {"axis": 0}
        else:
            s = np.array(float(scale.reshape(-1)[0]), np.float32)
            attrs = {}
        g.nodes.append(gs.Node("DequantizeLinear", name=f"{layer.node}/bias_dequantize", attrs=attrs,
                               inputs=[gs.Constant(base, values), gs.Constant(f"{base}/scale", s),
                                       gs.Constant(f"{base}/zero_point", np.zeros(s.shape, np.int32))],
                               outputs=[out]))

    def finish(self, g: gs.Graph) -> None:
        """Pack the ≤ 4-bit weights (and their zero points) as INT4, now that slicing is done."""
        for dq in self._packed:
            dq.inputs[0] = _int4_constant(dq.inputs[0].name, np.asarray(dq.inputs[0].values))
            dq.inputs[2] = _int4_constant(dq.inputs[2].name, np.asarray(dq.inputs[2].values))


def _int4_constant(name: str, values: np.ndarray) -> gs.Constant:
    """An INT4 initializer (onnx packs two values per byte) holding ``values`` in [-8, 7]."""
    from onnx_graphsurgeon.ir.tensor import LazyValues
    packed = onnx.helper.pack_float32_to_4bit(values.reshape(-1).astype(np.float32), signed=True)
    tensor = onnx.helper.make_tensor(name, onnx.TensorProto.INT4, list(values.shape), packed.tobytes(), raw=True)
    return _PackedConstant(name, LazyValues(tensor))


class _PackedConstant(gs.Constant):
    """A constant whose ONNX type numpy lacks (INT4): reading ``values`` gives an int8 copy and
    keeps the packed tensor, so the graph still exports it as INT4 (onnx-graphsurgeon would
    otherwise replace it by the int8 array it loaded)."""

    @property
    def values(self):
        from onnx_graphsurgeon.ir.tensor import LazyValues
        return self._values.load() if isinstance(self._values, LazyValues) else self._values

    @values.setter
    def values(self, values) -> None:
        self._values = values
