"""The pass interface (in place vs. functional, pre/postconditions, sequences) and the finalize pipeline."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

import plinio_onnx as po
from plinio_onnx.errors import PassError
from plinio_onnx.finalize import Finalize, finalize_passes
from plinio_onnx.graph import PLINIO_DOMAIN, reinfer_shapes
from plinio_onnx.passes.infra import (FunctionalPass, InPlacePass, PassContractError, PassResult,
                                      PostconditionError, PreconditionError, Sequential)
from plinio_onnx.records import PITRecord, SuperNetRecord

from _util import MODELS


class _Rename(InPlacePass):
    def call(self, graph):
        graph.gs.name = "renamed"
        return PassResult(graph, True)


class _CopyingButInPlace(InPlacePass):
    def call(self, graph):
        return PassResult(graph.copy(), True)


class _ReturnsInput(FunctionalPass):
    def call(self, graph):
        return PassResult(graph, False)


class _NeedsName(InPlacePass):
    def requires(self, graph):
        if graph.gs.name != "renamed":
            raise ValueError("the graph is not renamed")

    def call(self, graph):
        return PassResult(graph, False)


class _PromisesOutputs(InPlacePass):
    def call(self, graph):
        graph.gs.outputs = []
        return PassResult(graph, True)

    def ensures(self, graph):
        assert graph.gs.outputs, "no graph output is left"


class _Fails(InPlacePass):
    def call(self, graph):
        raise PassError("this pass always fails", file=graph.source)


def _graph():
    return po.load(MODELS / "digits_cnn.onnx")


def test_declared_in_place_or_functional_is_enforced():
    graph = _graph()
    result = _Rename()(graph)
    assert result.graph is graph and result.modified and graph.gs.name == "renamed"
    with pytest.raises(PassContractError, match="_CopyingButInPlace is declared in place"):
        _CopyingButInPlace()(graph)
    with pytest.raises(PassContractError, match="_ReturnsInput is declared functional"):
        _ReturnsInput()(graph)


def test_pre_and_postconditions_name_the_pass():
    with pytest.raises(PreconditionError, match="precondition of pass _NeedsName failed: .*not renamed"):
        _NeedsName()(_graph())
    with pytest.raises(PostconditionError, match="postcondition of pass _PromisesOutputs failed: .*no graph output"):
        _PromisesOutputs()(_graph())


def test_sequential_says_which_passes_ran_before_a_failure():
    graph = _graph()
    steps = Sequential([_Rename(), _NeedsName(), _Fails(), _Rename()], name="demo")
    assert steps.in_place
    with pytest.raises(PassError, match="this pass always fails") as info:
        steps(graph)
    assert info.value.passes_run == ("_Rename", "_NeedsName")
    assert "demo: pass _Fails failed after _Rename, _NeedsName" in info.value.__notes__
    assert Sequential([_Rename(), _NeedsName()])(_graph()).modified


def test_search_passes_are_functional_and_the_wrappers_return_graphs():
    graph = _graph()
    before = [n.name for n in graph.nodes]
    for make in (po.passes.PITPass(), po.passes.MPSPass(), po.passes.SuperNetPass(),
                 po.passes.ODiMOPass(accelerators=po.odimo.DEFAULT_ACCELERATORS)):
        assert not make.in_place
        result = make(graph)
        assert result.modified and result.graph is not graph
    assert [n.name for n in graph.nodes] == before and not graph.metadata
    assert isinstance(po.passes.pit(graph), po.Graph)
    for finalizing in finalize_passes():
        assert finalizing.in_place
    assert [p.name for p in finalize_passes()] == ["PickBranches", "PruneChannels", "SplitAccelerators",
                                                   "FoldQuantizers", "StripSearchFunctions"]


def test_a_search_pass_requires_a_graph_it_can_search():
    searchable = po.passes.mps(_graph())
    with pytest.raises(PreconditionError, match="MPSPass.*already searchable by MPS"):
        po.passes.mps(searchable)
    with pytest.raises(PreconditionError, match="PITPass.*already holds ai.plinio nodes"):
        po.passes.pit(searchable)


def test_prune_requires_the_choices_picked_and_quantizers_the_masks_pruned():
    joint = po.SuperNet(MODELS / "digits_cnn.onnx", pit=True).searchable_graph()
    with pytest.raises(PreconditionError, match="pick the SuperNet branches"):
        po.passes.prune_channels(joint.copy())
    picked = po.passes.pick_branches(joint.copy())
    assert not SuperNetRecord.present(picked) and PITRecord.present(picked)
    assert not PITRecord.present(po.passes.prune_channels(picked))
    pit_mps = po.MPS(MODELS / "digits_cnn.onnx", pit=True).searchable_graph()
    with pytest.raises(PreconditionError, match="prune the PIT channels"):
        po.passes.fold_quantizers(pit_mps.copy())


def test_finalize_ensures_no_plinio_node_is_left():
    graph = po.passes.pit(_graph())
    x = graph.gs.nodes[0].outputs[0]
    graph.gs.nodes.append(gs.Node("Unknown", name="stray", domain=PLINIO_DOMAIN, inputs=[x],
                                  outputs=[gs.Variable("stray_out", dtype=np.float32)]))
    graph.gs.outputs.append(graph.gs.nodes[-1].outputs[0])
    with pytest.raises(PostconditionError, match="Finalize.*ai.plinio nodes are left: stray"):
        Finalize()(graph)
    with pytest.raises(PostconditionError):
        po.finalize(graph)


def test_finalize_leaves_its_input_alone_and_reports_whether_it_changed_it():
    searchable = po.passes.pit(_graph())
    text = searchable.metadata["plinio.pit"]
    result = Finalize()(searchable)
    assert result.modified and searchable.metadata["plinio.pit"] == text
    assert not any((n.domain or "") == PLINIO_DOMAIN for n in result.graph.nodes)


def test_reinfer_shapes_forgets_stale_shapes_or_keeps_known_ones():
    graph = _graph()
    out = graph.gs.nodes[0].outputs[0]
    known = list(out.shape)
    out.shape = [1, 2, 3, 4]          # stale
    reinfer_shapes(graph, what="test")
    assert list(out.shape)[1:] == known[1:]
    out.shape = list(known)
    added = gs.Variable("added", dtype=np.float32)
    graph.gs.nodes.append(gs.Node("Add", name="add8", inputs=[out, gs.Constant("eight", np.zeros(8, np.float32))],
                                  outputs=[added]))
    graph.gs.outputs.append(added)
    reinfer_shapes(graph, what="test", forget=False)   # the new tensor gets its shape, the known stay
    assert list(added.shape) == list(out.shape) == known
    graph.gs.nodes[-1].inputs[1] = gs.Constant("five", np.zeros(5, np.float32))
    with pytest.raises(PassError, match="the broken graph"):
        reinfer_shapes(graph, what="the broken graph")
