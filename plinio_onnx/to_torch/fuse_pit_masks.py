"""The fx pass `fuse_pit_masks`: PIT's mask calls of a generated module become one `PITMasks` call.

A method that trains PIT masks requests it from `to_torch` (``to_torch(graph,
passes=[fuse_pit_masks])``); `to_torch` alone returns the per-node module, whose mask calls
(`plinio_onnx.functions.pit`) are the reference the fused engine (`plinio_onnx.to_torch.pit_masks`)
reproduces in values and straight-through gradients.
"""
from __future__ import annotations

import functools
import operator

import numpy as np
import torch
import torch.fx as fx

from ..functions.pit import block_mask, channel_mask, mask_blocks, mask_weight, time_mask
from .pit_masks import FactorPlan, MaskPlan, PITMasks

_BLOCKS, _INDEX, _TIME = "blocks", "index", "time"


def fuse_pit_masks(module: fx.GraphModule) -> None:
    """Replace, in a generated ``torch.fx.GraphModule``, the PIT mask calls on parameters
    (`channel_mask` or `block_mask` → `mask_blocks` / `mask_weight` → `time_mask` chains from a
    weight) by one
    `PITMasks` call computing the factor of every masked weight (split into views), each weight
    then one product, and pack the mask parameters it alone reads into one parameter; in place.
    Calls it does not recognize (and channel masks read by them) stay as they are; a module
    without PIT masks is left unchanged."""
    chains = _mask_chains(module.graph)
    if not chains:
        return
    plan, groups = _factor_plan(module, chains)
    name, k = "pit_masks", 1
    while hasattr(module, name):
        name, k = f"pit_masks_{k}", k + 1
    module.add_submodule(name, PITMasks(plan))
    fused, mask_nodes = _rewrite(module.graph, name, plan, chains, groups)
    _pack_mask_parameters(module, name, fused, mask_nodes)
    module.graph.lint()
    module.recompile()


def _target(module: torch.nn.Module, target: str) -> torch.Tensor:
    return functools.reduce(getattr, target.split("."), module)


