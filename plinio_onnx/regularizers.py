"""Regularizers (``po.regularizers``): the cost term of a search loss, in PLiNIO's form.

    model = po.PIT("model.onnx", cost={"params": po.cost.params, "macs": po.cost.macs})
    regularizer = po.regularizers.Constraint({"params": "30%", "macs": "50%"}, strength=2.0)
    loss = criterion(model(x), y) + regularizer(model)

A regularizer reads its costs through ``model.cost_of(cost)``, so it works with every searchable
model (`PIT`, `MPS`, `SuperNet` and their combinations) and every cost model: a cost is named —
one of the model's named costs (``cost={"params": ..., "latency": ...}`` at construction) or a
built-in cost model (``"params"``, ``"macs"``, ``"size"``, …) — or given as a cost function
itself (``po.cost.params``, or your own ``Callable[[LayerSpec], number]``).

Targets are absolute numbers or fractions of the model's initial cost (``"30%"``). Initial costs
are measured by `start(model)` — called by the first call of the regularizer when you have not
called it yourself — so a regularizer belongs to one model.

* `Linear`: ``Σ_i s_i · C_i`` — cost as an objective (PLiNIO's ``BaseRegularizer``).
* `Constraint`: ``Σ_i s_i · max(0, C_i − m·T_i) / T_i`` — cost as a constraint, no pressure once met.
* `DUCCIO`: several constraints, strengths derived from the warm-up task loss and ramped
  linearly over the search (arXiv 2310.07217, Eq. 13 and 14).
* `AdaptiveTarget`: a moving target per cost and a strength that adapts step by step (the
  target mode of ``plinio-onnx optimize``).
"""
from __future__ import annotations

import abc
import math
import re
from typing import Any, Callable, Iterable, Mapping, MutableMapping, Union

import torch

from . import host
from .errors import RegularizerError

#: A cost: its name (a named cost of the model or a built-in cost model) or a cost function.
CostRef = Union[str, Callable[..., Any]]
#: A target: an absolute number, or a fraction of the initial cost written ``"30%"``.
TargetValue = Union[int, float, str]

__all__ = ["AdaptiveTarget", "Constraint", "CostRef", "DUCCIO", "Linear", "Regularizer", "RegularizerError",
           "TargetValue", "cost_label"]


def cost_label(cost: CostRef) -> str:
    """A readable name of ``cost``: the name itself, or the function's ``__name__``."""
    return cost if isinstance(cost, str) else getattr(cost, "__name__", repr(cost))


