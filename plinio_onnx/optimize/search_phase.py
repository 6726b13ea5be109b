"""The search phase: the method's searchable model trained with two Adam optimizers (weights;
architecture parameters) on ``task loss + regularizer``, checkpointed every epoch; the best
epoch that meets the target (by validation metric) is the chosen architecture. With a
`plinio_onnx.optimize.latency_loop.LatencyCheck` the choice is measured in the runtime and, when
it misses a latency target there, the search goes on for a round against a tighter target.

The regularizer is ``strength · cost`` or, with targets, the control of
`plinio_onnx.optimize.control` over all of them (the adaptive constraint or DUCCIO); an epoch
qualifies when every target is met. What differs between methods is asked of the model through
its `SearchHooks`.
"""
from __future__ import annotations

import math
import time

import torch

from ..cost import ModelCost
from ..errors import PlinioOnnxError
from ..graph import Graph
from .checkpoint import load_optimizer, optimizer_arrays, parameter_names
from .control import make_control, upgrade_state
from .latency_loop import LatencyCheck
from .methods import Method, tag_method
from .report import percent
from .targets import format_cost
from .training import Run, adam, to_device

__all__ = ["search"]


def search(run: Run, method: Method, warmed: Graph, cost_fn, strength: float | None,
           target: "float | dict[str, float] | None", base_cost: float, *, refs: "dict | None" = None,
           regularizer: str = "constraint", check: "LatencyCheck | None" = None):
    """Search ``method`` on the warmed-up graph; returns the chosen searchable model and the
    phase's summary (a finished phase is read back from the checkpoint).

    ``cost_fn``: the primary cost (the first target's, or the one ``strength`` weighs);
    ``target``: the absolute targets by kind (one number: a target on ``cost_fn``), each kind's
    cost model in ``refs``; ``regularizer``: "constraint" or "duccio" with targets; ``check``:
    the measure-and-tighten loop of a latency target (`plinio_onnx.optimize.latency_loop`)."""
    rec = run.ckpt.phase("search")
    if isinstance(target, (int, float)):
        target, refs = {"cost": float(target)}, {"cost": cost_fn}
    if rec.get("done"):
        return method.build(run.ckpt.load_graph(rec["best_file"]), _build_cost(cost_fn)), rec["info"]
    model, info = _SearchPhase(run, method, warmed, cost_fn, strength, target or None, base_cost, rec,
                               refs or {}, regularizer, check).search()
    # Export reads float32 values on the CPU, whatever device searched: the same bytes.
    return model.cpu(), info


def _build_cost(cost_fn):
    """What a model is built with: a per-layer cost (a `ModelCost` is read through ``cost_of``)."""
    return "params" if isinstance(cost_fn, ModelCost) else cost_fn


def _nas_learning_rate(run: Run, model, epochs: int) -> float:
    """The recipe's ``lr_nas``, else one that lets a mask cross its threshold within ``nas_reach``
    of the search, in [5e-4, 1e-2], and not below the model's floor."""
    r = run.recipe
    if r.lr_nas:
        return r.lr_nas
    steps_per_epoch = run.steps_per_epoch()
    return max(model.nas_lr_floor, min(1e-2, max(5e-4, 1.0 / (r.nas_reach * max(epochs, 1) * steps_per_epoch))))


