"""Initializers tied by exporters (Identity chains, one tensor read in several slots): `load`
unties them by default (``tied="copy"``) or keeps genuine ties as one tensor (``tied="share"``);
methods treat a shared weight as unprunable, with the reason."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import plinio_onnx as po
from plinio_onnx.passes.tied_initializers import shared_initializers

from _util import ROOT, random_architecture, relative_error, run_ort, run_torch


class _TiedNet(torch.nn.Module):
    """conv1 and conv2 share one weight (a genuine tie); a fresh BN (ones and zeros)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv2.weight = self.conv1.weight
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv0(x))
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.bn(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _export(model: torch.nn.Module, x: torch.Tensor, path, exporter: str) -> None:
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                              training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                              input_names=["x"], dynamic_axes={"x": {0: "batch"}})
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=True,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))


@pytest.fixture(scope="module", params=["legacy", "dynamo"])
def tied_model(request, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tied") / f"tied_{request.param}.onnx"
    _export(_TiedNet(), torch.randn(2, 3, 8, 8), path, request.param)
    return path


def _feeds(graph: po.Graph, batch: int = 2) -> dict:
    x = np.random.default_rng(0).standard_normal((batch, 3, 8, 8)).astype(np.float32)
    return {graph.gs.inputs[0].name: x}


def test_default_unties_every_reader(tied_model):
    graph = po.load(tied_model)
    module = po.to_torch(graph).eval()
    # conv0 w+b, conv1 w+b, conv2 w (a copy)+b, BN scale+shift, fc w+b; statistics are buffers
    assert len(list(module.parameters())) == 10
    assert len(list(module.buffers())) == 2
    assert not shared_initializers(graph.gs)
    feeds = _feeds(graph)
    expected = run_ort(onnx.load(str(tied_model)), feeds)[0]
    assert relative_error(expected, run_torch(module, feeds, list(feeds))[0]) <= 1e-5


def test_share_keeps_the_genuine_tie_and_untied_statistics(tied_model):
    graph = po.load(tied_model, tied="share")
    module = po.to_torch(graph).train()
    assert len(list(module.parameters())) == 9      # one weight for conv1 and conv2
    assert len(list(module.buffers())) == 2          # running mean/var never alias a weight
    shared = shared_initializers(graph.gs)
    assert len(shared) == 1 and len(next(iter(shared.values()))) == 2
    feeds = _feeds(graph)
    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    out = module(torch.from_numpy(feeds[graph.gs.inputs[0].name]))
    out.sum().backward()
    assert all(p.grad is not None for p in module.parameters())
    # the forward pass updated the running statistics, not the BN scale/shift equal to them
    assert all(not torch.equal(b, torch.ones(8)) and not torch.equal(b, torch.zeros(8))
               for b in module.buffers())
    assert all(torch.equal(params[n], p) for n, p in module.named_parameters())


def test_shared_weight_is_unprunable_with_its_reason(tied_model):
    graph = po.load(tied_model, tied="share")
    model = po.PIT(graph)
    summary = model.summary()
    assert "is shared by" in summary
    assert float(model.cost) == 1428.0  # nothing prunable: the full parameter count
    for cls in (po.PIT, po.MPS, po.SuperNet):
        searchable = cls(graph)
        random_architecture(searchable, 0, ("logits",), ("mask", "alpha"), 0.5)
        searchable.eval()
        feeds = _feeds(graph)
        with torch.no_grad():
            reference = searchable(torch.from_numpy(feeds[graph.gs.inputs[0].name])).numpy()
        exported = searchable.export()
        got = run_ort(exported.to_onnx(), feeds)[0]
        assert relative_error(reference, got) <= 1e-4, cls.__name__


def test_identity_chains_and_double_slots_hand_built():
    # W -> Identity -> Identity -> conv2's weight; BN reads `ones` as scale and as variance
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2, 4, 4])
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((2, 2, 1, 1)).astype(np.float32), "W"),
             numpy_helper.from_array(np.ones(2, np.float32), "ones"),
             numpy_helper.from_array(np.zeros(2, np.float32), "zeros")]
    nodes = [helper.make_node("Identity", ["W"], ["W_a"]),
             helper.make_node("Identity", ["W_a"], ["W_b"]),
             helper.make_node("Identity", ["zeros"], ["mean"]),
             helper.make_node("Conv", ["x", "W"], ["c1"], name="conv1"),
             helper.make_node("Conv", ["c1", "W_b"], ["c2"], name="conv2"),
             helper.make_node("BatchNormalization", ["c2", "ones", "zeros", "mean", "ones"], ["y"],
                              name="bn")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": rng.standard_normal((3, 2, 4, 4)).astype(np.float32)}
    expected = run_ort(model, feeds)[0]
    for tied, params, buffers in (("copy", 4, 2), ("share", 3, 2)):
        graph = po.load(model, tied=tied)
        assert not [n for n in graph.nodes if n.op == "Identity"]
        module = po.to_torch(graph).eval()
        assert (len(list(module.parameters())), len(list(module.buffers()))) == (params, buffers), tied
        assert relative_error(expected, run_torch(module, feeds, ["x"])[0]) <= 1e-6
    assert "W_b" in po.load(model).initializers()  # the copy keeps the exporter's name
    with pytest.raises(ValueError, match="tied="):
        po.load(model, tied="yes")


def test_fresh_mobilenetv2_legacy_preserve_trains(tmp_path):
    """A fresh MobileNetV2-style net, legacy exporter, PRESERVE, no constant folding: every
    weight and BN affine parameter is a parameter, running statistics are buffers."""
    import sys
    sys.path.insert(0, str(ROOT))
    from models.zoo import ZOO, example_input
    torch.manual_seed(0)
    net = ZOO["mobilenetv2_tiny"].build()
    path = tmp_path / "fresh.onnx"
    x = example_input("mobilenetv2_tiny", batch=2)
    _export_input(net, x, path)
    graph = po.load(path)
    module = po.to_torch(graph).train()
    expected_params = sum(p.numel() for p in net.parameters())
    expected_buffers = sum(b.numel() for n, b in net.named_buffers() if "running" in n)
    assert sum(p.numel() for p in module.parameters()) == expected_params
    assert sum(b.numel() for b in module.buffers()) == expected_buffers
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    before = {n: b.clone() for n, b in module.named_buffers()}
    loss = module(x).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in module.parameters())
    optimizer.step()
    assert any(not torch.equal(before[n], b) for n, b in module.named_buffers())
    module.eval()
    feeds = {graph.gs.inputs[0].name: x.numpy()}
    torch_out = run_torch(po.to_torch(graph).eval(), feeds, list(feeds))[0]
    assert relative_error(run_ort(onnx.load(str(path)), feeds)[0], torch_out) <= 1e-5


def _export_input(net, x, path) -> None:
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17,
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                          input_names=["input"], dynamic_axes={"input": {0: "batch"}})