def _positive(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RegularizerError(f"{what}: {value!r} is not a number") from None
    if not math.isfinite(number) or number <= 0:
        raise RegularizerError(f"{what}: must be a positive number, got {value!r}")
    return number


def _non_negative(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RegularizerError(f"{what}: {value!r} is not a number") from None
    if not math.isfinite(number) or number < 0:
        raise RegularizerError(f"{what}: must be a number ≥ 0, got {value!r}")
    return number


def _absolute_target(value: TargetValue, initial: float, what: str) -> float:
    """``1234`` or ``"1.2e3"`` as it is, ``"30%"`` as 30 % of ``initial``."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%?)\s*", value)
        if not match:
            raise RegularizerError(f"{what}: {value!r} is not a number or a percentage like '30%'")
        number = float(match.group(1))
        if match.group(2):
            if not 0 < number <= 100:
                raise RegularizerError(f"{what}: a percentage must be in (0, 100], got {value!r}")
            return initial * number / 100.0
        return _positive(number, what)
    return _positive(value, what)


def _as_mapping(costs: "CostRef | Mapping[CostRef, Any]", value: Any) -> dict:
    """``{cost: value}`` from one cost (with ``value``) or a mapping (kept as given)."""
    if isinstance(costs, Mapping):
        if not costs:
            raise RegularizerError("no cost given")
        return dict(costs)
    return {costs: value}


def _per_cost(value: "float | Mapping[CostRef, float]", costs: Iterable[CostRef], what: str) -> dict:
    """One strength for every cost, or a mapping that names exactly the costs."""
    costs = list(costs)
    if isinstance(value, Mapping):
        if set(value) != set(costs):
            raise RegularizerError(f"{what}: give one for each cost {[cost_label(c) for c in costs]}, "
                                   f"got {[cost_label(c) for c in value]}")
        return {c: _non_negative(value[c], f"{what} of {cost_label(c)}") for c in costs}
    return {c: _non_negative(value, what) for c in costs}


def _check_labels(costs: Iterable[CostRef]) -> None:
    labels = [cost_label(c) for c in costs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise RegularizerError(f"two costs share the name(s) {repeated}: name them apart")


class Regularizer(abc.ABC):
    """A loss term computed from a searchable model's costs: ``loss = task + regularizer(model)``."""

    @abc.abstractmethod
    def __call__(self, model: Any) -> torch.Tensor:
        """The term at ``model``'s current architecture (a differentiable float64 scalar)."""

    @staticmethod
    def _costs(model: Any, costs: Iterable[CostRef]) -> dict:
        return {cost: model.cost_of(cost) for cost in costs}


class _Targeted(Regularizer):
    """A regularizer with a target per cost: initial costs measured once, targets made absolute."""

    def __init__(self, targets: Mapping[CostRef, TargetValue]) -> None:
        if not isinstance(targets, Mapping) or not targets:
            raise RegularizerError("targets: give a mapping {cost: target}, e.g. {'params': '30%'}")
        _check_labels(targets)
        self.target_values = dict(targets)
        #: The costs at `start` (None before).
        self.initial: dict | None = None
        #: Absolute targets (None before `start`).
        self.targets: dict | None = None

    def start(self, model: Any = None, *, initial: Mapping[CostRef, float] | None = None) -> None:
        """Measure ``model``'s costs (or take ``initial``) as the initial costs and make every
        target absolute. The first call of the regularizer does it when you have not."""
        if initial is None:
            if model is None:
                raise RegularizerError("start: give the model or the initial costs")
            with torch.no_grad():
                initial = {cost: float(value) for cost, value in self._costs(model, self.target_values).items()}
        missing = [cost_label(c) for c in self.target_values if c not in initial]
        if missing:
            raise RegularizerError(f"start: no initial cost for {missing}")
        self.initial = {c: float(initial[c]) for c in self.target_values}
        self.targets = {c: _absolute_target(v, self.initial[c], f"target of {cost_label(c)}")
                        for c, v in self.target_values.items()}

    def _started(self, model: Any) -> dict:
        if self.targets is None:
            self.start(model)
        return self.targets

    def met(self, model: Any) -> dict[str, bool]:
        """For every cost (by `cost_label`): whether ``model``'s cost is at or below its target."""
        targets = self._started(model)
        with torch.no_grad():
            return {cost_label(c): float(v) <= targets[c] for c, v in self._costs(model, targets).items()}


# -- linear -------------------------------------------------------------------------------------
class Linear(Regularizer):
    """``strength · C`` for one cost, ``Σ_i s_i · C_i`` for several (costs as objectives).

    ``Linear("params", 1e-4)`` or ``Linear({"params": 1e-4, po.cost.macs: 1e-6})``; with a
    mapping, ``strength`` multiplies every weight.
    """

    def __init__(self, cost: "CostRef | Mapping[CostRef, float]" = "params", strength: float = 1.0) -> None:
        weights = _as_mapping(cost, 1.0)
        _check_labels(weights)
        scale = _non_negative(strength, "strength")
        self.strengths = {c: scale * _non_negative(w, f"weight of {cost_label(c)}") for c, w in weights.items()}

    def __call__(self, model: Any) -> torch.Tensor:
        costs = self._costs(model, self.strengths)
        return sum(self.strengths[c] * value for c, value in costs.items())


# -- constraint ---------------------------------------------------------------------------------
class Constraint(_Targeted):
    """``Σ_i s_i · max(0, C_i − margin·T_i) / T_i``: a penalty only above the targets.

    Each excess is relative to its target, so one ``strength`` suits costs of any unit: an
    excess of 10 % over a target costs ``0.1 · s``. ``margin`` < 1 aims a little below the
    targets, so a cost that hovers at the hinge (a discrete cost moves in steps) ends up met.
    ``targets``: ``{cost: number or "30%"}``; ``strength``: one for all, or one per cost.
    """

    def __init__(self, targets: Mapping[CostRef, TargetValue], strength: "float | Mapping[CostRef, float]" = 1.0,
                 margin: float = 1.0) -> None:
        super().__init__(targets)
        self.strengths = _per_cost(strength, self.target_values, "strength")
        self.margin = _positive(margin, "margin")

    def __call__(self, model: Any) -> torch.Tensor:
        targets = self._started(model)
        costs = self._costs(model, targets)
        return sum(self.strengths[c] * torch.relu(value - self.margin * targets[c]) / targets[c]
                   for c, value in costs.items())


# -- DUCCIO -------------------------------------------------------------------------------------
class DUCCIO(_Targeted):
    """DUCCIO (DNAS Under Combined Constraints In One-shot, arXiv 2310.07217):
    ``Σ_i λ_i(e) · max(0, C_i − T_i)``.

    Final strengths (Eq. 13): ``λ_i = L_wu / (C_i(0) − T_i)``, ``L_wu`` the task loss after the
    warm-up and ``C_i(0)`` the initial cost, so every violated constraint starts as heavy as the
    task itself; or give ``final_strengths`` yourself. Schedule (Eq. 14, as PLiNIO applies it):
    ``λ_i(e) = λ_i · min(1, 0.01 + 0.99 · e / (ramp · E))`` at epoch ``e`` (from 0) of ``E``:
    from 1 % of the final strength to all of it, linearly, over the first ``ramp`` of the search
    (``ramp=0.5``: PLiNIO's; ``ramp=1``: the whole search). Call ``regularizer(model, epoch,
    epochs)``; without them the final strengths apply.
    """

    def __init__(self, targets: Mapping[CostRef, TargetValue], task_loss: float | None = None,
                 final_strengths: "Mapping[CostRef, float] | None" = None, ramp: float = 0.5,
                 min_gap: float = 0.1) -> None:
        super().__init__(targets)
        if (task_loss is None) == (final_strengths is None):
            raise RegularizerError("DUCCIO: give exactly one of task_loss and final_strengths")
        self.task_loss = None if task_loss is None else _positive(task_loss, "task_loss")
        self.final_strengths = (None if final_strengths is None
                                else _per_cost(final_strengths, self.target_values, "final strength"))
        self.ramp = _positive(ramp, "ramp")
        self.min_gap = _positive(min_gap, "min_gap")

    def start(self, model: Any = None, *, initial: Mapping[CostRef, float] | None = None) -> None:
        super().start(model, initial=initial)
        if self.task_loss is not None:
            # Eq. 13 divides by the initial excess C_i(0) − T_i. A constraint that starts met
            # (excess ≤ 0) has none: PLiNIO clamps the negative quotient to a strength of 0 (and
            # an excess of exactly 0 divides by zero), so that cost is never restrained again,
            # even when pressure on the other costs — or a search that trades one cost for
            # another, as MPS size against bit-operations or a SuperNet branch — later pushes it
            # above its target. Ours divides by max(C_i(0) − T_i, min_gap · T_i): a violated
            # constraint whose excess is at least min_gap of its target gets exactly Eq. 13; one
            # that starts met (or nearly) gets the strength it would have had starting min_gap
            # above its target. Its hinge costs nothing while it stays met, and holds it there
            # as firmly as a violated constraint if it ever crosses — never an infinite strength.
            self.final_strengths = {
                c: self.task_loss / max(self.initial[c] - t, self.min_gap * t) for c, t in self.targets.items()}

    def strengths(self, epoch: int | None = None, epochs: int | None = None) -> dict:
        """λ_i at ``epoch`` of ``epochs`` (Eq. 14); the final strengths without them."""
        if self.final_strengths is None:
            raise RegularizerError("DUCCIO: strengths are known after start(model)")
        if epoch is None or epochs is None:
            return dict(self.final_strengths)
        factor = min(1.0, 0.01 + 0.99 * epoch / (self.ramp * epochs))
        return {c: s * factor for c, s in self.final_strengths.items()}

    def __call__(self, model: Any, epoch: int | None = None, epochs: int | None = None) -> torch.Tensor:
        targets = self._started(model)
        strengths = self.strengths(epoch, epochs)
        costs = self._costs(model, targets)
        return sum(strengths[c] * torch.relu(value - targets[c]) for c, value in costs.items())


# -- adaptive target ----------------------------------------------------------------------------
class AdaptiveTarget(_Targeted):
    """A moving target per cost and a strength λ that adapts to it, step by step.

    Penalty: ``Σ_i λ_i · max(0, C_i − margin · A_i(s)) / T_i``. The moving target ``A_i(s)``
    goes geometrically from the initial cost ``C_i(0)`` to the target ``T_i`` over the first
    ``ramp`` of the ``total_steps`` optimizer steps (the target itself when the cost starts at or
    below it): ``A_i(s) = C_i(0) · (T_i / C_i(0)) ** min(1, s / ramp_steps)``, so the search
    prunes gradually. After every step (`after_step`) λ_i is multiplied by ``lambda_up`` when
    the cost seen by the last call was above ``A_i``, and by ``lambda_down`` (not below
    ``min_strength``) when it was below ``relax · A_i``: λ settles where the pressure balances
    the task loss. PIT, MPS and SuperNet models compute the discrete cost — the exported
    model's — so λ answers what export would write. ``strength``: the first λ (a good value: the
    warm-up task loss).

    ``state``: a mapping that holds the step count, λ and the initial costs (``{"step": s,
    "lam": {name: λ}, "initial": {name: C(0)}}``, names by `cost_label`), e.g. a training loop's
    checkpointed record; a new one by default. Handing the same state to a new regularizer
    resumes it where it was.

    Costs on a device (CUDA, …; `plinio_onnx.host.runs_on_host`): λ lives there as a float64
    tensor per cost, adapted by ``torch.where`` on the cost the last penalty saw — the same IEEE
    operations as the host's Python numbers, so the same λ bit for bit — and no step reads a
    value back. `flush` (and `strength`) write λ and `last` back as Python numbers: one host
    read, e.g. once per epoch.
    """

    def __init__(self, targets: Mapping[CostRef, TargetValue], total_steps: int, *, strength: float = 1.0,
                 ramp: float = 0.4, lambda_up: float = 1.01, lambda_down: float = 0.99, relax: float = 0.97,
                 margin: float = 0.97, min_strength: float = 1e-8,
                 state: MutableMapping[str, Any] | None = None) -> None:
        super().__init__(targets)
        if int(total_steps) < 1:
            raise RegularizerError(f"total_steps must be at least 1, got {total_steps!r}")
        self.ramp_steps = max(1, int(_positive(ramp, "ramp") * int(total_steps)))
        self.lambda_up, self.lambda_down = float(lambda_up), float(lambda_down)
        self.relax, self.margin, self.min_strength = float(relax), float(margin), float(min_strength)
        self.state = state if state is not None else {}
        self.state.setdefault("step", 0)
        lam = self.state.setdefault("lam", {})
        for cost in self.target_values:
            lam.setdefault(cost_label(cost), _positive(strength, "strength"))
        #: The costs seen by the last call (before the optimizer step), by label.
        self.last: dict[str, float] = {}
        self._device_lam: dict[str, torch.Tensor] = {}    # λ while the costs live on a device
        self._device_last: dict[str, torch.Tensor] = {}   # the costs the last penalty saw there

    def start(self, model: Any = None, *, initial: Mapping[CostRef, float] | None = None) -> None:
        """Measure (or take) the initial costs and fix the targets; a state that already holds
        initial costs (a resumed run) keeps them."""
        stored = self.state.get("initial")
        if initial is None and stored and all(cost_label(c) in stored for c in self.target_values):
            initial = {c: stored[cost_label(c)] for c in self.target_values}
        super().start(model, initial=initial)
        self.state["initial"] = {cost_label(c): value for c, value in self.initial.items()}

    def strength(self, cost: CostRef) -> float:
        """λ of ``cost`` now (after steps on a device: `flush`es first)."""
        self.flush()
        return float(self.state["lam"][cost_label(cost)])

    @property
    def on_device(self) -> bool:
        """Whether λ lives on a device now (until `flush`)."""
        return bool(self._device_lam)

    def flush(self) -> None:
        """λ and `last` as Python numbers again after steps whose costs lived on a device (one
        host read); nothing to do on the host."""
        for label, lam in self._device_lam.items():
            self.state["lam"][label] = float(lam)
        self.last.update({label: float(value) for label, value in self._device_last.items()})
        self._device_lam.clear()
        self._device_last.clear()

    def aim(self, cost: CostRef | None = None) -> float:
        """The moving target ``A(s)`` of ``cost`` (the only one when None) at the current step."""
        if self.targets is None:
            raise RegularizerError("AdaptiveTarget: the moving target is known after start(model)")
        if cost is None:
            if len(self.targets) != 1:
                raise RegularizerError("aim: name the cost (this regularizer has several)")
            (cost,) = self.targets
        start, target = self.initial[cost], self.targets[cost]
        if start <= target:
            return target
        progress = min(1.0, self.state["step"] / self.ramp_steps)
        return start * (target / start) ** progress

    def penalty(self, costs: Mapping[CostRef, torch.Tensor]) -> torch.Tensor:
        """The penalty at the given cost values (one per target; start() must have run)."""
        if self.targets is None:
            raise RegularizerError("AdaptiveTarget: call start(model) (or start(initial=...)) first")
        total = None
        for cost, target in self.targets.items():
            value = costs[cost]
            label = cost_label(cost)
            if host.runs_on_host(value):
                lam = self.state["lam"][label]
                self.last[label] = float(value.detach())
            else:
                lam = self._device_lam.get(label)
                if lam is None:
                    lam = self._device_lam[label] = torch.full((), self.state["lam"][label], dtype=torch.float64,
                                                               device=value.device)
                self._device_last[label] = value.detach()
            term = lam * torch.relu(value - self.margin * self.aim(cost)) / target
            total = term if total is None else total + term
        return total

    def __call__(self, model: Any) -> torch.Tensor:
        targets = self._started(model)
        return self.penalty(self._costs(model, targets))

    def after_step(self) -> None:
        """Adapt every λ to the cost the last call saw, then advance the moving targets one step.
        Call it once after every optimizer step."""
        if self.targets is not None:
            for cost in self.targets:
                label = cost_label(cost)
                if label in self._device_last:
                    self._adapt_on_device(label, self.aim(cost))
                    continue
                if label not in self.last:
                    continue
                aim, lam = self.aim(cost), self.state["lam"]
                if self.last[label] > aim:
                    lam[label] *= self.lambda_up
                elif self.last[label] < self.relax * aim:
                    lam[label] = max(lam[label] * self.lambda_down, self.min_strength)
        self.state["step"] += 1

    def _adapt_on_device(self, label: str, aim: float) -> None:
        """`after_step`'s rule for one λ on a device, decided by ``torch.where``."""
        lam, last = self._device_lam[label], self._device_last[label]
        lowered = torch.clamp_min(lam * self.lambda_down, self.min_strength)
        kept_or_lowered = torch.where(last < self.relax * aim, lowered, lam)
        self._device_lam[label] = torch.where(last > aim, lam * self.lambda_up, kept_or_lowered)
