"""to_torch → train → sync → save → load: trainable, mode-aware and lossless."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import plinio_onnx as po

from _util import MODELS, relative_error, run_ort, run_torch


def _digits(n: int = 256):
    data = np.load(MODELS / "digits.npz")
    return torch.from_numpy(data["x"][:n]), torch.from_numpy(data["y"][:n])


def test_train_sync_save_reload_is_lossless(tmp_path):
    graph = po.load(MODELS / "digits_cnn.onnx")
    module = po.to_torch(graph)
    params = dict(module.named_parameters())
    assert params and all(p.requires_grad for p in params.values())
    x, y = _digits()
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    module.train()
    losses = []
    for step in range(30):
        batch = slice((step * 32) % 256, (step * 32) % 256 + 32)
        loss = torch.nn.functional.cross_entropy(module(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])

    module.eval()
    with torch.no_grad():
        trained = module(x).numpy()
    po.sync(graph, module)
    out = graph.save(tmp_path / "trained.onnx")
    reloaded = po.to_torch(po.load(out)).eval()
    assert np.array_equal(run_torch(reloaded, {"x": x.numpy()}, ["x"])[0], trained)
    assert relative_error(run_ort(out, {"input": x.numpy()})[0], trained) < 1e-4


def test_batchnorm_updates_running_stats_only_in_train_mode():
    graph = po.load(MODELS / "digits_cnn.onnx")
    module = po.to_torch(graph)
    x, _ = _digits(64)
    buffers = {k: v.clone() for k, v in module.named_buffers() if v.dtype.is_floating_point}
    module.eval()
    with torch.no_grad():
        module(x)
    assert all(torch.equal(buffers[k], v) for k, v in module.named_buffers() if k in buffers)
    module.train()
    with torch.no_grad():
        module(x)
    assert any(not torch.equal(buffers[k], v) for k, v in module.named_buffers() if k in buffers)


def test_dropout_is_active_only_in_train_mode():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])
    ratio = numpy_helper.from_array(np.array(0.5, np.float32), "ratio")
    node = helper.make_node("Dropout", ["x", "ratio"], ["y"], name="drop")
    model = helper.make_model(helper.make_graph([node], "d", [x], [y], [ratio]),
                              opset_imports=[helper.make_opsetid("", 17)])
    module = po.to_torch(po.load(model))
    data = torch.ones(8, 64)
    assert torch.equal(module.eval()(data), data)
    dropped = module.train()(data)
    assert (dropped == 0).any() and (dropped == 2).any()


@pytest.mark.parametrize("batch", [1, 5, 17])
def test_symbolic_batch_dimension(batch):
    graph = po.load(MODELS / "resnet8.onnx")
    module = po.to_torch(graph).eval()
    x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    assert relative_error(run_ort(MODELS / "resnet8.onnx", {"input": x})[0],
                          run_torch(module, {"x": x}, ["x"])[0]) <= 1e-4


def test_floating_weights_are_parameters_and_integer_constants_buffers():
    graph = po.load(MODELS / "transformer_tiny.onnx")
    module = po.to_torch(graph)
    for name, buf in module.named_buffers():
        assert not buf.dtype.is_floating_point or buf.numel() <= 1, name
    onnx_names = set(module.initializer_names.values())
    assert onnx_names <= set(graph.initializers())
