"""MPS's bit-widths of all layers at once (`plinio_onnx.methods.mps_bits.BatchedBits`) against
the layer-by-layer `MPS.weight_bits` / `input_bits`: the same values (in eval exactly, in training
up to float32 rounding of the relaxation) and gradients, for every sampling and layout."""
from __future__ import annotations

import pytest
import torch

import plinio_onnx as po
from plinio_onnx.methods.searchable import SearchableModel

from _util import MODELS


def _per_layer(model):
    return SearchableModel.effective_specs(model)


def _bits(specs):
    return [(s.weight_bits, s.input_bits) for s in specs if s.weight_bits is not None]


@pytest.mark.parametrize("options", [{}, {"per_channel": False}, {"zero_bit": True}, {"sampling": "hard"},
                                     {"sampling": "gumbel"}])
@pytest.mark.parametrize("training", [True, False])
def test_batched_bits_equal_the_layer_by_layer_ones(options, training):
    torch.manual_seed(0)
    model = po.MPS(MODELS / "resnet8.onnx", w_precisions=(2, 4, 8), a_precisions=(2, 4, 8), **options)
    with torch.no_grad():
        for p in model.nas_parameters():
            p.normal_()   # distinct logits: the argmax and the softmax differ per column
    assert model._batched_bits() is not None
    model.train(training)
    got, want = _bits(model.effective_specs()), _bits(_per_layer(model))
    assert len(got) == len(want) == len(model.info.layers)
    for (gw, gi), (ww, wi) in zip(got, want):
        if training:
            torch.testing.assert_close(gw, ww, rtol=1e-6, atol=0)
            torch.testing.assert_close(gi, wi, rtol=1e-6, atol=0)
        else:
            assert float(gw) == float(ww) and float(gi) == float(wi)
    if training:
        logits = list(model.nas_parameters())
        (got_grad,) = torch.autograd.grad(sum(w * 3.0 + i for w, i in got), logits)
        (want_grad,) = torch.autograd.grad(sum(w * 3.0 + i for w, i in want), logits)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)


def test_the_cost_reads_the_batched_bits():
    model = po.MPS(MODELS / "digits_cnn.onnx", w_precisions=(2, 4, 8), a_precisions=(2, 4, 8))
    model.train()
    batched = model.cost_of("bitops")
    model.__dict__["_batched"] = None   # (layer by layer)
    torch.testing.assert_close(batched, model.cost_of("bitops"), rtol=1e-6, atol=0)


@pytest.mark.parametrize("options", [{"pit": True}, {"w_precisions": (8,), "a_precisions": (8,)}])
def test_layer_by_layer_where_the_bits_cannot_be_batched(options):
    """PIT's kept channels weigh the bits; one precision: nothing packed."""
    model = po.MPS(MODELS / "digits_cnn.onnx", **options)
    if "pit" in options:
        assert model.effective_specs()[0].weight_bits is not None
    else:
        assert model._batched_bits() is None
    model.train()
    torch.testing.assert_close(model.cost, sum(po.cost.bits.size(s) for s in _per_layer(model)))
