"""The catalogue of builtin SuperNet alternatives and how each inherits the original's weights.

Every alternative of a layer (Conv, Gemm, MatMul with a constant weight) reads the layer's input
and writes a tensor of the layer's output shape, so a search can start from a trained model:

* ``kernel:K`` (Conv) — a K×…×K kernel, same stride/dilation. The padding changes by the kernel
  growth so the output shape is kept, and the old kernel sits centred in the new one (offset
  ⌊(K−k)/2⌋ taps, pads shifted by as many dilated taps): a larger kernel is zero-padded and
  computes *exactly* the original; a smaller one is the original's centre crop. Offered only
  where no pad would become negative.
* ``separable`` (Conv, group 1) — depthwise k×k (the original kernel, stride, pads) followed by a
  pointwise 1×1 with the original bias. Init: per input channel i, the best rank-1 approximation
  W[:, i, :] ≈ P[:, i] ⊗ D[i, :] (SVD, balanced √σ₀ on both sides), the least-squares optimal
  depthwise-separable kernel; exact when the kernel is separable.
* ``group:G`` (Conv, group 1) — a grouped conv keeping the block-diagonal part of W (output
  block b reads input block b), the original bias.
* ``rank:R`` — Gemm/MatMul: two layers in→R→out from the truncated SVD W = U S Vᵀ (A = √S Vᵀ,
  B = U √S; at full rank exactly the original, to float rounding). Conv (group 1): a
  conv with R filters (the original kernel and attributes) and a 1×1 conv, from the SVD of
  W reshaped [C_out, C_in·K]. R is an int, or a float fraction of min(in, out). One
  decomposition per layer serves all its ranks, made for the largest when the branches are
  written (big matrices: from the Gram matrix, `plinio_onnx.passes.low_rank`).
* ``identity`` — skip the layer (or a region), where input and output shapes are equal.

A maker ``(region, arg, explicit) -> Candidate | reason`` returns the reason as a string where
the alternative does not apply; with ``explicit`` False (the automatic menu) factorizations
(separable, group, rank given as a fraction) are offered only when they have fewer parameters
than the original. The layer's bias is copied into each alternative: branches share nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from .low_rank import decomposition, svd
from .supernet_regions import Region

__all__ = ["BUILTIN_KINDS", "MAKERS", "Candidate", "Emitter", "parse_builtin", "region_identity"]

BUILTIN_KINDS = ("kernel", "separable", "group", "rank", "identity")
_ALIASES = {"skip": "identity", "dwsep": "separable", "depthwise_separable": "separable",
            "lowrank": "rank", "groups": "group"}


@dataclass
class Candidate:
    """One branch to be: its name and how to write its nodes."""

    name: str
    emit: Callable[["Emitter"], gs.Tensor]   # writes the branch's nodes, returns its output


class Emitter:
    """Writes one branch's nodes into the graph under a name prefix, recording them."""

    def __init__(self, g: gs.Graph, prefix: str, region: Region) -> None:
        self.g, self.prefix, self.region = g, prefix, region
        self.nodes: list[gs.Node] = []
        self.dtype = region.out.dtype or np.float32

    def const(self, name: str, values: np.ndarray) -> gs.Constant:
        """A constant (a trainable weight of the branch) named under the branch's prefix."""
        return gs.Constant(f"{self.prefix}.{name}", np.ascontiguousarray(values))

    def node(self, op: str, name: str, inputs: list, attrs: dict | None = None,
             output: gs.Variable | None = None) -> gs.Variable:
        """Append a node of the branch; returns its (new, unless given) output."""
        out = output or gs.Variable(f"{self.prefix}/{name}_output", dtype=self.dtype)
        node = gs.Node(op, name=f"{self.prefix}/{name}", attrs=dict(attrs or {}), inputs=inputs, outputs=[out])
        self.g.nodes.append(node)
        self.nodes.append(node)
        return out

    def with_bias(self, inputs: list, bias: np.ndarray | None) -> list:
        """``inputs`` plus a copy of the original's bias, where it has one."""
        return inputs + ([self.const("bias", bias.copy())] if bias is not None else [])


