"""The search hooks of PIT, MPS and SuperNet (what `optimize` asks of a searchable model), and
the method table that names them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import plinio_onnx as po
from plinio_onnx.methods.search_hooks import SearchHooks
from plinio_onnx.optimize.methods import METHODS, method_of_checkpoint
from plinio_onnx.passes.pit import METADATA_KEY as PIT_KEY
from plinio_onnx.passes.supernet import METADATA_KEY as SUPERNET_KEY

from _util import MODELS

DIGITS = MODELS / "digits_cnn.onnx"


def _kept(model) -> int:
    return sum(kept for kept, _ in model.kept_channels().values())


def test_pit_enforce_prunes_the_smallest_masks_down_to_the_target():
    model = po.PIT(DIGITS)
    with torch.no_grad():
        full = float(model.cost_of("params"))
        for group in model.info.groups:       # distinct mask values: a defined pruning order
            alpha = model.tensor(group.alpha[0])
            alpha.copy_(torch.linspace(0.6, 1.0, alpha.numel()))
    assert model.enforce_target("params", 0.5 * full)
    with torch.no_grad():
        cost = float(model.cost_of("params"))
    assert cost <= 0.5 * full
    # Greedy: the channel pruned last was needed (one more kept channel would exceed the target).
    assert _kept(model) < sum(total for _, total in model.kept_channels().values())
    assert not model.enforce_target("params", 1.0)   # below one channel per group: impossible


def test_pit_restore_re_keeps_the_most_marginal_channels_up_to_the_floor():
    model = po.PIT(DIGITS)
    with torch.no_grad():
        full = float(model.cost_of("params"))
        before = model.architecture_snapshot()
        name = model.info.groups[0].alpha[0]
        alpha = model.tensor(name)
        alpha[:4] = torch.tensor([0.1, 0.45, 0.3, 0.2])   # a step pruned four channels
        pruned = float(model.cost_of("params"))
    assert pruned < full
    assert model.restore_marginal("params", pruned, before) == 0      # already at the floor
    assert model.restore_marginal("params", pruned + 1, before) == 1  # one channel suffices
    assert float(model.tensor(name)[1].detach()) == pytest.approx(0.5 + 1e-3)   # the closest to the threshold
    assert model.restore_marginal("params", full, before) == 3
    with torch.no_grad():
        assert float(model.cost_of("params")) == full
    assert model.architecture()["kept_channels"][next(iter(model.kept_channels()))]["kept"] > 0


def test_supernet_hooks_with_and_without_pit():
    plain = po.SuperNet(DIGITS, cost="macs")
    assert plain.nas_lr_floor == 5e-2 and plain.min_cost("macs") is None
    assert [len(g["params"]) for g in plain.nas_param_groups(1e-3)] == [len(list(plain.nas_parameters()))]
    assert plain.architecture_snapshot() is None and plain.restore_marginal("macs", 1e9, None) == 0
    joint = po.SuperNet(DIGITS, cost="macs", pit=True)
    groups = joint.nas_param_groups(1e-3)
    assert joint.nas_lr_floor == 0.0 and [g["lr"] for g in groups] == [5e-2, 1e-3]   # logits, then masks
    assert sum(len(g["params"]) for g in groups) == len(list(joint.nas_parameters()))
    joint.after_search_epoch(10, 10)
    assert joint.temperature == pytest.approx(0.05)
    with torch.no_grad():
        joint.eval()
        full = float(joint.cost_of("macs"))
    assert joint.enforce_target("macs", 0.3 * full)
    with torch.no_grad():
        assert float(joint.eval().cost_of("macs")) <= 0.3 * full


def test_mps_hooks_calibrate_and_anneal():
    model = po.MPS(DIGITS, w_precisions=(4, 8), a_precisions=(8,))
    assert (model.default_cost, model.supports_targets, model.finetune_export) == ("size", False, False)
    assert model.nas_lr_floor == 1e-2
    x = torch.from_numpy(np.load(MODELS / "digits.npz")["x"][:32])
    clips_before = [float(p.detach()) for n, p in model.module.named_parameters() if "clip" in n]
    model.before_search([x])
    assert clips_before != [float(p.detach()) for n, p in model.module.named_parameters() if "clip" in n]
    t = model.temperature
    model.after_search_epoch(1, 10)
    assert model.temperature == pytest.approx(0.9 * t)


def test_method_table_names_classes_and_finds_a_checkpoints_method():
    assert all(issubclass(m.model_class, SearchHooks) for m in METHODS.values())
    assert {name: m.model_class.__name__ for name, m in METHODS.items()} == {
        "pit": "PIT", "mps": "MPS", "qat": "MPS", "pit+mps": "MPS", "supernet": "SuperNet", "supernet+pit": "SuperNet",
        "odimo": "ODiMO"}
    assert METHODS["supernet+pit"].metadata_keys == (SUPERNET_KEY, PIT_KEY)
    graph = METHODS["supernet+pit"].build(po.load(DIGITS), "macs").searchable_graph()
    assert method_of_checkpoint(graph).name == "supernet+pit"
    assert method_of_checkpoint(METHODS["pit"].build(po.load(DIGITS), "params").searchable_graph()).name == "pit"
    assert method_of_checkpoint(po.load(DIGITS)) is None
    odimo = METHODS["odimo"].build(po.load(DIGITS), METHODS["odimo"].costs["latency"]()).searchable_graph()
    assert "plinio.method" not in odimo.metadata   # found by its records (both MPS's and ODiMO's)
    assert method_of_checkpoint(odimo).name == "odimo"
