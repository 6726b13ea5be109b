"""MPS's training-mode mixtures Σ_p θ_p·Q_p as custom autograd functions over all precisions.

Written as a chain of small ops per precision, a quantizer's step spends most of its time in op
dispatch, autograd bookkeeping and memory traffic.

* Weights (`MixedWeightQuant`): the P precisions stacked into one [P, …] tensor (one divide, one
  round, a clamp per precision, one weighted sum), backward by hand: it saves Q_p·s_p [P, …] and
  gives ∂/∂W = g (straight-through; Σθ = 1), ∂/∂θ_p = ⟨g, Q_p·s_p⟩ per channel (or per layer),
  and through the scale output ∂/∂θ_p = s_p. In float32 on the CPU the native kernel
  (`plinio_onnx.functions.mps_native_weight`) computes the same in one call each way (a small
  weight's ~15 ops were mostly op dispatch), once it has passed its check against these ops.
* Activations (`MixedActQuant`, PACT): large tensors, so the work goes chunk by chunk (each chunk
  stays in the core's cache while every precision is computed on it, forward and backward) over
  reused buffers, and only x is saved (the values are recomputed in the backward, not stored
  once per precision). In float32 on the CPU the native kernel (`plinio_onnx.functions.mps_native`)
  computes the same in one pass each way, once it has passed its check against these ops.

Values are those of the per-precision ops (same scales, rounding half to even, same clamps).
The plain-autograd references live in tests/test_mps_train.py.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import numpy as np
import torch

from . import mps_native, mps_native_weight


def _clamp_rows(values: torch.Tensor, lows: Sequence[int], highs: Sequence[int]) -> torch.Tensor:
    """Clamp row p of ``values`` to [lows[p], highs[p]] in place (a clamp with tensor bounds is
    several times slower than clamps with scalar ones)."""
    if len(set(lows)) == 1 and len(set(highs)) == 1:
        return values.clamp_(lows[0], highs[0])
    for row, lo, hi in zip(values, lows, highs):
        row.clamp_(lo, hi)
    return values


class WeightPlan(NamedTuple):
    """The fixed numbers of a weight mixture: the bit-widths, the channel axis (−1: per layer) and
    the axes the per-channel (or per-tensor) max reduces."""
    bits: tuple[int, ...]
    axis: int
    reduce_axes: tuple[int, ...]


class MixedWeightQuant(torch.autograd.Function):
    """(Σ_p θ_p·Q_p(W)·s_p, Σ_p θ_p·s_p) with s_p = 2·max|W|/(2^b_p − 1) per channel (or tensor)
    from the detached W, Q_p = clamp(round(W/s_p), −2^(b−1), 2^(b−1)−1) (0 and s_p = 0 at b = 0);
    straight-through into W (see the module docstring). θ: [P] or [P, C]. In float32 on the CPU
    the native kernel (`plinio_onnx.functions.mps_native_weight`) computes it, once checked."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, theta: torch.Tensor, plan: WeightPlan):
        ctx.plan, ctx.theta_shape = plan, theta.shape
        ctx.native = _native_weights(weight, theta, plan)
        if ctx.native is not None:  # (saves W and the scales: Q_p·s_p is recomputed in the backward)
            kernel, shape = ctx.native
            w = weight.detach().contiguous()
            value, scale, scales = kernel.forward(w, theta.detach().contiguous(), plan.bits, shape)
            ctx.save_for_backward(w, scales)
            return value, scale
        value, scale, values, flat_scales = _weight_mixture(weight.detach(), theta.detach(), plan)
        ctx.save_for_backward(values, flat_scales)
        return value, scale

    @staticmethod
    def backward(ctx, grad_value, grad_scale):
        grad_theta = None
        if ctx.needs_input_grad[1] and ctx.native is not None:
            (kernel, shape), (w, scales) = ctx.native, ctx.saved_tensors
            grad_theta = kernel.theta_grad(w, scales, _contiguous(grad_value), _contiguous(grad_scale),
                                           ctx.plan.bits, shape).reshape(ctx.theta_shape)
        elif ctx.needs_input_grad[1]:
            values, flat_scales = ctx.saved_tensors
            grad_theta = weight_theta_grad(values, flat_scales, grad_value, grad_scale, ctx.theta_shape, ctx.plan.axis)
        return grad_value, grad_theta, None


