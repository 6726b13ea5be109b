"""Several targets at once, ``--regularizer``, latency / memory / size targets and the bit-width
report of ``plinio-onnx optimize`` (digits CNN, tiny epoch budgets)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import plinio_onnx as po
from plinio_onnx.cli import main
from plinio_onnx.optimize import OptimizeConfig
from plinio_onnx.optimize.config import Recipe
from plinio_onnx.optimize.control import TargetControl
from plinio_onnx.optimize.targets import resolve_target

from _util import MODELS

MODEL = MODELS / "digits_cnn.onnx"
DATA = MODELS / "digits.npz"
FAST = ["--warmup-epochs", "2", "--epochs", "4", "--finetune-epochs", "1", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- configuration --------------------------------------------------------------------------------
def test_several_targets_are_one_config_and_bad_combinations_one_error():
    config = OptimizeConfig(output="o.onnx", target_params="30%", target_macs="50%", target_memory="8k")
    assert config.targets == {"params": "30%", "macs": "50%", "memory": "8k"}
    assert config.regularizer_name == "constraint" and config.cost_name == "params"
    assert OptimizeConfig(output="o.onnx").regularizer_name == "linear"
    assert OptimizeConfig(output="o.onnx", target_latency="60%", hardware="gap8").cost_name == "latency"
    assert OptimizeConfig(output="o.onnx", method="mps", target_size="25%int8").targets == {"size": "25%int8"}
    for options, message in (
            ({"target_params": "5%", "strength": 1e-3}, "mutually exclusive"),
            ({"target_params": "5%", "regularizer": "linear"}, "linear takes no target"),
            ({"regularizer": "duccio"}, "needs at least one target"),
            ({"regularizer": "lasso", "target_params": "5%"}, "unknown regularizer"),
            ({"target_latency": "50%"}, "need --hardware"),
            ({"cost": "latency"}, "need --hardware"),
            ({"target_params": "5%", "target_macs": "9%", "cost": "size"}, "conflicts"),
            ({"method": "qat", "target_size": "50%"}, "does not apply to --method qat"),
            ({"method": "mps", "target_params": "50%"}, "does not apply to --method mps"),
            ({"method": "supernet", "target_memory": "50%"}, "does not apply to --method supernet")):
        with pytest.raises(po.PlinioOnnxError, match=message):
            OptimizeConfig(**{"output": "o.onnx", **options})
    # The cost may name one of the targets' costs.
    assert OptimizeConfig(output="o.onnx", target_params="5%", target_macs="9%", cost="macs").targets
    # Sizes: bytes, a percentage of the float model or of the uniform int8 model.
    assert resolve_target("size", "25%int8", 4000.0, 1000.0) == 250.0
    assert resolve_target("size", "25%", 4000.0, 1000.0) == 1000.0
    assert resolve_target("size", "2k", 4000.0, 1000.0) == 2000.0
    with pytest.raises(po.PlinioOnnxError, match="follows a percentage"):
        resolve_target("size", "300int8", 4000.0, 1000.0)


def test_fingerprint_of_several_targets_names_them_all():
    one = OptimizeConfig(output="o.onnx", target_params="30%")
    two = OptimizeConfig(output="o.onnx", target_params="30%", target_macs="50%")
    recipe = one.recipe_with_overrides
    # one params target: exactly as earlier releases (a float or a one-entry dict alike)
    assert one.fingerprint(recipe, 10.0) == one.fingerprint(recipe, {"params": 10.0})
    assert "targets" not in one.fingerprint(recipe, 10.0)
    print_two = two.fingerprint(recipe, {"params": 10.0, "macs": 20.0})
    assert print_two["targets"] == {"params": 10.0, "macs": 20.0} and print_two["regularizer"] == "constraint"
    assert print_two != two.fingerprint(recipe, {"params": 10.0, "macs": 21.0})


# -- the control over two costs, by hand ----------------------------------------------------------
class _Scripted:
    """A model whose costs follow a script; re-keeping records what it was asked."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.asked: list = []

    def cost_of(self, cost):
        if isinstance(cost, po.cost.ModelCost):
            return cost.of(self)
        return self.values[cost]

    def architecture_snapshot(self):
        return "snapshot"

    def restore_marginal(self, cost, floor, before):
        self.asked.append((float(cost.of(self)) if isinstance(cost, po.cost.ModelCost) else cost, floor, before))
        return 0


