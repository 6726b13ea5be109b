"""The SuperNet pass: give selected layers (or subgraphs) shape-compatible alternatives to choose from.

Every searched place becomes a ``Choice`` (`plinio_onnx.functions.supernet`) over N branches
that all read the same input tensor and produce a tensor of the same shape: branch 0 is the
original subgraph, its nodes untouched; the others are plain ONNX nodes inserted beside it.
Their outputs are stacked (``Unsqueeze`` + ``Concat``) into the Choice, which writes the tensor the
original wrote, so everything downstream (and graph outputs) keeps its name.

The pieces, one module each:

* `plinio_onnx.passes.supernet_regions` — the place a Choice replaces: a layer (Conv, Gemm,
  MatMul with a constant weight; a MatMul with its bias ``Add``), a named node, or the
  single-entry, single-exit subgraph between two tensors.
* `plinio_onnx.passes.supernet_builtins` — the builtin alternatives (``kernel:K``,
  ``separable``, ``group:G``, ``rank:R``, ``identity``) and how each inherits the original's
  weights, so a search can start from a trained model.
* `plinio_onnx.passes.supernet_subgraphs` — user-defined alternatives: ONNX graphs with one
  input and one output (their initializers become trainable weights of the branch).
* `plinio_onnx.passes.supernet_spec` — the automatic `Menu` and JSON spec files (`load_spec`;
  builtin names, and paths relative to the file).

Here: which places get which candidates (user regions, then user layers, then the automatic menu
on the layers ``include`` / ``exclude`` / ``op_types`` select) and the Choice written for each.

Guarantee: with the logits at their initial value (all equal) the eval-mode module and the
finalized graph compute exactly what ``graph`` computed (argmax ties go to the original branch);
the ONNX body (softmax mix) equals the input model when the original's logit dominates.
The record (choices, branches, their nodes) is stored in the graph's metadata
(`plinio_onnx.records.SuperNetRecord`).
"""
from __future__ import annotations

import fnmatch
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from plinio_onnx.errors import PassError
from plinio_onnx.functions import add_functions
from plinio_onnx.functions import relaxation
from plinio_onnx.functions import supernet as fn
from plinio_onnx.graph import PLINIO_DOMAIN, Graph, reinfer_shapes
from plinio_onnx.records import Branch, ChoiceRecord, SkippedPlace, SuperNetRecord

from .infra import FunctionalPass, PassResult
from .supernet_builtins import BUILTIN_KINDS, MAKERS, Candidate, Emitter, parse_builtin, region_identity
from .supernet_regions import LAYER_OPS, Region, is_layer, layer_region, node_region, subgraph_region
from .supernet_spec import Menu, load_spec
from .supernet_subgraphs import alternative_model, check_alternative_shape, graph_candidate

__all__ = ["BUILTIN_KINDS", "LAYER_OPS", "LOGITS_SUFFIX", "METADATA_KEY", "TEMPERATURE", "Menu", "SuperNetPass",
           "load_spec", "parse_builtin", "supernet"]

METADATA_KEY = SuperNetRecord.KEY
TEMPERATURE = "supernet.temperature"
LOGITS_SUFFIX = ".supernet_logits"

Alternative = "str | onnx.ModelProto | onnx.GraphProto | os.PathLike"


def _selected(name: str, include, exclude) -> bool:
    """Whether a node name matches ``include`` (None: all) and no ``exclude`` pattern."""
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude))


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
        self.planned: list[tuple[Region, list[Candidate]]] = []
        self.taken: set[int] = set()
        self.skipped: list[SkippedPlace] = []

    def claim(self, region: Region, where: str) -> bool:
        ids = {id(n) for n in region.nodes}
        if ids & self.taken:
            self.problems.append(f"{where}: overlaps another searched place")
            return False
        self.taken.update(ids)
        return True

    def user_candidates(self, region: Region, alternatives: Sequence, where: str) -> list[Candidate]:
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
                    model, name = alternative_model(alt, self.opset, where)
                    check_alternative_shape(model, region, name, where)
                    out.append(graph_candidate(model, name))
            except PassError as err:
                self.problems.append(err.message)
        if not alternatives:
            self.problems.append(f"{where}: no alternatives given")
        return out

    @staticmethod
    def _builtin(region: Region, alt: str, kind: str, arg) -> Candidate | str:
        if region.layer is None:
            return region_identity(region) if kind == "identity" else (
                f"builtin {alt!r} needs a Conv/Gemm/MatMul layer; a region only takes 'identity' or ONNX graphs")
        maker = MAKERS.get((region.layer.op, kind))
        return maker(region, arg, True) if maker else f"{kind!r} does not apply to {region.layer.op}"

    def user_regions(self, regions: list) -> None:
        for entry in regions:
            entry = dict(entry)
            where = f"region {entry.get('input')!r} → {entry.get('output')!r}"
            try:
                region = subgraph_region(self.g, self.tensors, entry.get("input"), entry.get("output"),
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
                region = node_region(node, self.graph_outputs)
            except PassError as err:
                self.problems.append(err.message)
                continue
            if self.claim(region, where):
                self.planned.append((region, self.user_candidates(region, alternatives, where)))

    def automatic(self, op_types: tuple[str, ...], include, exclude, menu: Menu) -> None:
        for node in list(self.g.nodes):
            if node.op not in op_types or not _selected(node.name, include, exclude) or id(node) in self.taken:
                continue
            if not is_layer(node):
                self.skipped.append(SkippedPlace(node=node.name, reason="no constant weight"))
                continue
            region = layer_region(node, self.graph_outputs)
            if any(id(n) in self.taken for n in region.nodes):
                continue
            candidates, seen = [], {"original"}
            for kind, arg in menu.requests(node.op):
                made = MAKERS[(node.op, kind)](region, arg, False)
                if isinstance(made, Candidate) and made.name not in seen:
                    seen.add(made.name)
                    candidates.append(made)
            if not candidates:
                self.skipped.append(SkippedPlace(node=node.name, reason="no alternative fits"))
                continue
            self.claim(region, node.name)
            self.planned.append((region, candidates))


def _insert_choice(g: gs.Graph, index: int, region: Region, candidates: list[Candidate],
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
        emitter = Emitter(g, f"{base}/supernet/{name}", region)
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