def _weight_mixture(w: torch.Tensor, theta: torch.Tensor, plan: WeightPlan):
    """The ATen path of `MixedWeightQuant`'s forward on detached tensors: (value, scale, the
    Q_p·s_p stack [P, …], the scales [P, C or 1] (0 where b = 0))."""
    bits, rank = plan.bits, w.dim()
    m = w.abs().amax(dim=list(plan.reduce_axes), keepdim=True).clamp_min_(1e-30)
    levels, lows, highs = _weight_constants(bits, rank, w.dtype, w.device)
    scales = torch.div(m.mul(2.0).unsqueeze(0), levels)         # [P, *m.shape], as eval's s
    values = torch.div(w.unsqueeze(0), scales).round_()
    if values.numel() <= SMALL_WEIGHTS:  # one clamp with tensor bounds: fewer ops where they dominate
        values.clamp_(lows, highs)
    else:
        _clamp_rows(values, lows.reshape(-1).tolist(), highs.reshape(-1).tolist())
    values.mul_(scales)                                          # Q_p·s_p
    if 0 in bits:
        scales[[p for p, b in enumerate(bits) if b == 0]] = 0.0
    value = torch.mul(values, _theta_like(theta, plan.axis, rank)).sum(0)  # θ [P, 1…] or [P, …C…]
    flat_scales = scales.reshape(len(bits), -1)
    scale = torch.mul(flat_scales, theta.reshape(len(bits), -1)).sum(0)
    return value, scale, values, flat_scales