def test_target_control_with_two_costs_equals_hand_computed_penalties():
    recipe = Recipe()
    model = _Scripted()
    state = {"step": 0, "lam": 2.0, "lambdas": {"params": 2.0, "macs": 3.0},
             "initial_costs": {"params": 1000.0, "macs": 8000.0}}
    steps = 10   # ramp_steps = 4
    control = TargetControl(recipe, {"params": 250.0, "macs": 2000.0}, {"params": "params", "macs": "macs"},
                            model, state, steps)
    script = [(1000.0, 8000.0), (900.0, 5000.0), (300.0, 2100.0), (200.0, 1500.0)]
    lam = {"params": 2.0, "macs": 3.0}
    for step, (p, m) in enumerate(script):
        model.values = {"params": torch.tensor(p, dtype=torch.float64), "macs": torch.tensor(m, dtype=torch.float64)}
        progress = min(1.0, step / 4)
        aim_p, aim_m = 1000.0 * 0.25 ** progress, 8000.0 * 0.25 ** progress
        assert control.aim("params") == pytest.approx(aim_p) and control.aim("macs") == pytest.approx(aim_m)
        expected = (lam["params"] * max(0.0, p - 0.97 * aim_p) / 250.0
                    + lam["macs"] * max(0.0, m - 0.97 * aim_m) / 2000.0)
        assert float(control.regularizer()) == pytest.approx(expected)
        control.after_step()
        for kind, value, aim in (("params", p, aim_p), ("macs", m, aim_m)):
            if value > aim:
                lam[kind] *= 1.01
            elif value < 0.97 * aim:
                lam[kind] *= 0.99
        assert state["lambdas"] == pytest.approx(lam) and state["lam"] == pytest.approx(lam["params"])
        # Re-keeping is asked of the worst ratio of each cost to its floor (0.95 · aim), driven to 1:
        # it stops as soon as one cost is back at its floor.
        worst, floor, before = model.asked[-1]
        assert floor == 1.0 and before == "snapshot"
        assert worst == pytest.approx(max(p / (0.95 * aim_p), m / (0.95 * aim_m)))
    assert state["step"] == len(script)
    assert control.met({"params": 250.0, "macs": 1999.0}) and not control.met({"params": 251.0, "macs": 10.0})