class _SearchPhase:
    """One search: the model, its two optimizers, the checkpointed ``state`` and the objective."""

    def __init__(self, run: Run, method: Method, warmed: Graph, cost_fn, strength: float | None,
                 targets: "dict[str, float] | None", base_cost: float, rec: dict, refs: dict,
                 regularizer: str, check: LatencyCheck | None = None) -> None:
        self.run, self.method, self.cost_fn, self.check = run, method, cost_fn, check
        self.targets, self.refs, self.regularizer_name = targets, refs, regularizer
        self.target = None if targets is None else next(iter(targets.values()))   # the primary one
        self.base_cost = base_cost
        self.budget = self.epochs = run.recipe.search_epochs
        self.t0 = time.perf_counter()
        if rec:
            self.model = run.place(method.build(run.ckpt.load_graph(rec["current_file"]), _build_cost(cost_fn)))
        else:
            self.model = run.place(method.build(warmed, _build_cost(cost_fn)))
            self.model.before_search(to_device(run.train.head(256)[0], run.device))
        # Kept in the state: a run resumed with another number of processes (steps per epoch)
        # goes on at the same rate.
        self.lr_nas = rec["state"].get("lr_nas") if rec else None
        self.lr_nas = self.lr_nas or _nas_learning_rate(run, self.model, self.epochs)
        self._make_optimizers()
        if rec:
            self._resume(rec)
        else:
            self._start(strength)
        latency_round = self.state.get("latency_round")
        if latency_round:   # resumed within a latency round: its targets and epochs
            self.targets = dict(latency_round["targets"])
            self.epochs = latency_round["start"] + latency_round["epochs"]
        self.current_file = self.rec.get("current_file")
        self._make_objective()

    def _make_optimizers(self) -> None:
        r, model = self.run.recipe, self.model
        self.net_opt = adam(model.net_parameters(), lr=r.lr_net, weight_decay=r.weight_decay_net)
        nas_groups = [group for group in model.nas_param_groups(self.lr_nas) if group["params"]]
        # QAT has no architecture parameters: a dummy keeps the flow (and checkpoints) uniform.
        self.nas_opt = adam(nas_groups or [torch.nn.Parameter(torch.zeros(1))], lr=self.lr_nas, weight_decay=0.0)
        self.names = parameter_names(model)

    def _resume(self, rec: dict) -> None:
        arrays = self.run.ckpt.load_arrays(rec["optim_file"])
        for prefix, optimizer in (("net.", self.net_opt), ("nas.", self.nas_opt)):
            load_optimizer(optimizer, {k[4:]: v for k, v in arrays.items() if k.startswith(prefix)}, self.names)
        self.state = rec["state"]
        # The schedules count optimizer steps; each completed epoch took `steps_per_epoch` of
        # them, which depends on the number of processes: a resumed run counts in its own.
        start = self.state.get("latency_round", {}).get("start", 0)   # a latency round counts from its start
        self.state["step"] = (self.state["epoch"] - start) * self.run.steps_per_epoch()
        if self.targets:
            upgrade_state(self.state, list(self.targets))
        self.elapsed = rec.get("seconds", 0.0)
        self.rec = rec

    def _start(self, strength: float | None) -> None:
        initial = self.run.evaluate(self.model)
        with torch.no_grad():
            initial_cost = float(self.model.cost_of(self.cost_fn))
            initial_costs = {kind: float(self.model.cost_of(ref)) for kind, ref in self.refs.items()}
        reference = self.run.reference_loss(initial["loss"])
        if strength is None and self.target is None:
            strength = reference / max(initial_cost, 1e-12)
        lam = reference * self.run.recipe.lambda_init if self.target is not None else None
        self.state = {"epoch": 0, "lam": lam, "step": 0, "lr_nas": self.lr_nas, "strength": strength, "best": None,
                      "best_epoch": None,
                      "met_epoch": None, "initial": initial, "initial_cost": initial_cost, "history": []}
        if self.targets:
            self.state.update(lambdas={kind: lam for kind in self.targets}, initial_costs=initial_costs,
                              reference_loss=reference)
        self.elapsed = 0.0
        self.rec = {}

    def _cost(self) -> torch.Tensor:
        return self.model.cost_of(self.cost_fn)

    def _make_objective(self) -> None:
        """The regularizer and the per-step control: the moving target, or ``strength · cost``."""
        if self.target is None:
            strength = self.state["strength"]
            self.control = None
            self.regularizer, self.after_step = (lambda: strength * self._cost()), None
            self.ramp_epochs = 0
            return
        r = self.run.recipe
        start = self.state.get("latency_round", {}).get("start", 0)
        steps = (self.epochs - start) * self.run.steps_per_epoch()
        self.control = make_control(self.regularizer_name, r, self.targets, self.refs, self.model, self.state,
                                    steps, self.epochs - start)
        # λ adapts to each step's discrete cost on the cost's device (no host read: `flush` writes
        # it back once per epoch); identical on every rank, as the parameters are.
        self.regularizer, self.after_step = self.control.regularizer, self.control.after_step
        self.ramp_epochs = start + math.ceil(self.control.ramp * (self.epochs - start))
        self.control.settle(self.net_opt, r.lr_net, 0.05)
        self.control.settle(self.nas_opt, self.lr_nas, 0.0)

    def search(self):
        while True:
            epoch, stopped = self._epochs()
            fallback = self._choose(epoch)
            if not self._another_round(epoch):
                return self.model, self._finish(epoch, stopped, fallback)

    def _epochs(self) -> tuple[int, str]:
        """Search epochs up to ``self.epochs`` (or an early stop): the last epoch, and why it stopped."""
        state, run = self.state, self.run
        run.bar.start("search", self.epochs, state["epoch"])
        epoch = state["epoch"]
        while epoch < self.epochs:
            # Early stop once a qualifying architecture exists and has not improved for a while.
            anchor = state["best_epoch"]
            if anchor is not None and epoch - max(anchor, self.ramp_epochs) >= run.recipe.search_patience:
                return epoch, "early"
            epoch += 1
            self._epoch(epoch)
        return epoch, "budget"

    def _another_round(self, epoch: int) -> bool:
        """Measure the chosen architecture against a latency target (``check``); when it misses,
        start a round against the tightened target from it and return True."""
        check, state, run = self.check, self.state, self.run
        if check is None or check.kind not in (self.targets or {}):
            return False
        rounds = state.setdefault("latency_rounds", [])
        self.model.eval()
        with torch.no_grad():
            predicted = float(self.model.cost_of(self.refs[check.kind]))
        # Export reads float32 values on the CPU (moved in place: the optimizers keep their parameters).
        measured = check.measure(self.model.cpu().export()) if run.dist.is_main else None
        self.model = run.place(self.model)
        verdict = check.judge(len(rounds), self.targets[check.kind], predicted, run.dist.broadcast(measured))
        rounds.append(verdict.to_json())
        run.bar.note(f"latency round {verdict.round}: {verdict.verdict}"
                     + (f" (measured {verdict.ratio:.1%} of the input)" if verdict.ratio is not None else ""))
        if verdict.next_target is None:
            return False
        self.targets = {**self.targets, check.kind: verdict.next_target}
        state["latency_round"] = {"start": epoch, "epochs": check.round_epochs, "targets": dict(self.targets)}
        state.update(best=None, best_epoch=None, step=0)
        with torch.no_grad():
            state["initial_costs"] = {kind: float(self.model.cost_of(ref)) for kind, ref in self.refs.items()}
        self.epochs = epoch + check.round_epochs
        # The round starts from the chosen architecture, with fresh optimizers (checkpointed: a
        # resumed run starts the round from the same place).
        self._make_optimizers()
        self._make_objective()
        self.current_file = run.ckpt.save_graph(self._searchable(), f"search-round{verdict.round + 1}.onnx")
        self._commit_optimizers(f"search-round{verdict.round + 1}.optim.npz")
        return True

    def _judge(self, scores: dict, cost: float, costs: dict[str, float]) -> tuple[bool, list]:
        """Whether the epoch meets every target, and its rank (higher is better)."""
        if self.target is None:
            return True, [-(scores["loss"] + self.state["strength"] * cost)]
        score = scores[self.run.task.metric]
        return self.control.met(costs), [score if self.run.task.higher_is_better else -score, -scores["loss"]]

    def _epoch(self, epoch: int) -> None:
        run, state, model = self.run, self.state, self.model
        train_loss = run.train_epoch("search", model, [self.net_opt, self.nas_opt], epoch, self.epochs,
                                     self.regularizer, self.after_step)
        if self.control is not None:
            self.control.flush()   # (λ kept on a device during the epoch)
        model.after_search_epoch(epoch, self.epochs)
        scores = run.evaluate(model)
        with torch.no_grad():
            c = float(self._cost())
            costs = {kind: float(value) for kind, value in self.control.costs().items()} if self.control else {}
        eligible, key = self._judge(scores, c, costs)
        improved = eligible and (state["best"] is None or tuple(key) > tuple(state["best"]))
        if eligible and state["met_epoch"] is None:
            state["met_epoch"] = epoch
        self.current_file = run.ckpt.save_graph(self._searchable(), f"search-e{epoch:04d}.onnx")
        if improved:
            state["best"], state["best_epoch"] = list(key), epoch
            state["best_scores"], state["best_cost"] = scores, c
            self.rec["best_file"] = self.current_file
        state["epoch"] = epoch
        control = self.control
        state["history"].append({"epoch": epoch, "train_loss": train_loss, "val": scores, "cost": c,
                                 "lambda": state["lam"] if self.target is not None else state["strength"],
                                 **({"aim": control.aim(), "restored": state.get("restored", 0), "costs": costs,
                                     "aims": control.aims(), "lambdas": control.lambdas()}
                                    if control else {})})
        self._commit_optimizers(f"search-e{epoch:04d}.optim.npz")
        extra = f"  {format_cost(c)} ({percent(c, self.base_cost)})"
        if control is not None:
            extra += f" → {format_cost(control.aim())}  λ {state['lam']:.3g}"
            extra += "".join(f"  {kind} {format_cost(costs[kind])} → {format_cost(control.aim(kind))}" for kind in list(costs)[1:])
        run.bar.epoch(epoch, run.info(scores, extra))
        run.epoch_done("search", epoch, {"val": scores, "cost": c})

    def _commit_optimizers(self, name: str) -> None:
        """Checkpoint both optimizers' state as ``name`` and commit the phase's record."""
        arrays = {**{f"net.{k}": v for k, v in optimizer_arrays(self.net_opt, self.names).items()},
                  **{f"nas.{k}": v for k, v in optimizer_arrays(self.nas_opt, self.names).items()}}
        optim_file = self.run.ckpt.save_arrays(arrays, name)
        self.rec.update(state=self.state, current_file=self.current_file, optim_file=optim_file,
                        seconds=self.elapsed + time.perf_counter() - self.t0)
        self.run.commit("search", self.rec)

    def _choose(self, epoch: int) -> bool:
        """The chosen architecture: the best qualifying epoch, else (with a target) the last one
        forced onto the target; returns whether it was forced."""
        ckpt, rec = self.run.ckpt, self.rec
        if self.state["best_epoch"] is not None:
            self.model = self.run.place(self.method.build(ckpt.load_graph(rec["best_file"]), _build_cost(self.cost_fn)))
            return False
        if self.target is not None:
            if not self.control.enforce():
                wanted = ", ".join(f"{kind} {format_cost(value)}" for kind, value in self.targets.items())
                raise PlinioOnnxError(f"the search could not reach the target ({wanted}); "
                                      "try a larger target or more --epochs")
            rec["best_file"] = ckpt.save_graph(self._searchable(), "search-best-fallback.onnx")
            return True
        rec["best_file"] = self.current_file if epoch else ckpt.save_graph(self._searchable(),
                                                                           "search-e0000.onnx")
        return False

    def _searchable(self) -> Graph:
        """The searchable graph to checkpoint, naming its method (`export` reads it back)."""
        return tag_method(self.model.searchable_graph(), self.method)

    def _finish(self, epoch: int, stopped: str, fallback: bool) -> dict:
        state, model, run = self.state, self.model, self.run
        model.eval()
        with torch.no_grad():
            final_scores = run.evaluate(model)
            final_cost = float(self._cost())
            final_costs = {kind: float(model.cost_of(ref)) for kind, ref in self.refs.items()}
        info = {"epochs": epoch, "best_epoch": state["best_epoch"], "val_loss": final_scores["loss"],
                "val_metric": final_scores[run.task.metric], "cost": final_cost, "lr_nas": self.lr_nas,
                "strength": state["strength"], "lambda": state["lam"] if self.target is not None else None,
                "costs": final_costs, "lambdas": state.get("lambdas"), "regularizer": self.regularizer_name
                if self.target is not None else "linear",
                "target_met_epoch": state["met_epoch"], "fallback": fallback, "stopped": stopped,
                "initial_val_loss": state["initial"]["loss"], "initial_cost": state["initial_cost"],
                "history": state["history"], "seconds": self.elapsed + time.perf_counter() - self.t0,
                "best_file": self.rec["best_file"], "architecture": model.architecture(),
                "latency_rounds": state.get("latency_rounds", []), "targets": dict(self.targets or {})}
        # The chosen searchable graph under a stable name: `plinio-onnx export` takes it.
        info["best_file"] = run.ckpt.save_graph(self._searchable(), "search.best.onnx")
        run.commit("search", {"done": True, "best_file": info["best_file"], "info": info, "budget": self.budget})
        run.bar.stop()
        return info
