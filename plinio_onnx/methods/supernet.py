"""`SuperNet`: the PLiNIO-style entry point for layer selection on an ONNX model.

    model = po.SuperNet("model.onnx", cost=po.cost.macs)
    loss = criterion(model(x), y) + strength * model.cost
    model.export("chosen.onnx")

Cost (PLiNIO's SuperNet, DARTS-style): a layer outside every Choice costs what it costs; a
Choice costs E_θ[cost] = Σ_i θ_i · Σ_{layers of branch i} cost(spec), with θ = softmax(α / T)
in training (``discrete_cost=True``: one-hot argmax with softmax gradient) and one-hot argmax in
eval — exactly the cost of the model `export` writes. Every cost model of `plinio_onnx.cost`
applies (a callable on a `LayerSpec`, or its name).

Joint search with PIT (``pit=True``, or a dict of `plinio_onnx.passes.pit` options)::

    model = po.SuperNet("model.onnx", cost="macs", pit=True)
    loss = criterion(model(x), y) + strength * model.cost   # logits and PIT masks both learn
    model.export("small.onnx")                              # pick branches (10), prune (20)

The PIT pass runs on the SuperNet graph: channels flow through every Choice (its branches'
outputs are one coupled group, like the inputs of a residual Add), so a layer after a Choice,
every branch producing it and every branch reading the Choice's input are pruned together, and
channels inside a branch (a separable or low-rank pair) form their own groups. Every layer is
then costed with its PIT-effective spec (kept channels, kept taps; discrete, straight-through):
a layer outside the Choices costs cost(PIT-effective spec), a Choice Σ_i θ_i · Σ_{layers of
branch i} cost(PIT-effective spec). ``export`` keeps the argmax branches, then slices the kept
channels (the records of dropped branches are skipped). ``po.PIT(po.SuperNet(...).export())``
(prune after picking) remains possible.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

import onnx
import torch

from plinio_onnx.functions import relaxation
from plinio_onnx.functions import supernet as fn
from plinio_onnx.passes.pit import check_channel_multiple
from plinio_onnx.passes.pit import pit as pit_pass
from plinio_onnx.passes.supernet import Menu, supernet
from plinio_onnx.records import ChoiceRecord, PITRecord, SuperNetRecord

from ..cost import LayerSpec, ModelCost
from ..errors import PlinioOnnxError
from ..graph import Graph
from ..to_torch.fuse_pit_masks import fuse_pit_masks
from .pit_channels import Counting, MemoCounting, PITChannels
from .pit_edits import PITMaskEdits
from .searchable import CostFn, SearchableModel, as_graph, as_int, render_summary

__all__ = ["SuperNet", "build_searchable", "exponential_temperature"]

#: The least learning rate of the Choice logits in `optimize` (they move further than masks).
_LOGITS_LR_FLOOR = 5e-2


class SuperNet(relaxation.Annealed, SearchableModel):
    """SuperNet layer selection on an ONNX model.

    ``model``: a path, ``onnx.ModelProto`` or `Graph`; a graph already searchable by SuperNet (a
    checkpoint written by `searchable_graph().save(...)`) resumes as it is. ``include``,
    ``exclude``, ``op_types``, ``menu``, ``layers``, ``regions``, ``spec``, ``automatic``,
    ``sampling`` and ``temperature`` are those of `plinio_onnx.passes.supernet`.
    ``discrete_cost``: the training cost uses the argmax branch (straight-through gradient)
    instead of the softmax expectation. ``pit``: also search PIT channel (and 1-D kernel) masks
    on the SuperNet graph, jointly with the logits (True, or a dict of `plinio_onnx.passes.pit`
    options: ``include``, ``exclude``, ``op_types``, ``masks``, ``threshold``). A checkpoint
    holding PIT masks resumes them whatever ``pit`` says. ``channel_multiple`` N (with ``pit``):
    PIT searches channels in blocks of N.

    Training forward: the softmax (or Gumbel / hard) mix of every Choice's branches (PIT masks
    binarized). Eval forward: the argmax branch of every Choice, i.e. the network `export` writes.
    """

    #: PIT masks, where the graph holds them, train fused (a module without any is left as it is).
    module_passes = (fuse_pit_masks,)

    def __init__(self, model: "str | os.PathLike | onnx.ModelProto | Graph", *,
                 cost: "CostFn | str" = "params", include: Iterable[str] | None = None,
                 exclude: Iterable[str] | None = None, op_types: Iterable[str] | None = None,
                 menu: "Menu | Mapping[str, Any] | None" = None,
                 layers: "Mapping[str, Sequence[Any]] | None" = None,
                 regions: "Sequence[Mapping[str, Any]] | None" = None,
                 spec: "str | os.PathLike | None" = None, automatic: bool | None = None,
                 sampling: str | None = None, temperature: float | None = None,
                 discrete_cost: bool = False, pit: "bool | Mapping[str, Any]" = False,
                 channel_multiple: int = 1) -> None:
        graph = as_graph(model)
        if check_channel_multiple(channel_multiple) > 1 and not pit:
            raise PlinioOnnxError("channel_multiple applies to PIT's channel masks: use it with pit=True",
                                  file=graph.source)
        if not SuperNetRecord.present(graph):
            graph = supernet(graph, include=include, exclude=exclude, op_types=op_types, menu=menu,
                             layers=layers, regions=regions, spec=spec, automatic=automatic,
                             sampling=sampling, temperature=temperature)
        if pit and not PITRecord.present(graph):
            graph = pit_pass(graph, **{"channel_multiple": channel_multiple,
                                       **(dict(pit) if isinstance(pit, Mapping) else {})})
        super().__init__(graph, cost)
        self.info = SuperNetRecord.of(graph)
        self.info.sampling = relaxation.sampling_mode(self.info.sampling)
        self.discrete_cost = discrete_cost
        #: PIT's effective channels and kernels (None: no PIT masks in the graph).
        pit_record = PITRecord.of(graph)
        self.pit = PITChannels(self.module, pit_record) if pit_record is not None else None
        self._nas_names = frozenset(self.info.logits() + (pit_record.mask_parameters() if pit_record else []))
        self.relaxation_temperature = relaxation.Temperature(self.tensor, self.info.temperatures, 1.0)
        self._branch_of: dict[str, tuple[int, int]] = {}
        for c, choice in enumerate(self.info.choices):
            for b, branch in enumerate(choice.branches):
                for node in branch.nodes:
                    self._branch_of[node] = (c, b)
        self._outside = [s for s in self.specs if s.name not in self._branch_of]
        self._branch_specs = [[[] for _ in choice.branches] for choice in self.info.choices]
        for spec_ in self.specs:
            where = self._branch_of.get(spec_.name)
            if where is not None:
                self._branch_specs[where[0]][where[1]].append(spec_)

    def _is_nas_parameter(self, onnx_name: str) -> bool:
        return onnx_name in self._nas_names

    # -- search controls ----------------------------------------------------------------------
    def set_sampling(self, sampling: str) -> None:
        """Training-mode sampling of every Choice: "softmax", "gumbel", "gumbel_hard" or "hard"
        (`plinio_onnx.functions.relaxation`; `SettingError` for others)."""
        sampling = relaxation.sampling_mode(sampling)
        for module in self.module.modules():
            if isinstance(module, fn.ChoiceModule):
                module.sampling = sampling
        for node in self.graph.nodes:
            if node.op == fn.CHOICE:
                node.attrs["sampling"] = sampling
        self.info.sampling = sampling

    def logits(self, choice: int | str) -> torch.Tensor:
        """The architecture parameter α of a Choice (by index or by name)."""
        return self.tensor(self._choice(choice).logits)

    def _choice(self, choice: int | str) -> ChoiceRecord:
        if isinstance(choice, int):
            return self.info.choices[choice]
        for entry in self.info.choices:
            if entry.name == choice:
                return entry
        raise KeyError(f"no Choice named {choice!r}; have {[c.name for c in self.info.choices]}")

    # -- cost ---------------------------------------------------------------------------------
    def _theta(self, choice: ChoiceRecord) -> torch.Tensor:
        logits = self.tensor(choice.logits).to(torch.float64)
        sampling = relaxation.HARD if self.discrete_cost else relaxation.SOFTMAX
        return relaxation.choice_weights(logits, self.relaxation_temperature.as_tensor(), sampling, self.training)

    def effective_spec(self, spec: LayerSpec, counting: Counting | None = None) -> LayerSpec:
        """The layer as PIT's masks leave it (kept channels and taps); as it is without PIT.
        ``counting``: how one cost evaluation counts (`plinio_onnx.methods.pit_channels`)."""
        if self.pit is None:
            return spec
        return self.pit.effective_spec(spec, counting) if counting is not None else self.pit.effective_spec(spec)

    def branch_costs(self, choice: int | str, cost: "CostFn | str") -> list[Any]:
        """The cost of every branch of a Choice (its layers, through `effective_spec`)."""
        return self._branch_costs(self._choice(choice).id, self.cost_fn(cost), MemoCounting())

    def _branch_costs(self, choice: int, cost: CostFn, counting: Counting) -> list[Any]:
        return [sum((cost(self.effective_spec(s, counting)) for s in specs), 0) for specs in self._branch_specs[choice]]

    def cost_of(self, cost: "CostFn | str | ModelCost") -> torch.Tensor:
        """Σ (layers outside Choices) + Σ_choices Σ_i θ_i · cost(branch i), every layer through
        `effective_spec` (PIT-effective with ``pit``); float64, differentiable in the logits (and
        the PIT masks). Eval mode: the argmax branches' cost = the exported model's. A
        `ModelCost` is computed on the whole model."""
        if isinstance(cost, ModelCost):
            return cost.of(self)
        fn_ = self.cost_fn(cost)
        counting = MemoCounting()  # every PIT group's channels (and kernel's taps) counted once
        total = torch.zeros((), dtype=torch.float64)
        for spec_ in self._outside:
            total = total + fn_(self.effective_spec(spec_, counting))
        for choice in self.info.choices:
            theta = self._theta(choice)
            costs = self._branch_costs(choice.id, fn_, counting)
            total = total + sum(theta[i] * costs[i] for i in range(len(costs)))
        return total

    # -- reporting ----------------------------------------------------------------------------
    def chosen(self) -> dict[str, str]:
        """For every Choice (named after its layer or output tensor): the argmax branch's name."""
        return {c.name: c.branches[fn.chosen(self.tensor(c.logits).detach().cpu().numpy())].name
                for c in self.info.choices}

    def probabilities(self) -> dict[str, dict[str, float]]:
        """For every Choice: softmax(α / T) per branch name."""
        out = {}
        for c in self.info.choices:
            p = relaxation.probabilities(self.tensor(c.logits).detach().cpu().numpy(), self.temperature)
            out[c.name] = {b.name: float(v) for b, v in zip(c.branches, p)}
        return out

    def architecture(self) -> dict:
        """A JSON-able description: the chosen branch and the probabilities of every Choice."""
        probabilities = self.probabilities()
        arch = {"temperature": self.temperature, "sampling": self.info.sampling,
                "choices": {name: {"chosen": branch, "probabilities": probabilities[name]}
                            for name, branch in self.chosen().items()}}
        if self.pit is not None:
            arch["kept_channels"] = self.pit.kept_channels_record()
        return arch

    def kept_channels(self) -> dict[str, tuple[int, int]]:
        """With PIT: for every searched channel group (named after its first producer), (kept,
        total); groups whose layers all sit in dropped branches included. Empty without PIT."""
        return self.pit.kept_channels() if self.pit is not None else {}

    def enforce(self, cost: "CostFn | str", target: float) -> bool:
        """Greedily switch Choices to cheaper branches until the discrete cost is ≤ ``target``
        (each step takes the most probable cheaper branch); True on success. For targets a
        search did not reach."""
        whole = isinstance(cost, ModelCost)   # not a sum over layers: judge each branch in place
        fn_ = cost if whole else self.cost_fn(cost)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                while float(self.cost_of(fn_)) > target:
                    best = None
                    for choice in self.info.choices:
                        logits = self.tensor(choice.logits)
                        current = int(logits.argmax())
                        costs = ([self._cost_with_branch(logits, b, fn_) for b in range(logits.numel())] if whole
                                 else [float(c) for c in self.branch_costs(choice.id, fn_)])
                        p = relaxation.probabilities(logits.cpu().numpy(), self.temperature)
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

    def _cost_with_branch(self, logits: torch.Tensor, branch: int, cost) -> float:
        """The model's (eval) ``cost`` were ``branch`` chosen by ``logits``; the logits are left as they were."""
        saved = logits.clone()
        logits[branch] = logits.max() + 1.0
        value = float(self.cost_of(cost))
        logits.copy_(saved)
        return value

    # -- search hooks (`SearchHooks`: what `plinio_onnx.optimize` asks) -----------------------
    default_cost = "macs"

    @classmethod
    def search_metadata_keys(cls, *, pit: "bool | Mapping[str, Any]" = False, **options) -> tuple[str, ...]:
        return (SuperNetRecord.KEY, PITRecord.KEY) if pit else (SuperNetRecord.KEY,)

    @property
    def nas_lr_floor(self) -> float:
        # With PIT: the masks' floor (none); the logits get their own in `nas_param_groups`.
        return 0.0 if self.pit is not None else _LOGITS_LR_FLOOR

    def nas_param_groups(self, lr_nas: float) -> list[dict]:
        """Without PIT one group; with PIT the logits (at least `_LOGITS_LR_FLOOR`) and the masks
        (at ``lr_nas``) in two."""
        if self.pit is None:
            return super().nas_param_groups(lr_nas)
        logits, masks = [], []
        choice_logits = set(self.info.logits())
        for _, param, names in self.module.parameter_initializers():
            if self._holds_nas(names):
                (logits if all(n in choice_logits for n in names) else masks).append(param)
        groups = [{"params": logits, "lr": max(lr_nas, _LOGITS_LR_FLOOR)}] if logits else []
        return groups + ([{"params": masks, "lr": lr_nas}] if masks else [])

    def min_cost(self, cost) -> None:
        return None  # `enforce_target` picks the cheapest branches when the search falls short

    def after_search_epoch(self, epoch: int, epochs: int) -> None:
        self.set_temperature(exponential_temperature(epoch, max(epochs, 1), 1.0, 0.05))

    def _pit_edits(self, cost) -> PITMaskEdits:
        # The masks are PIT's; the cost they are judged by is the whole SuperNet's.
        return PITMaskEdits(self.pit, lambda: self.cost_of(cost))

    def architecture_snapshot(self):
        return self._pit_edits("params").kept() if self.pit is not None else None

    def restore_marginal(self, cost, floor: float, before) -> int:
        return self._pit_edits(cost).restore(floor, before) if self.pit is not None else 0

    def enforce_target(self, cost, target: float) -> bool:
        """Cheaper branches first (`enforce`); with PIT, then the smallest masks of the argmax
        branches' network."""
        if self.enforce(cost, target):
            return True
        if self.pit is None:
            return False
        was_training = self.training
        self.eval()  # the argmax branches: the exported model's cost
        try:
            return self._pit_edits(cost).enforce(target)
        finally:
            self.train(was_training)

    def summary(self) -> str:
        """A readable table: every Choice's branches with probability, params and MACs (PIT-
        effective with ``pit``); totals; with ``pit``, the kept channels of every searched group."""
        from rich.table import Table

        table = Table(title=f"SuperNet architecture (T = {self.temperature:.3g}, sampling {self.info.sampling})")
        for col in ("choice", "branch", "p", "params", "MACs", ""):
            table.add_column(col, justify="left" if col in ("choice", "branch", "") else "right")
        probabilities = self.probabilities()
        chosen = self.chosen()
        with torch.no_grad():
            for choice in self.info.choices:
                params = self.branch_costs(choice.id, "params")
                macs = self.branch_costs(choice.id, "macs")
                for b, branch in enumerate(choice.branches):
                    mark = "◀ chosen" if branch.name == chosen[choice.name] else ""
                    table.add_row(choice.name if b == 0 else "", branch.name,
                                  f"{probabilities[choice.name][branch.name]:.3f}",
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
        text = render_summary(table, [f"{s.node} ({s.reason})" for s in self.info.skipped])
        if self.pit is None:
            return text
        chosen_nodes = {node for choice in self.info.choices
                        for node in choice.branches[fn.chosen(self.tensor(choice.logits).detach().cpu().numpy())].nodes}
        pit_table = Table(title=f"PIT channels (threshold {self.pit.threshold:g})")
        for col in ("group", "kept", "total", ""):
            pit_table.add_column(col, justify="left" if col in ("group", "") else "right")
        for group in self.pit.info.groups:
            kept = int(self.pit.kept(group).size)
            producers = [p.node for p in group.producers]
            live = any(node not in self._branch_of or node in chosen_nodes for node in producers)
            pit_table.add_row(group.name, f"{kept:,}", f"{int(group.size):,}",
                              "" if live else "(dropped branch)", style=None if live else "dim")
        return text + render_summary(pit_table, [f"{s.group} ({s.reason})" for s in self.pit.info.skipped])


def build_searchable(graph: Graph, cost: "CostFn | str", **options) -> SuperNet:
    """The CLI's hook: a `SuperNet` on ``graph`` (resumed when ``graph`` is already a SuperNet
    checkpoint). ``options`` are `SuperNet`'s keyword arguments, e.g. ``spec="supernet.json"``,
    ``menu={...}``, ``include=[...]``, ``sampling="hard"``, ``discrete_cost=True``."""
    return SuperNet(graph, cost=cost, **options)


def exponential_temperature(step: int, steps: int, start: float = 1.0, end: float = 0.1) -> float:
    """T annealed geometrically from ``start`` (step 0) to ``end`` (step ``steps``)."""
    fraction = min(max(step / max(steps, 1), 0.0), 1.0)
    return float(start * (end / start) ** fraction)

