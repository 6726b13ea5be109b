"""`SuperNet`: the PLiNIO-style entry point for layer selection on an ONNX model.

    model = po.SuperNet("model.onnx", cost=po.cost.macs)
    loss = criterion(model(x), y) + strength * model.cost
    model.export("chosen.onnx")

Cost (PLiNIO's SuperNet, DARTS-style): a layer outside every Choice costs what it costs; a
Choice costs E_θ[cost] = Σ_i θ_i · Σ_{layers of branch i} cost(spec), with θ = softmax(α / T)
in training (``discrete_cost=True``: one-hot argmax with softmax gradient) and one-hot argmax in
eval — exactly the cost of the model `export` writes. Branch layers are costed through
`SearchableModel.effective_spec`, so a method that also masks channels inside branches combines
with it; the documented flow for pruning is PIT on the exported model
(``po.PIT(po.SuperNet(...).export())``).
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

import onnx
import torch

from plinio_onnx.functions import supernet as fn
from plinio_onnx.passes.supernet import LOGITS_SUFFIX, METADATA_KEY, Menu, supernet

from ..graph import Graph
from .searchable import CostFn, SearchableModel, as_cost, as_graph, as_int, render_summary

__all__ = ["SuperNet", "build_searchable", "exponential_temperature"]


class SuperNet(SearchableModel):
    """SuperNet layer selection on an ONNX model.

    ``model``: a path, ``onnx.ModelProto`` or `Graph`; a graph already searchable by SuperNet (a
    checkpoint written by `searchable_graph().save(...)`) resumes as it is. ``include``,
    ``exclude``, ``op_types``, ``menu``, ``layers``, ``regions``, ``spec``, ``automatic``,
    ``sampling`` and ``temperature`` are those of `plinio_onnx.passes.supernet`.
    ``discrete_cost``: the training cost uses the argmax branch (straight-through gradient)
    instead of the softmax expectation.

    Training forward: the softmax (or Gumbel / hard) mix of every Choice's branches. Eval
    forward: the argmax branch of every Choice, i.e. the network `export` writes.
    """

    def __init__(self, model: "str | os.PathLike | onnx.ModelProto | Graph", *,
                 cost: "CostFn | str" = "params", include: Iterable[str] | None = None,
                 exclude: Iterable[str] | None = None, op_types: Iterable[str] | None = None,
                 menu: "Menu | Mapping[str, Any] | None" = None,
                 layers: "Mapping[str, Sequence[Any]] | None" = None,
                 regions: "Sequence[Mapping[str, Any]] | None" = None,
                 spec: "str | os.PathLike | None" = None, automatic: bool | None = None,
                 sampling: str | None = None, temperature: float | None = None,
                 discrete_cost: bool = False) -> None:
        graph = as_graph(model)
        if METADATA_KEY not in graph.metadata:
            graph = supernet(graph, include=include, exclude=exclude, op_types=op_types, menu=menu,
                             layers=layers, regions=regions, spec=spec, automatic=automatic,
                             sampling=sampling, temperature=temperature)
        super().__init__(graph, cost)
        self.info = json.loads(graph.metadata[METADATA_KEY])
        self.discrete_cost = discrete_cost
        self._branch_of: dict[str, tuple[int, int]] = {}
        for c, choice in enumerate(self.info["choices"]):
            for b, branch in enumerate(choice["branches"]):
                for node in branch["nodes"]:
                    self._branch_of[node] = (c, b)
        self._outside = [s for s in self.specs if s.name not in self._branch_of]
        self._branch_specs = [[[] for _ in choice["branches"]] for choice in self.info["choices"]]
        for spec_ in self.specs:
            where = self._branch_of.get(spec_.name)
            if where is not None:
                self._branch_specs[where[0]][where[1]].append(spec_)

    def _is_nas_parameter(self, onnx_name: str) -> bool:
        return onnx_name.endswith(LOGITS_SUFFIX)

    # -- search controls ----------------------------------------------------------------------
    @property
    def temperature(self) -> float:
        """The softmax temperature T shared by every Choice (1.0 when nothing is searched)."""
        names = self.info["temperatures"]
        return float(self.tensor(names[0])) if names else 1.0

    def set_temperature(self, value: float) -> None:
        """Set T (anneal it during the search, e.g. `exponential_temperature` from 1 towards
        0.05); it is a buffer, saved with the searchable graph."""
        if not value > 0:
            raise ValueError(f"the temperature must be positive (got {value})")
        with torch.no_grad():
            for name in self.info["temperatures"]:
                self.tensor(name).fill_(float(value))

    def set_sampling(self, sampling: str) -> None:
        """Training-mode sampling of every Choice: "softmax", "gumbel", "gumbel_hard" or "hard"."""
        if sampling not in fn.SAMPLING:
            raise ValueError(f"unknown sampling {sampling!r}; choose from {fn.SAMPLING}")
        for module in self.module.modules():
            if isinstance(module, fn.ChoiceModule):
                module.sampling = sampling
        for node in self.graph.nodes:
            if node.op == fn.CHOICE:
                node.attrs["sampling"] = sampling
        self.info["sampling"] = sampling

    def logits(self, choice: int | str) -> torch.Tensor:
        """The architecture parameter α of a Choice (by index or by name)."""
        return self.tensor(self._choice(choice)["logits"])

    def _choice(self, choice: int | str) -> dict:
        if isinstance(choice, int):
            return self.info["choices"][choice]
        for entry in self.info["choices"]:
            if entry["name"] == choice:
                return entry
        raise KeyError(f"no Choice named {choice!r}; have {[c['name'] for c in self.info['choices']]}")

    # -- cost ---------------------------------------------------------------------------------
    def _theta(self, choice: dict) -> torch.Tensor:
        logits = self.tensor(choice["logits"]).to(torch.float64)
        temperature = self.temperature
        if not self.training:
            return torch.nn.functional.one_hot(logits.argmax(), logits.numel()).to(torch.float64)
        if self.discrete_cost:
            return fn.hard_weights(logits, temperature)
        return fn.soft_weights(logits, temperature)

    def branch_costs(self, choice: int | str, cost: "CostFn | str") -> list[Any]:
        """The cost of every branch of a Choice (its layers, through `effective_spec`)."""
        entry = self._choice(choice)
        fn_ = as_cost(cost)
        return [sum((fn_(self.effective_spec(s)) for s in specs), 0)
                for specs in self._branch_specs[entry["id"]]]

    def cost_of(self, cost: "CostFn | str") -> torch.Tensor:
        """Σ (layers outside Choices) + Σ_choices Σ_i θ_i · cost(branch i); float64, differentiable
        in the logits. Eval mode: the argmax branches' cost = the exported model's."""
        fn_ = as_cost(cost)
        total = torch.zeros((), dtype=torch.float64)
        for spec_ in self._outside:
            total = total + fn_(self.effective_spec(spec_))
        for choice in self.info["choices"]:
            theta = self._theta(choice)
            costs = self.branch_costs(choice["id"], fn_)
            total = total + sum(theta[i] * costs[i] for i in range(len(costs)))
        return total

    # -- reporting ----------------------------------------------------------------------------
    def chosen(self) -> dict[str, str]:
        """For every Choice (named after its layer or output tensor): the argmax branch's name."""
        return {c["name"]: c["branches"][fn.chosen(self.tensor(c["logits"]).detach().cpu().numpy())]["name"]
                for c in self.info["choices"]}

    def probabilities(self) -> dict[str, dict[str, float]]:
        """For every Choice: softmax(α / T) per branch name."""
        out = {}
        for c in self.info["choices"]:
            p = fn.probabilities(self.tensor(c["logits"]).detach().cpu().numpy(), self.temperature)
            out[c["name"]] = {b["name"]: float(v) for b, v in zip(c["branches"], p)}
        return out

    def architecture(self) -> dict:
        """A JSON-able description: the chosen branch and the probabilities of every Choice."""
        probabilities = self.probabilities()
        return {"temperature": self.temperature, "sampling": self.info["sampling"],
                "choices": {name: {"chosen": branch, "probabilities": probabilities[name]}
                            for name, branch in self.chosen().items()}}

    def enforce(self, cost: "CostFn | str", target: float) -> bool:
        """Greedily switch Choices to cheaper branches until the discrete cost is ≤ ``target``
        (each step takes the most probable cheaper branch); True on success. For targets a
        search did not reach."""
        fn_ = as_cost(cost)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                while float(self.cost_of(fn_)) > target:
                    best = None
                    for choice in self.info["choices"]:
                        logits = self.tensor(choice["logits"])
                        current = int(logits.argmax())
                        costs = [float(c) for c in self.branch_costs(choice["id"], fn_)]
                        p = fn.probabilities(logits.cpu().numpy(), self.temperature)
                        for b, c in enumerate(costs):
                            if c < costs[current]:
                                key = (p[b], costs[current] - c)
                                if best is None or key > best[0]:
                                    best = (key, logits, b)
                    if best is None:
                        return False
                    _, logits, b = best
                    logits[b] = logits.max() + 1.0
                return True
        finally:
            self.train(was_training)

    def summary(self) -> str:
        """A readable table: every Choice's branches with probability, params and MACs; totals."""
        from rich.table import Table

        table = Table(title=f"SuperNet architecture (T = {self.temperature:.3g}, sampling {self.info['sampling']})")
        for col in ("choice", "branch", "p", "params", "MACs", ""):
            table.add_column(col, justify="left" if col in ("choice", "branch", "") else "right")
        probabilities = self.probabilities()
        chosen = self.chosen()
        with torch.no_grad():
            for choice in self.info["choices"]:
                params = self.branch_costs(choice["id"], "params")
                macs = self.branch_costs(choice["id"], "macs")
                for b, branch in enumerate(choice["branches"]):
                    mark = "◀ chosen" if branch["name"] == chosen[choice["name"]] else ""
                    table.add_row(choice["name"] if b == 0 else "", branch["name"],
                                  f"{probabilities[choice['name']][branch['name']]:.3f}",
                                  f"{as_int(params[b]):,}", f"{as_int(macs[b]):,}", mark,
                                  style="bold" if mark else None)
                table.add_section()
            was_training = self.training
            self.eval()
            discrete_p, discrete_m = as_int(self.cost_of("params")), as_int(self.cost_of("macs"))
            self.train()
            expected_p, expected_m = as_int(self.cost_of("params")), as_int(self.cost_of("macs"))
            self.train(was_training)
        table.add_row("total (chosen = exported)", "", "", f"{discrete_p:,}", f"{discrete_m:,}", "", style="bold")
        table.add_row("total (expected, softmax)", "", "", f"{expected_p:,}", f"{expected_m:,}", "")
        return render_summary(table, [f"{s['node']} ({s['reason']})" for s in self.info["skipped"]])


def build_searchable(graph: Graph, cost: "CostFn | str", **options) -> SuperNet:
    """The CLI's hook: a `SuperNet` on ``graph`` (resumed when ``graph`` is already a SuperNet
    checkpoint). ``options`` are `SuperNet`'s keyword arguments, e.g. ``spec="supernet.json"``,
    ``menu={...}``, ``include=[...]``, ``sampling="hard"``, ``discrete_cost=True``."""
    return SuperNet(graph, cost=cost, **options)


def exponential_temperature(step: int, steps: int, start: float = 1.0, end: float = 0.1) -> float:
    """T annealed geometrically from ``start`` (step 0) to ``end`` (step ``steps``)."""
    fraction = min(max(step / max(steps, 1), 0.0), 1.0)
    return float(start * (end / start) ** fraction)

