"""Regularizers (`po.regularizers`) and named costs: values against hand computation on hand-built
graphs, gradients to the architecture parameters, DUCCIO's schedule against its equations, the
adaptive target against the optimize flow's, and a short constrained PIT search on digits."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import plinio_onnx as po
from plinio_onnx.errors import PlinioOnnxError
from plinio_onnx.regularizers import AdaptiveTarget, Constraint, DUCCIO, Linear

from _util import MODELS

# The hand graph: x[n,3,8,8] → conv A (3→8, 3x3, pad 1, bias) → relu → flatten (512) → gemm (512→4, bias)
FULL_PARAMS = 8 * 27 + 8 + 4 * 512 + 4                 # 2276
FULL_MACS = 8 * 27 * 64 + 4 * 512                      # 15872
# With 2 of A's 8 channels kept: the gemm reads 2·64 = 128 features.
PRUNED_PARAMS = 2 * 27 + 2 + 4 * 128 + 4               # 572
PRUNED_MACS = 2 * 27 * 64 + 4 * 128                    # 3968


def latency(spec: po.cost.LayerSpec):
    """A user's cost model: 2 per conv MAC plus a 100 launch overhead, 0.5 per gemm MAC."""
    if spec.kind == "conv":
        return 2 * po.cost.macs(spec) + 100
    return 0.5 * po.cost.macs(spec)


FULL_LATENCY = 2 * 8 * 27 * 64 + 100 + 0.5 * 4 * 512   # 28772
PRUNED_LATENCY = 2 * 2 * 27 * 64 + 100 + 0.5 * 4 * 128  # 7268


