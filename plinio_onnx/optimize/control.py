"""`TargetControl`: λ, the moving target and the learning-rate settling of a cost-constrained search."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .config import Recipe

__all__ = ["TargetControl"]


class TargetControl:
    """λ and the moving target of a cost-constrained search.

    The regularizer is ``λ · max(0, cost − margin·T(s)) / target``. ``T(s)`` goes geometrically
    from the initial cost to the target over the first ``ramp`` of the search steps. ``λ`` is
    multiplied by ``lambda_up`` after every step whose discrete cost is above ``T(s)`` and by
    ``lambda_down`` while it is below ``relax · T(s)``, so it settles where the pressure
    balances the task loss. Adam moves all masks at about the same speed while the pressure
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
        self.start = float(state["initial_cost"])
        self.ramp_steps = max(1, int(recipe.ramp * total_steps))
        self.total_steps = max(total_steps, self.ramp_steps + 1)
        self._last = None
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
        progress = min(1.0, self.state["step"] / self.ramp_steps)
        if self.start <= self.target:
            return self.target
        return self.start * (self.target / self.start) ** progress

    def regularizer(self, cost: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """The loss term of one step (it also remembers the step's cost and architecture)."""
        def term() -> torch.Tensor:
            if self.snapshot is not None:
                self._before = self.snapshot()
            c = cost()
            self._last = float(c.detach())
            return self.state["lam"] * torch.relu(c - self.r.margin * self.aim()) / self.target
        return term

    def after_step(self) -> None:
        """Adapt λ to the step's cost, re-keep what fell below the floor, advance the schedules."""
        aim = self.aim()
        if self._last is not None:
            if self._last > aim:
                self.state["lam"] *= self.r.lambda_up
            elif self._last < self.r.relax * aim:
                self.state["lam"] = max(self.state["lam"] * self.r.lambda_down, 1e-8)
        if self.restore is not None and self.r.floor > 0:
            self.state["restored"] = self.state.get("restored", 0) + self.restore(self.r.floor * aim, self._before)
        self.state["step"] += 1
        self._apply_schedules()
