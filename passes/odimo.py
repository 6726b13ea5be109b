"""The ODiMO pass: map every output channel of a layer onto one of several accelerators
(ODiMO, "Precision-aware Latency and Energy Balancing on Multi-Accelerator Platforms for DNN
Inference", arXiv 2306.05060; PLiNIO's ``ODiMO_MPS``).

Each accelerator runs one weight precision, so choosing an accelerator for a channel is choosing
that channel's weight precision among the accelerators' ones: the pass inserts MPS's quantizers
(`plinio_onnx.passes.mps`, `plinio_onnx.functions.mps`) with one logit row per accelerator, in
the order the accelerators are given (two accelerators may share a precision: the rows stay
apart). Per layer:

* a dense layer (Conv with ``group = 1``, Gemm, MatMul with a constant 2-D weight) gets logits
  [K, C] — one accelerator per output channel;
* a grouped or depthwise Conv runs whole on one accelerator (splitting it would split its input
  groups too): logits [K'] over the accelerators that are not ``dense_only`` (one of them: no
  choice at all);
* the input activation is quantized at the accelerators' common activation precision. PLiNIO
  (`plinio/cost/diana_latency.py`) and the paper search DIANA's analog unit, whose inputs are
  7-bit, with 8-bit activations; accelerators with different activation precisions would need one
  convolution per accelerator in the search and are refused with a clear error.

Logits start at α_k = bits_k / max bits (MPS's initialization): the initial choice is the
accelerator with the highest precision (the first of them on ties), so at the initial logits the
searchable graph computes the input graph up to that precision's quantization error. The
record (`plinio_onnx.records.ODiMORecord`) names the accelerators and each layer's logit rows;
the `MPSRecord` beside it holds the quantizers, so the export folds them as MPS does, after
`plinio_onnx.passes.odimo_split` has split each layer into one sub-layer per accelerator.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from plinio_onnx.cost.spec import weight_source
from plinio_onnx.errors import PassError
from plinio_onnx.functions import add_functions
from plinio_onnx.functions import mps as fn
from plinio_onnx.functions import relaxation
from plinio_onnx.graph import PLINIO_DOMAIN, Graph
from plinio_onnx.records import (AcceleratorRecord, MappedLayer, MPSRecord, ODiMORecord, PITRecord,
                                 SkippedLayer, SuperNetRecord)

from .infra import FunctionalPass, PassResult
from .mps import (MAX_BITS, TEMPERATURE, _activation_quantizer, _bias_input, _insert_weight_quantizer,
                  _plan_layer, fold_batchnorm)
from .pit import _selected

LAYER_OPS = ("Conv", "Gemm", "MatMul")


class ODiMOPass(FunctionalPass):
    """The ODiMO pass (module docstring); its options are those of `odimo`. Requires a graph
    without other search records; ensures both the ODiMO and the MPS record are stored."""

    def __init__(self, **options: Any) -> None:
        self.options = options

    def requires(self, graph: Graph) -> None:
        for record in (ODiMORecord, MPSRecord, PITRecord, SuperNetRecord):
            if record.present(graph):
                raise PassError(f"ODiMO needs a plain graph; this one already holds {record.KEY}",
                                file=graph.source)

    def ensures(self, graph: Graph) -> None:
        if not (ODiMORecord.present(graph) and MPSRecord.present(graph)):
            raise ValueError("the ODiMO and MPS records were not both stored")

    def call(self, graph: Graph) -> PassResult:
        return PassResult(_searchable(graph, **self.options), True)


def odimo(graph: Graph, accelerators: Sequence[Any], *, sampling: str = "softmax", temperature: float = 1.0,
          include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
          op_types: Iterable[str] = LAYER_OPS, clip_init: float = 6.0, fold_bn: bool = True) -> Graph:
    """Return a searchable copy of ``graph`` whose layers map channels onto ``accelerators``
    (objects with ``name``, ``weight_bits``, ``act_bits`` and ``dense_only``, e.g.
    `plinio_onnx.methods.accelerators.Accelerator`). ``sampling``, ``temperature``, ``include``,
    ``exclude``, ``op_types``, ``clip_init`` and ``fold_bn`` are MPS's (`plinio_onnx.passes.mps.mps`),
    except that ODiMO, like PLiNIO's, has no hard sampling."""
    return ODiMOPass(accelerators=accelerators, sampling=sampling, temperature=temperature, include=include,
                     exclude=exclude, op_types=op_types, clip_init=clip_init, fold_bn=fold_bn)(graph).graph