# ----------------------------------------------------------------------------------------------
# Conv attributes and factorizations
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Conv:
    """A Conv layer, its weight [C_out, C_in/group, k…] and bias, as every Conv maker reads them."""

    node: gs.Node
    weight: np.ndarray
    bias: np.ndarray | None

    @classmethod
    def of(cls, region: Region) -> "_Conv":
        node = region.layer
        bias = np.asarray(node.inputs[2].values) if len(node.inputs) > 2 and node.inputs[2].name else None
        return cls(node, np.asarray(node.inputs[1].values), bias)

    @classmethod
    def ungrouped(cls, region: Region, refusal: str) -> "_Conv | str":
        """The layer where it has group 1, else ``refusal`` (why the form does not apply)."""
        conv = cls.of(region)
        return conv if conv.group == 1 else refusal

    @property
    def c_out(self) -> int:
        return self.weight.shape[0]

    @property
    def c_in(self) -> int:
        return self.weight.shape[1]

    @property
    def spatial(self) -> int:
        return self.weight.ndim - 2

    @property
    def taps(self) -> int:
        return int(np.prod(self.weight.shape[2:]))

    @property
    def group(self) -> int:
        return int(self.node.attrs.get("group", 1))

    def attrs(self, **changes) -> dict:
        """The original's attributes with ``changes`` and its padding: explicit pads where known,
        else its auto_pad."""
        attrs = _conv_attrs(self.node, self.spatial, **changes)
        if "pads" not in attrs:
            attrs["auto_pad"] = self.node.attrs["auto_pad"]
        return attrs

    def single(self, e: Emitter, weight: np.ndarray, attrs: dict) -> gs.Tensor:
        """One conv in a branch: the layer's input, ``weight`` and ``attrs``, the original's bias."""
        inputs = e.with_bias([e.region.x, e.const("weight", weight)], self.bias)
        return e.node("Conv", "Conv", inputs, attrs)

    def then_pointwise(self, e: Emitter, first: tuple[str, np.ndarray, dict],
                       second: tuple[str, np.ndarray]) -> gs.Tensor:
        """Two convs in a branch: ``first`` (name, weight, attributes) reads the layer's input, then
        a 1×1 ``second`` (name, weight) with the original's bias."""
        (first_name, first_weight, attrs), (second_name, second_weight) = first, second
        h = e.node("Conv", first_name, [e.region.x, e.const(first_name, first_weight)], attrs)
        inputs = e.with_bias([h, e.const(second_name, second_weight)], self.bias)
        return e.node("Conv", second_name, inputs, _pointwise_attrs(self.spatial))


