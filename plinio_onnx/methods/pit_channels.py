"""`PITChannels`: PIT's effective channel and tap counts, owned by every model holding PIT masks.

`PIT` costs its layers with it; `MPS` (``pit=True``) and `SuperNet` (``pit=True``) own one too,
for the PIT-effective spec of their layers and the kept channels of their reports. One cost
evaluation passes a `Counting` down: how each count is produced — computed when asked
(`Counting`), each group counted once (`MemoCounting`) or as a polynomial variable while a cost
model is compiled (`SymbolicCounting`).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import host
from ..cost import LayerSpec
from ..functions import pit as fn
from ..functions.pit_keep import block_index, group_keep, kernel_plan
from ..records import GroupedConv, GroupRecord, PITRecord, TimeMaskRecord
from ..to_torch import OnnxModule
from ..to_torch.pit_counts import count_plan, counts
from ..to_torch.pit_masks import PITMasks
from .searchable import CompiledCost, CostFn, Sym, compile_cost, is_builtin_cost


class Counting:
    """Counts computed when asked (the default)."""

    def count(self, key, compute):
        """A count that the built-in cost models see as one variable (a group's channels, a
        kernel's taps)."""
        return compute()

    def per_channel(self, key, compute):
        """A count of some channels of a group (no polynomial in the group counts)."""
        return compute()

    def vector(self, compute):
        """A per-channel vector (None: not available in this counting)."""
        return compute()


class MemoCounting(Counting):
    """Within one cost evaluation: every count computed once."""

    def __init__(self) -> None:
        self.known: dict = {}

    def count(self, key, compute):
        if key not in self.known:
            self.known[key] = compute()
        return self.known[key]

    per_channel = count


class SymbolicCounting(Counting):
    """While a cost model is compiled: counts are `Sym` variables; ``polynomial`` turns False when
    a layer needs per-channel counts (the model then runs layer by layer)."""

    def __init__(self) -> None:
        self.polynomial = True

    def count(self, key, compute):
        return Sym.var(key)

    def per_channel(self, key, compute):
        self.polynomial = False
        return Sym.var(key)

    def vector(self, compute):
        self.polynomial = False
        return None


DIRECT = Counting()


def _blocks(info: PITRecord) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For mask parameters over channels in blocks: (the entry of each channel, the channels of
    each entry (float64)), by parameter name."""
    out = {}
    for group in info.groups:
        if group.block > 1:
            sizes = [len(atom) for atom in group.atoms] if group.atoms else [group.size]
            for name, size in zip(group.alpha, sizes):
                index = torch.as_tensor(block_index(size, group.block))
                out[name] = (index, torch.bincount(index).to(torch.float64))
    return out


def _atom_orders(info: PITRecord) -> dict[int, torch.Tensor]:
    """For groups with one mask parameter per atom: where each channel sits in the atoms' concatenation."""
    return {g.id: torch.as_tensor(np.argsort(np.concatenate([np.asarray(a) for a in g.atoms])))
            for g in info.groups if g.atoms}


class PITChannels:
    """The PIT masks of ``module`` (the PIT record ``info`` of its graph): effective channels,
    kernels and layer specs, kept channels, and costs. ``discrete_cost``: counts from binarized
    masks (straight-through gradients) — the exported model's — instead of continuous |θ|."""

    def __init__(self, module: OnnxModule, info: PITRecord, discrete_cost: bool = True) -> None:
        self.module = module
        self.info = info
        self.threshold = info.threshold
        self.discrete_cost = discrete_cost
        self._attr = {onnx_name: attr for attr, onnx_name in module.initializer_names.items()}
        # A searched group's mask parameters: one, or one per atom (then in `_atom_order`).
        self._alpha = {g.id: g.alpha for g in info.groups if g.alpha}
        self._atom_order = _atom_orders(info)
        self._blocks = _blocks(info)  # parameters masking channels in blocks
        self._time = {entry.node: entry for entry in info.time}
        self._compiled: dict = {}   # cost model -> its `CompiledCost` (None: not a polynomial)
        self._count_plans: dict = {}  # (compiled cost, threshold) -> (CountPlan, attributes)
        self._placed: dict = {}       # (what, device) -> a constant index or count tensor there

    def tensor(self, onnx_name: str) -> torch.Tensor:
        return self.module.initializer(self._attr[onnx_name])

    def _on(self, key, device, make) -> torch.Tensor:
        """The constant tensor ``make()`` (on the host) on ``device``, copied there once: a copy
        in every cost evaluation would wait for a device's queue."""
        placed = self._placed.get((key, device))
        if placed is None:
            placed = self._placed[(key, device)] = make().to(device)
        return placed

    def _index(self, channels, device) -> torch.Tensor:
        """``channels`` (a list of indices) as an index tensor on ``device``."""
        return self._on(("channels", tuple(channels)), device, lambda: torch.as_tensor(channels))

    def _atoms(self, gid: int, device) -> torch.Tensor:
        return self._on(("atoms", gid), device, lambda: self._atom_order[gid])

    def _per_channel(self, name: str, entries: torch.Tensor) -> torch.Tensor:
        """Values per entry of mask parameter ``name`` spread over the channels they mask."""
        blocks = self._blocks.get(name)
        return entries if blocks is None else entries[self._on(("blocks", name), entries.device, lambda: blocks[0])]

    # -- lookups ------------------------------------------------------------------------------
    def output_group(self, node: str) -> tuple[int, list[int] | None] | None:
        """(group, its channels the layer produces — None: all) of layer ``node``'s output;
        None when no analysis group describes it."""
        gid = self.info.layer_output.get(node)
        if gid is not None:
            return int(gid), None
        part = self.info.layer_output_part.get(node)
        return (int(part[0]), part[1]) if part is not None else None

    def mask_names(self) -> list[str]:
        """Every channel-mask parameter (ONNX name), group by group."""
        return [name for group in self.info.groups for name in group.alpha]

    def kept(self, group: GroupRecord) -> np.ndarray:
        """The kept channels of a group record (numpy indices)."""
        return group_keep(lambda name: self.tensor(name).detach().cpu().numpy(), group, self.threshold)

    def kept_channels(self) -> dict[str, tuple[int, int]]:
        """For every searched group (named after its first producer): (kept, total)."""
        return {group.name: (int(self.kept(group).size), int(group.size)) for group in self.info.groups}

    def kept_channels_record(self) -> dict[str, dict[str, int]]:
        """`kept_channels` as JSON-able records: {group: {"kept": k, "total": n}}."""
        return {name: {"kept": kept, "total": total} for name, (kept, total) in self.kept_channels().items()}

    def output_keep(self, node: str) -> torch.Tensor | None:
        """The binarized mask of the channels layer ``node`` produces (None: not searched)."""
        where = self.output_group(node)
        name = self._alpha.get(where[0]) if where is not None else None
        if name is None:
            return None
        gid, channels = where
        keeps = [self._per_channel(n, fn.binarize(fn._theta(self.tensor(n)), self.threshold)) for n in name]
        keep = keeps[0] if gid not in self._atom_order else torch.cat(keeps)[self._atoms(gid, keeps[0].device)]
        return keep if channels is None else keep[self._index(channels, keep.device)]

    # -- counts -------------------------------------------------------------------------------
    def _count(self, name: str) -> torch.Tensor:
        """The channels mask parameter ``name`` keeps (each entry counts the channels it masks)."""
        alpha = self.tensor(name)
        # float64: costs reach 1e9 MACs, where float32 would not count exactly.
        kept = fn.channel_mask(alpha, self.threshold) if self.discrete_cost else fn._theta(alpha)
        blocks = self._blocks.get(name)
        if blocks is None:
            return kept.sum(dtype=torch.float64)
        return kept.to(torch.float64) @ self._on(("block sizes", name), alpha.device, lambda: blocks[1])

    def channels(self, gid: int, counting: Counting = DIRECT) -> torch.Tensor | int:
        """Effective channel count of analysis group ``gid`` (static when not searched)."""
        name = self._alpha.get(gid)
        if name is None:
            return int(self.info.group_sizes[gid])
        if gid in self._atom_order:  # one mask parameter per atom
            return counting.per_channel(("group", gid), lambda: sum(self._count(n) for n in name))
        return counting.count(("group", gid), lambda: self._count(name[0]))

    def part(self, gid: int, channels: list[int] | None, counting: Counting = DIRECT) -> torch.Tensor | int:
        """Effective count of ``channels`` of group ``gid`` (all of them: None), for a layer that
        holds only part of a group (a Split output, attention heads' features)."""
        if channels is None:
            return self.channels(gid, counting)
        if self._alpha.get(gid) is None:
            return len(channels)
        return counting.per_channel(("part", gid, tuple(channels)),
                                    lambda: self._part_sum(gid, channels))

    def _part_sum(self, gid: int, channels: list[int]) -> torch.Tensor:
        vector = self._group_vector(gid)
        return vector[self._index(channels, vector.device)].sum()

    def _group_vector(self, gid: int) -> torch.Tensor:
        """float64 kept value (0/1, or |θ| for a continuous cost) of every channel of group ``gid``."""
        def values(name: str) -> torch.Tensor:
            alpha = self.tensor(name)
            kept = fn.channel_mask(alpha, self.threshold) if self.discrete_cost else fn._theta(alpha)
            return self._per_channel(name, kept.to(torch.float64))

        name = self._alpha[gid]
        if gid not in self._atom_order:  # one mask parameter for the whole group
            return values(name[0])
        pieces = [values(n) for n in name]
        return torch.cat(pieces)[self._atoms(gid, pieces[0].device)]

    def kernel(self, node: str, static: int, counting: Counting = DIRECT):
        """Effective kernel size of Conv1d ``node`` (``static`` when its taps are not searched)."""
        entry = self._time.get(node)
        if entry is None:
            return static
        return counting.count(("kernel", node), lambda: self._kernel(node, entry))

    def _kernel(self, node: str, entry: TimeMaskRecord):
        beta, gamma = self.tensor(entry.beta), self.tensor(entry.gamma)
        gamma_map = self.tensor(f"{node}.pit_gamma_map")
        if self.discrete_cost:
            taps = fn.taps(beta, gamma, gamma_map, self.threshold)
            counted = taps.sum(dtype=torch.float64)
            if not host.runs_on_host(taps):   # (the same, decided on the device)
                exported = fn.exported_taps(taps, entry.dilation, tuple(entry.pads)).to(torch.float64)
                return counted + (exported - counted).detach()
            if bool(taps.detach().all()):
                return counted  # every tap kept: the kernel is exported as it is
            # Value: the exported kernel (zero alignment taps included); gradient: the tap count.
            mask = taps.detach().cpu().numpy()
            exported = len(kernel_plan(mask, entry.dilation, tuple(entry.pads)).taps)
            return counted + (exported - counted).detach()
        # Continuous: PLiNIO's k_eff with θβ, θγ normalized per tap.
        theta_beta = torch.cumsum(fn._theta(beta), 0)
        theta_gamma = gamma_map.to(beta.dtype) @ fn._theta(gamma)
        taps_per_level = gamma_map.to(beta.dtype).sum(1)
        positions = torch.arange(1, beta.numel() + 1, dtype=beta.dtype, device=beta.device)
        if beta.numel() == 1:
            theta_beta = theta_beta.expand_as(theta_gamma)
            positions = torch.ones_like(theta_gamma)
        return (theta_beta / positions * theta_gamma / taps_per_level).sum(dtype=torch.float64)

    def effective_spec(self, spec: LayerSpec, counting: Counting = DIRECT) -> LayerSpec:
        """``spec`` with the counts PIT's masks leave it (kept channels and taps)."""
        inputs = self.info.layer_inputs.get(spec.name)
        output = self.output_group(spec.name)
        rows = self.info.layer_rows.get(spec.name)
        changes = {}
        if inputs:  # (group, features per channel, channels read)
            changes["in_channels"] = sum(self.part(gid, read, counting) * inner for gid, inner, read in inputs)
        if output is not None:
            changes["out_channels"] = self.part(*output, counting)
        elif spec.depthwise and "in_channels" in changes:
            changes["out_channels"] = changes["in_channels"]  # it carries what it reads (a Concat's parts)
        if rows and any(self._alpha.get(gid) is not None for gid, _ in rows):
            # Attention MatMuls: their rows (per head) scale with the kept heads.
            total = sum(len(ch) if ch is not None else self.info.group_sizes[gid] for gid, ch in rows)
            kept = sum(self.part(gid, ch, counting) for gid, ch in rows)
            changes["output_positions"] = spec.output_positions // total * kept
        if spec.name in self._time:
            changes["kernel_size"] = self.kernel(spec.name, spec.kernel_size, counting)
        grouped = self.info.grouped.get(spec.name)
        if grouped is not None:
            in_channels = self._grouped_in_channels(grouped, spec, changes.get("out_channels", spec.out_channels),
                                                    counting)
            if in_channels is not None:
                changes["in_channels"] = in_channels
        return spec.with_(**changes) if changes else spec

    def _grouped_in_channels(self, conv: GroupedConv, spec: LayerSpec, out_channels, counting: Counting):
        """A grouped Conv whose groups keep uneven counts weighs Σ_k out_k·in_k·K: the ``in_channels``
        that gives cost models (out·in/groups·K) exactly that, whatever the counts."""
        groups = conv.groups
        vectors = counting.vector(lambda: (
            self._kept_vector(conv.input_groups, conv.input_channels),
            self._kept_vector([conv.output_group] * len(conv.output_channels), conv.output_channels)))
        kept_in, kept_out = vectors if vectors is not None else (None, None)
        if kept_in is None and kept_out is None:
            return None
        device = (kept_in if kept_in is not None else kept_out).device
        per_in = (kept_in.view(groups, -1).sum(1) if kept_in is not None
                  else torch.full((groups,), spec.in_channels / groups, dtype=torch.float64, device=device))
        per_out = (kept_out.view(groups, -1).sum(1) if kept_out is not None
                   else torch.full((groups,), spec.out_channels / groups, dtype=torch.float64, device=device))
        return groups * (per_in * per_out).sum() / out_channels

    def _kept_vector(self, gids: list, channels: list) -> torch.Tensor | None:
        """Kept value of every listed (group, channel); None when no listed channel is searched."""
        gids = np.asarray([-1 if gid is None else gid for gid in gids])
        if not any(self._alpha.get(int(gid)) is not None for gid in set(gids.tolist())):
            return None
        bounds = [0, *(np.flatnonzero(np.diff(gids)) + 1).tolist(), len(gids)]
        pieces = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            gid = int(gids[start])
            if self._alpha.get(gid) is None:
                pieces.append(end - start)   # unsearched: all kept (ones on the masks' device below)
            else:
                vector = self._group_vector(gid)
                pieces.append(vector[self._index(channels[start:end], vector.device)])
        device = next(p for p in pieces if isinstance(p, torch.Tensor)).device
        return torch.cat([torch.ones(p, dtype=torch.float64, device=device) if isinstance(p, int) else p
                          for p in pieces])

    # -- costs --------------------------------------------------------------------------------
    def compiled(self, cost: CostFn, specs) -> CompiledCost | None:
        """A built-in ``cost`` summed over ``specs`` as a polynomial in the group and kernel
        counts (compiled once); None for other callables and for layers that need per-channel counts."""
        if cost not in self._compiled:
            compiled = None
            if is_builtin_cost(cost):
                symbolic = SymbolicCounting()
                compiled = compile_cost(cost, (self.effective_spec(spec, symbolic) for spec in specs),
                                        order=lambda key: key[0] != "group")
                if not symbolic.polynomial:
                    compiled = None
            self._compiled[cost] = compiled
        return self._compiled[cost]

    def cost_of(self, cost: CostFn, specs) -> torch.Tensor:
        """``cost`` summed over ``specs`` at the current masks (float64, differentiable).

        The built-in cost models are polynomials in the effective counts: compiled once, then
        every call is one node giving all the counts (reusing the masks of the module's last
        forward while the mask parameters have not changed since) and a few tensor ops. Other
        callables, and specs a polynomial cannot express, run layer by layer, each group's (and
        kernel's) count computed once."""
        compiled = self.compiled(cost, specs)
        if compiled is not None:
            value = self._compiled_value(compiled)
            if value is not None:
                return value
        counting = MemoCounting()
        total = torch.zeros((), dtype=torch.float64)
        for spec in specs:
            total = total + cost(self.effective_spec(spec, counting))
        return total

    def _compiled_value(self, compiled: CompiledCost) -> torch.Tensor | None:
        """``compiled`` at the counts of its keys: ("group", gid) a group's effective channels,
        ("kernel", node) a Conv1d's effective kernel. None: count layer by layer."""
        if not self.discrete_cost:
            values = [self._count(self._alpha[k[1]][0]) if k[0] == "group" else
                      self._kernel(k[1], self._time[k[1]]) for k in compiled.keys]
            one = torch.ones((), dtype=torch.float64, device=values[0].device if values else None)
            return compiled(torch.stack(values + [one]))
        entry = self._count_plans.get((compiled, self.threshold))
        if entry is None:
            entry = self._count_plans[(compiled, self.threshold)] = self._count_plan(compiled)
        plan, attrs = entry
        if attrs is None:  # the module's own mask parameters
            tensors = plan.shared.mask_inputs(self.module)
        else:
            tensors = [self.module.initializer(a) for a in attrs]
        return counts(plan, tensors)

    def _count_plan(self, compiled: CompiledCost):
        """The count plan computing ``compiled`` (on the module's fused masks where they hold
        every count), and the attributes of its parameters (None: the fused masks' own)."""
        keys, attr = compiled.keys, self._attr
        alphas = {}
        for k in keys:
            if k[0] == "group":
                name = self._alpha[k[1]][0]
                blocks = self._blocks.get(name)
                alphas[k] = (attr[name], self.tensor(name), None if blocks is None else blocks[1].numpy())
        times = {}
        for k in keys:
            if k[0] == "kernel":
                e = self._time[k[1]]
                times[k] = ((attr[e.beta], self.tensor(e.beta)), (attr[e.gamma], self.tensor(e.gamma)),
                            self.tensor(f"{k[1]}.pit_gamma_map"), e.dilation, e.pads)
        fused = [m for m in self.module.children() if isinstance(m, PITMasks)]
        plan, attrs, positions = count_plan(fused[0] if len(fused) == 1 else None, alphas, times, self.threshold)
        return plan.with_cost(compiled.bind([positions[k] for k in keys], plan.size)), attrs
