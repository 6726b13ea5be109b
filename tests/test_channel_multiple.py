"""PIT's channel blocks (``channel_multiple``): exported channel counts on the grid, the search's
discrete cost equal to the export's, ONNX Runtime equal to the masked torch model, checkpoints
keeping their blocks, clear errors, and the ``--channel-multiple`` flag end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import plinio_onnx as po
from plinio_onnx.cost import bits as bit_costs
from plinio_onnx.data import random_inputs
from plinio_onnx.errors import PlinioOnnxError
from plinio_onnx.functions.pit_keep import block_index, block_sizes, group_keep
from plinio_onnx.optimize.config import OptimizeConfig
from plinio_onnx.optimize.methods import DEFAULT_CHANNEL_MULTIPLE, default_channel_multiple
from plinio_onnx.records import PITRecord

from _util import MODELS, random_architecture, relative_error, run_ort, run_torch


def _on_grid(kept: int, total: int, multiple: int) -> bool:
    """Kept counts a search in blocks of ``multiple`` may leave: multiples of it, all, or (a size
    that is not a multiple) multiples plus the left-over first block."""
    return kept == total or kept % multiple == 0 or kept % multiple == total % multiple


def _out_channels(graph: po.Graph) -> dict[str, int]:
    return {spec.name: int(spec.out_channels) for spec in po.cost.layer_specs(graph)}


def _check_export(model, graph: po.Graph, multiple: int, tolerance: float = 1e-4) -> po.Graph:
    """Export ``model`` (eval mode): ONNX Runtime equals the masked torch model; every layer's
    output channels and every group's kept channels are on the grid; returns the export."""
    model.eval()
    feeds = random_inputs(graph, batch=2, seed=1)
    expected = run_torch(model, feeds, [t.name for t in graph.gs.inputs])
    exported = model.export()
    for e, g in zip(expected, run_ort(exported.to_onnx(), feeds)):
        assert relative_error(e, g) <= tolerance
    before, after = _out_channels(graph), _out_channels(exported)
    assert any(after[name] < before[name] for name in after if name in before)  # something was pruned
    for name, count in after.items():
        if name in before:
            assert _on_grid(count, before[name], multiple), (name, count, before[name])
    for group_name, (kept, total) in model.pit.kept_channels().items():
        assert _on_grid(kept, total, multiple), (group_name, kept, total)
    return exported


def test_blocks_are_cut_from_the_end_and_cover_every_channel():
    assert block_index(16, 8).tolist() == [0] * 8 + [1] * 8
    assert block_index(20, 8).tolist() == [0] * 4 + [1] * 8 + [2] * 8   # the left-over 4 first
    assert block_sizes(20, 8).tolist() == [4, 8, 8]
    assert block_index(5, 1).tolist() == [0, 1, 2, 3, 4]
    # the last block is the kept-alive one: a full block, so a pruned layer keeps a multiple
    record = PITRecord.of(po.passes.pit(po.load(MODELS / "densenet_tiny.onnx"), channel_multiple=8))
    group = next(g for g in record.groups if g.size == 20)
    values = {group.alpha[0]: np.array([0.0, 0.0, 0.0], np.float32)}
    assert group.block == 8 and group_keep(values.get, group, 0.5).tolist() == list(range(12, 20))


@pytest.mark.parametrize("name,multiple", [("resnet8", 8), ("dscnn", 8), ("mobilenetv2_tiny", 16),
                                           ("densenet_tiny", 8), ("transformer_tiny", 8), ("tcn", 4)])