def _contiguous(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.contiguous()


def weight_theta_grad(values: torch.Tensor, flat_scales: torch.Tensor, grad_value: torch.Tensor | None,
                      grad_scale: torch.Tensor | None, theta_shape: torch.Size, axis: int) -> torch.Tensor:
    """∂/∂θ of a weight mixture: ⟨g, Q_p·s_p⟩ per channel (or per layer) plus s_p through the
    scale output; ``values`` the saved Q_p·s_p stack [P, …], ``flat_scales`` s_p as [P, C or 1]."""
    count = values.shape[0]
    products = torch.zeros_like(values) if grad_value is None else torch.mul(values, grad_value.unsqueeze(0))
    if len(theta_shape) == 2:  # per channel: sum all but the channel axis
        dims = [d for d in range(1, products.dim()) if d != axis + 1]
        grad_theta = products.sum(dim=dims).reshape(count, -1)
    else:
        grad_theta = products.reshape(count, -1).sum(1)
    if grad_scale is not None:
        extra = torch.mul(flat_scales, grad_scale.reshape(1, -1))
        grad_theta = grad_theta + (extra if len(theta_shape) == 2 else extra.sum(1))
    return grad_theta.reshape(theta_shape)

#: Weight stacks up to this many values clamp with tensor bounds (one op, where op dispatch is
#: most of the cost); larger ones row by row with scalar bounds (faster per value).
SMALL_WEIGHTS = 2 ** 16


@functools.lru_cache(maxsize=256)
def _weight_constants(bits: tuple[int, ...], rank: int, dtype: torch.dtype, device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(2^b − 1 (≥ 1), qmin, qmax) per precision, shaped [P, 1, …] against a [P, *W.shape] stack
    (made once per plan: read-only, the step only reads them)."""
    shape = [len(bits)] + [1] * rank
    levels = torch.tensor([float(max(2 ** b - 1, 1)) for b in bits], dtype=dtype, device=device)
    lows = torch.tensor([float(-(2 ** (b - 1))) if b else 0.0 for b in bits], dtype=dtype, device=device)
    highs = torch.tensor([float(2 ** (b - 1) - 1) if b else 0.0 for b in bits], dtype=dtype, device=device)
    return levels.reshape(shape), lows.reshape(shape), highs.reshape(shape)


def _theta_like(theta: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    """θ [P] or [P, C] shaped to broadcast against a [P, *W.shape] stack."""
    shape = [theta.shape[0]] + [1] * rank
    if theta.dim() == 2:
        shape[axis + 1] = -1
    return theta.reshape(shape)


def _native_weights(weight: torch.Tensor, theta: torch.Tensor, plan: WeightPlan):
    """(the native weight kernel, the weight's layout) where it computes this mixture (float32 on
    the CPU, a layout it knows) and passed its check; None otherwise."""
    if not mps_native_weight.supports(weight, theta, len(plan.bits)) or theta.shape[0] != len(plan.bits):
        return None
    shape = mps_native_weight.layout(tuple(weight.shape), plan.axis, plan.reduce_axes, tuple(theta.shape))
    kernel = _checked_weight_native() if shape is not None else None
    return None if kernel is None else (kernel, shape)


def native_weights_available() -> bool:
    """Whether float32 weight mixtures on the CPU run the native kernel (else ATen)."""
    return _checked_weight_native() is not None


@functools.lru_cache(maxsize=None)
def _checked_weight_native() -> "mps_native_weight.NativeWeightMixture | None":
    """`mps_native_weight.load`'s kernel, once it has computed what the ATen path computes (the
    values and scales bit for bit, the θ gradients up to the order of their sums) on every layout
    it takes, with ties, zeros and a zero-bit precision; None otherwise."""
    kernel = mps_native_weight.load()
    if kernel is None:
        return None
    cases = [((6, 20), WeightPlan((0, 2, 4, 8), 0, (1,)), True),           # runs of 20 values
             ((5, 6, 3, 3), WeightPlan((1, 2, 8), 1, (0, 2, 3)), True),    # short runs (ConvTranspose)
             ((7, 6), WeightPlan((2, 8), 1, (0, 1)), True),                # per-tensor scale, θ per channel
             ((4, 5, 3, 3), WeightPlan((2, 4, 8), 0, (1, 2, 3)), False),   # per-layer θ, per-channel scales
             ((4, 5, 3, 3), WeightPlan((2, 4, 8), -1, (0, 1, 2, 3)), False)]
    return kernel if all(_weight_agrees(kernel, *case) for case in cases) else None


def _weight_agrees(kernel: "mps_native_weight.NativeWeightMixture", shape: tuple[int, ...], plan: WeightPlan,
                   per_channel: bool) -> bool:
    generator = torch.Generator().manual_seed(0)  # (the global random state stays as it was)
    w = (torch.randn(shape, generator=generator) * 0.5).clamp_(-1.4, 1.4)
    w.view(-1)[:8] = torch.tensor([1.5, -1.5, 0.5, -0.5, 1.0, 0.0, -0.0, 0.25])  # 2 and 1 bits: ties
    columns = shape[plan.axis] if per_channel else None
    theta = torch.softmax(torch.randn((len(plan.bits), columns) if columns else (len(plan.bits),),
                                      generator=generator), 0)
    value, scale, values, flat_scales = _weight_mixture(w, theta, plan)
    grad_value = torch.randn(value.shape, generator=generator)
    grad_scale = torch.randn(scale.shape, generator=generator)
    want = weight_theta_grad(values, flat_scales, grad_value, grad_scale, theta.shape, plan.axis)
    layout = mps_native_weight.layout(shape, plan.axis, plan.reduce_axes, tuple(theta.shape))
    got_value, got_scale, scales = kernel.forward(w, theta, plan.bits, layout)
    got = kernel.theta_grad(w, scales, grad_value, grad_scale, plan.bits, layout).reshape(theta.shape)
    return bool(torch.equal(value, got_value) and torch.equal(scale, got_scale)
                and torch.allclose(want, got, rtol=1e-5, atol=1e-6))


# -- activations --------------------------------------------------------------------------------
#: Bytes of one chunk of an activation mixture on the CPU. Each op of the mixture reads its chunk
#: again (about 35 ops a step): a chunk and its work buffers stay in cache where a whole 8 MiB
#: activation goes to memory every time. Measured (2-core EPYC, 1 MiB L2 a core, shared L3, a
#: MobileNetV2-style step): 2 MiB chunks beat whole tensors by ~25%; from 512 KiB down, op
#: dispatch costs more than the cache saves.
CHUNK_BYTES = 2 ** 21


class Scratch:
    """Reusable work buffers (one set per quantizer): freshly allocated large tensors cost page
    faults on every step, reused ones do not."""

    def __init__(self) -> None:
        self._buffers: dict = {}

    def get(self, numel: int, like: torch.Tensor, slot: int) -> torch.Tensor:
        """A flat buffer of ``numel`` elements with ``like``'s dtype and device."""
        key = (slot, numel, like.dtype, like.device)
        buffer = self._buffers.get(key)
        if buffer is None:
            if len(self._buffers) > 8:  # sizes changed (another batch size): start over
                self._buffers.clear()
            buffer = self._buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffer


class ActPlan(NamedTuple):
    """The fixed numbers of an activation mixture: the integer range (qmin, qmax) of each
    precision, whether the quantizer is signed (clip range [−c, c], else [0, c]), the smallest
    clip, and ``exact``: divide by s as eval does (else multiply by 1/s, which rounds the same
    except on exact ties and is faster)."""
    ranges: tuple[tuple[int, int], ...]
    signed: bool
    min_clip: float
    exact: bool = False


class _Precision(NamedTuple):
    weight: float   # θ_p
    clip: float     # max(c_p, min_clip)
    low: int        # qmin
    high: int       # qmax
    scale: float    # s_p = clip / qmax in float32, as the export


def _precisions(theta: torch.Tensor, clip: torch.Tensor, plan: ActPlan) -> tuple[list[_Precision], torch.Tensor]:
    """θ_p, c_p and s_p as Python numbers, s_p = max(c_p, min_clip) / qmax computed in float32
    (as `plinio_onnx.functions.mps.act_scale` and the export compute it), and the mixture's scale
    Σ_p θ_p·max(c_p, min_clip)/qmax_p as a tensor in ``clip``'s dtype: a few tensor ops and one
    read (the step runs this for every quantizer; each op's dispatch is most of its cost)."""
    float32 = torch.float32
    clips = clip.detach().to(float32).clamp_min(plan.min_clip)
    scales = clips / _act_highs(plan.ranges, float32, clip.device)
    if clip.dtype == float32:
        scale = torch.dot(theta.detach().to(float32), scales)
    else:
        scale = torch.dot(theta.detach().to(clip.dtype),
                          clip.detach().clamp_min(plan.min_clip) / _act_highs(plan.ranges, clip.dtype, clip.device))
    clip_values, scale_values = torch.stack((clips, scales)).tolist()
    rows = [_Precision(w, c, lo, hi, sp) for w, c, (lo, hi), sp
            in zip(theta.detach().tolist(), clip_values, plan.ranges, scale_values)]
    return rows, scale


def _chunks(*tensors: torch.Tensor):
    """Aligned flat slices of equally sized contiguous tensors, `CHUNK_BYTES` each on the CPU
    (one slice elsewhere: a GPU gains nothing from it and would launch more kernels)."""
    flats = [t.reshape(-1) for t in tensors]
    total = flats[0].numel()
    step = CHUNK_BYTES // flats[0].element_size() if flats[0].device.type == "cpu" else total
    step = max(step, 1)
    for start in range(0, max(total, 1), step):  # (an empty tensor: one empty slice)
        yield [f[start:start + step] for f in flats]


def _rounded(x: torch.Tensor, scale: float, exact: bool, out: torch.Tensor) -> torch.Tensor:
    """round(x/s) into ``out``."""
    if exact:
        torch.div(x, scale, out=out)
    else:
        torch.mul(x, 1.0 / scale, out=out)
    return out.round_()


def _integers(x: torch.Tensor, scale: float, lo: int, hi: int, exact: bool, out: torch.Tensor) -> torch.Tensor:
    """clamp(round(x/s), qmin, qmax) into ``out``."""
    return _rounded(x, scale, exact, out).clamp_(lo, hi)


class MixedActQuant(torch.autograd.Function):
    """(y, scale) = (Σ_p θ_p·Q_p(x)·s_p, Σ_p θ_p·max(c_p, min_clip)/qmax_p) with PACT gradients
    (see the module docstring); it saves only x. ``scale`` (for the bias quantizer) is computed
    in ``clip``'s dtype, as `plinio_onnx.functions.mps.act_scale`.

    Backward: ∂y/∂θ_p = Q_p(x)·s_p (recomputed inside the clip range); ∂y/∂x = Σ_p θ_p·1[x strictly inside p's clip
    range]; ∂y/∂c_p = θ_p·Σ g where x ≥ c_p (signed: minus Σ g where x ≤ −c_p): the clipped sums
    follow from the inside sums (what is neither inside nor at most 0 is at or above the clip).
    ∂scale/∂θ_p = max(c_p, min_clip)/qmax_p, ∂scale/∂c_p = θ_p/qmax_p where c_p ≥ min_clip.
    """

    @staticmethod
    def forward(ctx, x, theta, clip, plan: ActPlan, scratch: Scratch):
        x = x.contiguous()
        ctx.save_for_backward(x, theta, clip)
        ctx.set_materialize_grads(False)
        rows, scale = _precisions(theta, clip, plan)
        ctx.plan, ctx.scratch, ctx.rows = plan, scratch, rows
        y = torch.empty_like(x)
        native = _native(x, len(rows))
        if native is not None:
            _native_mixture(native, x, rows, plan.exact, y)
        else:
            for x_part, y_part in _chunks(x, y):
                _mixture(x_part, rows, plan.exact, scratch.get(x_part.numel(), x, 0), y_part)
        return y, scale.reshape(1)

    @staticmethod
    def backward(ctx, grad, grad_scale):
        x, theta, clip = ctx.saved_tensors
        rows = ctx.rows
        need_x, need_theta = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x, products, inside_sums, outside = None, [0.0] * len(rows), [0.0] * len(rows), 0.0
        if grad is not None:
            native = _native(x, len(rows))
            backward = _chunked_backward if native is None else functools.partial(_native_backward, native)
            grad_x, products, inside_sums, outside = backward(
                x, grad.contiguous(), rows, ctx.plan, ctx.scratch, need_x, need_theta)
        theta_grads = [prod * row.scale for prod, row in zip(products, rows)]
        clip_grads = [row.weight * (outside - s) for s, row in zip(inside_sums, rows)]
        if grad_scale is not None:  # (c_p below min_clip: the clamp passes no gradient)
            g = float(grad_scale)   # (the scale output has one element)
            clip_values = clip.detach().tolist()
            theta_grads = [t + g * max(c, ctx.plan.min_clip) / row.high
                           for t, c, row in zip(theta_grads, clip_values, rows)]
            clip_grads = [t + (g * row.weight / row.high if c >= ctx.plan.min_clip else 0.0)
                          for t, c, row in zip(clip_grads, clip_values, rows)]
        grad_theta = _like(theta_grads, theta) if need_theta else None
        return grad_x, grad_theta, _like(clip_grads, clip), None, None


@functools.lru_cache(maxsize=256)
def _act_highs(ranges: tuple[tuple[int, int], ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """qmax per precision as a tensor (made once per plan; read-only)."""
    return torch.tensor([float(high) for _, high in ranges], dtype=dtype, device=device)


def _mixture(x: torch.Tensor, rows: list[_Precision], exact: bool, work: torch.Tensor, y: torch.Tensor) -> None:
    """y = Σ_p θ_p·Q_p(x)·s_p, in place; precisions with θ_p = 0 (hard sampling) are left out."""
    first = True
    for row in rows:
        if row.weight == 0.0:
            continue
        _integers(x, row.scale, row.low, row.high, exact, work)
        if first:
            torch.mul(work, row.weight * row.scale, out=y)
            first = False
        else:
            y.add_(work, alpha=row.weight * row.scale)
    if first:  # (every θ_p = 0)
        y.zero_()


def _chunked_backward(x, grad, rows: list[_Precision], plan: ActPlan, scratch: Scratch, need_x: bool,
                      need_theta: bool):
    """(∂/∂x, [Σ g·Q_p], [Σ g inside p's range (signed: Σ g·sign(x))], Σ_{x>0} g (signed: Σ g·sign(x))),
    chunk by chunk; the sums add up in float64."""
    grad_x = torch.empty_like(x) if need_x else None
    products, inside_sums, outside = [0.0] * len(rows), [0.0] * len(rows), 0.0
    parts = _chunks(x, grad, grad_x) if need_x else ((a, b, None) for a, b in _chunks(x, grad))
    for x_part, g_part, gx_part in parts:
        n = x_part.numel()
        work, inside = scratch.get(n, x, 0), scratch.get(n, x, 1)
        sign = torch.sign(x_part, out=scratch.get(n, x, 2)) if plan.signed else None
        if plan.signed:
            outside += float(torch.dot(g_part, sign))
        else:
            outside += float(_inside(g_part, x_part, 0.0, float("inf"), inside).sum())
        for p, row in enumerate(rows):
            _inside(g_part, x_part, -row.clip if plan.signed else 0.0, row.clip, inside)
            inside_sums[p] += float(torch.dot(inside, sign) if plan.signed else inside.sum())
            if need_theta:  # Σ g·Q_p inside the clip range (no clamp needed there); outside: below
                _rounded(x_part, row.scale, plan.exact, work)
                products[p] += float(torch.dot(inside, work))
            if need_x:
                if p == 0:
                    torch.mul(inside, row.weight, out=gx_part)
                else:
                    gx_part.add_(inside, alpha=row.weight)
    # Outside the clip range Q_p is qmax_p (x ≥ c_p) or qmin_p (0, or −qmax_p when signed): the
    # sums over there are the clipped sums the clip gradient uses.
    products = [prod + row.high * (outside - s) for prod, s, row in zip(products, inside_sums, rows)]
    return grad_x, products, inside_sums, outside


# -- the native kernel (`plinio_onnx.functions.mps_native`) -----------------------------------------
def _native(x: torch.Tensor, precisions: int) -> "mps_native.NativeMixture | None":
    """The native kernel where it computes this mixture (float32 on the CPU) and passed its check."""
    return _checked_native() if mps_native.supports(x, precisions) else None


def native_available() -> bool:
    """Whether float32 activation mixtures on the CPU run the native kernel (else ATen)."""
    return _checked_native() is not None


@functools.lru_cache(maxsize=None)
def _checked_native() -> "mps_native.NativeMixture | None":
    """`mps_native.load`'s kernel, once it has computed what the ATen path computes on values
    that test the rounding (ties, signed zeros, the clips, beyond them); None otherwise."""
    kernel = mps_native.load()
    if kernel is None:
        return None
    checks = [(signed, exact) for signed in (False, True) for exact in (False, True)]
    return kernel if all(_agrees(kernel, signed, exact) for signed, exact in checks) else None


def _agrees(kernel: "mps_native.NativeMixture", signed: bool, exact: bool) -> bool:
    ranges = ((-1, 1), (-7, 7), (-127, 127)) if signed else ((0, 3), (0, 15), (0, 255))
    plan = ActPlan(ranges, signed, 1e-4, exact)
    rows = [_Precision(w, c, lo, hi, float(np.float32(c) / np.float32(hi)))
            for w, c, (lo, hi) in zip((0.25, 0.0, 0.75), (1.5, 2.0, 0.75), ranges)]
    halves = torch.arange(-300, 300, dtype=torch.float32) * 0.5
    special = torch.tensor([0.0, -0.0, 1.5, -1.5, 2.0, -2.0, 0.75, -0.75, 9.0, -9.0, 1e-8, -1e-8])
    generator = torch.Generator().manual_seed(0)  # (the global random state stays as it was)
    x = torch.cat([halves * rows[0].scale, halves * rows[2].scale, special,
                   torch.randn(1001, generator=generator) * 2])
    grad = torch.randn(x.shape, generator=generator)
    want_y, got_y = torch.empty_like(x), torch.empty_like(x)
    _mixture(x, rows, exact, torch.empty_like(x), want_y)
    _native_mixture(kernel, x, rows, exact, got_y)
    want = _chunked_backward(x, grad, rows, plan, Scratch(), True, True)
    got = _native_backward(kernel, x, grad, rows, plan, Scratch(), True, True)
    sums_agree = np.allclose(np.concatenate([want[1], want[2], [want[3]]]),
                             np.concatenate([got[1], got[2], [got[3]]]), rtol=1e-5, atol=1e-4)
    return bool(torch.equal(want_y, got_y) and torch.equal(want[0], got[0]) and sums_agree)


def _native_mixture(kernel: "mps_native.NativeMixture", x: torch.Tensor, rows: list[_Precision], exact: bool,
                    y: torch.Tensor) -> None:
    """`_mixture` over the whole of ``x`` in the native kernel."""
    active = [row for row in rows if row.weight != 0.0]
    if not active:
        y.zero_()
        return
    kernel.forward(x, y, [row.scale if exact else 1.0 / row.scale for row in active],
                   [row.weight * row.scale for row in active], [row.low for row in active],
                   [row.high for row in active], exact)


def _native_backward(kernel: "mps_native.NativeMixture", x, grad, rows: list[_Precision], plan: ActPlan,
                     scratch: Scratch, need_x: bool, need_theta: bool):
    """`_chunked_backward`'s results from the native kernel (one pass)."""
    grad_x = torch.empty_like(x) if need_x else None
    sums = kernel.backward(x, grad, grad_x, [row.scale if plan.exact else 1.0 / row.scale for row in rows],
                           [-row.clip if plan.signed else 0.0 for row in rows], [row.clip for row in rows],
                           [row.weight for row in rows], plan.exact, plan.signed)
    products = [prod + row.high * (sums.outside - s) for prod, s, row in zip(sums.products, sums.inside, rows)]
    return grad_x, products, sums.inside, sums.outside


def _inside(grad: torch.Tensor, x: torch.Tensor, low: float, high: float, out: torch.Tensor) -> torch.Tensor:
    """grad where low < x < high, else 0, into ``out`` (one fused op)."""
    return torch.ops.aten.hardtanh_backward.grad_input(grad, x, low, high, grad_input=out)


def _like(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)
