"""MPS's functions (PLiNIO's mixed-precision search: "Channel-wise Mixed-precision Assignment for
DNN Inference on Constrained Edge Nodes"; "Joint Pruning and Channel-wise Mixed-Precision
Quantization for Efficient Deep Neural Networks", after EdMIPS): fake quantizers whose precision
is a softmax choice among candidate bit-widths.

Choice. A quantizer holds logits α over its precisions P (per layer: [|P|]; per output channel:
[|P|, C]). In training θ follows the quantizer's ``sampling`` (`plinio_onnx.functions.relaxation`:
softmax(α/T), hard, Gumbel) and the output is Σ_p θ_p·Q_p(x). **In eval the choice is always
one-hot argmax**: the module then computes exactly the exported network (first maximum wins, as
ONNX ``ArgMax`` and torch agree).

Quantizers (round half to even, the ONNX ``Round`` / ``QuantizeLinear`` rounding):

* ``MPSActQuant(x, alpha, clip, temperature) -> (y, scale)``: PACT with a learned clip c_p per
  precision (``clip`` [|P|]). Unsigned (after ReLU-like producers): s = c/(2^b−1),
  q = clamp(round(x/s), 0, 2^b−1). Signed: symmetric narrow range, s = c/(2^(b−1)−1),
  q = clamp(round(x/s), −(2^(b−1)−1), 2^(b−1)−1). y = q·s. Gradients (PACT): x where it lies
  inside the clip range, c where x is clipped (signed: ±), θ through Q_p(x).
  ``scale`` is s of the chosen precision (training: Σ θ_p s_p), for the bias quantizer.
* ``MPSWeightQuant(W, alpha, temperature) -> (y, scale)``: symmetric min-max, recomputed every
  forward from the detached W: s = 2·max|W|/(2^b−1) per output channel (or per tensor; a zero
  range gives s = 1), q = clamp(round(W/s), −2^(b−1), 2^(b−1)−1), y = q·s, straight-through
  gradient into W. b = 0 (pruning) gives y = 0 and s = 0. ``scale`` is [C] per channel or [1].
* ``MPSBiasQuant(b, s_in, s_w) -> y``: bias at 32 bits in scale s_b = s_in·s_w:
  y = round(b/s_b)·s_b (0 where s_b = 0), straight-through.

Every straight-through estimator is written ``value + (x − x.detach())``, or as a custom autograd
function that hands the gradient on, so the forward value is bit-exactly ``value``. Eval (and a
frozen search, `FIXED`) runs the ONNX body's ops in its order, so the module, the searchable
graph and the export agree bit for bit; training-mode activation quantizers multiply by 1/s
instead of dividing by s (faster; it only differs on exact ties).
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from .. import host
from ..graph import PLINIO_DOMAIN
from ..to_torch.context import NodeContext
from ..to_torch.registry import Unsupported, register
from . import make_function
from .mps_device import DeviceActQuant, DeviceWeightQuant
from .mps_train import ActPlan, MixedActQuant, Scratch
from .mps_weights import MixedWeightQuant, WeightPlan
from .relaxation import FIXED, SAMPLINGS, SOFTMAX, choice_weights, is_sampling, sampling_mode

ACT_QUANT = "MPSActQuant"
WEIGHT_QUANT = "MPSWeightQuant"
BIAS_QUANT = "MPSBiasQuant"

#: Smallest activation clip: keeps the scale positive whatever the optimizer does to c.
MIN_CLIP = 1e-4
#: int32 bias bounds that float32 represents exactly (2^31 − 128).
BIAS_LIMIT = 2147483520.0


# -- integer ranges ---------------------------------------------------------------------------
def act_range(bits: int, signed: bool) -> tuple[int, int]:
    """(qmin, qmax) of an activation quantizer: unsigned full range, signed symmetric narrow."""
    if signed:
        top = 2 ** (bits - 1) - 1
        return -top, top
    return 0, 2 ** bits - 1


def weight_range(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of a weight quantizer: the full signed range."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


# -- ONNX bodies ------------------------------------------------------------------------------
def _const(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value)))


def _attr_const(output: str, attribute: str, kind: int, field: str) -> onnx.NodeProto:
    node = helper.make_node("Constant", [], [output])
    ref = onnx.AttributeProto()
    ref.name, ref.ref_attr_name, ref.type = field, attribute, kind
    node.attribute.append(ref)
    return node


def _reduce_max(src: str, dst: str) -> onnx.NodeProto:
    """ReduceMax(keepdims=1) over the axes named by the function's ``reduce_axes`` attribute
    (an attribute up to opset 17)."""
    node = helper.make_node("ReduceMax", [src], [dst], keepdims=1)
    ref = onnx.AttributeProto()
    ref.name, ref.ref_attr_name, ref.type = "axes", "reduce_axes", onnx.AttributeProto.INTS
    node.attribute.append(ref)
    return node


def act_quant_function() -> onnx.FunctionProto:
    f32 = np.float32
    nodes = [
        _attr_const("bits", "bits", onnx.AttributeProto.INTS, "value_ints"),
        _attr_const("signed_i", "signed", onnx.AttributeProto.INT, "value_int"),
        helper.make_node("Cast", ["signed_i"], ["signed_f"], to=TensorProto.FLOAT),
        helper.make_node("ArgMax", ["alpha"], ["idx"], axis=0, keepdims=1),
        helper.make_node("Gather", ["bits", "idx"], ["b_i"], axis=0),
        helper.make_node("Cast", ["b_i"], ["b"], to=TensorProto.FLOAT),
        _const("two", f32(2.0)), _const("one", f32(1.0)), _const("min_clip", f32(MIN_CLIP)),
        helper.make_node("Sub", ["b", "signed_f"], ["e"]),
        helper.make_node("Pow", ["two", "e"], ["p"]),
        helper.make_node("Sub", ["p", "one"], ["qmax"]),
        helper.make_node("Mul", ["qmax", "signed_f"], ["neg_qmin"]),
        helper.make_node("Neg", ["neg_qmin"], ["qmin"]),
        helper.make_node("Gather", ["clip", "idx"], ["c_raw"], axis=0),
        helper.make_node("Max", ["c_raw", "min_clip"], ["c"]),
        helper.make_node("Div", ["c", "qmax"], ["scale"]),
        helper.make_node("Div", ["x", "scale"], ["xs"]),
        helper.make_node("Round", ["xs"], ["r"]),
        helper.make_node("Max", ["r", "qmin"], ["r_lo"]),
        helper.make_node("Min", ["r_lo", "qmax"], ["q"]),
        helper.make_node("Mul", ["q", "scale"], ["y"]),
    ]
    return make_function(ACT_QUANT, ["x", "alpha", "clip", "temperature"], ["y", "scale"], nodes,
                         ["bits", "signed", "sampling"])


def weight_quant_function() -> onnx.FunctionProto:
    f32 = np.float32
    nodes = [
        _attr_const("bits", "bits", onnx.AttributeProto.INTS, "value_ints"),
        helper.make_node("ArgMax", ["alpha"], ["idx"], axis=0, keepdims=0),
        helper.make_node("Gather", ["bits", "idx"], ["b_i"], axis=0),
        helper.make_node("Cast", ["b_i"], ["b_flat"], to=TensorProto.FLOAT),
        helper.make_node("Abs", ["W"], ["absw"]),
        _reduce_max("absw", "m"),
        helper.make_node("Shape", ["m"], ["m_shape"]),
        helper.make_node("Reshape", ["b_flat", "m_shape"], ["b"]),
        _const("zero", f32(0.0)), _const("one", f32(1.0)), _const("two", f32(2.0)),
        _const("flat", np.array([-1], np.int64)),
        helper.make_node("Pow", ["two", "b"], ["p"]),
        helper.make_node("Sub", ["p", "one"], ["levels"]),
        helper.make_node("Max", ["levels", "one"], ["levels_safe"]),
        helper.make_node("Mul", ["m", "two"], ["range"]),
        helper.make_node("Div", ["range", "levels_safe"], ["s_raw"]),
        helper.make_node("Greater", ["m", "zero"], ["nonzero"]),
        helper.make_node("Where", ["nonzero", "s_raw", "one"], ["s"]),
        helper.make_node("Sub", ["b", "one"], ["b_1"]),
        helper.make_node("Pow", ["two", "b_1"], ["half"]),
        helper.make_node("Neg", ["half"], ["qmin"]),
        helper.make_node("Sub", ["half", "one"], ["qmax"]),
        helper.make_node("Div", ["W", "s"], ["ws"]),
        helper.make_node("Round", ["ws"], ["r"]),
        helper.make_node("Max", ["r", "qmin"], ["r_lo"]),
        helper.make_node("Min", ["r_lo", "qmax"], ["q"]),
        helper.make_node("Mul", ["q", "s"], ["wq"]),
        helper.make_node("Greater", ["b", "zero"], ["keep"]),
        helper.make_node("Where", ["keep", "wq", "zero"], ["y"]),
        helper.make_node("Where", ["keep", "s", "zero"], ["s_kept"]),
        helper.make_node("Reshape", ["s_kept", "flat"], ["scale"]),
    ]
    return make_function(WEIGHT_QUANT, ["W", "alpha", "temperature"], ["y", "scale"], nodes,
                         ["bits", "axis", "reduce_axes", "sampling"])


def bias_quant_function() -> onnx.FunctionProto:
    f32 = np.float32
    nodes = [
        _const("zero", f32(0.0)), _const("lo", f32(-BIAS_LIMIT)), _const("hi", f32(BIAS_LIMIT)),
        helper.make_node("Mul", ["s_in", "s_w"], ["sb"]),
        helper.make_node("Div", ["b", "sb"], ["bs"]),
        helper.make_node("Round", ["bs"], ["r"]),
        helper.make_node("Max", ["r", "lo"], ["r_lo"]),
        helper.make_node("Min", ["r_lo", "hi"], ["q"]),
        helper.make_node("Mul", ["q", "sb"], ["bq"]),
        helper.make_node("Greater", ["sb", "zero"], ["keep"]),
        helper.make_node("Where", ["keep", "bq", "zero"], ["y"]),
    ]
    return make_function(BIAS_QUANT, ["b", "s_in", "s_w"], ["y"], nodes)


def functions() -> list[onnx.FunctionProto]:
    return [act_quant_function(), weight_quant_function(), bias_quant_function()]


# -- the quantizers at one precision (shared by torch, finalize and the tests) ----------------
def act_scale(clip: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """s = max(c, MIN_CLIP) / qmax (float32, as the ONNX body and the exported scale)."""
    return clip.clamp_min(MIN_CLIP) / float(act_range(bits, signed)[1])


def act_integers(x: torch.Tensor, scale: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """clamp(round(x/s), qmin, qmax): the integers QuantizeLinear (+ Clip) produces."""
    lo, hi = act_range(bits, signed)
    return torch.clamp(torch.round(x / scale), lo, hi)


def act_fake_quant(x: torch.Tensor, clip: torch.Tensor, bits: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-exact value (no gradient): (q·s, s), the ops of `act_integers` done in place."""
    scale = act_scale(clip, bits, signed)
    lo, hi = act_range(bits, signed)
    with torch.no_grad():
        y = torch.div(x, scale).round_().clamp_(lo, hi).mul_(scale)
    return y, scale