def test_pit_exports_multiples_and_costs_what_it_exports(name, multiple):
    graph = po.load(MODELS / f"{name}.onnx")
    model = po.PIT(graph, channel_multiple=multiple)
    assert all(g.block == multiple for g in model.info.groups)
    assert all(model.tensor(g.alpha[0]).numel() == -(-g.size // multiple) for g in model.info.groups if not g.atoms)
    random_architecture(model, 0, (), (".pit_alpha",), 0.5)
    exported = _check_export(model, graph, multiple)
    with torch.no_grad():
        for cost in (po.cost.params, po.cost.macs):
            assert float(model.cost_of(cost)) == po.cost.total(exported, cost)


def test_small_groups_are_kept_whole_and_reported():
    graph = po.load(MODELS / "transformer_tiny.onnx")
    record = po.PIT(graph, channel_multiple=8).info
    assert all(g.size > 8 for g in record.groups)
    assert any("at most 8 channels" in s.reason and s.size == 4 for s in record.skipped)


def test_mps_with_pit_exports_multiples_and_costs_what_it_exports():
    graph = po.load(MODELS / "resnet8.onnx")
    model = po.MPS(graph, pit=True, channel_multiple=8)
    feeds = random_inputs(graph, batch=2, seed=1)
    model.calibrate(*[torch.from_numpy(v) for v in feeds.values()])
    random_architecture(model, 2, (".mps_w_alpha", ".mps_a_alpha"), (".pit_alpha",), 0.5)
    model.eval()
    expected = run_torch(model, feeds, ["input"])[0]
    exported = _check_export(model, graph, 8, tolerance=1.0)  # (quantized: checked to one step below)
    step = max(float(expected.max() - expected.min()), 1e-6) / 255
    assert np.max(np.abs(expected - run_ort(exported.to_onnx(), feeds)[0])) <= step
    with torch.no_grad():
        assert float(model.cost_of("size_bits")) == bit_costs.total_of(exported, bit_costs.size_bits)
        assert float(model.cost_of("params")) == po.cost.total(bit_costs._constant_weights(exported))


def test_supernet_with_pit_exports_multiples_and_costs_what_it_exports():
    graph = po.load(MODELS / "dscnn.onnx")
    model = po.SuperNet(graph, pit=True, channel_multiple=8)
    assert all(g.block == 8 for g in model.pit.info.groups)
    random_architecture(model, 1, (".supernet_logits",), (".pit_alpha",), 0.5)
    exported = _check_export(model, graph, 8)
    with torch.no_grad():
        for cost in (po.cost.params, po.cost.macs):
            assert float(model.cost_of(cost)) == po.cost.total(exported, cost)


def test_fused_block_masks_equal_the_per_node_functions():
    class PerNode(po.PIT):
        module_passes = ()

    graph = po.load(MODELS / "resnet8.onnx")
    fused, reference = po.PIT(graph, channel_multiple=8), PerNode(graph, channel_multiple=8)
    assert "block_mask(" not in fused.module.code and "block_mask(" in reference.module.code
    random_architecture(fused, 3, (), (".pit_alpha",), 0.5)
    with torch.no_grad():
        for name in fused.info.mask_parameters():
            reference.tensor(name).copy_(fused.tensor(name))
    x = torch.from_numpy(random_inputs(graph, batch=2, seed=0)["input"])
    grads = []
    for model in (fused, reference):
        model.zero_grad()
        (model(x).square().sum() + 1e-4 * model.cost_of("macs")).backward()
        grads.append({n: model.module.initializer_grad(a).clone()
                      for a, n in model.module.initializer_names.items() if n.endswith(".pit_alpha")})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6), name


def test_checkpoint_resumes_with_its_blocks(tmp_path):
    graph = po.load(MODELS / "dscnn.onnx")
    model = po.PIT(graph, channel_multiple=8)
    random_architecture(model, 4, (), (".pit_alpha",), 0.5)
    path = tmp_path / "searchable.onnx"
    model.searchable_graph().save(path)
    resumed = po.PIT(path, channel_multiple=1)  # a checkpoint keeps the blocks it was made with
    assert [g.block for g in resumed.info.groups] == [8] * len(model.info.groups)
    assert resumed.kept_channels() == model.kept_channels()
    with torch.no_grad():
        assert float(resumed.cost_of("macs")) == float(model.cost_of("macs"))
    assert _out_channels(resumed.export()) == _out_channels(model.export())


@pytest.mark.parametrize("bad", [0, -8, 2.5, True])
def test_bad_channel_multiples_are_refused(bad):
    graph = po.load(MODELS / "digits_cnn.onnx")
    with pytest.raises(PlinioOnnxError, match="channel_multiple must be a positive integer"):
        po.PIT(graph, channel_multiple=bad)
    with pytest.raises(PlinioOnnxError, match="--channel-multiple must be a positive integer"):
        OptimizeConfig(output="out.onnx", channel_multiple=bad)


def test_channel_multiple_needs_channel_masks():
    graph = po.load(MODELS / "digits_cnn.onnx")
    with pytest.raises(PlinioOnnxError, match="pit=True"):
        po.MPS(graph, channel_multiple=8)
    with pytest.raises(PlinioOnnxError, match="pit=True"):
        po.SuperNet(graph, channel_multiple=8)
    with pytest.raises(PlinioOnnxError, match="not to --method mps"):
        OptimizeConfig(output="out.onnx", method="mps", channel_multiple=8)


def test_config_default_and_profile_merge():
    assert default_channel_multiple() == DEFAULT_CHANNEL_MULTIPLE == 8

    class Profile:
        channel_multiple = 16
    assert default_channel_multiple(Profile()) == 16
    config = OptimizeConfig(output="out.onnx")
    assert config.search_method.options["channel_multiple"] == DEFAULT_CHANNEL_MULTIPLE
    assert OptimizeConfig(output="out.onnx", method="pit+mps", channel_multiple=4).search_method.options == \
        {"pit": True, "channel_multiple": 4}
    assert "channel_multiple" not in OptimizeConfig(output="out.onnx", method="mps").search_method.options
    # without a multiple given, the fingerprint is that of earlier releases (a checkpoint resumes
    # with the blocks its record holds); a multiple given needs a checkpoint made with it
    recipe = config.recipe_with_overrides
    assert "channel_multiple" not in config.fingerprint(recipe, None)
    assert "channel_multiple" not in OptimizeConfig(output="o.onnx", channel_multiple=1).fingerprint(recipe, None)
    assert OptimizeConfig(output="o.onnx", channel_multiple=16).fingerprint(recipe, None)["channel_multiple"] == 16


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plinio_onnx.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_cli_flag_end_to_end_on_digits(tmp_path):
    out = tmp_path / "digits.onnx"
    result = _cli("optimize", MODELS / "digits_cnn.onnx", "--method", "pit", "--data", MODELS / "digits.npz",
                  "-o", out, "--channel-multiple", "4", "--target-params", "30%", "--epochs", "1",
                  "--warmup-epochs", "0", "--finetune-epochs", "0", "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "digits.report.json").read_text())
    assert report["channel_multiple"] == 4
    kept = report["architecture"]["kept_channels"]
    assert any(v["kept"] < v["total"] for v in kept.values())
    assert all(v["kept"] % 4 == 0 for v in kept.values())
    before, after = _out_channels(po.load(MODELS / "digits_cnn.onnx")), _out_channels(po.load(out))
    assert all(after[name] % 4 == 0 or after[name] == before[name] for name in after)
    refused = _cli("optimize", MODELS / "digits_cnn.onnx", "--data", MODELS / "digits.npz",
                   "-o", tmp_path / "bad.onnx", "--channel-multiple", "0")
    assert refused.returncode != 0 and "--channel-multiple must be a positive integer" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "bad.onnx").exists()


def test_searchable_graph_with_blocks_runs_in_onnxruntime(tmp_path):
    import onnx

    graph = po.load(MODELS / "mobilenetv2_tiny.onnx")
    model = po.PIT(graph, channel_multiple=16)
    random_architecture(model, 5, (), (".pit_alpha",), 0.5)
    model.eval()
    path = tmp_path / "searchable.onnx"
    model.searchable_graph().save(path)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    feeds = random_inputs(graph, batch=2, seed=2)
    assert relative_error(run_torch(model, feeds, ["input"])[0], run_ort(path, feeds)[0]) <= 1e-4


def test_version_2_records_read_as_channel_by_channel():
    graph = po.passes.pit(po.load(MODELS / "digits_cnn.onnx"))
    data = json.loads(graph.metadata[PITRecord.KEY])
    assert data["version"] == PITRecord.VERSION == 3
    data["version"] = 2
    for group in data["groups"]:
        del group["block"]
    graph.metadata[PITRecord.KEY] = json.dumps(data)
    record = PITRecord.of(graph)
    assert [g.block for g in record.groups] == [1] * len(record.groups)
    assert json.loads(graph.metadata[PITRecord.KEY])["version"] == 3  # upgraded in the graph too
    model = po.PIT(graph)
    assert model.kept_channels() == {g.name: (g.size, g.size) for g in record.groups}
