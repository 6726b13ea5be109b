"""The fused PIT mask engine: every PIT-masked weight of a generated module in one autograd node.

On small models a PIT step costs over a plain one what its mask nodes cost: a few tiny ops and
autograd nodes each (channel mask, weight masks, tap mask, then the same again for the cost),
each paying Python's and the dispatcher's overhead. `PITMasks` (put in place by the fx pass
`plinio_onnx.to_torch.fuse_pit_masks`) computes, from one concatenation of the mask parameters,
every channel and tap mask at once (`MaskPlan`), the factor f of every masked weight by gathers
with index arrays made once (`FactorPlan`), and all the products W ⊙ f in one foreach call,
their gradients likewise (`_MaskFactors`). Values and straight-through gradients are those of
the per-node functions of `plinio_onnx.functions.pit`, which stay the reference and the fallback.

What depends on the masks only (the factors, the taps' gradient matrix, the cost's counts) is
kept on the `MaskValues` of the masks, which a plan reuses while no mask flips (`MaskPlan.current`);
`PITMasks.last_forward` says what the module's last call computed, for the cost
(`plinio_onnx.to_torch.pit_counts`).
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import host
from ..functions.pit import channel_mask, taps


@dataclass(eq=False)
class MaskValues:
    """The masks of a `MaskPlan` while none of them flips: ``key`` (which channel entries and which
    taps' θβ, θγ pass their thresholds), ``extended`` = [channel masks, tap masks, 1], per tap
    whether β and γ keep it; and what is computed from them alone, once: ``factors`` (see
    `FactorPlan.factors`), ``tap_grad_matrix`` (see `MaskPlan.grad`) and ``counts`` (per count
    plan, see `plinio_onnx.to_torch.pit_counts.CountPlan.evaluate`)."""
    key: torch.Tensor
    extended: torch.Tensor
    keep_beta: torch.Tensor | None
    keep_gamma: torch.Tensor | None
    factors: tuple | None = None
    tap_grad_matrix: torch.Tensor | None = None
    counts: dict = field(default_factory=dict)


@dataclass(eq=False)
class MaskState:
    """One call of `MaskPlan.forward`: the concatenated parameters ``flat`` (no autograd), the
    masks' ``values`` and sign(flat) once a backward needed it."""
    flat: torch.Tensor
    values: MaskValues
    sign: torch.Tensor | None = None


class MaskPlan:
    """Every channel mask (an alpha per group) and tap mask (a beta and a gamma per time mask)
    computed from one concatenation of their parameters: |·| and keep-alive once for all, the
    masks of all groups at once, and θβ = Σ_{i≤j} β̂_i, θγ = G·γ̂ of every tap of every time mask
    as one product with a constant 0/1 matrix, summed in float64 then rounded (the value
    `plinio_onnx.functions.pit.taps` computes).

    ``groups``: (size, threshold) per group — size: its alpha's entries; ``weights``: per group,
    how many channels each entry masks (None, or a group's None: one each; channels searched in
    blocks, see `plinio_onnx.functions.pit_keep.block_index`), ``entry_weights`` their
    concatenation; ``times``: (beta size, gamma size, gamma map, threshold) per time mask (a γ
    map is a constant of the plan: its buffer is what `gamma_map` made it). The concatenation of the parameters: group i's alpha is parameter i, time mask t's
    beta and gamma parameters G + 2t and G + 2t + 1. ``current``: the `MaskValues` of the last
    call (reused by the next one while no mask flips)."""

    def __init__(self, groups, times=(), weights=None) -> None:
        self.groups = [(int(n), float(t)) for n, t in groups]
        self.times = [(int(nb), int(ng), np.asarray(m), float(t)) for nb, ng, m, t in times]
        self.sizes = [n for n, _ in self.groups]
        weights = weights or [None] * len(self.sizes)
        self.entry_weights = np.concatenate([np.ones(n) if w is None else np.asarray(w, dtype=np.float64)
                                             for n, w in zip(self.sizes, weights)] + [np.zeros(0)])
        self.channels = sum(self.sizes)
        self.lengths = self.sizes + [n for nb, ng, _, _ in self.times for n in (nb, ng)]
        self.kernels = [m.shape[0] for _, _, m, _ in self.times]
        self.tap_starts = np.cumsum([0] + self.kernels, dtype=np.int64)  # of every time mask's taps
        self.taps = int(self.tap_starts[-1])
        self.extended_size = self.channels + self.taps + 1
        # The last entry of every parameter is kept alive (θ = 1). Gradients w.r.t. ``extended``
        # are gathered in one more entry, a sink, where everything bound for a kept-alive
        # channel goes: those parameters get no gradient.
        self.kept_alive = np.cumsum(self.lengths, dtype=np.int64) - 1
        self.kept_alive_channels = self.kept_alive[:len(self.sizes)]
        self.matrix = self._tap_matrix()
        self.tap_thresholds = np.repeat([t for _, _, _, t in self.times], self.kernels) if self.times else None
        self.current: MaskValues | None = None
        self._constants: dict = {}

    def _tap_matrix(self) -> np.ndarray:
        """M with [θβ; θγ] of every tap = M · θ(time parameters)."""
        width = sum(self.lengths[len(self.sizes):])
        matrix = np.zeros((2 * self.taps, width))
        start = 0
        for t, (nb, ng, gmap, _) in enumerate(self.times):
            k, row = self.kernels[t], int(self.tap_starts[t])
            for j in range(k):
                if nb > 1:
                    matrix[row + j, start:start + j + 1] = 1.0
                else:
                    matrix[row + j, start] = 1.0
                matrix[self.taps + row + j, start + nb:start + nb + ng] = gmap[j, :ng]
            start += nb + ng
        return matrix

    def __getstate__(self) -> dict:  # (copies and pickles start without device tensors)
        return {k: v for k, v in self.__dict__.items() if k not in ("current", "_constants")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.current, self._constants = None, {}

    def constants(self, device, dtype) -> "MaskConstants":
        """The plan's constants as tensors on ``device`` (floating ones in ``dtype``)."""
        key = (device, dtype)
        if key not in self._constants:
            self._constants[key] = MaskConstants(self, device, dtype)
        return self._constants[key]

    def forward(self, flat: torch.Tensor) -> MaskState:
        """The masks of the concatenated parameters ``flat`` (no autograd)."""
        const = self.constants(flat.device, flat.dtype)
        theta = flat.abs()
        # Which channels and which taps' θβ, θγ pass their thresholds (kept-alive entries always):
        # compared first, as booleans, so that the common case — no mask flipped since the last
        # call — costs a handful of ops, and what depends on the masks only is reused.
        keys = []
        if self.groups:
            keys.append(torch.gt(theta[:self.channels], const.channel_thresholds))
        if self.times:
            sums = torch.addmv(const.tap_offset, const.tap_matrix, theta[self.channels:].double())
            keys.append(torch.gt(sums.to(flat.dtype), const.tap_thresholds))
        key = torch.cat(keys) if len(keys) > 1 else keys[0]
        current = self.current
        # (On a device, whether a mask flipped is not asked: it would wait for the device's queue.)
        if current is not None and host.runs_on_host(flat) and current.extended.dtype == flat.dtype \
                and current.key.device == key.device and torch.equal(current.key, key):
            return MaskState(flat, current)
        pieces, channels, count = [], self.channels, self.taps
        keep_beta = keep_gamma = None
        if self.groups:
            pieces.append(key[:channels].to(flat.dtype))
        if self.times:
            kept = key[channels:].to(flat.dtype)
            keep_beta, keep_gamma = kept[:count], kept[count:]
            pieces.append(keep_beta * keep_gamma)
        pieces.append(const.one)
        self.current = MaskValues(key, torch.cat(pieces), keep_beta, keep_gamma)
        return MaskState(flat, self.current)

    def grad(self, state: MaskState, grad_extended: torch.Tensor) -> torch.Tensor:
        """∂/∂(the concatenated parameters) given ∂/∂(``extended``): the straight-through
        gradients of the channel masks (grad·sign(α)) and of the taps (θβ = M_β·θ, θγ = M_γ·θ:
        ∂/∂θ = (grad ⊙ kept by γ)·M_β + (grad ⊙ kept by β)·M_γ), none for kept-alive entries."""
        flat, channels = state.flat, self.channels
        pieces = [grad_extended[:channels]] if self.groups else []
        if self.times:
            pieces.append(grad_extended[channels:channels + self.taps] @ self._tap_grad_matrix(state))
        if state.sign is None:
            state.sign = torch.sign(flat)
        return (torch.cat(pieces) if len(pieces) > 1 else pieces[0]).mul_(state.sign)

    def _tap_grad_matrix(self, state: MaskState) -> torch.Tensor:
        """diag(kept by γ)·M_β + diag(kept by β)·M_γ (the same while the masks are)."""
        values = state.values
        if values.tap_grad_matrix is None:
            both = self.constants(state.flat.device, state.flat.dtype).tap_grad_matrix
            values.tap_grad_matrix = (values.keep_gamma[:, None] * both[:self.taps]
                                      + values.keep_beta[:, None] * both[self.taps:])
        return values.tap_grad_matrix


class MaskConstants:
    """A `MaskPlan`'s constants on one device: ``channel_thresholds`` (per alpha entry; −inf
    where kept alive), ``tap_matrix`` and ``tap_offset`` (float64: [θβ; θγ] of every tap = M·θ, the
    kept-alive columns of M folded into the offset, as θ is 1 there), ``tap_thresholds``
    (per row), ``tap_grad_matrix`` (M in the parameters' dtype, the kept-alive columns zero: they
    get no gradient) and ``one``."""

    def __init__(self, plan: MaskPlan, device, dtype) -> None:
        thresholds = np.repeat([t for _, t in plan.groups], plan.sizes).astype(np.float64)
        thresholds[plan.kept_alive_channels] = -np.inf
        self.channel_thresholds = torch.as_tensor(thresholds, dtype=dtype, device=device)
        alive = plan.kept_alive[len(plan.sizes):] - plan.channels  # kept-alive columns of M
        folded = plan.matrix.copy()
        folded[:, alive] = 0.0
        self.tap_matrix = torch.as_tensor(folded, dtype=torch.float64, device=device)
        self.tap_offset = torch.as_tensor(plan.matrix[:, alive].sum(axis=1), dtype=torch.float64, device=device)
        thresholds_of_taps = np.concatenate([plan.tap_thresholds] * 2) if plan.times else np.zeros(0)
        self.tap_thresholds = torch.as_tensor(thresholds_of_taps, dtype=dtype, device=device)
        self.tap_grad_matrix = torch.as_tensor(folded, dtype=dtype, device=device)
        self.one = torch.ones(1, dtype=dtype, device=device)


class FactorPlan:
    """How `_MaskFactors` makes the factor f of every masked weight W ⊙ f: a product of gathers
    from the masks' ``extended`` vector (the last entry a 1) by index ``rows`` made once, so that
    all factors of a module take a handful of tensor ops and their gradients as many (scatters by
    the same indices).

    ``masks``: the `MaskPlan`; ``targets``: the module attribute of every mask parameter (in
    ``masks``' order); ``shapes``: every factor's ([1, *W.shape[1:]] when no mask lies along W's
    first axis: a product broadcasting over the first axis only, and its ∂/∂f a sum over it, are
    several times faster than broadcasting a [1, C, 1, 1] mask; [W.shape[0], 1, …] when masks
    lie along the first axis only: an index per row, not per weight entry; else the shape the
    masks broadcast to, e.g. a grouped Conv's [O, I/g, 1, 1]: one index per channel pair, not
    per tap); ``thresholds``:
    every group's."""

    def __init__(self, masks: MaskPlan, shapes, rows, targets, thresholds) -> None:
        self.masks, self.shapes = masks, [tuple(s) for s in shapes]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.rows = np.asarray(rows, dtype=np.int64)
        self.targets, self.thresholds = list(targets), thresholds
        # the factors with a leading 1 where their weight has more: ∂/∂f sums over that axis
        self.reduced = [len(shape) > 1 and shape[0] == 1 for shape in self.shapes]
        # the factors of one entry per row: ∂/∂f sums over the other axes
        self.per_row = [len(shape) > 1 and shape[0] != 1 and all(d == 1 for d in shape[1:]) for shape in self.shapes]
        self._constants: dict = {}

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_constants"}

    def __setstate__(self, state: dict) -> None:
        state.setdefault("per_row", [False] * len(state["shapes"]))  # (pickled before per-row factors)
        self.__dict__.update(state)
        self._constants = {}

    def broadcast_axes(self, i: int, weight_shape) -> tuple[int, ...]:
        """The axes along which factor ``i`` broadcasts over its weight (∂/∂f sums over them)."""
        return tuple(d for d, (f, w) in enumerate(zip(self.shapes[i], weight_shape)) if f == 1 and w != 1)

    def factor_grad_buffer(self, like: torch.Tensor) -> tuple:
        """A vector for ∂/∂(every factor, concatenated) like ``like``, and a view per factor of
        its part (the shape the backward's sum gives: without a reduced first axis). Reused by
        every backward: what it holds is consumed before the backward returns."""
        key = ("factor grads", like.device, like.dtype)
        if key not in self._constants:
            buffer = torch.empty(sum(self.sizes), dtype=like.dtype, device=like.device)
            pieces = buffer.split_with_sizes(self.sizes) if len(self.sizes) > 1 else (buffer,)
            slots = [piece.view(shape[1:] if reduced else shape)
                     for piece, shape, reduced in zip(pieces, self.shapes, self.reduced)]
            self._constants[key] = (buffer, slots)
        return self._constants[key]

    def indices(self, device) -> tuple:
        """The index rows on ``device``, and their concatenation with the kept-alive channels'
        entries sent to the sink (the backward's one scatter, see `MaskPlan`)."""
        if device not in self._constants:
            rows = [torch.as_tensor(row, device=device) for row in self.rows]
            scatter = np.concatenate(list(self.rows))
            scatter[np.isin(scatter, self.masks.kept_alive_channels)] = self.masks.extended_size
            self._constants[device] = (rows, torch.as_tensor(scatter, device=device))
        return self._constants[device]

    def factors(self, extended: torch.Tensor) -> tuple:
        """(every factor, shaped; with several index rows, the product of the other rows'
        entries for each row, [rows, entries] — ∂f/∂(row p's entries) — else None) from
        ``extended`` (with autograd or not)."""
        gathered = [torch.index_select(extended, 0, index) for index in self.indices(extended.device)[0]]
        flat = functools.reduce(operator.mul, gathered) if len(gathered) > 1 else gathered[0]
        pieces = flat.split_with_sizes(self.sizes) if len(self.sizes) > 1 else (flat,)
        views = [piece.view(shape) for piece, shape in zip(pieces, self.shapes)]
        others = None if len(gathered) == 1 else torch.stack(
            [functools.reduce(operator.mul, [g for q, g in enumerate(gathered) if q != p])
             for p in range(len(gathered))])
        return views, others

    def factors_of(self, values: MaskValues) -> tuple:
        """`factors` of the masks ``values`` (no autograd), computed once for them."""
        if values.factors is None:
            values.factors = self.factors(values.extended)
        return values.factors


class _MaskFactors(torch.autograd.Function):
    """Every masked weight W ⊙ f of a PIT module from the concatenated mask parameters and the
    weights, in one autograd node: ∂/∂W = grad ⊙ f, and ∂/∂f = Σ grad ⊙ W (summed to f's shape)
    mapped to the straight-through gradients of `channel_mask` and `time_mask` — what autograd
    computes through the per-node functions. ``state``: the masks of ``flat`` (`MaskPlan.forward`).
    It saves no tensor for backward (what it needs lives on ``ctx``; the weights' versions are
    checked by hand), so a cost read from the same masks backpropagates on its own after the
    loss did, or before."""

    @staticmethod
    def forward(ctx, plan: FactorPlan, state: MaskState, flat, *weights):
        ctx.set_materialize_grads(False)
        factors, others = plan.factors_of(state.values)
        ctx.plan, ctx.state, ctx.others = plan, state, others
        ctx.factors, ctx.weights, ctx.versions = factors, weights, [w._version for w in weights]
        return tuple(torch._foreach_mul(list(weights), factors))

    @staticmethod
    def backward(ctx, *grads):
        # (once differentiable, checked by hand: the decorator's wrapping costs a step's worth)
        if torch.is_grad_enabled():
            raise RuntimeError("PIT masks support no double backward (create_graph=True)")
        plan: FactorPlan = ctx.plan
        weights, factors = ctx.weights, ctx.factors
        count = len(weights)
        if [w._version for w in weights] != ctx.versions:
            raise RuntimeError("a PIT-masked weight was modified in place between the forward and the backward")
        needs = ctx.needs_input_grad
        result = [None] * (3 + count)
        present = [i for i, g in enumerate(grads) if g is not None]
        wanted = [i for i in present if needs[3 + i]]
        to_masks = needs[2] and present
        # ∂/∂W = grad ⊙ f, and grad ⊙ W (for ∂/∂f): one foreach call for both
        if len(present) == count and len(wanted) == count and to_masks:
            products = torch._foreach_mul(list(grads) + list(grads), [*factors, *weights])
            result[3:] = products[:count]
            products = products[count:]
        else:
            if wanted:
                for i, g in zip(wanted, torch._foreach_mul([grads[i] for i in wanted],
                                                           [factors[i] for i in wanted])):
                    result[3 + i] = g
            products = torch._foreach_mul([grads[i] for i in present],
                                          [weights[i] for i in present]) if to_masks else []
        if not to_masks:
            return tuple(result)
        state = ctx.state
        # ∂/∂f: every product summed to its factor's shape, straight into one vector
        grad, slots = plan.factor_grad_buffer(state.flat)
        if len(present) < count:
            grad.zero_()
        for i, product in zip(present, products):
            if plan.reduced[i]:
                torch.sum(product, 0, out=slots[i])
            elif plan.per_row[i]:
                torch.sum(product, tuple(range(1, product.dim())), keepdim=True, out=slots[i])
            elif plan.shapes[i] != product.shape:  # (a grouped Conv's: over the taps)
                torch.sum(product, plan.broadcast_axes(i, product.shape), keepdim=True, out=slots[i])
            else:
                slots[i].copy_(product)
        if ctx.others is not None:  # ∂f/∂(each row's entries): every row scattered at once
            grad = torch.mul(ctx.others, grad).view(-1)
        grad_extended = state.flat.new_zeros(plan.masks.extended_size + 1)
        grad_extended.index_add_(0, plan.indices(grad.device)[1], grad)
        result[2] = plan.masks.grad(state, grad_extended)
        return tuple(result)


@dataclass(eq=False)
class MaskForward:
    """What a `PITMasks` call computed, for a cost read from the same masks: the masks
    (``state``), the concatenation of the mask parameters (``flat``: an autograd node of that
    call whose backward needs no saved tensor) and the parameters it read, at ``versions``."""
    state: MaskState
    flat: torch.Tensor
    params: tuple
    versions: list[int]

    def is_current(self, params) -> bool:
        """Whether ``params`` are the same tensors, at the same versions, as this call read."""
        return len(params) == len(self.params) and all(map(operator.is_, params, self.params)) \
            and [p._version for p in params] == self.versions


class PITMasks(torch.nn.Module):
    """Every PIT-masked weight of a generated module, in one autograd node (see
    `plinio_onnx.to_torch.fuse_pit_masks`): called with the module's mask parameters (or none,
    when they are packed into its parameter ``packed``) then the weights they mask, returns the
    masked weights. ``last_forward``: what its last call computed (`MaskForward`; None after a
    per-node call), which a cost may reuse while it is current."""

    def __init__(self, plan: FactorPlan) -> None:
        super().__init__()
        self.plan = plan
        self.last_forward: MaskForward | None = None

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        plan = self.plan
        packed = self._parameters.get("packed")
        if packed is not None:  # the mask parameters, packed (see `fuse_pit_masks`)
            params, weights, flat = (packed,), tensors, packed
        else:
            count = len(plan.targets)
            params, weights = tensors[:count], tensors[count:]
            dtype = params[0].dtype
            if any(p.dtype != dtype for p in params):
                self.last_forward = None
                return self.per_node(params, weights)
            flat = torch.cat(params) if len(params) > 1 else params[0]
        state = plan.masks.forward(flat.detach())
        outputs = _MaskFactors.apply(plan, state, flat, *weights)
        self.last_forward = MaskForward(state, flat, params, [p._version for p in params])
        return outputs

    def mask_inputs(self, module) -> list[torch.Tensor]:
        """What ``module`` (the generated module holding this) passes as mask parameters: the
        packed parameter, or the plan's targets."""
        packed = self._parameters.get("packed")
        if packed is not None:
            return [packed]
        parameters, buffers = module._parameters, module._buffers  # (getattr is slower)
        return [parameters[a] if a in parameters else buffers[a] for a in self.plan.targets]

    def per_node(self, params, weights) -> tuple[torch.Tensor, ...]:
        """The per-node functions, composed (mask parameters of different dtypes)."""
        plan, mask_plan = self.plan, self.plan.masks
        groups = len(mask_plan.groups)
        pieces = [channel_mask(params[g], plan.thresholds[g]) for g in range(groups)]
        for t, (_, _, gmap, threshold) in enumerate(mask_plan.times):
            beta, gamma = params[groups + 2 * t], params[groups + 2 * t + 1]
            pieces.append(taps(beta, gamma, torch.as_tensor(gmap, device=beta.device), threshold))
        dtype = pieces[0].dtype
        pieces = [p.to(dtype) for p in pieces] + [torch.ones(1, dtype=dtype, device=params[0].device)]
        factors = plan.factors(torch.cat(pieces))[0]
        return tuple(weight * factor for weight, factor in zip(weights, factors))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["last_forward"] = None
        return state
