"""ODiMO: the pass, the parallel-latency cost, the per-accelerator export split and `--method odimo`."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import plinio_onnx as po
from plinio_onnx.cli import main
from plinio_onnx.cost.spec import weight_source
from plinio_onnx.data import random_inputs
from plinio_onnx.errors import PassError, PlinioOnnxError
from plinio_onnx.functions import mps as fn
from plinio_onnx.graph import PLINIO_DOMAIN
from plinio_onnx.passes.odimo_split import MAPPING_KEY
from plinio_onnx.optimize.targets import format_cost
from plinio_onnx.passes.quantize import BITS_METADATA_KEY

from _util import MODELS, ZOO_NAMES, random_architecture, run_ort, run_torch

DIANA_NS_PER_CYCLE = 1e9 / 260e6     # the analog unit's 70 ns compute step, in DIANA cycles


def _output_step(reference: np.ndarray) -> float:
    """One quantization step of the output: its range over 2^8 − 1 levels (as the MPS tests)."""
    return max(float(reference.max() - reference.min()), 1e-6) / 255


def _tensors(feeds: dict) -> list[torch.Tensor]:
    return [torch.from_numpy(v) for v in feeds.values()]


def _producer(tensor):
    return tensor.inputs[0] if tensor.inputs else None


def _choose(model: po.ODiMO, node: str, accelerators: list[str]) -> None:
    """Logits whose argmax maps channel c of ``node`` onto ``accelerators[c]``."""
    mapped = model._mapped[node]
    alpha = model.tensor(model._layers[node].alpha)
    values = torch.zeros_like(alpha)
    for c, name in enumerate(accelerators):
        values[mapped.accelerators.index(name), c] = 5.0
    with torch.no_grad():
        alpha.copy_(values)


def _check_export(model: po.ODiMO, exported: po.Graph) -> None:
    """Every sub-layer is named after, annotated with and quantized at its accelerator, and the
    sub-layers of a layer hold exactly its channels, each the one the search chose for it."""
    mapping = json.loads(exported.metadata[MAPPING_KEY])
    bits = json.loads(exported.metadata[BITS_METADATA_KEY])["layers"]
    nodes = {n.name: n for n in exported.nodes}
    units = {a.name: a for a in model.accelerators}
    chosen = model.mapping()
    for layer, parts in mapping["layers"].items():
        mapped = model._mapped[layer]
        alpha = model.tensor(model._layers[layer].alpha).detach().numpy()
        choice = np.argmax(alpha, 0) if mapped.per_channel else np.full(model._layers[layer].channels,
                                                                         int(np.argmax(alpha)))
        covered = sorted(c for part in parts.values() for c in part["channels"])
        assert covered == list(range(model._layers[layer].channels)), layer
        assert {p["accelerator"]: len(p["channels"]) for p in parts.values()} == \
            {k: v for k, v in chosen[layer].items() if v}, layer
        for name, part in parts.items():
            unit = units[part["accelerator"]]
            assert mapping["nodes"][name] == unit.name
            assert name == layer or name == f"{layer}/odimo/{unit.name}"
            assert [mapped.accelerators[k] for k in choice[part["channels"]]] == [unit.name] * len(part["channels"])
            assert np.all(np.asarray(bits[name]["weight_bits"]) == unit.weight_bits), name
            assert bits[name]["input_bits"] == unit.act_bits
            dq = _producer(nodes[name].inputs[1])
            assert dq.op == "DequantizeLinear"
            ints = np.asarray(dq.inputs[0].values).astype(np.int64)
            lo, hi = fn.weight_range(unit.weight_bits)
            assert ints.min() >= lo and ints.max() <= hi, name


# -- the zoo: random mappings, exported and run in ONNX Runtime --------------------------------
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_random_mapping_exports_what_it_evaluates(name):
    graph = po.load(MODELS / f"{name}.onnx")
    model = po.ODiMO(graph)
    feeds = random_inputs(graph, batch=2, seed=1)
    model.calibrate(*_tensors(feeds))
    random_architecture(model, 0, (".mps_w_alpha",), (), 0.0)
    model.eval()
    expected = run_torch(model, feeds, [t.name for t in graph.gs.inputs])
    exported = model.export()
    proto = exported.to_onnx()
    onnx.checker.check_model(proto, full_check=True)
    assert not any((n.domain or "") == PLINIO_DOMAIN for n in exported.nodes)
    for e, g in zip(expected, run_ort(proto, feeds)):
        assert np.max(np.abs(e - g)) <= _output_step(e), name
    _check_export(model, exported)
    # The random logits really split layers between the two units.
    split = [layer for layer, counts in model.mapping().items() if all(counts.values())]
    assert split, name
    # The order is restored by a Gather or by permuting the readers' weights, never lost.
    gathers = [n for n in exported.nodes if n.op == "Gather" and n.name.endswith("/odimo/restore_order")]
    assert len(gathers) <= len(split), name


def test_grouped_layers_run_whole_on_a_unit_that_runs_them():
    model = po.ODiMO(po.load(MODELS / "mobilenetv2_tiny.onnx"))
    grouped = [n.name for n in model.graph.nodes if n.op == "Conv" and n.attrs.get("group", 1) > 1]
    assert grouped
    for node in grouped:
        assert model._mapped[node].accelerators == ["digital"] and not model._mapped[node].per_channel
        assert model.tensor(model._layers[node].alpha).shape == (1,)


# -- a hand-built layer: costs by hand, channel order restored --------------------------------
def _hand_graph() -> po.Graph:
    # x[n,16,8,8] → conv (16→8, 3x3, pad 1, bias) → relu → conv (8→4, 1x1) → y
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="head")]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in [("w", (8, 16, 3, 3)), ("b", (8,)), ("w2", (4, 8, 1, 1))]]
    proto = helper.make_model(helper.make_graph(nodes, "hand", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    return po.load(proto)


def _analog(n_out: int, c_in: int, k: int, unroll: int, positions: int) -> float:
    """DIANA analog cycles by hand: weight load 4·2·C_in·k² + ⌈C_out/512⌉⌈C_in/128⌉·HW/u·70 ns."""
    return (8 * c_in * k * k + positions / unroll * 70 / DIANA_NS_PER_CYCLE) if n_out else 0.0


def _digital(n_out: float, c_in: int, k: int, rows: int, cols: int) -> float:
    """DIANA digital cycles by hand: ⌈C_out/16⌉·C_in·⌈rows/16⌉·cols·k² + rows·cols·(C_out+C_in)/8."""
    return (np.ceil(n_out / 16) * c_in * np.ceil(rows / 16) * cols * k * k
            + rows * cols * (n_out + c_in) / 8) if n_out else 0.0


def test_latency_is_the_maximum_over_the_units_by_hand():
    model = po.ODiMO(_hand_graph())
    _choose(model, "conv", ["analog", "digital", "analog", "digital", "digital", "analog", "digital", "digital"])
    _choose(model, "head", ["digital"] * 4)
    model.eval()
    # conv: 3 channels analog (u = 4: 4·3 ≤ 512 and (4 + 2)·64·3 ≤ 1152), 5 digital.
    conv_analog, conv_digital = _analog(3, 16, 3, 4, 64), _digital(5, 16, 3, 8, 8)
    assert conv_analog == pytest.approx(1152 + 291.2) and conv_digital == pytest.approx(1152 + 168)
    head = _digital(4, 8, 1, 8, 8)
    assert float(model.cost) == pytest.approx(max(conv_analog, conv_digital) + head, rel=1e-12)
    assert model.mapping() == {"conv": {"digital": 5, "analog": 3}, "head": {"digital": 4, "analog": 0}}
    assert model.single_accelerator_latency("digital") == pytest.approx(_digital(8, 16, 3, 8, 8) + head)
    assert model.single_accelerator_latency("analog") == pytest.approx(
        _analog(8, 16, 3, 4, 64) + _analog(4, 8, 1, 8, 64))      # head: u = 8 (8·4 ≤ 512, 8·64 ≤ 1152)
    summary = model.summary()
    assert f"mapping {max(conv_analog, conv_digital) + head:,.0f}" in summary and "all on analog" in summary
    # Training: the expected channel counts (uniform logits: half of each layer on each unit).
    with torch.no_grad():
        for layer in model._layers.values():
            model.tensor(layer.alpha).zero_()
    model.train()
    cost = model.cost
    assert float(cost.detach()) == pytest.approx(max(_analog(4, 16, 3, 4, 64), _digital(4, 16, 3, 8, 8))
                                        + max(_analog(2, 8, 1, 8, 64), _digital(2, 8, 1, 8, 8)), rel=1e-12)
    cost.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.nas_parameters())


def test_smooth_maximum_and_data_movement_term():
    moved = lambda spec, counts: 10.0 * sum(float(n) for n in counts.values())  # noqa: E731
    exact = po.ODiMO(_hand_graph(), data_movement=moved)
    smooth = po.ODiMO(_hand_graph(), reduction="softmax")
    for model in (exact, smooth):
        _choose(model, "conv", ["analog"] * 3 + ["digital"] * 5)
        _choose(model, "head", ["digital"] * 4)
        model.eval()
    costs = torch.tensor([_analog(3, 16, 3, 4, 64), _digital(5, 16, 3, 8, 8)], dtype=torch.float64)
    head = _digital(4, 8, 1, 8, 8)
    assert float(exact.cost) == pytest.approx(float(costs.max()) + head + 10.0 * (8 + 4))
    assert float(smooth.cost) == pytest.approx(float(torch.dot(torch.softmax(costs, 0), costs)) + head)


def test_export_restores_the_channel_order_and_annotates_each_sub_layer():
    graph = _hand_graph()
    model = po.ODiMO(graph)
    feeds = random_inputs(graph, batch=2, seed=3)
    model.calibrate(*_tensors(feeds))
    _choose(model, "conv", ["analog", "digital", "analog", "digital", "digital", "analog", "digital", "digital"])
    _choose(model, "head", ["analog", "digital", "analog", "digital"])
    model.eval()
    expected = run_torch(model, feeds, ["x"])[0]
    exported = model.export()
    assert np.max(np.abs(expected - run_ort(exported.to_onnx(), feeds)[0])) <= _output_step(expected)
    nodes = {n.name: n for n in exported.nodes}
    digital, analog = nodes["conv/odimo/digital"], nodes["conv/odimo/analog"]
    assert "conv" not in nodes and "head" not in nodes
    assert np.shape(weight_source(digital.inputs[1]).values)[0] == 5
    assert np.shape(weight_source(analog.inputs[1]).values)[0] == 3
    # conv's Concat order (digital 1, 3, 4, 6, 7, then analog 0, 2, 5) is folded into the head's
    # input channels (ReLU and the activation quantizer pass it through): no Gather there.
    concat = _producer(_producer(nodes["relu"].inputs[0]).outputs[0])
    assert concat.op == "Concat" and [_producer(t).name for t in concat.inputs] == [digital.name, analog.name]
    assert "conv/odimo/restore_order" not in nodes
    order = [1, 3, 4, 6, 7, 0, 2, 5]
    head_dq = _producer(nodes["head/odimo/digital"].inputs[1])
    head_ints = np.asarray(head_dq.inputs[0].values)
    w2 = numpy_helper.to_array(next(t for t in _hand_graph().to_onnx().graph.initializer if t.name == "w2"))
    scale = np.asarray(head_dq.inputs[1].values).reshape(-1, 1, 1, 1)
    assert np.all(np.abs(head_ints * scale - np.take(w2[[1, 3]], order, axis=1)) <= scale / 2 + 1e-6)
    # The head feeds the graph output: a Gather restores its order (digital 1, 3, then analog 0, 2).
    gather = nodes["head/odimo/restore_order"]
    assert _producer(gather.inputs[0]).op == "Concat"
    head_order = [1, 3, 0, 2]
    assert [head_order[i] for i in np.asarray(gather.inputs[1].values)] == list(range(4))
    mapping = json.loads(exported.metadata[MAPPING_KEY])
    assert mapping["layers"]["conv"] == {"conv/odimo/digital": {"accelerator": "digital", "channels": [1, 3, 4, 6, 7]},
                                         "conv/odimo/analog": {"accelerator": "analog", "channels": [0, 2, 5]}}
    assert mapping["accelerators"] == {"digital": {"weight_bits": 8, "act_bits": 8},
                                       "analog": {"weight_bits": 2, "act_bits": 8}}
    _check_export(model, exported)


def test_regrouped_order_needs_no_gather_and_one_unit_needs_no_split():
    model = po.ODiMO(_hand_graph())
    _choose(model, "conv", ["digital"] * 5 + ["analog"] * 3)
    _choose(model, "head", ["analog"] * 4)
    exported = model.eval().export()
    ops = [n.op for n in exported.nodes]
    assert "Gather" not in ops and ops.count("Concat") == 1
    assert json.loads(exported.metadata[MAPPING_KEY])["nodes"]["head"] == "analog"


def test_checkpoint_resumes_and_accelerators_are_validated(tmp_path):
    model = po.ODiMO(_hand_graph())
    _choose(model, "conv", ["analog"] * 8)
    path = tmp_path / "search.onnx"
    model.searchable_graph().save(path)
    resumed = po.ODiMO(po.load(path))
    assert resumed.mapping()["conv"] == {"digital": 0, "analog": 8}
    npu = po.odimo.Accelerator("npu", weight_bits=4, act_bits=8, latency=po.cost.macs)
    with pytest.raises(PlinioOnnxError, match="built for the accelerators"):
        po.ODiMO(po.load(path), accelerators=(po.odimo.DIGITAL, npu))
    seven_bit = po.odimo.Accelerator("analog7", weight_bits=2, act_bits=7, latency=po.cost.macs)
    with pytest.raises(PassError, match="activation precisions differ"):
        po.ODiMO(_hand_graph(), accelerators=(po.odimo.DIGITAL, seven_bit))
    with pytest.raises(PassError, match="distinct"):
        po.ODiMO(_hand_graph(), accelerators=(po.odimo.DIGITAL, po.odimo.DIGITAL))
    with pytest.raises(PassError, match="softmax"):
        po.ODiMO(_hand_graph(), sampling="hard")


def test_user_accelerators_with_equal_precisions_stay_apart():
    fast = po.odimo.Accelerator("fast", weight_bits=8, act_bits=8, latency=lambda s: 1.0 * s.out_channels)
    slow = po.odimo.Accelerator("slow", weight_bits=8, act_bits=8, latency=lambda s: 3.0 * s.out_channels)
    model = po.ODiMO(_hand_graph(), accelerators=(fast, slow))
    _choose(model, "conv", ["fast"] * 6 + ["slow"] * 2)
    _choose(model, "head", ["slow"] * 4)
    model.eval()
    assert float(model.cost) == pytest.approx(max(6.0, 3.0 * 2) + 3.0 * 4)
    assert json.loads(model.export().metadata[MAPPING_KEY])["nodes"]["conv/odimo/slow"] == "slow"


def test_diana_units_alone_are_plinios_uniform_cases():
    from plinio_onnx.cost import LayerSpec
    from plinio_onnx.hardware.diana import diana_analog_latency, diana_digital_latency, diana_latency

    def conv(c_in, c_out, k, hw, groups=1, w=8):
        return LayerSpec(name="c", op="Conv", kind="conv", in_channels=c_in, out_channels=c_out, kernel_size=k * k,
                         groups=groups, depthwise=groups > 1, output_positions=hw * hw, weight_bits=w,
                         extra={"kernel_shape": [k, k], "output_shape": [hw, hw]})
    for c_in, c_out, k, hw in ((16, 32, 3, 8), (3, 600, 1, 4), (64, 10, 1, 1)):
        assert diana_digital_latency(conv(c_in, c_out, k, hw)) == diana_latency(conv(c_in, c_out, k, hw, w=8))
        assert diana_analog_latency(conv(c_in, c_out, k, hw)) == diana_latency(conv(c_in, c_out, k, hw, w=2))
    assert diana_digital_latency(conv(16, 0, 3, 8)) == 0 and diana_analog_latency(conv(16, 0, 3, 8)) == 0
    with pytest.raises(ValueError, match="dense"):
        diana_analog_latency(conv(16, 16, 3, 8, groups=16))


# -- the command line -------------------------------------------------------------------------
def test_optimize_method_odimo_on_digits(tmp_path, capsys):
    out = tmp_path / "odimo.onnx"
    assert main(["optimize", str(MODELS / "digits_cnn.onnx"), "--method", "odimo", "--data",
                 str(MODELS / "digits.npz"), "-o", str(out), "--warmup-epochs", "2", "--epochs", "3",
                 "--threads", "1"]) == 0
    console = capsys.readouterr().out
    exported = po.load(out)
    mapping = json.loads(exported.metadata[MAPPING_KEY])
    assert set(mapping["nodes"].values()) <= {"digital", "analog"}
    assert not any((n.domain or "") == PLINIO_DOMAIN for n in exported.nodes)
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["method"] == "odimo" and report["cost"] == "latency"
    latency = report["architecture"]["latency"]
    assert set(latency) == {"mapping", "all_digital", "all_analog"}
    assert report["after"]["test"]["accuracy"] > 0.8
    assert [row["out_after"] for row in report["layers"]] == [row["out_before"] for row in report["layers"]]
    markdown = out.with_suffix(".report.md").read_text()
    assert "## Accelerator mapping" in markdown and "| layer | digital | analog |" in markdown
    for layer, counts in report["architecture"]["mapping"].items():
        assert f"| {layer} | {counts.get('digital', 0)} | {counts.get('analog', 0)} |" in markdown
    # The console summary: the same mapping (channels per unit and layer) and the three latencies.
    assert "accelerator mapping" in console
    rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:4]]
            for line in console.splitlines() if line.count("│") == 4}
    for layer, counts in report["architecture"]["mapping"].items():
        assert rows[layer] == [str(counts.get("digital", 0)), str(counts.get("analog", 0))]
    mapping = report["architecture"]["mapping"]
    assert rows["total"] == [str(sum(c.get(unit, 0) for c in mapping.values())) for unit in ("digital", "analog")]
    assert (f"modelled latency of the mapping {format_cost(latency['mapping'])} (all on digital "
            f"{format_cost(latency['all_digital'])}, all on analog {format_cost(latency['all_analog'])})") in console


# -- latency targets ------------------------------------------------------------------------------
def test_fastest_mapping_and_target_fallback_by_hand():
    # conv (16→8, 3x3, 8x8): all digital 1152 + 8·24 = 1344 beats the analog unit's 1443.2
    # (any channel on it costs its whole weight load); head (8→4, 1x1): 160 digital, 209.6 analog.
    conv_d, conv_a = _digital(8, 16, 3, 8, 8), _analog(8, 16, 3, 4, 64)
    head_d, head_a = _digital(4, 8, 1, 8, 8), _analog(4, 8, 1, 8, 64)
    assert (conv_d, conv_a, head_d, head_a) == pytest.approx((1344, 1443.2, 160, 209.6))
    latency = po.odimo.ParallelLatency()
    assert po.ODiMO(_hand_graph()).min_cost(latency) == pytest.approx(conv_d + head_d)

    model = po.ODiMO(_hand_graph())
    _choose(model, "conv", ["analog"] * 3 + ["digital"] * 5)
    _choose(model, "head", ["analog"] * 4)
    model.eval()
    start = max(conv_a, _digital(5, 16, 3, 8, 8)) + head_a
    assert float(model.cost) == pytest.approx(start)
    # The layer with most to gain (conv: 99.2 cycles, head: 49.6) moves first, and alone suffices.
    assert model.enforce_target(latency, conv_d + head_a + 1)
    assert model.mapping() == {"conv": {"digital": 8, "analog": 0}, "head": {"digital": 0, "analog": 4}}
    assert not model.enforce_target(latency, conv_d + head_d - 1)   # below the fastest mapping
    assert model.enforce_target(latency, conv_d + head_d)
    assert float(model.cost) == pytest.approx(conv_d + head_d)


def test_exported_latency_joins_the_split_layers():
    graph = _hand_graph()
    model = po.ODiMO(graph)
    _choose(model, "conv", ["analog", "digital", "analog", "digital", "digital", "analog", "digital", "digital"])
    _choose(model, "head", ["digital"] * 4)
    model.eval()
    latency = po.odimo.ParallelLatency()
    exported = model.export()
    assert {n.name for n in exported.nodes} >= {"conv/odimo/digital", "conv/odimo/analog", "head"}
    specs = {spec.name: spec for spec in po.odimo.mapped_specs(exported)}
    assert specs["conv"].out_channels == 8 and specs["conv"].extra["odimo_channels"] == {"digital": 5, "analog": 3}
    assert latency.of_graph(exported) == pytest.approx(float(model.cost), rel=1e-12)
    assert latency.of_graph(_hand_graph()) == pytest.approx(model.single_accelerator_latency("digital"))


def test_odimo_latency_target_options(tmp_path, capsys):
    base = ["optimize", str(MODELS / "digits_cnn.onnx"), "--method", "odimo", "--data", str(MODELS / "digits.npz"),
            "-o", str(tmp_path / "o.onnx"), "--threads", "1", "--quiet"]
    assert main(base + ["--target-latency", "85%", "--hardware", "diana"]) != 0
    assert "--hardware does not apply to --method odimo" in capsys.readouterr().err
    assert main(base + ["--target-params", "50%"]) != 0
    assert "--target-params does not apply to --method odimo" in capsys.readouterr().err
    # 80% of all-digital (7,521 cycles) is below the fastest mapping (6,221: 83%).
    assert main(base + ["--target-latency", "80%"]) != 0
    err = capsys.readouterr().err
    assert "below the smallest architecture odimo can reach (6,221 cycles, 83%" in err and "fastest split" in err


def test_optimize_odimo_with_a_latency_target(tmp_path):
    out = tmp_path / "odimo.onnx"
    report = po.optimize(MODELS / "digits_cnn.onnx", MODELS / "digits.npz", output=out, method="odimo",
                         target_latency="85%", warmup_epochs=1, epochs=2, threads=1, quiet=True,
                         measure_latency=False).to_json()
    latency = report["architecture"]["latency"]
    (constraint,) = report["constraints"]
    assert constraint["kind"] == "latency" and constraint["unit"] == "cycles" and constraint["met"]
    assert constraint["before"] == pytest.approx(latency["all_digital"])   # the input: all on the first unit
    assert constraint["target"] == pytest.approx(0.85 * latency["all_digital"])
    # The exported file's latency (split layers joined) is the searched mapping's.
    assert constraint["after"] == pytest.approx(latency["mapping"], rel=1e-9)
    assert constraint["after"] == pytest.approx(po.odimo.ParallelLatency().of_graph(po.load(out)), rel=1e-12)
    assert latency["mapping"] <= constraint["target"] < min(latency["all_digital"], latency["all_analog"])
    assert any(counts["digital"] and counts["analog"] for counts in report["architecture"]["mapping"].values())