def _hand_graph() -> po.Graph:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="A", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="G", transB=1)]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in [("w", (8, 3, 3, 3)), ("b", (8,)), ("wg", (4, 512)), ("bg", (4,))]]
    proto = helper.make_model(helper.make_graph(nodes, "hand", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    return po.load(proto)


def _pit(**options) -> po.PIT:
    return po.PIT(_hand_graph(), cost={"params": po.cost.params, "macs": "macs", "latency": latency}, **options)


def _keep_two(model: po.PIT) -> None:
    """A's mask: channels 0 and 7 kept (7, the last, is kept alive whatever its value)."""
    (group,) = model.info.groups
    alpha = model.tensor(group.alpha[0])
    with torch.no_grad():
        alpha.fill_(0.1)
        alpha[0] = 1.0
        alpha[7] = 1.0


def _nas_gradient(model) -> float:
    return sum(float(p.grad.abs().sum()) for p in model.nas_parameters() if p.grad is not None)


def _zero_grad(model) -> None:
    for p in model.parameters():
        p.grad = None


# -- named costs ----------------------------------------------------------------------------------
def test_named_costs_by_hand_and_the_primary_cost():
    model = _pit()
    assert list(model.costs) == ["params", "macs", "latency"]
    with torch.no_grad():
        assert float(model.cost) == FULL_PARAMS                       # the first named cost
        assert float(model.cost_of("params")) == FULL_PARAMS
        assert float(model.cost_of("macs")) == FULL_MACS
        assert float(model.cost_of("latency")) == FULL_LATENCY
        assert float(model.cost_of(latency)) == FULL_LATENCY          # the function itself
        assert float(model.cost_of("ops")) == FULL_MACS + 8 * 64 + 4  # a built-in, not named
        _keep_two(model)
        assert float(model.cost_of("params")) == PRUNED_PARAMS
        assert float(model.cost_of("macs")) == PRUNED_MACS
        assert float(model.cost_of("latency")) == PRUNED_LATENCY
        assert float(model.cost) == PRUNED_PARAMS
    # One unnamed cost is named after itself; a named cost shadows the built-in of its name.
    assert list(po.PIT(_hand_graph(), cost=latency).costs) == ["latency"]
    assert list(po.PIT(_hand_graph(), cost="macs").costs) == ["macs"]
    shadow = po.PIT(_hand_graph(), cost={"params": latency})
    with torch.no_grad():
        assert float(shadow.cost_of("params")) == FULL_LATENCY == float(shadow.cost)


def test_named_costs_refuse_bad_input():
    with pytest.raises(PlinioOnnxError, match="unknown cost model 'speed'"):
        po.PIT(_hand_graph(), cost={"params": "params", "speed": "speed"})
    with pytest.raises(PlinioOnnxError, match="non-empty mapping"):
        po.PIT(_hand_graph(), cost={})
    with pytest.raises(PlinioOnnxError, match="function of a LayerSpec"):
        po.PIT(_hand_graph(), cost={"params": 3})
    with pytest.raises(PlinioOnnxError, match="choose from .*latency"):
        _pit().cost_of("energy")


def test_named_costs_on_mps_and_supernet():
    mps = po.MPS(_hand_graph(), cost={"size": "size", "params": po.cost.params}, per_channel=False)
    mps.eval()
    with torch.no_grad():
        assert float(mps.cost) == float(mps.cost_of("size")) == float(mps.cost_of(po.cost.size))
        assert float(mps.cost_of("params")) == FULL_PARAMS
    supernet = po.SuperNet(_hand_graph(), cost={"macs": "macs", "latency": latency},
                           layers={"A": ["kernel:1"]}, automatic=False)
    supernet.eval()
    with torch.no_grad():
        # The initial logits pick the original branch.
        assert float(supernet.cost) == FULL_MACS and float(supernet.cost_of("latency")) == FULL_LATENCY


# -- Linear ---------------------------------------------------------------------------------------
def test_linear_one_cost_and_a_weighted_sum_by_hand():
    model = _pit()
    _keep_two(model)
    with torch.no_grad():
        assert float(Linear("params", 1e-3)(model)) == pytest.approx(1e-3 * PRUNED_PARAMS)
        assert float(Linear(latency, 2.0)(model)) == pytest.approx(2.0 * PRUNED_LATENCY)
        weighted = Linear({"params": 2.0, latency: 0.5, "macs": 1e-2}, strength=0.1)
        assert float(weighted(model)) == pytest.approx(0.1 * (2 * PRUNED_PARAMS + 0.5 * PRUNED_LATENCY
                                                               + 1e-2 * PRUNED_MACS))
    model.train()
    weighted(model).backward()
    assert _nas_gradient(model) > 0
    with pytest.raises(PlinioOnnxError, match="≥ 0"):
        Linear("params", -1.0)
    with pytest.raises(PlinioOnnxError, match="share the name"):
        Linear({"latency": 1.0, latency: 1.0})


# -- Constraint -----------------------------------------------------------------------------------
def test_constraint_penalizes_only_above_its_targets_by_hand():
    model = _pit()
    reg = Constraint({"params": "50%", latency: 5000}, strength={"params": 3.0, latency: 2.0})
    reg.start(model)                                   # the initial (full) costs fix "50%"
    assert reg.initial == {"params": FULL_PARAMS, latency: FULL_LATENCY}
    assert reg.targets == {"params": FULL_PARAMS / 2, latency: 5000.0}
    with torch.no_grad():
        assert float(reg(model)) == pytest.approx(3.0 * (FULL_PARAMS / 2) / (FULL_PARAMS / 2)
                                                  + 2.0 * (FULL_LATENCY - 5000) / 5000)
        assert reg.met(model) == {"params": False, "latency": False}
    _keep_two(model)
    with torch.no_grad():   # params met (572 ≤ 1138): only latency's excess is penalized
        assert float(reg(model)) == pytest.approx(2.0 * (PRUNED_LATENCY - 5000) / 5000)
        assert reg.met(model) == {"params": True, "latency": False}
    model.train()
    reg(model).backward()
    assert _nas_gradient(model) > 0
    # Every target met: zero penalty, no gradient. A margin aims below the targets.
    _zero_grad(model)
    relaxed = Constraint({"params": 600, "macs": 4000})
    relaxed.start(model)
    penalty = relaxed(model)
    assert float(penalty.detach()) == 0.0
    penalty.backward()
    assert _nas_gradient(model) == 0
    with torch.no_grad():
        tight = Constraint({"params": 600, "macs": 4000}, margin=0.9)
        assert float(tight(model)) == pytest.approx((572 - 540) / 600 + (3968 - 3600) / 4000)


def test_constraint_refuses_bad_targets():
    with pytest.raises(PlinioOnnxError, match="percentage"):
        Constraint({"params": "150%"}).start(initial={"params": 100.0})
    with pytest.raises(PlinioOnnxError, match="not a number"):
        Constraint({"params": "half"}).start(initial={"params": 100.0})
    with pytest.raises(PlinioOnnxError, match="positive"):
        Constraint({"params": -5}).start(initial={"params": 100.0})
    with pytest.raises(PlinioOnnxError, match="one for each cost"):
        Constraint({"params": 5, "macs": 10}, strength={"params": 1.0})


def test_constraint_on_mps_and_supernet_reaches_their_parameters():
    mps = po.MPS(_hand_graph(), cost={"size": "size"}, per_channel=False)
    mps.eval()
    for node, bits in (("A", 4), ("G", 2)):
        name = mps._layers[node].alpha
        with torch.no_grad():
            logits = mps.tensor(name)
            logits.fill_(-5.0)
            logits[mps._layers[node].bits.index(bits)] = 5.0
    # bytes: A's 216 weights at 4 bits, G's 2048 at 2, float32 biases (8 + 4)
    size = (216 * 4 + 2048 * 2 + 12 * 32) / 8
    reg = Constraint({"size": 500.0}, strength=4.0)
    with torch.no_grad():
        assert float(mps.cost_of("size")) == size
        assert float(reg(mps)) == pytest.approx(4.0 * (size - 500) / 500)
    mps.train()
    reg(mps).backward()
    assert _nas_gradient(mps) > 0
    supernet = po.SuperNet(_hand_graph(), cost="macs", layers={"A": ["kernel:1"]}, automatic=False)
    supernet.train()
    reg = Constraint({"macs": 0.5 * FULL_MACS})
    reg(supernet).backward()
    assert supernet.logits("A").grad is not None and bool(torch.all(supernet.logits("A").grad != 0))


def test_regularizers_on_combined_methods_reach_every_kind_of_parameter():
    # PIT+MPS: a byte budget and a parameter budget move the precisions and the channel masks.
    joint = po.MPS(_hand_graph(), cost={"size": "size", "params": "params"}, per_channel=False, pit=True)
    joint.train()
    Constraint({"size": "30%", "params": "50%"})(joint).backward()
    moved = {name.rsplit(".", 1)[-1] for name in joint.module.initializer_names.values()
             if (grad := joint.grad(name)) is not None and bool(grad.abs().sum() > 0)}
    assert {"pit_alpha", "mps_w_alpha"} <= moved
    # SuperNet+PIT: the logits and the masks.
    both = po.SuperNet(_hand_graph(), cost={"macs": "macs", "latency": latency}, layers={"A": ["kernel:1"]},
                       automatic=False, pit=True)
    both.train()
    DUCCIO({"macs": "50%", latency: "50%"}, task_loss=1.0)(both, 1, 4).backward()
    moved = {name.rsplit(".", 1)[-1] for name in both.module.initializer_names.values()
             if (grad := both.grad(name)) is not None and bool(grad.abs().sum() > 0)}
    assert "pit_alpha" in moved and both.logits("A").grad is not None
    assert bool(torch.all(both.logits("A").grad != 0))


# -- DUCCIO ---------------------------------------------------------------------------------------
def test_duccio_final_strengths_and_schedule_follow_the_paper():
    model = _pit()
    # params: violated (2276 > 1000); macs: starts met exactly (PLiNIO would divide by zero).
    reg = DUCCIO({"params": 1000, "macs": FULL_MACS}, task_loss=2.0)
    reg.start(model)
    # Eq. 13: λ = L_wu / (C(0) − T); a met constraint: L_wu / (min_gap · T).
    final = {"params": 2.0 / (FULL_PARAMS - 1000), "macs": 2.0 / (0.1 * FULL_MACS)}
    assert reg.strengths() == pytest.approx(final)
    # Eq. 14 (ramp 0.5, E = 10): λ(e) = λ · min(1, 0.01 + 0.99 · e / 5)
    for epoch, factor in [(0, 0.01), (1, 0.208), (2, 0.406), (5, 1.0), (9, 1.0)]:
        assert reg.strengths(epoch, 10) == pytest.approx({k: v * factor for k, v in final.items()})
    # At the start, a violated constraint's term is the warm-up task loss (scaled by the ramp).
    with torch.no_grad():
        assert float(reg(model, 2, 10)) == pytest.approx(0.406 * 2.0)
        assert float(reg(model)) == pytest.approx(2.0)
    model.train()
    reg(model, 3, 10).backward()
    assert _nas_gradient(model) > 0
    # ramp=1: the strength grows over the whole search.
    whole = DUCCIO({"params": 1000}, task_loss=2.0, ramp=1.0)
    whole.start(model)
    assert whole.strengths(5, 10)["params"] == pytest.approx(final["params"] * (0.01 + 0.99 * 0.5))


def test_duccio_restrains_a_constraint_that_started_met_once_it_is_crossed():
    model = _pit()
    # Initial costs measured elsewhere (e.g. after pruning): macs started at 3968, met by 12000.
    reg = DUCCIO({"params": 500, "macs": 12000}, task_loss=1.5)
    reg.start(initial={"params": PRUNED_PARAMS, "macs": PRUNED_MACS})
    strengths = reg.strengths()
    # params: its excess 72 is at least min_gap·T = 50, so exactly Eq. 13.
    assert strengths["params"] == pytest.approx(1.5 / (PRUNED_PARAMS - 500))
    assert strengths["macs"] == pytest.approx(1.5 / (0.1 * 12000))
    with torch.no_grad():   # the full model exceeds both: macs is restrained too
        assert float(reg(model)) == pytest.approx(strengths["params"] * (FULL_PARAMS - 500)
                                                  + strengths["macs"] * (FULL_MACS - 12000))
    # A constraint violated by less than min_gap of its target gets the floor, not a huge λ.
    near = DUCCIO({"params": 2270}, task_loss=1.0)
    near.start(model)
    assert near.strengths()["params"] == pytest.approx(1.0 / 227.0)
    # Explicit final strengths are used as given.
    given = DUCCIO({"params": 1000}, final_strengths={"params": 0.25})
    with torch.no_grad():
        assert float(given(model, 0, 4)) == pytest.approx(0.25 * 0.01 * (FULL_PARAMS - 1000))
    with pytest.raises(PlinioOnnxError, match="exactly one"):
        DUCCIO({"params": 1000})


# -- AdaptiveTarget -------------------------------------------------------------------------------
def test_adaptive_target_equals_the_optimize_flow_on_a_scripted_cost_sequence():
    from plinio_onnx.optimize.config import Recipe
    from plinio_onnx.optimize.control import TargetControl as _TargetControl

    costs = [100, 99, 97, 96, 98, 90, 85, 80, 82, 70, 65, 60, 58, 52, 51, 49, 47, 45, 46, 44,
             43, 40, 41, 42, 48, 50, 49.5, 51, 47, 46]
    recipe = Recipe()
    current = {}

    class _Scripted:   # a model whose cost follows the script (nothing to re-keep)
        def cost_of(self, cost):
            return current["cost"]

        def architecture_snapshot(self):
            return None

        def restore_marginal(self, cost, floor, before):
            return 0

    # A state as a one-target search wrote it before several targets (λ and the cost plain numbers).
    state = {"initial_cost": 100.0, "lam": 1.5, "step": 0}
    flow = _TargetControl(recipe, {"params": 50.0}, {"params": "params"}, _Scripted(), state, len(costs))
    flow_term = flow.regularizer
    ours = AdaptiveTarget({"params": 50.0}, len(costs), strength=1.5, ramp=recipe.ramp,
                          lambda_up=recipe.lambda_up, lambda_down=recipe.lambda_down,
                          relax=recipe.relax, margin=recipe.margin)
    ours.start(initial={"params": 100.0})
    for step, cost in enumerate(costs):
        current["cost"] = torch.tensor(float(cost), dtype=torch.float64, requires_grad=True)
        expected = flow_term()
        got = ours.penalty({"params": current["cost"]})
        assert float(got.detach()) == float(expected.detach())
        assert ours.aim() == flow.aim() == pytest.approx(max(50.0, 100.0 * 0.5 ** (step / 12)))
        flow.after_step()
        ours.after_step()
        assert ours.strength("params") == state["lam"]
    assert ours.state["step"] == state["step"] == len(costs)


def test_adaptive_target_by_hand_on_a_model_with_two_costs():
    model = _pit()
    state: dict = {}
    reg = AdaptiveTarget({"params": "25%", latency: 10000}, total_steps=10, strength=2.0, state=state)
    model.train()
    penalty = reg(model)
    t_params, t_latency = FULL_PARAMS / 4, 10000.0
    # Step 0: the moving targets are the initial costs; the hinge aims at 0.97 of them.
    assert float(penalty.detach()) == pytest.approx(2.0 * 0.03 * FULL_PARAMS / t_params + 2.0 * 0.03 * FULL_LATENCY / t_latency)
    penalty.backward()
    assert _nas_gradient(model) > 0
    reg.after_step()   # both costs above their moving targets' relax band: no change…
    assert state["lam"] == {"params": 2.0, "latency": 2.0} and state["step"] == 1
    # …but above the moving target from step 1 on (ramp_steps = 4): λ rises by 1 %.
    assert reg.aim("params") == pytest.approx(FULL_PARAMS * 0.25 ** 0.25)
    reg(model)
    reg.after_step()
    assert state["lam"] == pytest.approx({"params": 2.02, "latency": 2.02})
    # Below relax · aim: λ falls by 1 %.
    _keep_two(model)
    with torch.no_grad():
        reg(model)
    reg.after_step()
    assert state["lam"] == pytest.approx({"params": 2.02 * 0.99, "latency": 2.02 * 0.99})
    with pytest.raises(PlinioOnnxError, match="name the cost"):
        reg.aim()
    # The state is the checkpoint: a new regularizer on it resumes (initial costs, λ, step).
    assert state["initial"] == {"params": FULL_PARAMS, "latency": FULL_LATENCY} and state["step"] == 3
    resumed = AdaptiveTarget({"params": "25%", latency: 10000}, total_steps=10, strength=5.0, state=state)
    with torch.no_grad():
        resumed(model)   # started from the state, not from the pruned model it is called on
        assert resumed.targets == {"params": t_params, latency: t_latency}
        value = float(resumed(_pit()))
    lam, progress = 2.02 * 0.99, 3 / 4
    aims = FULL_PARAMS * 0.25 ** progress, FULL_LATENCY * (t_latency / FULL_LATENCY) ** progress
    assert value == pytest.approx(lam * (FULL_PARAMS - 0.97 * aims[0]) / t_params
                                  + lam * (FULL_LATENCY - 0.97 * aims[1]) / t_latency)


# -- a short search on real data ------------------------------------------------------------------
def test_pit_on_digits_meets_two_constraints():
    torch.manual_seed(0)
    data = np.load(MODELS / "digits.npz")
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    model = po.PIT(MODELS / "digits_cnn.onnx", cost={"params": po.cost.params, "macs": po.cost.macs})
    reg = Constraint({"params": "40%", "macs": "60%"}, strength=0.5, margin=0.95)
    reg.start(model)
    assert reg.met(model) == {"params": False, "macs": False}
    weights = torch.optim.Adam(model.net_parameters(), lr=2e-3)
    masks = torch.optim.Adam(model.nas_parameters(), lr=5e-3)
    for _ in range(4):
        model.train()
        order = torch.randperm(1400)
        for i in range(0, 1400, 32):
            idx = order[i:i + 32]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx]) + reg(model)
            weights.zero_grad()
            masks.zero_grad()
            loss.backward()
            weights.step()
            masks.step()
    model.eval()
    assert reg.met(model) == {"params": True, "macs": True}
    exported = model.export()
    assert po.cost.total(exported) <= reg.targets["params"]
    assert po.cost.total(exported, po.cost.macs) <= reg.targets["macs"]
    with torch.no_grad():
        accuracy = float((model(x[1400:]).argmax(1) == y[1400:]).float().mean())
    assert accuracy > 0.8
