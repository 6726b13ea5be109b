"""PIT's counts for the cost, from the fused masks: every kept-channel and exported-tap count
(and, given a compiled cost model, the cost itself) in one autograd node (`_Counts`).

The cost is an explicit call (`counts`); it reuses the masks of the module's last forward
(`plinio_onnx.to_torch.pit_masks.PITMasks.last_forward`) while the mask parameters are the
same tensors at the same versions, and what it computes from a set of masks is kept on their
`MaskValues` while none flips.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .. import host
from ..functions.pit import exported_taps
from ..functions.pit_keep import kernel_plan
from .pit_masks import MaskPlan, MaskState, MaskValues, PITMasks


@functools.lru_cache(maxsize=4096)
def _exported_taps(mask: tuple, dilation: int, pads: tuple) -> int:
    return len(kernel_plan(np.asarray(mask, dtype=np.float32), dilation, pads).taps)


@dataclass(eq=False)
class CountValues:
    """What a `CountPlan` computed from one set of masks: ``x`` (numpy float64), the cost there
    (``value``; None without a cost) and ∂cost/∂extended at unit gradient once a backward
    needed it (``unit``)."""
    x: np.ndarray
    value: float | None
    unit: torch.Tensor | None = None


class CountPlan:
    """What `counts` computes from ``masks`` (a `MaskPlan`): x = [kept channels of every group,
    exported taps of every time mask (``exports``: its (dilation, pads)), 1] — sums of segments
    of the masks' ``extended`` vector, each channel entry weighted by the channels it masks
    (``weights``: `MaskPlan.entry_weights`, then 1s) — and, with ``cost`` (an object with ``value_np(x)`` and
    ``grad_np(x, grad)``, e.g. a bound compiled cost model), its value there. ``shared``: the
    `PITMasks` whose last masks it may reuse (``masks`` is its plan's)."""

    def __init__(self, masks: MaskPlan, exports, shared: PITMasks | None = None, cost=None) -> None:
        self.masks, self.shared, self.cost = masks, shared, cost
        self.exports = [(int(d), tuple(int(p) for p in pads)) for d, pads in exports]
        groups = len(masks.groups)
        self.size = groups + len(masks.times) + 1
        self.starts = np.concatenate([np.cumsum([0] + masks.sizes[:-1]) if groups else [],
                                      masks.channels + masks.tap_starts[:-1], [masks.extended_size - 1]]).astype(np.int64)
        # x position of every extended entry (for ∂/∂extended = ∂/∂x at the count it is in)
        position = np.repeat(np.arange(self.size), np.diff(np.append(self.starts, masks.extended_size)))
        self.segment = position.copy()  # the count every extended entry adds to
        position[masks.kept_alive_channels] = self.size  # (no gradient: a zero appended to ∂/∂x)
        self.position = np.append(position, self.size)  # the sink
        self.kernels = np.asarray(masks.kernels, dtype=np.float64)
        self.weights = np.concatenate([masks.entry_weights, np.ones(masks.taps + 1)])
        self.blocked = bool(np.any(masks.entry_weights != 1))
        self._placed: dict = {}  # device -> (segment, position, weights and the sink's 1) as tensors

    def with_cost(self, cost) -> "CountPlan":
        """This plan computing ``cost`` (bound to its counts' positions)."""
        plan = CountPlan.__new__(CountPlan)
        plan.__dict__.update(self.__dict__)
        plan.cost = cost
        return plan

    def evaluate(self, values: MaskValues) -> CountValues:
        """x and the cost for the masks ``values``: computed once per set of masks (the counts
        change only when a mask flips)."""
        counted = values.counts.get(self)
        if counted is None:
            x = self.values(values.extended)
            counted = CountValues(x, None if self.cost is None else self.cost.value_np(x))
            values.counts[self] = counted
        return counted

    def cost_grads(self, counted: CountValues, grad, like: torch.Tensor) -> torch.Tensor:
        """∂cost/∂extended · ``grad`` (a number or a 0-d tensor) at ``counted`` (like ``like``, a
        new tensor): ∂cost/∂x on every entry of its count, at unit gradient computed once."""
        unit = counted.unit
        if unit is None or unit.dtype != like.dtype or unit.device != like.device:
            unit = counted.unit = self.entry_grads(self.cost.grad_np(counted.x, 1.0), like)
        return unit * grad

    def values(self, extended: torch.Tensor) -> np.ndarray:
        """x (numpy float64) from the masks' ``extended`` vector."""
        extended = extended.detach().cpu().numpy()
        weighted = extended * self.weights if self.blocked else extended
        x = np.add.reduceat(weighted, self.starts).astype(np.float64)  # exact below 2^24
        groups = len(self.masks.groups)
        if self.masks.times:
            taps = x[groups:-1]
            for t in np.flatnonzero(taps != self.kernels):  # shortened kernels: their exported size
                start = self.masks.channels + int(self.masks.tap_starts[t])
                mask = tuple(bool(v) for v in extended[start:start + self.masks.kernels[t]])
                taps[t] = _exported_taps(mask, *self.exports[t])
        return x

    def entry_grads(self, grad: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        """∂/∂extended and the sink (like ``like``) given ∂/∂x (numpy): every entry gets its
        count's (times the channels it masks), but kept-alive channels and the sink get 0."""
        grads = np.append(grad, 0.0)[self.position]
        if self.blocked:
            grads[:-1] *= self.weights
        return torch.as_tensor(grads, dtype=like.dtype, device=like.device)

    # -- on a device: the same with tensor ops only (no host read) ---------------------------------
    def _device_constants(self, device) -> tuple:
        if device not in self._placed:
            self._placed[device] = (torch.as_tensor(self.segment, device=device),
                                    torch.as_tensor(self.position, device=device),
                                    torch.as_tensor(np.append(self.weights, 1.0), dtype=torch.float64, device=device))
        return self._placed[device]

    def device_values(self, extended: torch.Tensor) -> torch.Tensor:
        """`values` as a float64 tensor on ``extended``'s device (the exported taps of every
        time mask by `plinio_onnx.functions.pit.exported_taps`)."""
        segment, _, weights = self._device_constants(extended.device)
        weighted = extended.detach().to(torch.float64)
        if self.blocked:
            weighted = weighted * weights[:-1]   # (the sink is no entry of ``extended``)
        x = torch.zeros(self.size, dtype=torch.float64, device=extended.device).index_add_(0, segment, weighted)
        if self.masks.times:
            start, groups = self.masks.channels, len(self.masks.groups)
            exported = [exported_taps(extended[start + int(first):start + int(first) + kernel], *self.exports[t])
                        for t, (first, kernel) in enumerate(zip(self.masks.tap_starts[:-1], self.masks.kernels))]
            x[groups:groups + len(exported)] = torch.stack(exported).to(torch.float64)
        return x

    def device_entry_grads(self, grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`entry_grads` from a ∂/∂x tensor, on its device."""
        _, position, weights = self._device_constants(grad.device)
        grads = torch.cat([grad.to(torch.float64), grad.new_zeros(1, dtype=torch.float64)])[position]
        if self.blocked:
            grads = grads * weights
        return grads.to(like.dtype)


class _Counts(torch.autograd.Function):
    """x = float64 [kept channels of each group…, exported taps of each time mask…, 1] — the values
    of Σ channel_mask(α) and of the exported kernels — with the straight-through gradients of
    Σ channel_mask(α) and Σ taps(β, γ), from the concatenated mask parameters in one autograd
    node; or, for a plan with a cost, its value at x. ``state``: the masks of ``flat`` when known."""

    @staticmethod
    def forward(ctx, plan: CountPlan, state: MaskState | None, flat):
        ctx.set_materialize_grads(False)
        if state is None:
            state = plan.masks.forward(flat)
        if not host.runs_on_host(flat):
            return _on_device(ctx, plan, state)
        counted = plan.evaluate(state.values)
        ctx.plan, ctx.state, ctx.counted = plan, state, counted
        if plan.cost is not None:
            return torch.scalar_tensor(counted.value, dtype=torch.float64, device=flat.device)
        return torch.tensor(counted.x, dtype=torch.float64, device=flat.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if grad is None or not ctx.needs_input_grad[2]:
            return None, None, None
        state, plan = ctx.state, ctx.plan
        if ctx.counted is None:  # (on a device)
            from_x = grad if plan.cost is None else plan.cost.grad(ctx.x, grad)
            return None, None, plan.masks.grad(state, plan.device_entry_grads(from_x, state.flat))
        if plan.cost is None:
            from_counts = plan.entry_grads(grad.detach().cpu().numpy(), state.flat)
        else:
            from_counts = plan.cost_grads(ctx.counted, float(grad), state.flat)
        return None, None, plan.masks.grad(state, from_counts)


def _on_device(ctx, plan: CountPlan, state: MaskState) -> torch.Tensor:
    """`_Counts.forward` on a device: x from the masks, and the cost there, as tensors."""
    x = plan.device_values(state.values.extended)
    ctx.plan, ctx.state, ctx.counted, ctx.x = plan, state, None, x
    return x if plan.cost is None else plan.cost.value(x)


def counts(plan: CountPlan, params: list) -> torch.Tensor | None:
    """The `_Counts` of ``params`` (the mask parameters, in ``plan.masks``' order): the vector x,
    or the plan's cost at x. The masks of the shared module's last forward are reused while
    ``params`` are what it read. None when the parameters' dtypes differ (count them one by one
    instead)."""
    if not params:  # nothing prunable: count layer by layer
        return None
    dtype = params[0].dtype
    if any(p.dtype != dtype for p in params):
        return None
    last = plan.shared.last_forward if plan.shared is not None else None
    if last is not None and last.is_current(params):
        flat = last.flat
        if not (flat.requires_grad or not torch.is_grad_enabled() or not any(p.requires_grad for p in params)):
            flat = torch.cat(params) if len(params) > 1 else params[0]  # (that forward ran without grad)
        return _Counts.apply(plan, last.state, flat)
    return _Counts.apply(plan, None, torch.cat(params) if len(params) > 1 else params[0])


def count_plan(model_masks: PITMasks | None, alphas: dict, times: dict, threshold: float):
    """A `CountPlan` for the groups ``alphas`` (key → (attribute, tensor, channels per entry or
    None)) and time masks
    ``times`` (key → ((beta attribute, beta), (gamma attribute, gamma), gamma map, dilation,
    pads)), reusing the masks of ``model_masks`` (the module's `PITMasks`) when its plan holds
    them all at ``threshold``. Returns the plan, the attributes of its parameters (in its
    masks' order; None: those of ``model_masks``, `PITMasks.mask_inputs`) and the position of
    every key in the counts."""
    if model_masks is not None:
        shared = _shared_plan(model_masks, alphas, times, threshold)
        if shared is not None:
            return shared
    groups = [(int(t.numel()), threshold) for _, t, _ in alphas.values()]
    weights = [w for _, _, w in alphas.values()]
    specs, exports, attrs = [], [], [attr for attr, _, _ in alphas.values()]
    for (battr, beta), (gattr, gamma), gmap, dilation, pads in times.values():
        specs.append((int(beta.numel()), int(gamma.numel()), gmap.detach().cpu().numpy(), threshold))
        attrs += [battr, gattr]
        exports.append((dilation, pads))
    positions = {key: i for i, key in enumerate(alphas)}
    positions.update({key: len(groups) + i for i, key in enumerate(times)})
    return CountPlan(MaskPlan(groups, specs, weights), exports), attrs, positions


def _shared_plan(model_masks: PITMasks, alphas: dict, times: dict, threshold: float):
    """`count_plan` on the masks of ``model_masks``; None when its plan does not hold them all."""
    plan = model_masks.plan
    mp = plan.masks
    index_of = {target: i for i, target in enumerate(plan.targets)}
    groups_count = len(mp.groups)
    positions, exports = {}, [(1, (0, 0))] * len(mp.times)
    if not (all(t == threshold for _, t in mp.groups) and all(t[3] == threshold for t in mp.times)):
        return None
    starts = np.cumsum([0] + mp.sizes)
    for key, (attr, _, weights) in alphas.items():
        index = index_of.get(attr)
        if index is None or index >= groups_count:
            return None
        expected = np.ones(mp.sizes[index]) if weights is None else np.asarray(weights)
        if not np.array_equal(mp.entry_weights[starts[index]:starts[index + 1]], expected):
            return None
        positions[key] = index
    for key, ((battr, _), (gattr, _), _, dilation, pads) in times.items():
        index = index_of.get(battr)
        if index is None or index < groups_count or (index - groups_count) % 2 or index_of.get(gattr) != index + 1:
            return None
        t = (index - groups_count) // 2
        positions[key] = groups_count + t
        exports[t] = (dilation, pads)
    return CountPlan(mp, exports, model_masks), None, positions
