"""Every Conv a SuperNet search writes spells out its attributes: kernel_shape, strides, pads,
dilations and group (consumers such as qonnx's channels-last conversion require them even
where ONNX has defaults)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import plinio_onnx as po

from _util import MODELS, ZOO_NAMES

CONV_ATTRIBUTES = {"kernel_shape", "strides", "pads", "dilations", "group"}
#: every Conv alternative the pass can generate (kernels, separable, group, low rank)
FULL_MENU = {"kernels": [1, 3, 5], "separable": True, "groups": [2], "conv_ranks": [0.5]}


def _missing_attributes(graph: po.Graph) -> list[tuple[str, list[str]]]:
    return [(node.name, sorted(CONV_ATTRIBUTES - set(node.attrs)))
            for node in graph.nodes if node.op == "Conv" and not CONV_ATTRIBUTES <= set(node.attrs)]


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_supernet_convs_carry_every_attribute(name):
    model = po.SuperNet(MODELS / f"{name}.onnx", menu=FULL_MENU)
    searchable = model.searchable_graph()
    assert _missing_attributes(searchable) == []
    rng = np.random.default_rng(3)
    for seed in range(3):   # random logits: several argmax architectures
        with torch.no_grad():
            for param in model.nas_parameters():
                param.copy_(torch.from_numpy(rng.standard_normal(param.shape).astype(np.float32)))
        model.eval()
        exported = model.export()
        assert _missing_attributes(exported) == []
