"""`PIT`: the PLiNIO-style entry point for PIT on an ONNX model.

    model = po.PIT("model.onnx", cost=po.cost.params)
    loss = criterion(model(x), y) + strength * model.cost
    model.export("pruned.onnx")
"""
from __future__ import annotations

import os
from typing import Iterable

import numpy as np
import onnx
import torch

from plinio_onnx.functions import pit as fn
from plinio_onnx.passes.pit import LAYER_OPS, MASKS, pit
from plinio_onnx.records import GroupedConv, PITRecord, TimeMaskRecord

from ..cost import LayerSpec
from ..graph import Graph
from .searchable import (CostFn, SearchableModel, Sym, as_cost, as_graph, as_int, compile_cost,
                         is_builtin_cost, render_summary)

_SYMBOLIC = object()  # `_counts` while a cost model is compiled: counts are `Sym` variables


class PIT(SearchableModel):
    """PIT (channel, receptive-field and dilation masks) on an ONNX model.

    ``model``: a path, ``onnx.ModelProto`` or `Graph`; a graph already searchable by PIT (a
    checkpoint written by `searchable_graph().save(...)`) resumes as it is. The other arguments
    are those of `plinio_onnx.passes.pit`. ``discrete_cost``: cost from binarized masks
    (straight-through gradients) — the exported model's cost — instead of continuous |θ|.

    In eval and train mode alike the forward uses binarized masks, so what you evaluate is what
    `export` writes.
    """

    def __init__(self, model: "str | os.PathLike | onnx.ModelProto | Graph", *,
                 cost: "CostFn | str" = "params", include: Iterable[str] | None = None,
                 exclude: Iterable[str] | None = None, op_types: Iterable[str] = LAYER_OPS,
                 masks: Iterable[str] = MASKS, threshold: float = 0.5, discrete_cost: bool = True) -> None:
        graph = as_graph(model)
        if not PITRecord.present(graph):
            graph = pit(graph, include=include, exclude=exclude, op_types=op_types, masks=masks,
                        threshold=threshold)
        super().__init__(graph, cost)
        self.info = PITRecord.of(graph)
        self.threshold = self.info.threshold
        self.discrete_cost = discrete_cost
        self._alpha = self.info.group_alpha()
        self._atom_order = _atom_orders(self.info)
        self._time = {entry.node: entry for entry in self.info.time}
        self._nas_names = frozenset(self.info.mask_parameters())
        self._attached = None  # (its key, masks, bound cost): `.cost` computed by the module's forward

    @property
    def cost(self) -> torch.Tensor:
        attached = self._attached
        if attached is not None and attached[0] == (self.cost_model, self.threshold, self.discrete_cost):
            _, masks, bound = attached  # (the path `cost_of` takes to the same value, shortened)
            taken = masks.take_cost(bound, masks.mask_inputs(self._modules["module"]))
            if taken is not None:
                return taken
        return self.cost_of(self.cost_model)

    def _is_nas_parameter(self, onnx_name: str) -> bool:
        return onnx_name in self._nas_names

    # -- effective sizes ----------------------------------------------------------------------
    def _count(self, alpha: torch.Tensor) -> torch.Tensor:
        # float64: costs reach 1e9 MACs, where float32 would not count exactly.
        kept = fn.channel_mask(alpha, self.threshold) if self.discrete_cost else fn._theta(alpha)
        return kept.sum(dtype=torch.float64)

    def cost_of(self, cost) -> torch.Tensor:
        # The built-in cost models are polynomials in the effective counts: compiled once (the
        # layers evaluated on `Sym` counts), then every call is one node giving all the counts
        # (`_count_vector`) and a few tensor ops. Other callables, and specs a polynomial cannot
        # express, run layer by layer, with each group's (and kernel's) count computed once.
        cost = as_cost(cost)
        compiled = self._cost_cache.get(cost, False)
        if compiled is False and not is_builtin_cost(cost):
            compiled = None
        if compiled is False:
            self._counts = _SYMBOLIC
            try:
                compiled = compile_cost(cost, (self.effective_spec(spec) for spec in self.specs),
                                        order=lambda key: key[0] != "group")
            finally:
                self._counts = None
            self._cost_cache[cost] = compiled
        if compiled is not None:
            value = self._count_vector(compiled.keys, compiled)
            if value is not None:
                return value
        self._counts: dict = {}
        try:
            return super().cost_of(cost)
        finally:
            self._counts = None

    def _count_vector(self, keys: tuple, compiled) -> torch.Tensor:
        """``compiled`` at the counts of its keys: ("group", gid) a group's effective channels,
        ("kernel", node) a Conv1d's effective kernel; the masks come from the module's last
        forward when the mask parameters have not changed since. None: count layer by layer."""
        if not self.discrete_cost:
            values = [self._count(self.tensor(self._alpha[k[1]][0])) if k[0] == "group" else
                      self._kernel(k[1], self._time[k[1]]) for k in keys]
            return compiled(torch.stack(values + [torch.ones((), dtype=torch.float64)]))
        entry = self._cost_cache.get(("counts", compiled, self.threshold))
        if entry is None:
            attr = self._onnx_to_attr
            alphas = {k: (attr[self._alpha[k[1]][0]], self.tensor(self._alpha[k[1]][0])) for k in keys if k[0] == "group"}
            times = {}
            for k in keys:
                if k[0] == "kernel":
                    e = self._time[k[1]]
                    times[k] = ((attr[e.beta], self.tensor(e.beta)), (attr[e.gamma], self.tensor(e.gamma)),
                                self.tensor(f"{k[1]}.pit_gamma_map"), e.dilation, e.pads)
            fused = [m for m in self.module.children() if isinstance(m, fn.PITMasks)]
            plan, attrs, positions = fn.count_plan(fused[0] if len(fused) == 1 else None, alphas, times, self.threshold)
            entry = (plan, attrs, compiled.bind([positions[k] for k in keys], plan.size))
            self._cost_cache[("counts", compiled, self.threshold)] = entry
        plan, attrs, bound = entry
        module = self._modules["module"]
        if attrs is None:  # the module's own mask parameters
            tensors = plan.shared.mask_inputs(module)
        else:
            tensors = [module.initializer(a) for a in attrs]
        if plan.shared is not None and compiled is self._cost_cache.get(self.cost_model):
            # `.cost`: computed by the module's forward itself from then on (one node fewer)
            taken = plan.shared.take_cost(bound, tensors)
            if taken is not None:
                return taken
            plan.shared.attach_cost(plan, bound)
            self._attached = ((self.cost_model, self.threshold, self.discrete_cost), plan.shared, bound)
        return fn.counts(plan, tensors, bound)

    def _cached(self, key, compute):
        counts = getattr(self, "_counts", None)
        if counts is None:
            return compute()
        if counts is _SYMBOLIC:
            return Sym.var(key)
        if key not in counts:
            counts[key] = compute()
        return counts[key]

    def channels(self, gid: int) -> torch.Tensor | int:
        """Effective channel count of analysis group ``gid`` (static when not searched)."""
        name = self._alpha.get(gid)
        if name is None:
            return int(self.info.group_sizes[gid])
        if gid in self._atom_order:  # one mask parameter per atom
            self._not_compiled()
            return self._cached(("group", gid), lambda: sum(self._count(self.tensor(n)) for n in name))
        return self._cached(("group", gid), lambda: self._count(self.tensor(name[0])))

    def part(self, gid: int, channels: list[int] | None) -> torch.Tensor | int:
        """Effective count of ``channels`` of group ``gid`` (all of them: None), for a layer that
        holds only part of a group (a Split output, attention heads' features)."""
        if channels is None:
            return self.channels(gid)
        if self._alpha.get(gid) is None:
            return len(channels)
        self._not_compiled()
        return self._cached(("part", gid, tuple(channels)),
                            lambda: self._group_vector(gid)[torch.as_tensor(channels)].sum())

    def _not_compiled(self) -> None:
        """Per-channel counts are no polynomial in group counts: cost models run layer by layer."""
        if getattr(self, "_counts", None) is _SYMBOLIC:
            raise TypeError("per-channel counts")

    def _group_vector(self, gid: int) -> torch.Tensor:
        """float64 kept value (0/1, or |θ| for a continuous cost) of every channel of group ``gid``."""
        def values(name: str) -> torch.Tensor:
            alpha = self.tensor(name)
            kept = fn.channel_mask(alpha, self.threshold) if self.discrete_cost else fn._theta(alpha)
            return kept.to(torch.float64)

        name = self._alpha[gid]
        if gid not in self._atom_order:  # one mask parameter for the whole group
            return values(name[0])
        return torch.cat([values(n) for n in name])[self._atom_order[gid]]

    def kernel(self, node: str, static: int):
        entry = self._time.get(node)
        if entry is None:
            return static
        return self._cached(("kernel", node), lambda: self._kernel(node, entry))

    def _kernel(self, node: str, entry: TimeMaskRecord):
        beta, gamma = self.tensor(entry.beta), self.tensor(entry.gamma)
        gamma_map = self.tensor(f"{node}.pit_gamma_map")
        if self.discrete_cost:
            taps = fn.taps(beta, gamma, gamma_map, self.threshold)
            counted = taps.sum(dtype=torch.float64)
            if bool(taps.detach().all()):
                return counted  # every tap kept: the kernel is exported as it is
            # Value: the exported kernel (zero alignment taps included); gradient: the tap count.
            mask = taps.detach().cpu().numpy()
            exported = len(fn.kernel_plan(mask, entry.dilation, tuple(entry.pads)).taps)
            return counted + (exported - counted).detach()
        # Continuous: PLiNIO's k_eff with θβ, θγ normalized per tap.
        theta_beta = torch.cumsum(fn._theta(beta), 0)
        theta_gamma = gamma_map.to(beta.dtype) @ fn._theta(gamma)
        counts = gamma_map.to(beta.dtype).sum(1)
        positions = torch.arange(1, beta.numel() + 1, dtype=beta.dtype)
        if beta.numel() == 1:
            theta_beta = theta_beta.expand_as(theta_gamma)
            positions = torch.ones_like(theta_gamma)
        return (theta_beta / positions * theta_gamma / counts).sum(dtype=torch.float64)

    def effective_spec(self, spec: LayerSpec) -> LayerSpec:
        inputs = self.info.layer_inputs.get(spec.name)
        output = self.info.layer_output.get(spec.name)
        part = self.info.layer_output_part.get(spec.name)
        rows = self.info.layer_rows.get(spec.name)
        changes = {}
        if inputs:  # (group, features per channel, channels read)
            changes["in_channels"] = sum(self.part(gid, read) * inner for gid, inner, read in inputs)
        if output is not None:
            changes["out_channels"] = self.channels(output)
        elif part is not None:
            changes["out_channels"] = self.part(*part)
        elif spec.depthwise and "in_channels" in changes:
            changes["out_channels"] = changes["in_channels"]  # it carries what it reads (a Concat's parts)
        if rows and any(self._alpha.get(gid) is not None for gid, _ in rows):
            # Attention MatMuls: their rows (per head) scale with the kept heads.
            total = sum(len(ch) if ch is not None else self.info.group_sizes[gid] for gid, ch in rows)
            kept = sum(self.part(gid, ch) for gid, ch in rows)
            changes["output_positions"] = spec.output_positions // total * kept
        if spec.name in self._time:
            changes["kernel_size"] = self.kernel(spec.name, spec.kernel_size)
        grouped = self.info.grouped.get(spec.name)
        if grouped is not None:
            in_channels = self._grouped_in_channels(grouped, spec, changes.get("out_channels", spec.out_channels))
            if in_channels is not None:
                changes["in_channels"] = in_channels
        return spec.with_(**changes) if changes else spec

    def _grouped_in_channels(self, conv: GroupedConv, spec: LayerSpec, out_channels):
        """A grouped Conv whose groups keep uneven counts weighs Σ_k out_k·in_k·K: the ``in_channels``
        that gives cost models (out·in/groups·K) exactly that, whatever the counts."""
        groups = conv.groups
        kept_in = self._kept_vector(conv.input_groups, conv.input_channels)
        kept_out = self._kept_vector([conv.output_group] * len(conv.output_channels), conv.output_channels)
        if kept_in is None and kept_out is None:
            return None
        per_in = (kept_in.view(groups, -1).sum(1) if kept_in is not None
                  else torch.full((groups,), spec.in_channels / groups, dtype=torch.float64))
        per_out = (kept_out.view(groups, -1).sum(1) if kept_out is not None
                   else torch.full((groups,), spec.out_channels / groups, dtype=torch.float64))
        return groups * (per_in * per_out).sum() / out_channels

    def _kept_vector(self, gids: list, channels: list) -> torch.Tensor | None:
        """Kept value of every listed (group, channel); None when no listed channel is searched."""
        self._not_compiled()
        gids = np.asarray([-1 if gid is None else gid for gid in gids])
        if not any(self._alpha.get(int(gid)) is not None for gid in set(gids.tolist())):
            return None
        bounds = [0, *(np.flatnonzero(np.diff(gids)) + 1).tolist(), len(gids)]
        pieces = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            gid = int(gids[start])
            if self._alpha.get(gid) is None:
                pieces.append(torch.ones(end - start, dtype=torch.float64))
            else:
                pieces.append(self._group_vector(gid)[torch.as_tensor(channels[start:end])])
        return torch.cat(pieces)

    # -- reporting ----------------------------------------------------------------------------
    def kept_channels(self) -> dict[str, tuple[int, int]]:
        """For every searched group (named after its first producer): (kept, total)."""
        out = {}
        for group in self.info.groups:
            kept = fn.group_keep(lambda name: self.tensor(name).detach().cpu().numpy(), group, self.threshold)
            out[group.name] = (int(kept.size), int(group.size))
        return out

    def summary(self) -> str:
        """A readable table: every layer's kept input/output channels and kernel, and the costs."""
        from rich.table import Table

        table = Table(title="PIT architecture")
        for col in ("layer", "op", "in", "out", "kernel", "params", "MACs"):
            table.add_column(col, justify="left" if col in ("layer", "op") else "right")
        from ..cost import macs, params
        with torch.no_grad():
            for spec in self.specs:
                eff = self.effective_spec(spec)
                table.add_row(spec.name, spec.op, f"{as_int(eff.in_channels)}/{spec.in_channels}",
                              f"{as_int(eff.out_channels)}/{spec.out_channels}",
                              f"{as_int(eff.kernel_size)}/{spec.kernel_size}",
                              f"{as_int(params(eff)):,}", f"{as_int(macs(eff)):,}")
            total_p, total_m = as_int(self.cost_of("params")), as_int(self.cost_of("macs"))
        table.add_row("total", "", "", "", "", f"{total_p:,}", f"{total_m:,}", style="bold")
        return render_summary(table, [f"{s.group} ({s.reason})" for s in self.info.skipped])


def _atom_orders(info: PITRecord) -> dict[int, torch.Tensor]:
    """For groups with one mask parameter per atom: where each channel sits in the atoms' concatenation."""
    return {g.id: torch.as_tensor(np.argsort(np.concatenate([np.asarray(a) for a in g.atoms])))
            for g in info.groups if g.atoms}


class BoundPIT:
    """PIT's effective channels, kernels and kept counts for another searchable model that holds
    PIT masks (MPS, SuperNet): the state `PIT` keeps, bound to that model's tensors, and PIT's own
    methods (looked up on `PIT` when called, so the costs are always PIT's)."""

    def __init__(self, tensor, info: PITRecord, discrete_cost: bool = True) -> None:
        self.tensor = tensor
        self.info = info
        self.threshold = info.threshold
        self.discrete_cost = discrete_cost
        self._alpha = info.group_alpha()
        self._atom_order = _atom_orders(info)
        self._time = {entry.node: entry for entry in info.time}
        self._counts = None  # a dict while one cost is computed: each group counted once

    def __getattr__(self, name: str):
        method = vars(PIT).get(name)
        if callable(method):
            return method.__get__(self)
        raise AttributeError(name)