def act_plan(bits: tuple[int, ...], signed: bool, exact: bool = False) -> ActPlan:
    """The numbers `MixedActQuant` needs for a mixture over ``bits``."""
    return ActPlan(tuple(act_range(b, signed) for b in bits), bool(signed), MIN_CLIP, exact)


def weight_levels(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(2^b − 1 (≥ 1), qmin, qmax) as float tensors for a (broadcast) bit tensor."""
    levels = torch.pow(2.0, bits) - 1.0
    half = torch.pow(2.0, bits - 1.0)
    return levels.clamp_min(1.0), -half, half - 1.0


def weight_quant_values(weight: torch.Tensor, bits: torch.Tensor, reduce_axes: list[int]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, s, keep) for ``weight`` (detached) at ``bits`` (float, broadcast like the reduced max).

    q: integers (float dtype) with 0 where b = 0; s: scales (0 where b = 0), broadcast shape;
    keep: b > 0. The ONNX body computes the same ops in the same order."""
    w = weight.detach()
    m = w.abs().amax(dim=reduce_axes, keepdim=True)
    bits = bits.to(w.dtype).reshape(m.shape) if bits.numel() == m.numel() else bits.to(w.dtype)
    levels, qmin, qmax = weight_levels(bits)
    s = torch.where(m > 0, (m * 2.0) / levels, torch.ones_like(m))
    q = torch.minimum(torch.maximum(torch.round(w / s), qmin), qmax)
    keep = bits > 0
    zero = torch.zeros((), dtype=w.dtype)
    return torch.where(keep, q, zero), torch.where(keep, s, zero), keep


def weight_fake_quant(weight: torch.Tensor, bits: torch.Tensor, reduce_axes: list[int]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q·s with a straight-through gradient into ``weight``, per-channel/tensor scale)."""
    q, s, keep = weight_quant_values(weight, bits, reduce_axes)
    value = torch.where(keep, q * s, torch.zeros((), dtype=q.dtype))
    return value + (weight - weight.detach()), s


def bias_integers(bias: torch.Tensor, s_in: torch.Tensor, s_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(round(b/s_b) clamped to int32, s_b = s_in·s_w) from detached values."""
    sb = s_in.detach() * s_w.detach()
    q = torch.clamp(torch.round(bias.detach() / sb), -BIAS_LIMIT, BIAS_LIMIT)
    return q, sb


class _BiasQuant(torch.autograd.Function):
    """round(b/s_b)·s_b (0 where s_b = 0) with a straight-through gradient into b: one autograd
    node and in-place ops (a layer runs it every step; the ops are tiny, so their count is the cost)."""

    @staticmethod
    def forward(ctx, bias: torch.Tensor, s_in: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
        sb = s_in.detach() * s_w.detach()
        value = torch.div(bias.detach(), sb).round_().clamp_(-BIAS_LIMIT, BIAS_LIMIT).mul_(sb)
        return value.masked_fill_(sb <= 0, 0.0)   # (where s_b = 0 the division gave inf or NaN)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


def bias_quant(bias: torch.Tensor, s_in: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    """The quantized bias (`bias_integers`' q·s_b, 0 where s_b = 0), straight-through into ``bias``."""
    return _BiasQuant.apply(bias, s_in, s_w)


def chosen_weight_bits(alpha: np.ndarray, bits) -> np.ndarray:
    """The argmax precision (first maximum): a scalar for per-layer α [P], [C] for α [P, C]."""
    return np.asarray(bits)[np.argmax(np.asarray(alpha), axis=0)]


def broadcast_bits(values: torch.Tensor, rank: int, axis: int) -> torch.Tensor:
    """[C] (or a scalar) → the shape of a per-channel max: C on ``axis``, 1 elsewhere."""
    if values.dim() == 0 or axis < 0:
        return values.reshape([1] * rank)
    shape = [1] * rank
    shape[axis] = -1
    return values.reshape(shape)


# -- torch modules ----------------------------------------------------------------------------
class ActQuantizer(torch.nn.Module):
    """Torch side of ``MPSActQuant`` (see the module docstring). ``calibrating``: pass x through
    unchanged and record its range (used by `plinio_onnx.methods.mps.MPS.calibrate`)."""

    def __init__(self, bits: tuple[int, ...], signed: bool, sampling: str) -> None:
        super().__init__()
        self.bits, self.signed, self.sampling = tuple(bits), bool(signed), sampling
        self.calibrating = False
        self.observed: list[torch.Tensor] = []
        self.clip_id: int | None = None   # id() of the clip parameter seen while calibrating
        self._scratch = Scratch()
        self._mixture = act_plan(self.bits, self.signed)
        self._single = [act_plan((b,), self.signed, exact=True) for b in self.bits]  # eval's ops
        self._on_device = DeviceActQuant(self._mixture, act_plan(self.bits, self.signed, exact=True))

    def forward(self, x, alpha, clip, temperature):
        if self.calibrating:
            self.observed.append(x.detach().flatten()[::max(1, x.numel() // 16384)].clone())
            self.clip_id = id(clip)
            p = int(alpha.argmax())  # biases meanwhile see the eval-time scale
            return x, act_scale(clip[p:p + 1].detach(), self.bits[p], self.signed)
        if not host.runs_on_host(x):  # the same without host reads (see mps_device)
            return self._on_device(x, alpha, clip, temperature, self.sampling, self.training)
        if not self.training or self.sampling == FIXED:  # argmax, as exported (PACT gradients still)
            p = int(alpha.argmax())
            if not (torch.is_grad_enabled() and (x.requires_grad or clip.requires_grad)):
                return act_fake_quant(x, clip[p:p + 1], self.bits[p], self.signed)
            one = torch.ones(1, dtype=x.dtype, device=x.device)
            return MixedActQuant.apply(x, one, clip[p:p + 1], self._single[p], self._scratch)
        theta = choice_weights(alpha, temperature, self.sampling, True)
        return MixedActQuant.apply(x, theta, clip, self._mixture, self._scratch)


class WeightQuantizer(torch.nn.Module):
    """Torch side of ``MPSWeightQuant``: per-layer (α [P]) or per-channel (α [P, C]) choice."""

    def __init__(self, bits: tuple[int, ...], axis: int, reduce_axes: list[int], sampling: str) -> None:
        super().__init__()
        self.bits, self.axis, self.reduce_axes, self.sampling = tuple(bits), axis, list(reduce_axes), sampling
        self._plan = WeightPlan(self.bits, axis, tuple(self.reduce_axes))
        self._on_device = DeviceWeightQuant(self._plan)

    def forward(self, weight, alpha, temperature):
        if not self.training or self.sampling == FIXED:
            table, rank = self._on_device.table(weight), weight.dim()   # (made once per device)
            bits = broadcast_bits(table[alpha.argmax(0)], rank, self.axis)
            y, s = weight_fake_quant(weight, bits, self.reduce_axes)
            return y, s.reshape(-1)
        theta = choice_weights(alpha, temperature, self.sampling, True)  # [P] or [P, C]
        if not host.runs_on_host(weight):  # the same without host reads (see mps_device)
            return self._on_device(weight, theta)
        return MixedWeightQuant.apply(weight, theta, self._plan)


# -- handlers ---------------------------------------------------------------------------------
def _ints(value) -> tuple[int, ...]:
    return tuple(int(v) for v in (value if isinstance(value, (list, tuple, np.ndarray)) else [value]))


def _sampling(ctx: NodeContext) -> str:
    value = ctx.attr("sampling", SOFTMAX)
    if not is_sampling(value):
        raise Unsupported(f"unknown sampling {value!r}; choose from {SAMPLINGS}")
    return sampling_mode(value)


@register(ACT_QUANT, domain=PLINIO_DOMAIN)
def _act_quant_handler(ctx: NodeContext):
    bits = _ints(ctx.attr("bits"))
    module = ActQuantizer(bits, bool(ctx.attr("signed", 0)), _sampling(ctx))
    out = ctx.module(module, ctx.input(0), ctx.input(1, trainable=len(bits) > 1),
                     ctx.input(2, trainable=True), ctx.input(3, trainable=False))
    return [ctx.getitem(out, 0), ctx.getitem(out, 1)]


@register(WEIGHT_QUANT, domain=PLINIO_DOMAIN)
def _weight_quant_handler(ctx: NodeContext):
    bits = _ints(ctx.attr("bits"))
    module = WeightQuantizer(bits, int(ctx.attr("axis", -1)), list(_ints(ctx.attr("reduce_axes"))),
                             _sampling(ctx))
    out = ctx.module(module, ctx.input(0), ctx.input(1, trainable=len(bits) > 1),
                     ctx.input(2, trainable=False))
    return [ctx.getitem(out, 0), ctx.getitem(out, 1)]


@register(BIAS_QUANT, domain=PLINIO_DOMAIN)
def _bias_quant_handler(ctx: NodeContext):
    return ctx.call(bias_quant, ctx.input(0, trainable=True), ctx.input(1), ctx.input(2))
