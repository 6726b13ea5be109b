"""The control of a cost-constrained search: the regularizer over every target (λ per cost and
the moving targets, or DUCCIO's schedule), the re-keeping floor, the fallback onto the targets,
and the learning-rate settling after the ramp.

Targets are keyed by kind ("params", "macs", "size", "latency", "memory"); ``refs`` gives each
kind's cost model (a per-layer function or a `plinio_onnx.cost.ModelCost`), read through the
searchable model's ``cost_of``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..cost import WorstRatio
from ..regularizers import DUCCIO, AdaptiveTarget
from .config import Recipe
from .targets import within_target

__all__ = ["TargetControl", "make_control", "upgrade_state"]


def upgrade_state(state: dict, kinds: list[str]) -> dict:
    """A search state written with one target (``lam`` and ``initial_cost`` plain numbers, as
    every release before several targets wrote it) gets the per-kind ``lambdas`` and
    ``initial_costs``; a current state is returned as it is."""
    first = kinds[0]
    if "lambdas" not in state and state.get("lam") is not None:
        state["lambdas"] = {first: float(state["lam"])}
    if "initial_costs" not in state and "initial_cost" in state:
        state["initial_costs"] = {first: float(state["initial_cost"])}
    return state


class _Control:
    """What both controls share: the costs of the model, the judge of a cost vector, the
    fallback onto the targets, and the learning-rate settling after ``ramp_steps``."""

    def __init__(self, recipe: Recipe, targets: Mapping[str, float], refs: Mapping[str, Any], model: Any,
                 state: dict, total_steps: int, ramp_steps: int) -> None:
        self.r = recipe
        self.targets = dict(targets)
        self.refs = dict(refs)
        self.model = model
        self.state = state
        self.ramp_steps = ramp_steps
        self.total_steps = max(total_steps, self.ramp_steps + 1)
        self.schedules: list[tuple[torch.optim.Optimizer, float, float, list[float]]] = []

    @property
    def primary(self) -> str:
        return next(iter(self.targets))

    def costs(self) -> dict[str, torch.Tensor]:
        """Every constrained cost of the model now (differentiable)."""
        return {kind: self.model.cost_of(ref) for kind, ref in self.refs.items()}

    def met(self, costs: Mapping[str, float]) -> bool:
        """Whether every cost is within its target."""
        return all(within_target(costs[kind], target) for kind, target in self.targets.items())

    def _one_or_worst(self, bounds: Mapping[str, float]) -> tuple[Any, float]:
        """(cost, bound) for a search hook that drives one cost to a bound: the cost itself with
        one target; with several, the largest ratio of a cost to its bound, driven to 1."""
        if len(bounds) == 1:
            ((kind, bound),) = bounds.items()
            return self.refs[kind], bound
        return WorstRatio({self.refs[kind]: bound for kind, bound in bounds.items()}), 1.0

    def enforce(self) -> bool:
        """Edit the architecture until every cost is within its target (a search that ended
        above); True on success."""
        cost, bound = self._one_or_worst(self.targets)
        return self.model.enforce_target(cost, bound)

    def aims(self) -> dict[str, float]:
        return dict(self.targets)

    def lambdas(self) -> dict[str, float]:
        return dict(self.state.get("lambdas", {}))

    def flush(self) -> None:
        """Bring ``state`` up to date after a run of steps (read it only after this)."""

    # -- learning rates -------------------------------------------------------------------------
    def settle(self, optimizer: torch.optim.Optimizer, lr: float, minimum: float) -> None:
        """After the ramp, anneal ``optimizer``'s learning rate (cosine, down to ``minimum``·lr);
        ``lr`` is the base rate, and parameter groups created at other rates keep their ratio."""
        ratios = [group["lr"] / lr if lr else 1.0 for group in optimizer.param_groups]
        self.schedules.append((optimizer, lr, minimum, ratios))
        self._apply_schedules()

    def _apply_schedules(self) -> None:
        if not self.r.settle:
            return
        done = (self.state["step"] - self.ramp_steps) / (self.total_steps - self.ramp_steps)
        factor = 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, done))))
        for optimizer, lr, minimum, ratios in self.schedules:
            for group, ratio in zip(optimizer.param_groups, ratios):
                group["lr"] = lr * ratio * max(factor, minimum)


class TargetControl(_Control):
    """λ per cost and the moving targets of a cost-constrained search (``--regularizer
    constraint``), and what the flow adds around them.

    The penalty is `po.regularizers.AdaptiveTarget`'s (the one implementation of the moving target
    and of λ): ``Σ_i λ_i · max(0, C_i − margin·T_i(s)) / target_i``, each ``T_i(s)`` going
    geometrically from the initial cost to its target over the first ``ramp`` of the search
    steps, each λ_i rising while its discrete cost is above ``T_i(s)`` and falling below
    ``relax · T_i(s)``: all targets are met together, each cost pressed only while it is above
    its own schedule. Adam moves all masks at about the same speed while the pressure
    dominates, so many can cross the threshold in the same step: the model's
    ``restore_marginal`` then re-keeps the most marginal of them while *every* cost is still
    below its floor ``floor · T_i(s)`` — it stops as soon as one cost reaches its floor, so
    re-keeping never lifts a cost above its schedule. After the ramp both learning rates anneal
    (cosine; weights down to 5 %, masks to 0) so the architecture freezes and the weights
    converge. State (λ per cost, step) lives in ``state`` (the checkpointed dict).
    """

    def __init__(self, recipe: Recipe, targets: Mapping[str, float], refs: Mapping[str, Any], model: Any,
                 state: dict, total_steps: int) -> None:
        upgrade_state(state, list(targets))
        self.adaptive = AdaptiveTarget(
            dict(targets), total_steps, strength=1.0, ramp=recipe.ramp, lambda_up=recipe.lambda_up,
            lambda_down=recipe.lambda_down, relax=recipe.relax, margin=recipe.margin,
            state={"step": state["step"], "lam": state["lambdas"]})
        self.adaptive.start(initial=state["initial_costs"])
        super().__init__(recipe, targets, refs, model, state, total_steps, self.adaptive.ramp_steps)
        self.ramp = recipe.ramp   # the fraction of the search the moving targets take
        self._before = None
        self.restoring = recipe.floor > 0

    def aim(self, kind: str | None = None) -> float:
        """The moving target of ``kind`` (the first target's by default) at the current step."""
        return self.adaptive.aim(kind or self.primary)

    def aims(self) -> dict[str, float]:
        return {kind: self.aim(kind) for kind in self.targets}

    def regularizer(self) -> torch.Tensor:
        """The loss term of one step (it also remembers the step's costs and architecture)."""
        if self.restoring:
            self._before = self.model.architecture_snapshot()
        return self.adaptive.penalty(self.costs())   # (costs on a device: λ stays there)

    def after_step(self) -> None:
        """Adapt every λ to the step's cost, re-keep what fell below the floors, advance the
        schedules."""
        # Re-keeping changes no cost λ was measured on, so it may run before λ moves on. It is the
        # step's one host read on a device: which masks crossed the threshold, which of them are
        # the most marginal and when the cost is back at its floor are decided one mask at a time
        # on the host (the same on every rank: the parameters are). ``floor`` 0 turns it off.
        if self.restoring:
            cost, floor = self._one_or_worst({kind: self.r.floor * aim for kind, aim in self.aims().items()})
            restored = self.model.restore_marginal(cost, floor, self._before)
            self.state["restored"] = self.state.get("restored", 0) + restored
        self.adaptive.after_step()
        if not self.adaptive.on_device:        # (on a device, state["lam"] at the next `flush`)
            self.state["lam"] = self.adaptive.strength(self.primary)
        self.state["step"] = self.adaptive.state["step"]
        self._apply_schedules()

    def flush(self) -> None:
        if self.adaptive.on_device:
            self.state["lam"] = self.adaptive.strength(self.primary)   # (`strength` flushes)


class DuccioControl(_Control):
    """DUCCIO's schedule over every target (``--regularizer duccio``): ``Σ_i λ_i(e) ·
    max(0, C_i − T_i)``, final strengths from the warm-up task loss (Eq. 13), ramped linearly
    over the first half of the search (Eq. 14) — `po.regularizers.DUCCIO` computes both. The
    targets do not move and nothing is re-kept; after the ramp the learning rates settle as
    under the constraint."""

    def __init__(self, recipe: Recipe, targets: Mapping[str, float], refs: Mapping[str, Any], model: Any,
                 state: dict, total_steps: int, epochs: int, task_loss: float) -> None:
        upgrade_state(state, list(targets))
        self.duccio = DUCCIO(dict(targets), task_loss=max(task_loss, 1e-12))
        self.duccio.start(initial=state["initial_costs"])
        self.epochs = max(1, epochs)
        self.steps_per_epoch = max(1, total_steps // self.epochs)
        super().__init__(recipe, targets, refs, model, state, total_steps,
                         max(1, int(self.duccio.ramp * total_steps)))
        self.ramp = self.duccio.ramp
        self.state["lambdas"] = self.strengths()

    def strengths(self) -> dict[str, float]:
        epoch = self.state["step"] // self.steps_per_epoch
        return self.duccio.strengths(epoch, self.epochs)

    def aim(self, kind: str | None = None) -> float:
        return self.targets[kind or self.primary]

    def regularizer(self) -> torch.Tensor:
        strengths, costs = self.strengths(), self.costs()
        return sum(strengths[kind] * torch.relu(costs[kind] - target) for kind, target in self.duccio.targets.items())

    def after_step(self) -> None:
        self.state["step"] += 1
        self.state["lambdas"] = self.strengths()
        self.state["lam"] = self.state["lambdas"][self.primary]
        self._apply_schedules()


def make_control(regularizer: str, recipe: Recipe, targets: Mapping[str, float], refs: Mapping[str, Any],
                 model: Any, state: dict, total_steps: int, epochs: int) -> _Control:
    """The control of ``regularizer`` ("constraint" or "duccio") over ``targets``."""
    if regularizer == "duccio":
        reference = state.get("reference_loss", state["initial"]["loss"])
        return DuccioControl(recipe, targets, refs, model, state, total_steps, epochs, reference)
    return TargetControl(recipe, targets, refs, model, state, total_steps)