def _conv_pads(node: gs.Node, spatial: int) -> tuple[list[int], list[int]] | None:
    """Explicit (begin, end) pads of a Conv; None when auto_pad needs unknown sizes."""
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", ""):
        pads = list(node.attrs.get("pads", [0] * (2 * spatial)))
        return pads[:spatial], pads[spatial:]
    if auto_pad == "VALID":
        return [0] * spatial, [0] * spatial
    shape = node.inputs[0].shape
    if shape is None or any(not isinstance(d, (int, np.integer)) for d in shape[2:]):
        return None
    weight = node.inputs[1].shape
    strides = list(node.attrs.get("strides", [1] * spatial))
    dilations = list(node.attrs.get("dilations", [1] * spatial))
    begin, end = [], []
    for size, k, s, d in zip(shape[2:], weight[2:], strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(large if auto_pad == "SAME_LOWER" else small)
        end.append(small if auto_pad == "SAME_LOWER" else large)
    return begin, end


def _conv_attrs(node: gs.Node, spatial: int, **changes) -> dict:
    attrs = {"dilations": list(node.attrs.get("dilations", [1] * spatial)),
             "strides": list(node.attrs.get("strides", [1] * spatial)),
             "group": int(node.attrs.get("group", 1))}
    pads = _conv_pads(node, spatial)
    if pads is not None:
        attrs["pads"] = pads[0] + pads[1]
    attrs.update(changes)
    attrs["kernel_shape"] = list(attrs.pop("kernel_shape"))
    return attrs


def _pointwise_attrs(spatial: int) -> dict:
    """A 1×1 convolution's attributes, all explicit (consumers such as qonnx's channels-last
    conversion require strides, pads and dilations even where ONNX has defaults)."""
    return {"kernel_shape": [1] * spatial, "strides": [1] * spatial, "pads": [0] * (2 * spatial),
            "dilations": [1] * spatial, "group": 1}


def _resolve_rank(arg, smallest: int) -> tuple[int, bool] | str:
    """(rank, given as an int); a float is a fraction of ``smallest``."""
    if isinstance(arg, bool) or not isinstance(arg, (int, float, np.integer, np.floating)):
        return f"rank {arg!r} is not a number"
    if isinstance(arg, (float, np.floating)):
        if not 0.0 < arg <= 1.0:
            return f"rank fraction {arg} is not in (0, 1]"
        return max(1, int(round(float(arg) * smallest))), False
    if not 1 <= int(arg) <= smallest:
        return f"rank {int(arg)} is not in [1, {smallest}]"
    return int(arg), True


# ----------------------------------------------------------------------------------------------
# Makers: one per (op, kind), in the `MAKERS` table at the end
# ----------------------------------------------------------------------------------------------
def _conv_kernel(region: Region, size, explicit: bool) -> Candidate | str:
    conv = _Conv.of(region)
    weight, spatial = conv.weight, conv.spatial
    size = int(size)
    kernel = list(weight.shape[2:])
    if size < 1:
        return f"kernel {size} is not positive"
    if all(k == size for k in kernel):
        return f"kernel {size} is the original's"
    pads = _conv_pads(conv.node, spatial)
    if pads is None:
        return "auto_pad with unknown input sizes"
    dilations = list(conv.node.attrs.get("dilations", [1] * spatial))
    offsets = [(size - k) // 2 for k in kernel]
    begin = [b + d * o for b, d, o in zip(pads[0], dilations, offsets)]
    end = [e + d * (size - k - o) for e, d, k, o in zip(pads[1], dilations, kernel, offsets)]
    if min(begin + end) < 0:
        return f"kernel {size} would need negative padding to keep the output shape"
    new = np.zeros(weight.shape[:2] + (size,) * spatial, dtype=weight.dtype)
    src, dst = [slice(None)] * 2, [slice(None)] * 2
    for k, o in zip(kernel, offsets):
        lo, hi = max(0, -o), min(k, size - o)   # original taps that land inside the new kernel
        src.append(slice(lo, hi))
        dst.append(slice(lo + o, hi + o))
    new[tuple(dst)] = weight[tuple(src)]
    attrs = conv.attrs(kernel_shape=[size] * spatial, pads=begin + end)
    return Candidate(f"kernel{size}", lambda e: conv.single(e, new, attrs))


def _conv_separable(region: Region, arg, explicit: bool) -> Candidate | str:
    conv = _Conv.ungrouped(region, "only group-1 convolutions have a depthwise-separable form")
    if isinstance(conv, str):
        return conv
    weight, c_out, c_in, taps = conv.weight, conv.c_out, conv.c_in, conv.taps
    if taps == 1:
        return "a 1×1 convolution has no depthwise-separable form"
    if not explicit and c_in * taps + c_out * c_in >= c_out * c_in * taps:
        return "the depthwise-separable form is not cheaper"
    # Per input channel i: W[:, i, :] (c_out × taps) ≈ σ₀ u₀ v₀ᵀ, the best rank-1 fit.
    per_channel = weight.astype(np.float64).transpose(1, 0, *range(2, weight.ndim)).reshape(c_in, c_out, taps)
    u, s, vt = svd(per_channel)
    root = np.sqrt(s[:, 0])
    depthwise = (root[:, None] * vt[:, 0, :]).reshape((c_in, 1) + weight.shape[2:]).astype(weight.dtype)
    pointwise = (u[:, :, 0] * root[:, None]).T.reshape((c_out, c_in) + (1,) * conv.spatial).astype(weight.dtype)
    attrs = conv.attrs(kernel_shape=weight.shape[2:], group=int(c_in))
    return Candidate("separable", lambda e: conv.then_pointwise(e, ("depthwise", depthwise, attrs),
                                                               ("pointwise", pointwise)))


def _conv_group(region: Region, groups, explicit: bool) -> Candidate | str:
    groups = int(groups)
    conv = _Conv.ungrouped(region, "only group-1 convolutions get a grouped form")
    if isinstance(conv, str):
        return conv
    weight, c_out, c_in = conv.weight, conv.c_out, conv.c_in
    if groups < 2 or c_in % groups or c_out % groups:
        return f"group {groups} does not divide {c_in} input and {c_out} output channels"
    per_in, per_out = c_in // groups, c_out // groups
    blocks = [weight[b * per_out:(b + 1) * per_out, b * per_in:(b + 1) * per_in] for b in range(groups)]
    grouped = np.concatenate(blocks, axis=0)   # block-diagonal part of W
    attrs = conv.attrs(kernel_shape=weight.shape[2:], group=groups)
    return Candidate(f"group{groups}", lambda e: conv.single(e, grouped, attrs))


def _conv_rank(region: Region, arg, explicit: bool) -> Candidate | str:
    conv = _Conv.ungrouped(region, "only group-1 convolutions get a low-rank form")
    if isinstance(conv, str):
        return conv
    weight, c_out, c_in, taps = conv.weight, conv.c_out, conv.c_in, conv.taps
    resolved = _resolve_rank(arg, min(c_out, c_in * taps))
    if isinstance(resolved, str):
        return resolved
    rank, given = resolved
    if not (explicit or given) and rank * (c_in * taps + c_out) >= c_out * c_in * taps:
        return f"rank {rank} is not cheaper"
    planned = decomposition(weight.reshape(c_out, c_in * taps), rank, region.decompositions)
    attrs = conv.attrs(kernel_shape=weight.shape[2:])

    def emit(e: Emitter) -> gs.Tensor:
        first, second = planned.factors(rank)
        first = first.reshape((rank, c_in) + weight.shape[2:]).astype(weight.dtype)
        second = second.reshape((c_out, rank) + (1,) * conv.spatial).astype(weight.dtype)
        return conv.then_pointwise(e, ("reduce", first, attrs), ("expand", second))
    return Candidate(f"rank{rank}", emit)


def _linear_weight(node: gs.Node) -> np.ndarray | str:
    """The layer's effective weight [out, in] (Gemm: alpha and transB folded)."""
    weight = np.asarray(node.inputs[1].values)
    if node.op == "MatMul":
        return weight.T
    if int(node.attrs.get("transA", 0)):
        return "Gemm with transA"
    alpha = float(node.attrs.get("alpha", 1.0))
    weight = weight if int(node.attrs.get("transB", 0)) else weight.T
    return weight * np.asarray(alpha, weight.dtype) if alpha != 1.0 else weight


def _linear_rank(region: Region, arg, explicit: bool) -> Candidate | str:
    node = region.layer
    weight = _linear_weight(node)
    if isinstance(weight, str):
        return weight
    n_out, n_in = weight.shape
    resolved = _resolve_rank(arg, min(n_out, n_in))
    if isinstance(resolved, str):
        return resolved
    rank, given = resolved
    if not (explicit or given) and rank * (n_in + n_out) >= n_in * n_out:
        return f"rank {rank} is not cheaper"
    planned = decomposition(weight, rank, region.decompositions)

    def emit(e: Emitter) -> gs.Tensor:
        first, second = (f.astype(weight.dtype) for f in planned.factors(rank))
        if node.op == "Gemm":
            h = e.node("Gemm", "reduce", [region.x, e.const("reduce", first)], {"transB": 1})
            inputs = [h, e.const("expand", second)]
            if len(node.inputs) > 2 and node.inputs[2].name:
                beta = float(node.attrs.get("beta", 1.0))
                bias = np.asarray(node.inputs[2].values)
                inputs.append(e.const("bias", bias * np.asarray(beta, bias.dtype) if beta != 1.0 else bias.copy()))
            return e.node("Gemm", "expand", inputs, {"transB": 1})
        h = e.node("MatMul", "reduce", [region.x, e.const("reduce", first.T)])
        y = e.node("MatMul", "expand", [h, e.const("expand", second.T)])
        if region.bias_add is not None:
            bias = next(t for t in region.bias_add.inputs if isinstance(t, gs.Constant))
            y = e.node("Add", "bias", [y, e.const("bias", np.asarray(bias.values).copy())])
        return y
    return Candidate(f"rank{rank}", emit)


def _layer_identity(region: Region, arg, explicit: bool) -> Candidate | str:
    node = region.layer
    shape = node.inputs[1].shape
    if node.op == "Conv":
        spatial = len(shape) - 2
        pads = _conv_pads(node, spatial)
        dilations = list(node.attrs.get("dilations", [1] * spatial))
        same = (shape[0] == shape[1] * int(node.attrs.get("group", 1))
                and all(s == 1 for s in node.attrs.get("strides", [1] * spatial))
                and pads is not None
                and all(b + e == d * (k - 1) for b, e, d, k in zip(pads[0], pads[1], dilations, shape[2:])))
    else:
        weight = _linear_weight(node)
        same = not isinstance(weight, str) and weight.shape[0] == weight.shape[1]
        same = same and node.inputs[0].shape is not None and len(node.inputs[0].shape) >= 2
    if not same:
        return "input and output shapes differ"
    return Candidate("identity", lambda e: region.x)


def region_identity(region: Region) -> Candidate | str:
    """Skip a user-named region, where its input and output have the same shape and type."""
    x, out = region.x, region.out
    if x.shape is None or out.shape is None or list(x.shape) != list(out.shape) or x.dtype != out.dtype:
        return f"input {x.name!r} {x.shape} and output {out.name!r} {out.shape} differ (or are unknown)"
    return Candidate("identity", lambda e: region.x)


def parse_builtin(text: str) -> tuple[str, Any] | None:
    """``"kernel:5"`` → ("kernel", 5); ``"rank:0.5"`` → ("rank", 0.5); None if not a builtin name."""
    kind, _, arg = str(text).partition(":")
    kind = _ALIASES.get(kind.strip().lower(), kind.strip().lower())
    if kind not in BUILTIN_KINDS:
        return None
    if not arg:
        return kind, None
    try:
        value: Any = int(arg)
    except ValueError:
        try:
            value = float(arg)
        except ValueError:
            return None
    return kind, value


# ==============================================================================================


MAKERS: dict[tuple[str, str], Callable[[Region, Any, bool], "Candidate | str"]] = {
    ("Conv", "kernel"): _conv_kernel,
    ("Conv", "separable"): _conv_separable,
    ("Conv", "group"): _conv_group,
    ("Conv", "rank"): _conv_rank,
    ("Gemm", "rank"): _linear_rank,
    ("MatMul", "rank"): _linear_rank,
    ("Conv", "identity"): _layer_identity,
    ("Gemm", "identity"): _layer_identity,
    ("MatMul", "identity"): _layer_identity,
}
"""(layer op, builtin kind) → its maker ``(region, arg, explicit) -> Candidate | reason``."""
