"""`TargetControl`: λ, the moving target and the learning-rate settling of a cost-constrained search."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..regularizers import AdaptiveTarget
from .config import Recipe

__all__ = ["TargetControl"]

_COST = "cost"  # the one cost a flow's target constrains, as the regularizer names it


class TargetControl:
    """λ and the moving target of a cost-constrained search, and what the flow adds around them.

    The penalty is `po.regularizers.AdaptiveTarget`'s (the one implementation of the moving target
    and of λ): ``λ · max(0, cost − margin·T(s)) / target``, ``T(s)`` going geometrically from the
    initial cost to the target over the first ``ramp`` of the search steps, λ rising while the
    discrete cost is above ``T(s)`` and falling below ``relax · T(s)``. Adam moves all masks at about the same speed while the pressure
    dominates, so many can cross the threshold in the same step: ``restore`` then re-keeps the
    most marginal of them until the cost is back at ``floor · T(s)``. After the ramp both
    learning rates anneal (cosine; weights down to 5 %, masks to 0) so the architecture freezes
    and the weights converge. State (λ, step) lives in ``state`` (the checkpointed dict).
    """

    def __init__(self, recipe: Recipe, target: float, state: dict, total_steps: int,
                 restore: Callable[[float, Any], int] | None = None,
                 snapshot: Callable[[], Any] | None = None) -> None:
        self.r = recipe
        self.target = target
        self.state = state
        # The flow's checkpointed state keeps its own keys (λ a float): old checkpoints resume.
        self.adaptive = AdaptiveTarget(
            {_COST: target}, total_steps, strength=state["lam"], ramp=recipe.ramp, lambda_up=recipe.lambda_up,
            lambda_down=recipe.lambda_down, relax=recipe.relax, margin=recipe.margin,
            state={"step": state["step"], "lam": {_COST: state["lam"]}})
        self.adaptive.start(initial={_COST: float(state["initial_cost"])})
        self.ramp_steps = self.adaptive.ramp_steps
        self.total_steps = max(total_steps, self.ramp_steps + 1)
        self._before = None
        self.restore = restore
        self.snapshot = snapshot if restore is not None and recipe.floor > 0 else None
        self.schedules: list[tuple[torch.optim.Optimizer, float, float, list[float]]] = []

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

    def aim(self) -> float:
        """The moving target T at the current step."""
        return self.adaptive.aim(_COST)

    def regularizer(self, cost: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """The loss term of one step (it also remembers the step's cost and architecture)."""
        def term() -> torch.Tensor:
            if self.snapshot is not None:
                self._before = self.snapshot()
            return self.adaptive.penalty({_COST: cost()})
        return term

    def after_step(self) -> None:
        """Adapt λ to the step's cost, re-keep what fell below the floor, advance the schedules."""
        aim = self.aim()
        # Re-keeping changes no cost λ was measured on, so it may run before λ moves on.
        if self.restore is not None and self.r.floor > 0:
            self.state["restored"] = self.state.get("restored", 0) + self.restore(self.r.floor * aim, self._before)
        self.adaptive.after_step()
        self.state["lam"] = self.adaptive.strength(_COST)
        self.state["step"] = self.adaptive.state["step"]
        self._apply_schedules()