def check_accelerators(accelerators: Sequence[Any], source: str | None = None) -> list[AcceleratorRecord]:
    """The accelerators as records; `PassError` for fewer than one, duplicate names, bit-widths
    outside 2…8 or differing activation precisions."""
    records = [AcceleratorRecord(name=str(a.name), weight_bits=int(a.weight_bits), act_bits=int(a.act_bits),
                                 dense_only=bool(getattr(a, "dense_only", False))) for a in accelerators]
    if not records:
        raise PassError("ODiMO needs at least one accelerator", file=source)
    names = [a.name for a in records]
    if len(set(names)) != len(names) or not all(names):
        raise PassError(f"accelerator names must be distinct and non-empty, got {names}", file=source)
    for a in records:
        for what, bits in (("weight_bits", a.weight_bits), ("act_bits", a.act_bits)):
            if not 2 <= bits <= MAX_BITS:
                raise PassError(f"accelerator {a.name!r}: {what} must be in 2…{MAX_BITS}, got {bits}", file=source)
    if len({a.act_bits for a in records}) > 1:
        raise PassError("the accelerators' activation precisions differ "
                        f"({', '.join(f'{a.name}: {a.act_bits}' for a in records)}); ODiMO quantizes a layer's "
                        "input once (DIANA's 7-bit analog inputs are searched as 8-bit, as the paper does)",
                        file=source)
    if all(a.dense_only for a in records):
        raise PassError("at least one accelerator must run grouped layers (dense_only=False)", file=source)
    return records


def _searchable(graph: Graph, *, accelerators: Sequence[Any], sampling: str = "softmax", temperature: float = 1.0,
                include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                op_types: Iterable[str] = LAYER_OPS, clip_init: float = 6.0, fold_bn: bool = True) -> Graph:
    units = check_accelerators(accelerators, graph.source)
    if not relaxation.is_sampling(sampling) or relaxation.sampling_mode(sampling) in (relaxation.HARD,
                                                                                       relaxation.GUMBEL_HARD):
        raise PassError(f"ODiMO samples with 'softmax' or 'gumbel', not {sampling!r}", file=graph.source)
    sampling = relaxation.sampling_mode(sampling)
    if not temperature > 0:
        raise PassError("the temperature must be positive", file=graph.source)
    graph = graph.copy()
    if fold_bn and not any((n.domain or "") == PLINIO_DOMAIN for n in graph.nodes):
        folded = fold_batchnorm(graph)
    else:
        folded = []
    g = graph.gs
    temp = gs.Constant(TEMPERATURE, np.array([temperature], np.float32))
    a_bits = (units[0].act_bits,)
    layers, mapped, activations, skipped = [], [], {}, []
    for node in list(g.nodes):
        if (node.domain or "") not in ("", "ai.onnx") or not _selected(node.name, node.op, include, exclude,
                                                                       tuple(op_types)):
            continue
        plan = _plan(node)
        if isinstance(plan, str):
            skipped.append(SkippedLayer(node=node.name, op=node.op, reason=plan))
            continue
        axis, channels, dense = plan
        options = [a for a in units if dense or not a.dense_only]
        act = _activation_quantizer(g, node.inputs[0], activations, a_bits, sampling, clip_init, temp)
        layer = _insert_weight_quantizer(g, node, axis, channels, tuple(a.weight_bits for a in options),
                                         dense, "per_channel", sampling, temp, act, True)
        per_channel = dense and len(options) > 1
        if layer.bits != [a.weight_bits for a in options] or layer.per_channel != per_channel:
            raise PassError("the quantizer's precisions do not follow the accelerators", file=graph.source,
                            node=node.name, op=node.op)
        layers.append(layer)
        mapped.append(MappedLayer(node=node.name, accelerators=[a.name for a in options], per_channel=per_channel,
                                  channel_axis=-1 if node.op == "MatMul" else 1))
    g.cleanup(remove_unused_graph_inputs=False).toposort()
    MPSRecord(w_precisions=sorted({a.weight_bits for a in units}), a_precisions=list(a_bits), per_channel=True,
              weight_scale="per_channel", sampling=sampling, temperature=TEMPERATURE, layers=layers,
              activations=list(activations.values()), skipped=skipped, folded_bn=folded).store(graph)
    ODiMORecord(accelerators=units, layers=mapped).store(graph)
    return add_functions(graph, fn.functions())


def _plan(node: gs.Node) -> tuple[int, int, bool] | str:
    """(weight's output-channel axis, output channels, dense) or the reason to skip the layer."""
    plan = _plan_layer(node)
    if isinstance(plan, str):
        return plan
    axis, channels = plan
    dense = node.op != "Conv" or int(node.attrs.get("group", 1)) == 1
    if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name and _bias_input(node, channels) is None:
        bias = weight_source(node.inputs[2])
        shape = tuple(np.asarray(bias.values).shape) if isinstance(bias, gs.Constant) else None
        if shape is None or (shape and shape[-1] not in (1, channels)):
            return "its bias is not a constant the channel split can slice"
    return axis, channels, dense
