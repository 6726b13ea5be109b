"""MPS's training-mode activation mixture Σ_p θ_p·Q_p(x) as a custom autograd function over all
precisions (the weight mixture: `plinio_onnx.functions.mps_weights`).

Written as a chain of small ops per precision, a quantizer's step spends most of its time in op
dispatch, autograd bookkeeping and memory traffic.

`MixedActQuant` (PACT): activations are large tensors, so the work goes chunk by chunk (each
chunk stays in the core's cache while every precision is computed on it, forward and backward)
over reused buffers, and only x is saved (the values are recomputed in the backward, not stored
once per precision). In float32 on the CPU the native kernel (`plinio_onnx.functions.mps_native`)
computes the same in one pass each way, once it has passed its check against these ops.

Values are those of the per-precision ops (same scales, rounding half to even, same clamps).
The plain-autograd references live in tests/test_mps_train.py.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch

from . import mps_native


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
    Σ_p θ_p·s_p [1] (`mixture_scale`)."""
    weights, raw = theta.detach().tolist(), clip.detach().tolist()
    clips = np.maximum(np.asarray(raw, np.float32), np.float32(plan.min_clip))
    scales = clips / np.asarray([hi for _, hi in plan.ranges], np.float32)
    rows = [_Precision(w, c, lo, hi, s) for w, c, (lo, hi), s
            in zip(weights, clips.tolist(), plan.ranges, scales.tolist())]
    if theta.dtype == clip.dtype == torch.float32:
        total = np.float32(0.0)
        for weight, scale in zip(weights, scales):
            total = total + np.float32(weight) * scale
        return rows, torch.tensor([total], dtype=torch.float32, device=clip.device)
    highs = _act_highs(plan.ranges, clip.dtype, clip.device)
    return rows, torch.dot(theta.detach().to(clip.dtype), clip.detach().clamp_min(plan.min_clip) / highs).reshape(1)


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
    (see the module docstring); it saves only x. ``scale`` (for the bias quantizer): s_p as
    `plinio_onnx.functions.mps.act_scale` computes it, Σ_p θ_p·s_p added in float32 in order
    (θ and the clips float32: the same on every path, native, ATen and device), else a dot in
    ``clip``'s dtype.

    Backward: ∂y/∂θ_p = Q_p(x)·s_p (recomputed inside the clip range); ∂y/∂x = Σ_p θ_p·1[x strictly
    inside p's clip range]; ∂y/∂c_p = θ_p·Σ g where x ≥ c_p (signed: minus Σ g where x ≤ −c_p):
    the clipped sums follow from the inside sums (what is neither inside nor at most 0 is at or
    above the clip).
    ∂scale/∂θ_p = max(c_p, min_clip)/qmax_p, ∂scale/∂c_p = θ_p/qmax_p where c_p ≥ min_clip.
    """

    @staticmethod
    def forward(ctx, x, theta, clip, plan: ActPlan, scratch: Scratch):
        x = x.contiguous()
        ctx.save_for_backward(x, theta, clip)
        ctx.set_materialize_grads(False)
        ctx.plan, ctx.scratch = plan, scratch
        ctx.native = _native_quantizer(x, theta, clip, plan)
        if ctx.native is not None:
            return ctx.native.quant_forward(x, theta, clip, _quant_plan(plan))
        y, scale, ctx.rows = _aten_forward(x, theta, clip, plan, scratch)
        return y, scale

    @staticmethod
    def backward(ctx, grad, grad_scale):
        x, theta, clip = ctx.saved_tensors
        need_x, need_theta = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad = None if grad is None else grad.contiguous()
        scale_grad = None if grad_scale is None else float(grad_scale)   # (the scale output has one element)
        if ctx.native is not None:
            grad_x, grad_theta, grad_clip = ctx.native.quant_backward(x, grad, scale_grad, theta, clip,
                                                                      _quant_plan(ctx.plan), need_x)
        else:
            grad_x, grad_theta, grad_clip = _aten_backward(x, theta, clip, ctx.rows, ctx.plan, ctx.scratch, grad,
                                                           scale_grad, need_x, need_theta)
        return grad_x, grad_theta if need_theta else None, grad_clip, None, None


def _aten_forward(x: torch.Tensor, theta: torch.Tensor, clip: torch.Tensor, plan: ActPlan, scratch: Scratch):
    """`MixedActQuant`'s forward in ATen ops: (y, scale, the rows)."""
    rows, scale = _precisions(theta, clip, plan)
    y = torch.empty_like(x)
    for x_part, y_part in _chunks(x, y):
        _mixture(x_part, rows, plan.exact, scratch.get(x_part.numel(), x, 0), y_part)
    return y, scale, rows


def _aten_backward(x, theta, clip, rows: list[_Precision], plan: ActPlan, scratch: Scratch,
                   grad: torch.Tensor | None, grad_scale: float | None, need_x: bool, need_theta: bool):
    """`MixedActQuant`'s backward in ATen ops: (∂x, ∂θ, ∂clip)."""
    grad_x, products, inside_sums, outside = None, [0.0] * len(rows), [0.0] * len(rows), 0.0
    if grad is not None:
        grad_x, products, inside_sums, outside = _chunked_backward(x, grad, rows, plan, scratch, need_x, need_theta)
    theta_grads = [prod * row.scale for prod, row in zip(products, rows)]
    clip_grads = [row.weight * (outside - s) for s, row in zip(inside_sums, rows)]
    if grad_scale is not None:  # (c_p below min_clip: the clamp passes no gradient)
        g = grad_scale
        clip_values = clip.detach().tolist()
        theta_grads = [t + g * max(c, plan.min_clip) / row.high for t, c, row in zip(theta_grads, clip_values, rows)]
        clip_grads = [t + (g * row.weight / row.high if c >= plan.min_clip else 0.0)
                      for t, c, row in zip(clip_grads, clip_values, rows)]
    return grad_x, _like(theta_grads, theta), _like(clip_grads, clip)


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
    """Whether the kernel's whole quantizer computes what `_aten_forward` and `_aten_backward`
    compute: y, the scale and ∂x bit for bit, ∂θ and ∂clip up to the order of their sums."""
    ranges = ((-1, 1), (-7, 7), (-127, 127)) if signed else ((0, 3), (0, 15), (0, 255))
    plan = ActPlan(ranges, signed, 1e-4, exact)
    theta, clip = torch.tensor([0.25, 0.0, 0.75]), torch.tensor([1.5, 2.0, 0.75])
    scales = [float(np.float32(c) / np.float32(hi)) for c, (_, hi) in zip(clip.tolist(), ranges)]
    halves = torch.arange(-300, 300, dtype=torch.float32) * 0.5
    special = torch.tensor([0.0, -0.0, 1.5, -1.5, 2.0, -2.0, 0.75, -0.75, 9.0, -9.0, 1e-8, -1e-8])
    generator = torch.Generator().manual_seed(0)  # (the global random state stays as it was)
    x = torch.cat([halves * scales[0], halves * scales[2], special, torch.randn(1001, generator=generator) * 2])
    grad = torch.randn(x.shape, generator=generator)
    want_y, want_scale, rows = _aten_forward(x, theta, clip, plan, Scratch())
    got_y, got_scale = kernel.quant_forward(x, theta, clip, _quant_plan(plan))
    want = _aten_backward(x, theta, clip, rows, plan, Scratch(), grad, 0.5, True, True)
    got = kernel.quant_backward(x, grad, 0.5, theta, clip, _quant_plan(plan), True)
    return bool(torch.equal(want_y, got_y) and torch.equal(want_scale, got_scale) and torch.equal(want[0], got[0])
                and all(torch.allclose(a, b, rtol=1e-5, atol=1e-4) for a, b in zip(want[1:], got[1:])))


def _native_quantizer(x: torch.Tensor, theta: torch.Tensor, clip: torch.Tensor, plan: ActPlan
                      ) -> "mps_native.NativeMixture | None":
    """The native kernel where it runs this whole quantizer: x, θ and the clips contiguous float32
    on the CPU (`_native`); None otherwise."""
    if theta.dtype != torch.float32 or clip.dtype != torch.float32 or not (theta.is_cpu and clip.is_cpu) \
            or not (theta.is_contiguous() and clip.is_contiguous()):
        return None
    return _native(x, len(plan.ranges))


@functools.lru_cache(maxsize=256)
def _quant_plan(plan: ActPlan) -> "mps_native.QuantPlan":
    """``plan``'s numbers as the kernel takes them (made once per plan)."""
    return mps_native.QuantPlan(plan.ranges, plan.signed, plan.min_clip, plan.exact)


def _inside(grad: torch.Tensor, x: torch.Tensor, low: float, high: float, out: torch.Tensor) -> torch.Tensor:
    """grad where low < x < high, else 0, into ``out`` (one fused op)."""
    return torch.ops.aten.hardtanh_backward.grad_input(grad, x, low, high, grad_input=out)


def _like(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)