def _is_attr(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _calls(node: fx.Node, fn) -> bool:
    return node.op == "call_function" and node.target is fn and not node.kwargs


def _parse(node: fx.Node, channel_masks: set):
    """(the masked value, the part) for a mask call the pass fuses; None for anything else."""
    args = node.args
    if _calls(node, mask_blocks) and len(args) == 4 and args[1] in channel_masks \
            and all(isinstance(a, int) for a in args[2:]):
        return args[0], (_BLOCKS, args[1], args[2], args[3])
    if _calls(node, mask_weight) and len(args) == 4 and args[1] in channel_masks and _is_attr(args[2]) \
            and isinstance(args[3], (list, tuple)) and all(isinstance(a, int) for a in args[3]):
        return args[0], (_INDEX, args[1], args[2], tuple(args[3]))
    if _calls(node, time_mask) and len(args) == 5 and all(_is_attr(a) for a in args[1:4]) \
            and isinstance(args[4], float):
        return args[0], (_TIME, args[1], args[2], args[3], args[4])
    return None


def _mask_chains(graph: fx.Graph) -> list:
    """Every chain of mask calls on a parameter: (its get_attr node, the parts, the call nodes).
    A channel mask read elsewhere than by fused chains stays a node,
    and so do its chains."""
    channel_masks = {n for n in graph.nodes if _calls(n, channel_mask) and len(n.args) == 2
                     and _is_attr(n.args[0]) and isinstance(n.args[1], float)}
    channel_masks |= {n for n in graph.nodes if _calls(n, block_mask) and len(n.args) == 3
                      and _is_attr(n.args[0]) and _is_attr(n.args[1]) and isinstance(n.args[2], float)}
    parsed = {}
    for node in graph.nodes:
        entry = _parse(node, channel_masks)
        if entry is not None:
            parsed[node] = entry
    chains = []
    for node, (source, part) in parsed.items():
        if not _is_attr(source):
            continue
        members, parts = [node], [part]
        while len(members[-1].users) == 1:
            (user,) = members[-1].users
            if user not in parsed or parsed[user][0] is not members[-1]:
                break
            members.append(user)
            parts.append(parsed[user][1])
        chains.append((source, parts, members))
    while True:
        inside = {m for _, _, members in chains for m in members}
        outside = {m for m in channel_masks if any(u not in inside for u in m.users)}
        kept = [c for c in chains if not any(p[0] is not _TIME and p[1] in outside for p in c[1])]
        if len(kept) == len(chains):
            return chains
        chains = kept


def _mask_plan(module, chains) -> tuple[MaskPlan, dict, dict]:
    """The `MaskPlan` of every group and time mask the chains read; the groups (channel mask
    node → (index, alpha target, alpha size, threshold, the alpha entry of each channel — None:
    one entry per channel)) and time masks ((beta, gamma, gamma map targets, threshold) → (index,
    spec))."""
    groups: dict = {}
    times: dict = {}
    for _, parts, _ in chains:
        for part in parts:
            if part[0] is _TIME:
                _, beta, gamma, gmap, threshold = part
                key = (beta.target, gamma.target, gmap.target, threshold)
                if key not in times:
                    times[key] = (len(times), (int(_target(module, beta.target).numel()),
                                               int(_target(module, gamma.target).numel()),
                                               _target(module, gmap.target).detach().cpu().numpy(), float(threshold)))
            elif part[1] not in groups:
                alpha, threshold, blocks = part[1].args[0], part[1].args[-1], None
                size = int(_target(module, alpha.target).numel())
                if _calls(part[1], block_mask):  # channels masked in blocks
                    blocks = _target(module, part[1].args[1].target).detach().cpu().numpy().astype(np.int64)
                groups[part[1]] = (len(groups), alpha.target, size, float(threshold), blocks)
    plan = MaskPlan([(size, threshold) for _, _, size, threshold, _ in groups.values()],
                    [spec for _, spec in times.values()],
                    [None if blocks is None else np.bincount(blocks, minlength=size)
                     for _, _, size, _, blocks in groups.values()])
    return plan, groups, times


def _part_indices(module, part, weight_shape, mask_plan: MaskPlan, groups: dict, times: dict) -> np.ndarray:
    """A part of a chain as an index array broadcastable to W: the entry of ``extended`` each
    weight entry is multiplied by."""
    rank, one = len(weight_shape), mask_plan.extended_size - 1  # (the extending 1)
    if part[0] is _TIME:
        t = times[(part[1].target, part[2].target, part[3].target, part[4])][0]
        kernel = weight_shape[-1]
        start = mask_plan.channels + int(mask_plan.tap_starts[t])
        return (start + np.arange(kernel)).reshape((1,) * (rank - 1) + (kernel,))
    group, _, size, _, blocks = groups[part[1]]
    group_start = sum(mask_plan.sizes[:group])
    entry = np.arange(size) if blocks is None else blocks  # the alpha entry of each channel
    if part[0] is _BLOCKS:
        _, _, axis, inner = part
        shape = [1] * rank
        shape[axis] = weight_shape[axis]
        return (group_start + entry[np.arange(weight_shape[axis]) // inner]).reshape(shape)
    _, _, index, shape = part
    values = _target(module, index.target).detach().cpu().numpy().astype(np.int64)
    resolved = [w if s == -1 else s for s, w in zip(shape, weight_shape)]
    channels = entry.size
    return np.where(values < channels, group_start + entry[np.minimum(values, channels - 1)], one).reshape(resolved)


def _factor_shape(weight_shape: tuple, arrays: list[np.ndarray]) -> tuple:
    """The shape of a weight's factor (`FactorPlan`): [1, *W.shape[1:]] where no mask lies
    along the first axis; else the shape the masks' index arrays broadcast to — [W.shape[0], 1,
    …] where masks lie along the first axis only (a MatMul's or a Gemm's [in, out] weight read
    by masked inputs: one factor entry, and one index, per row rather than per weight entry),
    [O, I/g, 1, 1] for a grouped Conv (one per output and input channel pair, not per tap)."""
    if len(weight_shape) < 2:
        return weight_shape
    along_first = weight_shape[0] != 1 and any(a.shape[0] != 1 for a in arrays)
    if not along_first:
        return (1,) + weight_shape[1:]
    return tuple(int(d) for d in np.broadcast_shapes(*(a.shape for a in arrays)))


def _factor_plan(module, chains) -> tuple[FactorPlan, dict]:
    """The `FactorPlan` of the chains (and the groups of `_mask_plan`)."""
    mask_plan, groups, times = _mask_plan(module, chains)
    one = mask_plan.extended_size - 1
    shapes, columns = [], []
    for source, parts, _ in chains:
        weight_shape = tuple(_target(module, source.target).shape)
        arrays = [_part_indices(module, part, weight_shape, mask_plan, groups, times) for part in parts]
        shape = _factor_shape(weight_shape, arrays)
        shapes.append(shape)
        # Entry by entry, the masks that apply first (the 1s last: the product is the same), so
        # that the parts of different groups along one axis (a Concat's) share a row.
        column = np.sort(np.stack([np.broadcast_to(a, shape).reshape(-1) for a in arrays]), axis=0)
        columns.append(column[(column != one).any(axis=1)] if (column != one).any() else column[:1])
    rows = [np.concatenate([c[p] if p < len(c) else np.full(int(np.prod(s)), one) for c, s in zip(columns, shapes)])
            for p in range(max(len(c) for c in columns))]
    targets = [target for _, target, _, _, _ in groups.values()] + \
        [t for (beta, gamma, _, _) in times for t in (beta, gamma)]
    plan = FactorPlan(mask_plan, shapes, rows, targets, [threshold for _, _, _, threshold, _ in groups.values()])
    return plan, groups


def _rewrite(graph: fx.Graph, name: str, plan: FactorPlan, chains, groups: dict):
    """Insert the call of submodule ``name`` (its inputs: the mask parameters, then the weights)
    and let every chain's users read its output; erase what is left unread. Returns the call and
    the mask parameters' get_attr nodes."""
    first = next(n for n in graph.nodes if n.op != "placeholder")
    existing = {n.target: n for n in graph.nodes if n.op == "get_attr"}
    inputs = []
    for target in plan.targets:  # the parameters' get_attr nodes, moved first
        node = existing.get(target)
        if node is None:
            with graph.inserting_before(first):
                node = graph.get_attr(target)
        elif node is not first:
            first.prepend(node)
        inputs.append(node)
    for source, _, _ in chains:  # then the weights'
        if source is not first:
            first.prepend(source)
        inputs.append(source)
    with graph.inserting_before(first.next if first in inputs else first):  # (after every input)
        # called as a plain function of the submodule: nn.Module.__call__'s hooks machinery is a
        # measurable share of a small model's step
        fused = graph.call_function(_call_masks, (graph.get_attr(name), *inputs))
        masked = [graph.call_function(operator.getitem, (fused, i)) for i in range(len(chains))]
    orphans = set()
    for (_, _, members), weight in zip(chains, masked):
        members[-1].replace_all_uses_with(weight)
        for member in reversed(members):
            orphans.update(a for a in member.args if isinstance(a, fx.Node))
            graph.erase_node(member)
    for mask in groups:
        if not mask.users:
            orphans.update(a for a in mask.args if isinstance(a, fx.Node))
            graph.erase_node(mask)
    for node in orphans:  # (indices and γ maps are constants of the plan: their get_attr nodes go too)
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    return fused, inputs[:len(plan.targets)]


def _call_masks(masks: PITMasks, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return masks.forward(*tensors)


def _pack_mask_parameters(module, name: str, fused: fx.Node, nodes) -> None:
    """Pack the mask parameters read by ``fused`` only (their get_attr ``nodes``) into one flat
    parameter of its `PITMasks`: one autograd leaf, gradient and optimizer entry instead of one
    per group and time mask (on a small model, a sizable part of a step)."""
    targets = [node.target for node in nodes]
    params = [module._parameters.get(t) for t in targets]
    if any(p is None for p in params) or len({(p.dtype, p.device, p.requires_grad) for p in params}) != 1 \
            or any(set(node.users) != {fused} for node in nodes) or not hasattr(module, "pack"):
        return
    fused.args = fused.args[:1] + fused.args[1 + len(nodes):]
    for node in nodes:
        module.graph.erase_node(node)
    module.pack(targets, name)