def test_duccio_control_with_two_costs_equals_eq_13_and_14_by_hand():
    from plinio_onnx.optimize.control import make_control

    model = _Scripted()
    state = {"step": 0, "lam": 0.5, "initial": {"loss": 0.5}, "reference_loss": 0.5,
             "initial_costs": {"params": 1000.0, "macs": 8000.0}}
    control = make_control("duccio", Recipe(), {"params": 250.0, "macs": 2000.0}, {"params": "params", "macs": "macs"},
                           model, state, total_steps=8, epochs=4)
    final = {"params": 0.5 / 750.0, "macs": 0.5 / 6000.0}          # Eq. 13: L_wu / (C(0) − T)
    model.values = {"params": torch.tensor(600.0, dtype=torch.float64),
                    "macs": torch.tensor(1500.0, dtype=torch.float64)}   # macs already met
    for step in range(8):
        factor = min(1.0, 0.01 + 0.99 * (step // 2) / 2)              # Eq. 14, full at mid-search
        assert state["lambdas"] == pytest.approx({k: v * factor for k, v in final.items()})
        assert float(control.regularizer()) == pytest.approx(final["params"] * factor * 350.0)
        control.after_step()
    assert control.aim("macs") == 2000.0 and model.asked == []      # fixed targets, nothing re-kept


def test_worst_ratio_drives_every_cost_to_its_bound():
    model = po.PIT(MODEL)
    with torch.no_grad():
        params, macs = float(model.cost_of("params")), float(model.cost_of("macs"))
    worst = po.cost.WorstRatio({"params": params / 2, "macs": macs / 4})
    with torch.no_grad():
        assert float(model.cost_of(worst)) == pytest.approx(4.0)
    # A multi-target fallback prunes until both fit.
    assert model.enforce_target(worst, 1.0)
    with torch.no_grad():
        assert float(model.cost_of("params")) <= params / 2 and float(model.cost_of("macs")) <= macs / 4
    # A SuperNet's fallback judges each branch by the whole ratio, in place.
    supernet = po.SuperNet(MODEL, cost="macs")
    with torch.no_grad():
        supernet.eval()
        params, macs = float(supernet.cost_of("params")), float(supernet.cost_of("macs"))
    worst = po.cost.WorstRatio({"params": 0.7 * params, "macs": 0.5 * macs})
    assert supernet.enforce_target(worst, 1.0)
    with torch.no_grad():
        supernet.eval()
        assert float(supernet.cost_of("params")) <= 0.7 * params and float(supernet.cost_of("macs")) <= 0.5 * macs


# -- end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_targets(tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "pit.onnx"
    rc = main(["optimize", str(MODEL), "--data", str(DATA), "--method", "pit", "--target-params", "30%",
               "--target-macs", "50%", "-o", str(out), *FAST])
    return rc, out


def test_two_targets_are_met_together_and_reported(two_targets, capsys):
    rc, out = two_targets
    assert rc == 0
    graph = po.load(out)
    base = po.load(MODEL)
    params, macs = po.cost.total(graph, po.cost.params), po.cost.total(graph, po.cost.macs)
    assert params <= 0.3 * po.cost.total(base, po.cost.params)
    assert macs <= 0.5 * po.cost.total(base, po.cost.macs)
    report = json.loads(out.with_suffix(".report.json").read_text())
    by_kind = {c["kind"]: c for c in report["constraints"]}
    assert set(by_kind) == {"params", "macs"} and report["regularizer"] == "constraint"
    assert by_kind["params"]["after"] == params and by_kind["macs"]["after"] == macs
    assert by_kind["params"]["target"] == pytest.approx(0.3 * 47_530)
    assert by_kind["macs"]["before"] == po.cost.total(base, po.cost.macs)
    assert all(c["met"] for c in report["constraints"])
    history = report["phases"]["search"]["history"]
    assert set(history[-1]["costs"]) == {"params", "macs"} and set(history[-1]["lambdas"]) == {"params", "macs"}
    md = out.with_suffix(".report.md").read_text()
    assert "## Targets (constraint regularizer)" in md and "| params (params) |" in md and "| macs (MACs) |" in md
    # The same command again resumes from the finished checkpoint (same fingerprint).
    assert main(["optimize", str(MODEL), "--data", str(DATA), "--method", "pit", "--target-params", "30%",
                 "--target-macs", "50%", "-o", str(out), *FAST[:-1]]) == 0
    printed = capsys.readouterr()
    assert "resuming" in printed.err and "targets (constraint regularizer)" in printed.out
    assert json.loads(out.with_suffix(".report.json").read_text())["resumed"] is True


def test_latency_and_memory_targets_under_duccio(tmp_path):
    """``--target-latency`` on an analytical profile and ``--target-memory`` end to end, met
    together by DUCCIO's regularizer (a short search: the fallback may finish the job)."""
    out = tmp_path / "lat.onnx"
    assert main(["optimize", str(MODEL), "--data", str(DATA), "--method", "pit", "--hardware", "gap8",
                 "--target-latency", "60%", "--target-memory", "80%", "--regularizer", "duccio",
                 "-o", str(out), *FAST]) == 0
    latency = po.hardware.get("gap8").cost("latency")
    base, final = po.load(MODEL), po.load(out)
    lat_before = sum(float(latency(s)) for s in po.cost.layer_specs(base))
    lat_after = sum(float(latency(s)) for s in po.cost.layer_specs(final))
    mem_before, mem_after = po.cost.peak_memory(base), po.cost.peak_memory(final)
    assert lat_after <= 0.6 * lat_before and mem_after <= 0.8 * mem_before
    report = json.loads(out.with_suffix(".report.json").read_text())
    by_kind = {c["kind"]: c for c in report["constraints"]}
    assert report["regularizer"] == "duccio" and report["phases"]["search"]["regularizer"] == "duccio"
    assert by_kind["latency"]["unit"] == "cycles" and by_kind["memory"]["unit"] == "bytes"
    assert by_kind["latency"]["before"] == pytest.approx(lat_before) and by_kind["latency"]["after"] == pytest.approx(lat_after)
    assert by_kind["memory"]["before"] == mem_before and by_kind["memory"]["after"] == mem_after
    assert by_kind["memory"]["target"] == pytest.approx(0.8 * mem_before)


def test_impossible_memory_target_fails_before_training(tmp_path, capsys):
    code = main(["optimize", str(MODEL), "--data", str(DATA), "--method", "pit", "--target-memory", "100",
                 "-o", str(tmp_path / "m.onnx"), *FAST])
    assert code != 0 and "below the smallest architecture" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


# -- the bit-width report -------------------------------------------------------------------------
def _weight_bits_by_hand(q: np.ndarray) -> list[int]:
    """Each output channel's bits from its integers: min-max symmetric scaling puts the largest
    magnitude at 2^(b-1) (clipped to 2^(b-1)-1 on the positive side): either gives b."""
    top = np.abs(q.reshape(q.shape[0], -1).astype(np.int64)).max(1)
    return [int(np.floor(np.log2(t + 1))) + 1 for t in top]


def _input_bits_by_hand(model: onnx.ModelProto, layer: onnx.NodeProto, inits: dict) -> int:
    """The bits of the activation a layer reads: the range its Quantize → (Clip) → Dequantize keeps."""
    producers = {o: n for n in model.graph.node for o in n.output}
    dq = producers[layer.input[0]]
    assert dq.op_type == "DequantizeLinear"
    before = producers[dq.input[0]]
    if before.op_type == "Clip":
        low, high = (int(inits[name]) for name in before.input[1:3])
        return int(np.ceil(np.log2(high - low + 1)))
    return 8


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    out = tmp_path_factory.mktemp("mps") / "mps.onnx"
    rc = main(["optimize", str(MODEL), "--data", str(DATA), "--method", "mps", "--target-size", "35%int8",
               "-o", str(out), *FAST])
    return rc, out


def test_mps_report_numbers_equal_hand_computation_from_the_exported_file(mixed):
    rc, out = mixed
    assert rc == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    quant = report["quantization"]
    model = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    layers = {n.name: n for n in model.graph.node if n.op_type in ("Conv", "Gemm")}
    total_bytes = total_bitops = 0
    spatial = {"/conv1/Conv": 64, "/conv2/Conv": 64, "/conv3/Conv": 16, "/fc1/Gemm": 1, "/fc2/Gemm": 1}
    seen_mixed = False
    for row in quant["layers"]:
        layer = layers[row["name"]]
        q = inits[producers[layer.input[1]].input[0]]          # the weight's integers
        bias = inits[producers[layer.input[2]].input[0]]
        if layer.op_type == "Gemm" and not next((a.i for a in layer.attribute if a.name == "transB"), 0):
            q = q.T   # [in, out] → one row per output channel
        bits = _weight_bits_by_hand(q)
        assert row["weight_bits"] == (bits if isinstance(row["weight_bits"], list) else bits[0])
        counts = {b: bits.count(b) for b in sorted(set(bits))}
        expected_histogram = (str(bits[0]) if len(counts) == 1 and not row["pruned_channels"] else
                              " ".join(f"{b}b×{n}" for b, n in sorted(
                                  {**counts, **({0: row["pruned_channels"]} if row["pruned_channels"] else {})}.items())))
        assert row["weight_histogram"] == expected_histogram
        seen_mixed |= len(counts) > 1
        per_channel = int(np.prod(q.shape[1:]))
        weight_bytes = sum(per_channel * b for b in bits) / 8 + 4 * bias.size
        assert row["weights"] == q.size and row["bytes"] == weight_bytes
        input_bits = _input_bits_by_hand(model, layer, inits)
        assert row["input_bits"] == input_bits
        bitops = sum(per_channel * b for b in bits) * spatial[row["name"]] * input_bits
        assert row["bitops"] == bitops
        total_bytes += weight_bytes
        total_bitops += bitops
    t = quant["totals"]
    assert t["bytes"] == total_bytes and t["bitops"] == total_bitops
    weights = {"/conv1/Conv": 144, "/conv2/Conv": 4608, "/conv3/Conv": 9216, "/fc1/Gemm": 32768, "/fc2/Gemm": 640}
    biases = 16 + 32 + 32 + 64 + 10
    assert t["float32_bytes"] == 4 * (sum(weights.values()) + biases)
    assert t["int8_bytes"] == sum(weights.values()) + 4 * biases
    assert t["int8_bitops"] == 64 * sum(w * spatial[n] for n, w in weights.items())
    assert seen_mixed
    # The size target: 35 % of the int8 bytes, met by the exported file.
    (size,) = report["constraints"]
    assert size["kind"] == "size" and size["target"] == pytest.approx(0.35 * t["int8_bytes"])
    assert size["after"] == total_bytes <= size["target"] and size["met"]
    md = out.with_suffix(".report.md").read_text()
    assert "## Bit-widths" in md and "of uniform int8" in md


def test_latency_target_in_seconds_is_refused_below_reach_and_says_so():
    """A measured latency is ~1e-5 s: the reach check is relative (a target 2% under the least
    reachable latency is refused, not passed by an absolute epsilon) and the message shows the
    seconds and percentages (not "0"), and names --channel-multiple."""
    from plinio_onnx.optimize.methods import get_method
    from plinio_onnx.optimize.targets import budgets

    def seconds(spec):   # 5 µs a layer + 1 ns a weight: a measured table's shape
        return 5e-6 + 1e-9 * spec.in_channels * spec.out_channels * spec.kernel_size

    graph, method = po.load(MODEL), get_method("pit").with_channel_multiple(16)
    reachable = budgets({"latency": "90%"}, graph, method, {"latency": seconds})[0]
    assert reachable.base < 1e-3 and 0 < reachable.min_reachable < 0.9 * reachable.base
    below = reachable.min_reachable * 0.98
    with pytest.raises(po.PlinioOnnxError) as err:
        budgets({"latency": below}, graph, method, {"latency": seconds})
    message = str(err.value)
    assert f"{below:.4g}" in message and f"{reachable.min_reachable:.4g}" in message
    assert f"{below / reachable.base:.0%} of the input's" in message and "--channel-multiple (now 16)" in message


def test_a_latency_in_seconds_meets_its_target_only_below_it_and_is_printed():
    """Targets are met up to float rounding, relatively: with an absolute 1e-6 a 20 µs latency
    1 % (0.2 µs) over a 12 µs target passed as met, and the search stopped early. Reports and
    messages print such costs to 4 digits, not as "0"."""
    from plinio_onnx.optimize.report import constraints_table
    from plinio_onnx.optimize.targets import format_cost, within_target

    target = 0.6 * 20e-6
    control = TargetControl(Recipe(), {"latency": target}, {"latency": "latency"}, _Scripted(),
                            {"step": 0, "lam": 1.0, "lambdas": {"latency": 1.0}, "initial_costs": {"latency": 20e-6}},
                            10)
    assert control.met({"latency": target}) and control.met({"latency": target * (1 + 1e-12)})
    assert not control.met({"latency": target * 1.01}) and not within_target(target * 1.01, target)
    assert within_target(12_000, 12_000) and not within_target(12_001, 12_000)
    assert format_cost(1.2e-5) == "1.2e-05" and format_cost(12_000.0) == "12,000" and format_cost(8) == "8"
    from rich.console import Console
    console = Console(record=True, width=120)
    console.print(constraints_table([{"kind": "latency", "unit": "s", "before": 20e-6, "after": 1.214e-5,
                                      "target": target, "given": "60%", "met": False}], "constraint"))
    text = console.export_text()
    assert "2e-05" in text and "1.214e-05 (60.7%)" in text and "1.2e-05 (60%)" in text and "no" in text
