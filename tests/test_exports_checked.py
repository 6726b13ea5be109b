"""Every export is topologically sorted and passes the checker before it is written: SuperNet on a
ShuffleNet-style unit whose consecutive layers both pick their identity branch."""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch

import plinio_onnx as po
from plinio_onnx.passes.supernet import METADATA_KEY

from _util import relative_error, run_ort


class _ShuffleUnit(torch.nn.Module):
    """grouped 1×1 → channel shuffle → depthwise 3×3 → grouped 1×1, added back to its input."""

    def __init__(self, channels: int = 16, groups: int = 4) -> None:
        super().__init__()
        self.groups = groups
        self.pw1 = torch.nn.Conv2d(channels, channels, 1, groups=groups)
        self.dw = torch.nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.pw2 = torch.nn.Conv2d(channels, channels, 1, groups=groups)

    def forward(self, x):
        y = torch.relu(self.pw1(x))
        n, c, h, w = y.shape
        y = y.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)
        return torch.relu(x + self.pw2(self.dw(y)))


@pytest.fixture(scope="module")
def shuffle_unit(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("shuffle") / "unit.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_ShuffleUnit().eval(), (torch.randn(1, 16, 8, 8),), str(path),
                          dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    return path


def _pick(model, choices: dict[str, str]) -> None:
    """Make ``choices`` (layer → branch name) the argmax of every Choice's logits."""
    info = json.loads(model.searchable_graph().metadata[METADATA_KEY])
    with torch.no_grad():
        for choice in info["choices"]:
            names = [b["name"] for b in choice["branches"]]
            logits = torch.full((len(names),), -5.0)
            logits[names.index(choices.get(choice["name"], "original"))] = 5.0
            model.tensor(choice["logits"]).copy_(logits)


@pytest.mark.parametrize("picked", [("dw", "pw2"), ("pw1", "dw", "pw2"), ("pw1",)])
def test_supernet_identity_chain_exports_sorted(shuffle_unit, tmp_path, picked):
    model = po.SuperNet(shuffle_unit)
    _pick(model, {f"/{layer}/Conv": "identity" for layer in picked})
    model.eval()
    x = np.random.default_rng(0).standard_normal((2, 16, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    out = tmp_path / "unit_sn.onnx"
    model.export(out)
    saved = onnx.load(str(out))
    onnx.checker.check_model(saved, full_check=True)  # sorted: every input produced earlier
    produced = {i.name for i in saved.graph.input} | {i.name for i in saved.graph.initializer}
    for node in saved.graph.node:
        assert all(not name or name in produced for name in node.input), node.name
        produced.update(node.output)
    assert relative_error(expected, run_ort(saved, {"x": x})[0]) <= 1e-5
    assert not any(n.op_type == "Conv" and n.name.startswith(f"/{layer}/") for layer in picked
                   for n in saved.graph.node)
