"""One relaxation for MPS and SuperNet: the same weights, vocabulary and temperature API."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import plinio_onnx as po
from plinio_onnx.errors import SettingError
from plinio_onnx.functions import relaxation

MODELS = Path(__file__).resolve().parent.parent / "models"


def test_weights_by_hand():
    logits = torch.tensor([0.5, 2.0, -1.0], requires_grad=True)
    expected = np.exp(np.array([0.5, 2.0, -1.0]) / 0.5)
    expected /= expected.sum()
    soft = relaxation.choice_weights(logits, 0.5, "softmax", True)
    assert np.allclose(soft.detach().numpy(), expected, rtol=1e-6)
    assert np.allclose(relaxation.probabilities(np.array([0.5, 2.0, -1.0]), 0.5), expected)
    hard = relaxation.choice_weights(logits, 0.5, "hard", True)
    assert hard.tolist() == [0.0, 1.0, 0.0]  # one-hot forward …
    (hard * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    grad_hard = logits.grad.clone()
    logits.grad = None
    (soft * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(grad_hard, logits.grad)  # … the softmax's gradient
    for sampling in relaxation.SAMPLINGS + (relaxation.FIXED,):  # eval: always the argmax
        assert relaxation.choice_weights(logits, 0.5, sampling, False).tolist() == [0.0, 1.0, 0.0]
    gumbel = relaxation.choice_weights(logits, 0.5, "gumbel", True)
    assert float(gumbel.detach().sum()) == pytest.approx(1.0) and gumbel.shape == (3,)
    assert torch.equal(relaxation.cost_weights(logits, 0.5, "gumbel", True), soft)  # the cost sees no noise
    per_channel = torch.randn(3, 5)  # MPS: precisions × channels, chosen along dim 0
    assert torch.equal(relaxation.one_hot_argmax(per_channel).argmax(0), per_channel.argmax(0))


def test_one_vocabulary_and_one_error():
    assert relaxation.sampling_mode("soft") == relaxation.sampling_mode(b"softmax") == "softmax"
    assert all(relaxation.sampling_mode(s) == s for s in relaxation.SAMPLINGS)
    for bad in ("uniform", relaxation.FIXED, None):
        assert not relaxation.is_sampling(bad)
    with pytest.raises(SettingError):
        relaxation.sampling_mode("uniform")
    with pytest.raises(SettingError):
        relaxation.check_temperature(0.0)
    assert issubclass(SettingError, po.PlinioOnnxError) and issubclass(SettingError, ValueError)


def test_mps_and_supernet_share_the_temperature_api():
    mps = po.MPS(MODELS / "digits_cnn.onnx", sampling="soft")  # the former spelling
    supernet = po.SuperNet(MODELS / "digits_cnn.onnx")
    assert mps.sampling == "softmax"
    assert {n.attrs["sampling"] for n in mps.searchable_graph().nodes if "sampling" in n.attrs} == {"softmax"}
    for model in (mps, supernet):
        model.set_temperature(0.5)
        assert model.temperature == pytest.approx(0.5)
        assert model.anneal(0.5) == pytest.approx(0.25) and model.temperature == pytest.approx(0.25)
        model.temperature = 2.0
        assert model.temperature == pytest.approx(2.0)
        for bad in (0.0, -1.0):
            with pytest.raises(SettingError):
                model.set_temperature(bad)
            with pytest.raises(SettingError):
                model.temperature = bad
        assert model.temperature == pytest.approx(2.0)
    with pytest.raises(SettingError):
        supernet.set_sampling("soft_max")
    supernet.set_sampling("soft")
    assert supernet.info.sampling == "softmax"


def test_checkpoints_with_the_former_spelling_resume():
    import json

    from plinio_onnx.functions import mps as mps_fn
    from plinio_onnx.passes.mps import METADATA_KEY

    graph = po.MPS(MODELS / "digits_cnn.onnx").searchable_graph()
    for node in graph.nodes:  # as written before "softmax" was the one spelling
        if "sampling" in node.attrs:
            node.attrs["sampling"] = "soft"
    info = json.loads(graph.metadata[METADATA_KEY])
    info["sampling"] = "soft"
    graph.metadata = {**graph.metadata, METADATA_KEY: json.dumps(info)}
    resumed = po.MPS(graph)
    assert resumed.sampling == "softmax"
    quantizers = [m for m in resumed.module.modules() if isinstance(m, (mps_fn.ActQuantizer, mps_fn.WeightQuantizer))]
    assert quantizers and {q.sampling for q in quantizers} == {"softmax"}
    x = torch.rand(2, 1, 8, 8)
    resumed.train()
    assert torch.isfinite(resumed(x)).all()
