"""The SuperNet pass: give selected layers (or subgraphs) shape-compatible alternatives to choose from.

Every searched place becomes a ``Choice`` (`plinio_onnx.functions.supernet`) over N branches
that all read the same input tensor and produce a tensor of the same shape: branch 0 is the
original subgraph, its nodes untouched; the others are plain ONNX nodes inserted beside it.
Their outputs are stacked (``Unsqueeze`` + ``Concat``) into the Choice, which writes the tensor the
original wrote, so everything downstream (and graph outputs) keeps its name.

Automatic alternatives (a `Menu`) for each selected layer — Conv, Gemm, MatMul with a constant
weight — inherit the original's weights, so a search can start from a trained model:

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
  W reshaped [C_out, C_in·K]. R is an int, or a float fraction of min(in, out).
* ``identity`` — skip the layer, where input and output shapes are equal.

In the automatic menu, factorizations (separable, group, rank given as a fraction) are offered
only when they have fewer parameters than the original; explicitly named ones always are.

A *layer*'s region is its node plus, for a MatMul, the constant bias ``Add`` right after it (so
every branch carries its own bias and costs count it like `plinio_onnx.cost` does). The layer's
bias is copied into each alternative: branches share nothing.

User-defined alternatives: ``layers={"node": [...]}`` names a node (its first non-constant input
to its output); ``regions=[{"input": "t0", "output": "t1", "alternatives": [...]}]`` names the
single-entry, single-exit subgraph between two tensors. Alternatives are builtin names (above),
``onnx.ModelProto`` / ``onnx.GraphProto`` / paths of ``.onnx`` files with one input and one
output (their initializers become trainable weights of the branch), or, in a JSON spec file
(`load_spec`), builtin names and paths relative to the file.

Guarantee: with the logits at their initial value (all equal) the eval-mode module and the
finalized graph compute exactly what ``graph`` computed (argmax ties go to the original branch);
the ONNX body (softmax mix) equals the input model when the original's logit dominates.
The record (choices, branches, their nodes) is stored in the graph's metadata
(`plinio_onnx.records.SuperNetRecord`).
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import shape_inference, version_converter

from plinio_onnx.errors import PassError
from plinio_onnx.functions import add_functions
from plinio_onnx.functions import relaxation
from plinio_onnx.functions import supernet as fn
from plinio_onnx.graph import PLINIO_DOMAIN, Graph, reinfer_shapes
from plinio_onnx.records import Branch, ChoiceRecord, SkippedPlace, SuperNetRecord

from .infra import FunctionalPass, PassResult

__all__ = ["LAYER_OPS", "METADATA_KEY", "Menu", "load_spec", "supernet"]

METADATA_KEY = SuperNetRecord.KEY
LAYER_OPS = ("Conv", "Gemm", "MatMul")
TEMPERATURE = "supernet.temperature"
LOGITS_SUFFIX = ".supernet_logits"
BUILTIN_KINDS = ("kernel", "separable", "group", "rank", "identity")
_ALIASES = {"skip": "identity", "dwsep": "separable", "depthwise_separable": "separable",
            "lowrank": "rank", "groups": "group"}

Alternative = "str | onnx.ModelProto | onnx.GraphProto | os.PathLike"


@dataclass(frozen=True)
class Menu:
    """Automatic alternatives per layer kind (see the module docstring for each).

    ``kernels``: Conv kernel sizes (the original's is skipped); ``separable``: depthwise-separable
    Conv; ``groups``: grouped Conv forms; ``identity``: skip where shapes allow; ``ranks``:
    low-rank Gemm/MatMul (float = fraction of min(in, out), int = rank); ``conv_ranks``: the same
    for group-1 Convs (off by default).
    """

    kernels: tuple[int, ...] = (1, 3, 5)
    separable: bool = True
    groups: tuple[int, ...] = (2,)
    identity: bool = True
    ranks: tuple[float, ...] = (0.25, 0.5)
    conv_ranks: tuple[float, ...] = ()

    @classmethod
    def of(cls, value: "Menu | Mapping[str, Any] | None") -> "Menu":
        if value is None:
            return cls()
        if isinstance(value, Menu):
            return value
        known = {f.name for f in fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise PassError(f"unknown SuperNet menu entries {sorted(unknown)}; choose from {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in value.items()})

    def requests(self, op: str) -> list[tuple[str, Any]]:
        """(kind, argument) of every automatic alternative for a layer of type ``op``."""
        if op == "Conv":
            out = [("kernel", int(k)) for k in self.kernels]
            out += [("separable", None)] if self.separable else []
            out += [("group", int(g)) for g in self.groups]
            out += [("rank", r) for r in self.conv_ranks]
        else:
            out = [("rank", r) for r in self.ranks]
        return out + ([("identity", None)] if self.identity else [])


# ==============================================================================================
# Regions: the original subgraph a Choice replaces
# ==============================================================================================
@dataclass
class _Region:
    name: str                   # base name of the Choice (the layer's node name, or the output)
    x: gs.Variable              # the single activation input
    out: gs.Variable            # the single output
    nodes: list[gs.Node]        # the original nodes
    layer: gs.Node | None = None  # set for a Conv/Gemm/MatMul layer region
    bias_add: gs.Node | None = None  # MatMul's bias Add


def _is_layer(node: gs.Node) -> bool:
    if node.op not in LAYER_OPS or (node.domain or "") not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    weight = node.inputs[1]
    if not isinstance(weight, gs.Constant) or isinstance(node.inputs[0], gs.Constant):
        return False
    if node.op == "MatMul":
        return len(weight.shape) == 2
    bias = node.inputs[2] if len(node.inputs) > 2 else None   # copied into every alternative
    return bias is None or not bias.name or isinstance(bias, gs.Constant)


def _bias_add(node: gs.Node, graph_outputs: set[int]) -> gs.Node | None:
    """The constant [N] bias ``Add`` right after a MatMul layer (as `plinio_onnx.cost` sees it)."""
    out = node.outputs[0]
    if node.op != "MatMul" or id(out) in graph_outputs or len(out.outputs) != 1 or out.outputs[0].op != "Add":
        return None
    add = out.outputs[0]
    width = int(node.inputs[1].shape[-1])
    other = [t for t in add.inputs if t is not out]
    if len(other) == 1 and isinstance(other[0], gs.Constant) and tuple(other[0].shape) == (width,):
        return add
    return None


def _layer_region(node: gs.Node, graph_outputs: set[int]) -> _Region:
    add = _bias_add(node, graph_outputs)
    out = (add or node).outputs[0]
    return _Region(node.name, node.inputs[0], out, [node] + ([add] if add else []), node, add)


def _node_region(node: gs.Node, graph_outputs: set[int]) -> _Region:
    if _is_layer(node):
        return _layer_region(node, graph_outputs)
    activations = [t for t in node.inputs if t.name and not isinstance(t, gs.Constant)]
    outputs = [t for t in node.outputs if t.name]
    if len(activations) != 1 or len(outputs) != 1:
        raise PassError(f"alternatives need a node with one non-constant input and one output "
                        f"(it has {len(activations)} and {len(outputs)}); name the subgraph with "
                        "regions=[{'input': ..., 'output': ...}]", node=node.name, op=node.op)
    return _Region(node.name, activations[0], outputs[0], [node])


def _subgraph_region(g: gs.Graph, tensors: dict[str, gs.Tensor], input_name: str, output_name: str,
                     name: str | None) -> _Region:
    """The nodes between two tensors; refuses regions that read or leak other activations."""
    for t in (input_name, output_name):
        if t not in tensors:
            raise PassError(f"region tensor {t!r} is not in the graph")
    x, out = tensors[input_name], tensors[output_name]
    where = f"region {input_name!r} → {output_name!r}"
    if x is out or isinstance(out, gs.Constant) or not out.inputs:
        raise PassError(f"{where}: the output must be computed from the input")
    downstream: set[int] = set()        # nodes that depend on x
    stack = list(x.outputs)
    while stack:
        node = stack.pop()
        if id(node) not in downstream:
            downstream.add(id(node))
            stack.extend(c for t in node.outputs for c in t.outputs)
    nodes: dict[int, gs.Node] = {}      # ... and that out depends on
    stack = [out.inputs[0]]
    while stack:
        node = stack.pop()
        if id(node) in nodes or id(node) not in downstream:
            continue
        nodes[id(node)] = node
        stack.extend(t.inputs[0] for t in node.inputs if t is not x and t.inputs)
    if id(out.inputs[0]) not in downstream:
        raise PassError(f"{where}: the output does not depend on the input")
    for node in nodes.values():
        for t in node.inputs:
            if t.name and t is not x and not isinstance(t, gs.Constant) and \
                    (not t.inputs or id(t.inputs[0]) not in nodes):
                raise PassError(f"{where}: node {node.name!r} reads {t.name!r}, which does not come from "
                                f"{input_name!r}; a region has a single input")
    graph_outputs = {id(t) for t in g.outputs}
    for node in nodes.values():
        for t in node.outputs:
            if t is out or not t.name:
                continue
            if id(t) in graph_outputs or any(id(c) not in nodes for c in t.outputs):
                raise PassError(f"region {input_name!r} → {output_name!r}: its tensor {t.name!r} is "
                                "also used outside the region; a region has a single output")
    order = {id(n): i for i, n in enumerate(g.nodes)}
    members = sorted(nodes.values(), key=lambda n: order[id(n)])
    return _Region(name or output_name, x, out, members)


# ==============================================================================================
# Builtin alternatives: one maker per (op, kind), registered by decorator
# ==============================================================================================
@dataclass
class _Candidate:
    name: str
    emit: Callable[["_Emitter"], gs.Tensor]   # writes the branch's nodes, returns its output


class _Emitter:
    """Writes one branch's nodes into the graph under a name prefix, recording them."""

    def __init__(self, g: gs.Graph, prefix: str, region: _Region) -> None:
        self.g, self.prefix, self.region = g, prefix, region
        self.nodes: list[gs.Node] = []
        self.dtype = region.out.dtype or np.float32
        self._k = 0

    def const(self, name: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(f"{self.prefix}.{name}", np.ascontiguousarray(values))

    def node(self, op: str, name: str, inputs: list, attrs: dict | None = None,
             output: gs.Variable | None = None) -> gs.Variable:
        out = output or gs.Variable(f"{self.prefix}/{name}_output", dtype=self.dtype)
        node = gs.Node(op, name=f"{self.prefix}/{name}", attrs=dict(attrs or {}), inputs=inputs, outputs=[out])
        self.g.nodes.append(node)
        self.nodes.append(node)
        return out


_MAKERS: dict[tuple[str, str], Callable[..., "_Candidate | str"]] = {}


def alternative(kind: str, *ops: str):
    """Register a maker ``fn(region, arg, explicit) -> _Candidate | reason`` of builtin ``kind``."""
    def decorate(maker):
        for op in ops:
            _MAKERS[(op, kind)] = maker
        return maker
    return decorate


def _weight(region: _Region) -> np.ndarray:
    return np.asarray(region.layer.inputs[1].values)


def _conv_bias(node: gs.Node) -> np.ndarray | None:
    return np.asarray(node.inputs[2].values) if len(node.inputs) > 2 and node.inputs[2].name else None


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


def _svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD in float64 (batched over leading axes), on one thread.

    The matrices are small; a multithreaded LAPACK on a busy machine spends seconds spinning
    (measured: 3–5 s for a 128×640 matrix under load, 15 ms on one thread)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        u, s, vt = torch.linalg.svd(torch.from_numpy(np.asarray(matrix, dtype=np.float64)), full_matrices=False)
    finally:
        torch.set_num_threads(threads)
    return u.numpy(), s.numpy(), vt.numpy()


def _rank_factors(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """matrix [out, in] ≈ B @ A with A [rank, in], B [out, rank] (truncated SVD, √σ each side)."""
    u, s, vt = _svd(matrix)
    root = np.sqrt(s[:rank])
    return root[:, None] * vt[:rank], u[:, :rank] * root[None, :]


@alternative("kernel", "Conv")
def _conv_kernel(region: _Region, size, explicit: bool) -> _Candidate | str:
    node = region.layer
    weight = _weight(region)
    spatial = weight.ndim - 2
    size = int(size)
    kernel = list(weight.shape[2:])
    if size < 1:
        return f"kernel {size} is not positive"
    if all(k == size for k in kernel):
        return f"kernel {size} is the original's"
    pads = _conv_pads(node, spatial)
    if pads is None:
        return "auto_pad with unknown input sizes"
    dilations = list(node.attrs.get("dilations", [1] * spatial))
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
    bias = _conv_bias(node)

    def emit(e: _Emitter) -> gs.Tensor:
        inputs = [region.x, e.const("weight", new)] + ([e.const("bias", bias.copy())] if bias is not None else [])
        return e.node("Conv", "Conv", inputs, _conv_attrs(node, spatial, kernel_shape=[size] * spatial,
                                                          pads=begin + end))
    return _Candidate(f"kernel{size}", emit)


@alternative("separable", "Conv")
def _conv_separable(region: _Region, arg, explicit: bool) -> _Candidate | str:
    node = region.layer
    weight = _weight(region)
    c_out, c_in = weight.shape[:2]
    spatial = weight.ndim - 2
    taps = int(np.prod(weight.shape[2:]))
    if int(node.attrs.get("group", 1)) != 1:
        return "only group-1 convolutions have a depthwise-separable form"
    if taps == 1:
        return "a 1×1 convolution has no depthwise-separable form"
    if not explicit and c_in * taps + c_out * c_in >= c_out * c_in * taps:
        return "the depthwise-separable form is not cheaper"
    # Per input channel i: W[:, i, :] (c_out × taps) ≈ σ₀ u₀ v₀ᵀ, the best rank-1 fit.
    per_channel = weight.astype(np.float64).transpose(1, 0, *range(2, weight.ndim)).reshape(c_in, c_out, taps)
    u, s, vt = _svd(per_channel)
    root = np.sqrt(s[:, 0])
    depthwise = (root[:, None] * vt[:, 0, :]).reshape((c_in, 1) + weight.shape[2:]).astype(weight.dtype)
    pointwise = (u[:, :, 0] * root[:, None]).T.reshape((c_out, c_in) + (1,) * spatial).astype(weight.dtype)
    bias = _conv_bias(node)

    def emit(e: _Emitter) -> gs.Tensor:
        attrs = _conv_attrs(node, spatial, kernel_shape=weight.shape[2:], group=int(c_in))
        if "pads" not in attrs:
            attrs["auto_pad"] = node.attrs["auto_pad"]
        h = e.node("Conv", "depthwise", [region.x, e.const("depthwise", depthwise)], attrs)
        inputs = [h, e.const("pointwise", pointwise)] + ([e.const("bias", bias.copy())] if bias is not None else [])
        return e.node("Conv", "pointwise", inputs, _pointwise_attrs(spatial))
    return _Candidate("separable", emit)


@alternative("group", "Conv")
def _conv_group(region: _Region, groups, explicit: bool) -> _Candidate | str:
    node = region.layer
    weight = _weight(region)
    c_out, c_in = weight.shape[:2]
    spatial = weight.ndim - 2
    groups = int(groups)
    if int(node.attrs.get("group", 1)) != 1:
        return "only group-1 convolutions get a grouped form"
    if groups < 2 or c_in % groups or c_out % groups:
        return f"group {groups} does not divide {c_in} input and {c_out} output channels"
    per_in, per_out = c_in // groups, c_out // groups
    blocks = [weight[b * per_out:(b + 1) * per_out, b * per_in:(b + 1) * per_in] for b in range(groups)]
    grouped = np.concatenate(blocks, axis=0)   # block-diagonal part of W
    bias = _conv_bias(node)

    def emit(e: _Emitter) -> gs.Tensor:
        inputs = [region.x, e.const("weight", grouped)] + ([e.const("bias", bias.copy())] if bias is not None else [])
        attrs = _conv_attrs(node, spatial, kernel_shape=weight.shape[2:], group=groups)
        if "pads" not in attrs:
            attrs["auto_pad"] = node.attrs["auto_pad"]
        return e.node("Conv", "Conv", inputs, attrs)
    return _Candidate(f"group{groups}", emit)


@alternative("rank", "Conv")
def _conv_rank(region: _Region, arg, explicit: bool) -> _Candidate | str:
    node = region.layer
    weight = _weight(region)
    c_out, c_in = weight.shape[:2]
    spatial = weight.ndim - 2
    taps = int(np.prod(weight.shape[2:]))
    if int(node.attrs.get("group", 1)) != 1:
        return "only group-1 convolutions get a low-rank form"
    resolved = _resolve_rank(arg, min(c_out, c_in * taps))
    if isinstance(resolved, str):
        return resolved
    rank, given = resolved
    if not (explicit or given) and rank * (c_in * taps + c_out) >= c_out * c_in * taps:
        return f"rank {rank} is not cheaper"
    first, second = _rank_factors(weight.reshape(c_out, c_in * taps), rank)
    first = first.reshape((rank, c_in) + weight.shape[2:]).astype(weight.dtype)
    second = second.reshape((c_out, rank) + (1,) * spatial).astype(weight.dtype)
    bias = _conv_bias(node)

    def emit(e: _Emitter) -> gs.Tensor:
        attrs = _conv_attrs(node, spatial, kernel_shape=weight.shape[2:])
        if "pads" not in attrs:
            attrs["auto_pad"] = node.attrs["auto_pad"]
        h = e.node("Conv", "reduce", [region.x, e.const("reduce", first)], attrs)
        inputs = [h, e.const("expand", second)] + ([e.const("bias", bias.copy())] if bias is not None else [])
        return e.node("Conv", "expand", inputs, _pointwise_attrs(spatial))
    return _Candidate(f"rank{rank}", emit)


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


@alternative("rank", "Gemm", "MatMul")
def _linear_rank(region: _Region, arg, explicit: bool) -> _Candidate | str:
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
    first, second = (f.astype(weight.dtype) for f in _rank_factors(weight, rank))

    def emit(e: _Emitter) -> gs.Tensor:
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
    return _Candidate(f"rank{rank}", emit)


@alternative("identity", "Conv", "Gemm", "MatMul")
def _layer_identity(region: _Region, arg, explicit: bool) -> _Candidate | str:
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
    return _Candidate("identity", lambda e: region.x)


def _region_identity(region: _Region) -> _Candidate | str:
    x, out = region.x, region.out
    if x.shape is None or out.shape is None or list(x.shape) != list(out.shape) or x.dtype != out.dtype:
        return f"input {x.name!r} {x.shape} and output {out.name!r} {out.shape} differ (or are unknown)"
    return _Candidate("identity", lambda e: region.x)


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
# User-defined alternatives: ONNX subgraphs
# ==============================================================================================
def _alternative_model(alt, opset: int, where: str) -> tuple[onnx.ModelProto, str]:
    """(ModelProto at the graph's opset, a branch name)."""
    if isinstance(alt, onnx.GraphProto):
        model = onnx.helper.make_model(alt, opset_imports=[onnx.helper.make_opsetid("", opset)])
        name = alt.name or "custom"
    elif isinstance(alt, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(alt)
        name = alt.graph.name or "custom"
    else:
        path = Path(alt)
        if not path.is_file():
            raise PassError(f"{where}: alternative {str(alt)!r} is neither a builtin "
                            f"({', '.join(BUILTIN_KINDS)}) nor an ONNX file")
        try:
            model = onnx.load(str(path))
        except Exception as err:
            raise PassError(f"{where}: cannot read alternative ({' '.join(str(err).split())[:200]})",
                            file=str(path)) from None
        name = path.stem
    if model.functions or any(n.domain not in ("", "ai.onnx") for n in model.graph.node):
        raise PassError(f"{where}: alternative {name!r} must use standard ONNX ops only")
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if version != opset:
        try:
            model = version_converter.convert_version(model, opset)
        except Exception as err:
            raise PassError(f"{where}: alternative {name!r} (opset {version}) cannot be converted to the "
                            f"model's opset {opset} ({' '.join(str(err).split())[:200]})") from None
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise PassError(f"{where}: alternative {name!r} must have one input and one output "
                        f"(it has {len(inputs)} and {len(model.graph.output)})")
    return model, name


def _check_alternative_shape(model: onnx.ModelProto, region: _Region, name: str, where: str) -> None:
    """Infer the alternative's output shape from the region's input shape; it must be the region's."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    initializers = {t.name for t in probe.graph.initializer}
    graph_input = next(i for i in probe.graph.input if i.name not in initializers)
    if region.x.shape is not None:
        graph_input.type.tensor_type.ClearField("shape")
        for d in region.x.shape:
            dim = graph_input.type.tensor_type.shape.dim.add()
            if isinstance(d, (int, np.integer)):
                dim.dim_value = int(d)
            elif d:
                dim.dim_param = str(d)
    del probe.graph.value_info[:]
    probe.graph.output[0].type.tensor_type.ClearField("shape")
    try:
        inferred = shape_inference.infer_shapes(probe, strict_mode=True)
    except Exception as err:
        raise PassError(f"{where}: alternative {name!r} does not accept input {region.x.name!r} "
                        f"{region.x.shape}: {' '.join(str(err).split())[:300]}") from None
    out = inferred.graph.output[0].type.tensor_type
    if not out.HasField("shape"):
        raise PassError(f"{where}: the output shape of alternative {name!r} cannot be inferred")
    got = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in out.shape.dim]
    want = list(region.out.shape) if region.out.shape is not None else None
    if want is not None and (len(got) != len(want) or any(
            isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)) and int(a) != int(b)
            for a, b in zip(got, want))):
        raise PassError(f"{where}: alternative {name!r} outputs shape {got}, the original "
                        f"{region.out.name!r} has {want}")


def _graph_candidate(model: onnx.ModelProto, name: str) -> _Candidate:
    def emit(e: _Emitter) -> gs.Tensor:
        sub = gs.import_onnx(model)
        prefix = e.prefix
        source = sub.inputs[0]
        result = sub.outputs[0]
        for tensor in sub.tensors().values():
            if tensor is not source and tensor.name:   # "" marks an omitted optional input
                tensor.name = f"{prefix}/{tensor.name}"
        for k, node in enumerate(sub.nodes):
            node.name = f"{prefix}/{node.name or node.op + str(k)}"
            node.inputs = [e.region.x if t is source else t for t in node.inputs]
            e.g.nodes.append(node)
            e.nodes.append(node)
        if result is source:   # an identity graph
            return e.region.x
        return result
    return _Candidate(name, emit)


# ==============================================================================================
# The pass
# ==============================================================================================
def _selected(name: str, include, exclude) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude))


def load_spec(path: "str | os.PathLike") -> dict:
    """Read a JSON SuperNet spec into `supernet` keyword arguments; alternative paths are resolved
    relative to the file. Keys: ``automatic``, ``include``, ``exclude``, ``op_types``, ``menu``,
    ``layers`` ({node: [alternatives]}), ``regions`` ([{input, output, alternatives, name?}]),
    ``sampling``, ``temperature``."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PassError(f"cannot read the SuperNet spec ({' '.join(str(err).split())[:200]})", file=str(path)) from None
    if not isinstance(spec, dict):
        raise PassError("a SuperNet spec is a JSON object", file=str(path))
    known = {"automatic", "include", "exclude", "op_types", "menu", "layers", "regions", "sampling", "temperature"}
    unknown = set(spec) - known
    if unknown:
        raise PassError(f"unknown SuperNet spec keys {sorted(unknown)}; choose from {sorted(known)}", file=str(path))

    def resolve(alts) -> list:
        if not isinstance(alts, list):
            raise PassError("alternatives are a JSON list", file=str(path))
        return [a if parse_builtin(a) is not None else str((path.parent / a).resolve()) for a in alts]

    if "layers" in spec:
        spec["layers"] = {node: resolve(alts) for node, alts in spec["layers"].items()}
    if "regions" in spec:
        spec["regions"] = [{**r, "alternatives": resolve(r.get("alternatives", []))} for r in spec["regions"]]
    return spec


def supernet(graph: Graph, *, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
             op_types: Iterable[str] | None = None, menu: "Menu | Mapping[str, Any] | None" = None,
             layers: "Mapping[str, Sequence[Alternative]] | None" = None,
             regions: "Sequence[Mapping[str, Any]] | None" = None, spec: "str | os.PathLike | None" = None,
             automatic: bool | None = None, sampling: str | None = None,
             temperature: float | None = None) -> Graph:
    """Return a searchable copy of ``graph`` with a ``Choice`` per searched place (`SuperNetPass`,
    module docstring).

    ``include`` / ``exclude`` (fnmatch patterns on node names) and ``op_types`` select the layers
    that get the automatic ``menu`` (`Menu`, or a dict of its fields) when ``automatic`` (default
    True). ``layers`` maps node names to their alternatives (replacing the menu for that node);
    ``regions`` lists ``{"input": tensor, "output": tensor, "alternatives": [...], "name": ...}``.
    ``spec``: a JSON file (`load_spec`) whose values fill the arguments left at None.
    ``sampling``: "softmax" (default), "gumbel", "gumbel_hard" or "hard" (training forward);
    ``temperature``: the initial softmax temperature T (default 1).
    """
    return SuperNetPass(include=include, exclude=exclude, op_types=op_types, menu=menu, layers=layers,
                        regions=regions, spec=spec, automatic=automatic, sampling=sampling,
                        temperature=temperature)(graph).graph


class SuperNetPass(FunctionalPass):
    """The SuperNet pass (module docstring); its options are those of `supernet`. Requires a graph
    without ai.plinio nodes; ensures the SuperNet record is stored."""

    def __init__(self, **options: Any) -> None:
        self.options = options

    def requires(self, graph: Graph) -> None:
        if any((n.domain or "") == PLINIO_DOMAIN for n in graph.nodes):
            raise PassError("the graph already holds ai.plinio nodes; run SuperNet on the original model "
                            "(and PIT/MPS on the model SuperNet exports)", file=graph.source)

    def ensures(self, graph: Graph) -> None:
        if not SuperNetRecord.present(graph):
            raise ValueError("no SuperNet record was stored")

    def call(self, graph: Graph) -> PassResult:
        return PassResult(_searchable(graph, **self.options), True)


def _searchable(graph: Graph, *, include=None, exclude=None, op_types=None, menu=None, layers=None,
                regions=None, spec=None, automatic=None, sampling=None, temperature=None) -> Graph:
    options = load_spec(spec) if spec is not None else {}
    include = include if include is not None else options.get("include")
    exclude = exclude if exclude is not None else options.get("exclude")
    op_types = tuple(op_types if op_types is not None else options.get("op_types", LAYER_OPS))
    menu = Menu.of(menu if menu is not None else options.get("menu"))
    layers = dict(layers if layers is not None else options.get("layers", {}))
    regions = list(regions if regions is not None else options.get("regions", []))
    automatic = bool(automatic if automatic is not None else options.get("automatic", True))
    sampling = sampling if sampling is not None else options.get("sampling", "softmax")
    temperature = float(temperature if temperature is not None else options.get("temperature", 1.0))
    if not relaxation.is_sampling(sampling):
        raise PassError(f"unknown sampling {sampling!r}; choose from {relaxation.SAMPLINGS}", file=graph.source)
    sampling = relaxation.sampling_mode(sampling)
    if not temperature > 0:
        raise PassError(f"the temperature must be positive (got {temperature})", file=graph.source)
    unknown_ops = set(op_types) - set(LAYER_OPS)
    if unknown_ops:
        raise PassError(f"no automatic alternatives for {sorted(unknown_ops)}; op_types are among {LAYER_OPS}",
                        file=graph.source)
    graph = graph.copy()
    g = graph.gs
    g.toposort()
    _name_nodes(g)
    planner = _Planner(g, graph.opset)
    planner.user_regions(regions)
    planner.user_layers(layers)
    if automatic:
        planner.automatic(op_types, include, exclude, menu)
    if planner.problems:
        raise PassError("SuperNet: " + "; ".join(planner.problems), file=graph.source)

    temperatures: dict[np.dtype, gs.Constant] = {}

    def temperature_of(dtype) -> gs.Constant:
        """One shared T per dtype (float32: ``supernet.temperature``); Div needs matching types."""
        dtype = np.dtype(dtype or np.float32)
        if dtype not in temperatures:
            name = TEMPERATURE if dtype == np.float32 else f"{TEMPERATURE}.{dtype.name}"
            temperatures[dtype] = gs.Constant(name, np.array([temperature], dtype))
        return temperatures[dtype]

    choices = []
    names_used: set[str] = {n.name for n in g.nodes}
    for index, (region, candidates) in enumerate(planner.planned):
        choices.append(_insert_choice(g, index, region, candidates, temperature_of(region.out.dtype), sampling,
                                      names_used))

    g.cleanup(remove_unused_graph_inputs=False).toposort()
    SuperNetRecord(sampling=sampling, temperatures=sorted(t.name for t in temperatures.values()),
                   choices=choices, skipped=planner.skipped).store(graph)
    graph = add_functions(graph, fn.functions())
    # Strict: an alternative of the wrong shape fails here.
    reinfer_shapes(graph, what="SuperNet: the searchable graph is inconsistent", check=False, forget=False)
    return graph


class _Planner:
    """Which places of a graph get a Choice, with which candidates: user regions, then user
    layers, then the automatic menu; overlaps and bad alternatives are gathered in ``problems``
    (raised together), layers the menu cannot serve in ``skipped``."""

    def __init__(self, g: gs.Graph, opset: int) -> None:
        self.g, self.opset = g, opset
        self.tensors = g.tensors()
        self.graph_outputs = {id(t) for t in g.outputs}
        self.problems: list[str] = []
        self.planned: list[tuple[_Region, list[_Candidate]]] = []
        self.taken: set[int] = set()
        self.skipped: list[SkippedPlace] = []

    def claim(self, region: _Region, where: str) -> bool:
        ids = {id(n) for n in region.nodes}
        if ids & self.taken:
            self.problems.append(f"{where}: overlaps another searched place")
            return False
        self.taken.update(ids)
        return True

    def user_candidates(self, region: _Region, alternatives: Sequence, where: str) -> list[_Candidate]:
        out = []
        for alt in alternatives:
            builtin = parse_builtin(alt) if isinstance(alt, str) else None
            try:
                if builtin is not None:
                    made = self._builtin(region, alt, *builtin)
                    if isinstance(made, str):
                        self.problems.append(f"{where}: alternative {alt!r}: {made}")
                        continue
                    out.append(made)
                else:
                    model, name = _alternative_model(alt, self.opset, where)
                    _check_alternative_shape(model, region, name, where)
                    out.append(_graph_candidate(model, name))
            except PassError as err:
                self.problems.append(err.message)
        if not alternatives:
            self.problems.append(f"{where}: no alternatives given")
        return out

    @staticmethod
    def _builtin(region: _Region, alt: str, kind: str, arg) -> _Candidate | str:
        if region.layer is None:
            return _region_identity(region) if kind == "identity" else (
                f"builtin {alt!r} needs a Conv/Gemm/MatMul layer; a region only takes 'identity' or ONNX graphs")
        maker = _MAKERS.get((region.layer.op, kind))
        return maker(region, arg, True) if maker else f"{kind!r} does not apply to {region.layer.op}"

    def user_regions(self, regions: list) -> None:
        for entry in regions:
            entry = dict(entry)
            where = f"region {entry.get('input')!r} → {entry.get('output')!r}"
            try:
                region = _subgraph_region(self.g, self.tensors, entry.get("input"), entry.get("output"),
                                          entry.get("name"))
            except PassError as err:
                self.problems.append(err.message)
                continue
            if self.claim(region, where):
                self.planned.append((region, self.user_candidates(region, entry.get("alternatives", []), where)))

    def user_layers(self, layers: dict) -> None:
        by_name = {n.name: n for n in self.g.nodes}
        for node_name, alternatives in layers.items():
            node = by_name.get(node_name)
            where = f"node {node_name!r}"
            if node is None:
                self.problems.append(f"{where} is not in the graph")
                continue
            try:
                region = _node_region(node, self.graph_outputs)
            except PassError as err:
                self.problems.append(err.message)
                continue
            if self.claim(region, where):
                self.planned.append((region, self.user_candidates(region, alternatives, where)))

    def automatic(self, op_types: tuple[str, ...], include, exclude, menu: Menu) -> None:
        for node in list(self.g.nodes):
            if node.op not in op_types or not _selected(node.name, include, exclude) or id(node) in self.taken:
                continue
            if not _is_layer(node):
                self.skipped.append(SkippedPlace(node=node.name, reason="no constant weight"))
                continue
            region = _layer_region(node, self.graph_outputs)
            if any(id(n) in self.taken for n in region.nodes):
                continue
            candidates, seen = [], {"original"}
            for kind, arg in menu.requests(node.op):
                made = _MAKERS[(node.op, kind)](region, arg, False)
                if isinstance(made, _Candidate) and made.name not in seen:
                    seen.add(made.name)
                    candidates.append(made)
            if not candidates:
                self.skipped.append(SkippedPlace(node=node.name, reason="no alternative fits"))
                continue
            self.claim(region, node.name)
            self.planned.append((region, candidates))


def _insert_choice(g: gs.Graph, index: int, region: _Region, candidates: list[_Candidate],
                   temperature: gs.Constant, sampling: str, names_used: set[str]) -> ChoiceRecord:
    base = region.name
    out = region.out
    # The original branch writes a new tensor; the Choice takes over the original output tensor.
    original_out = gs.Variable(f"{out.name}/supernet/original", dtype=out.dtype, shape=out.shape)
    producer = out.inputs[0]
    producer.outputs = [original_out if t is out else t for t in producer.outputs]
    branches = [Branch(name="original", output=original_out.name, nodes=[n.name for n in region.nodes])]
    outputs = [original_out]
    taken_names = {"original"}
    for candidate in candidates:
        name, k = candidate.name, 1
        while name in taken_names:
            k += 1
            name = f"{candidate.name}_{k}"
        taken_names.add(name)
        emitter = _Emitter(g, f"{base}/supernet/{name}", region)
        result = candidate.emit(emitter)
        if result is region.out:   # an alternative that wrote the region's own output: never
            raise PassError(f"alternative {name!r} of {base!r} writes the original output", node=base)
        outputs.append(result)
        branches.append(Branch(name=name, output=result.name, nodes=[n.name for n in emitter.nodes]))
    for node in (n for b in branches[1:] for n in b.nodes):
        if node in names_used:
            raise PassError(f"node name {node!r} of an alternative clashes with the graph", node=base)
        names_used.add(node)

    stacked_parts = []
    for k, tensor in enumerate(outputs):
        part = gs.Variable(f"{base}/supernet/stack{k}", dtype=out.dtype)
        if g.opset >= 13:
            axes = [gs.Constant(f"{base}/supernet/axes{k}", np.array([0], np.int64))]
            g.nodes.append(gs.Node("Unsqueeze", name=f"{base}/supernet/unsqueeze{k}", inputs=[tensor] + axes,
                                   outputs=[part]))
        else:
            g.nodes.append(gs.Node("Unsqueeze", name=f"{base}/supernet/unsqueeze{k}", attrs={"axes": [0]},
                                   inputs=[tensor], outputs=[part]))
        stacked_parts.append(part)
    stacked = gs.Variable(f"{base}/supernet/candidates", dtype=out.dtype)
    g.nodes.append(gs.Node("Concat", name=f"{base}/supernet/stack", attrs={"axis": 0},
                           inputs=stacked_parts, outputs=[stacked]))
    logits = gs.Constant(f"{base}{LOGITS_SUFFIX}", np.zeros(len(outputs), np.dtype(out.dtype or np.float32)))
    choice_name = f"{base}/supernet/choice"
    g.nodes.append(gs.Node(fn.CHOICE, name=choice_name, domain=PLINIO_DOMAIN, attrs={"sampling": sampling},
                           inputs=[stacked, logits, temperature], outputs=[out]))
    return ChoiceRecord(id=index, name=base, node=choice_name, logits=logits.name, temperature=temperature.name,
                        input=region.x.name, output=out.name,
                        kind="layer" if region.layer is not None else "region",
                        op=region.layer.op if region.layer is not None else None, branches=branches)


def _name_nodes(g: gs.Graph) -> None:
    """Give unnamed nodes a name and make duplicates unique: choices, branches and costs are
    recorded by node name."""
    seen: set[str] = set()
    for k, node in enumerate(g.nodes):
        name = node.name or f"{node.op}_{k}"
        while name in seen:
            name = f"{name}_{k}"
        node.name = name
        seen.add(name)



