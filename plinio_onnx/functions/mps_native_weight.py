"""A native CPU kernel for MPS's weight mixture (`plinio_onnx.functions.mps_weights.MixedWeightQuant`).

The ATen path of a weight mixture is about 15 small ops forward and 6 backward; on the weights of
a small CNN (a few thousand values) nearly all of its ~100 µs each way is op dispatch. This
kernel makes one call each way: the forward computes the max, the scales, every precision's
Q_p·s_p and the weighted sum while a run of values sits in the L1 cache, the backward recomputes
Q_p·s_p from W (nothing [P, …] is saved) and adds up ⟨g, Q_p·s_p⟩ per channel.

The weight is seen as [outer, C, inner] around its channel axis (C = 1 where neither θ nor the
scale is per channel). Runs of ``inner`` values share one scale and one θ; where runs are short
(Gemm/MatMul weights, channels on axis 1: inner = 1) whole rows of C·inner values are taken at
once with the scale and θ of every value laid out beside them.

It runs on one thread and has no size cutoff: its one pass beats the ATen path's passes over
[P, …] stacks on two threads at every size measured, from a 3×3 conv's 144 values (op dispatch)
to a [4096, 4096] weight (memory traffic: ~0.1 s against ~0.7 s a step on a shared 2-core host).

Built and loaded like `plinio_onnx.functions.mps_native` (same compiler, flags, cache folder and
``PLINIO_ONNX_NATIVE=0`` switch; a library of its own).

What is bit for bit the ATen path's: the max of |W| (NaN included), the scales 2·max/(2^b − 1),
W/s_p (true division), rounding half to even, the clamp, the products Q_p·s_p·θ_p, and, for up to
4 precisions, the value and the scale output: both add ((0 + u_0) + u_1) + …, the order of ATen's
``sum(0)`` there (beyond 4 its order depends on where a value sits and on the thread split: close,
not equal); ∂W is the incoming gradient itself (straight-through). Only close: ∂θ, whose products
g·Q_p·s_p are ATen's but whose sums are taken in another order (float lanes of 16 flushed into
float64 every 256 values; in rows of short runs, float64 per position), and whose per-layer scale
term Σ_k s_p,k·g_k is added in float64.
"""
from __future__ import annotations

import ctypes
import functools
import os
import subprocess
from typing import NamedTuple

import torch

from . import mps_native

#: The most precisions one call takes.
MAX_PRECISIONS = 8
#: Runs (values sharing one scale and one θ) shorter than this are taken row by row instead.
SHORT_RUN = 16

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 256
#define LANES 16
#define SHORT_RUN %(short_run)d

/* ATen's clamp (min(max(v, lo), hi)): NaN stays NaN, signed zeros stay */
static inline float clamp_(float v, float lo, float hi) {
  v = v < lo ? lo : v;
  return hi < v ? hi : v;
}

/* Q·s = clamp(round(w / s), lo, hi) · s */
static inline float level(float w, float s, float lo, float hi) {
  return clamp_(nearbyintf(w / s), lo, hi) * s;
}

/* |x| as bits (sign cleared): for floats these order as their values, with NaN above infinity,
   so an integer max (which vectorizes; a float max that keeps NaN does not) is ATen's amax of
   |x|, NaN included */
static inline uint32_t magnitude(const float *x) {
  uint32_t u;
  memcpy(&u, x, sizeof u);
  return u & 0x7fffffffu;
}

/* m[c] = max(max |w| over channel c (cs == C) or over the tensor (cs == 1), 1e-30) */
static int maxima(const float *w, int64_t outer, int64_t C, int64_t inner, int64_t cs, float *m) {
  int64_t L = inner < SHORT_RUN && C > 1 ? C * inner : 0;  /* short runs: rows of C runs at once */
  uint32_t *bits = calloc(cs + L, sizeof(uint32_t));
  if (!bits) return -1;
  uint32_t *row = bits + cs;
  for (int64_t o = 0; o < outer; o++) {
    if (L) {
      for (int64_t j = 0; j < L; j++) { uint32_t u = magnitude(w + o * L + j); row[j] = u > row[j] ? u : row[j]; }
      continue;
    }
    for (int64_t c = 0; c < C; c++) {
      const float *run = w + (o * C + c) * inner;
      uint32_t best = bits[cs == 1 ? 0 : c];
      for (int64_t i = 0; i < inner; i++) { uint32_t u = magnitude(run + i); best = u > best ? u : best; }
      bits[cs == 1 ? 0 : c] = best;
    }
  }
  for (int64_t j = 0; j < L; j++) {
    uint32_t *best = bits + (cs == 1 ? 0 : j / inner);
    *best = row[j] > *best ? row[j] : *best;
  }
  for (int64_t c = 0; c < cs; c++) {
    memcpy(m + c, bits + c, sizeof(float));
    m[c] = m[c] < 1e-30f ? 1e-30f : m[c];
  }
  free(bits);
  return 0;
}

/* sum of a[i]*b[i] in float lanes */
static double lane_dot(const float *a, const float *b, int64_t m) {
  float lanes[LANES] = {0};
  int64_t i = 0;
  for (; i + LANES <= m; i += LANES) for (int j = 0; j < LANES; j++) lanes[j] += a[i + j] * b[i + j];
  double total = 0.0;
  for (int j = 0; j < LANES; j++) total += lanes[j];
  for (; i < m; i++) total += a[i] * b[i];
  return total;
}

/* scale and θ of every value of a row of C runs of `inner` values (short runs) */
static void spread(const float *per_c, int64_t every_c, int64_t C, int64_t inner, float *row) {
  for (int64_t c = 0; c < C; c++)
    for (int64_t i = 0; i < inner; i++) row[c * inner + i] = per_c[every_c ? c : 0];
}

/* scales: [2][P][cs], the quantizing scales 2m/levels, then the output scales (0 where b = 0);
   y = sum_p theta_p * Q_p * s_p; scale_out[k] = sum_p out_scale[p][k] * theta[p][k] (k < K) */
int mps_weight_forward(const float *w, float *y, float *scales, float *scale_out, int64_t outer, int64_t C,
                       int64_t inner, int64_t cs, int64_t ct, int P, const float *levels, const float *lo,
                       const float *hi, const float *theta) {
  float *qs = scales, *os = scales + P * cs;
  if (maxima(w, outer, C, inner, cs, os)) return -1;
  for (int p = 0; p < P; p++)  /* (os's first row holds m until the next loop) */
    for (int64_t c = 0; c < cs; c++) qs[p * cs + c] = (os[c] * 2.0f) / levels[p];
  for (int p = 0; p < P; p++)
    for (int64_t c = 0; c < cs; c++) os[p * cs + c] = lo[p] == 0.0f && hi[p] == 0.0f ? 0.0f : qs[p * cs + c];
  int64_t K = cs > ct ? cs : ct;
  for (int64_t k = 0; k < K; k++) {
    float total = 0.0f;
    for (int p = 0; p < P; p++) total += os[p * cs + (cs == 1 ? 0 : k)] * theta[p * ct + (ct == 1 ? 0 : k)];
    scale_out[k] = total;
  }
  if (inner >= SHORT_RUN || C == 1) {
    for (int64_t o = 0; o < outer; o++)
      for (int64_t c = 0; c < C; c++) {
        const float *run = w + (o * C + c) * inner;
        float *out = y + (o * C + c) * inner;
        for (int p = 0; p < P; p++) {
          const float s = qs[p * cs + (cs == 1 ? 0 : c)], t = theta[p * ct + (ct == 1 ? 0 : c)];
          const float l = lo[p], h = hi[p];
          if (p == 0) for (int64_t i = 0; i < inner; i++) out[i] = 0.0f + level(run[i], s, l, h) * t;
          else for (int64_t i = 0; i < inner; i++) out[i] = out[i] + level(run[i], s, l, h) * t;
        }
      }
    return 0;
  }
  int64_t L = C * inner;
  float *rows = malloc(sizeof(float) * 2 * P * L);
  if (!rows) return -1;
  for (int p = 0; p < P; p++) {
    spread(qs + p * cs, cs > 1, C, inner, rows + 2 * p * L);
    spread(theta + p * ct, ct > 1, C, inner, rows + (2 * p + 1) * L);
  }
  for (int64_t o = 0; o < outer; o++) {
    const float *row = w + o * L;
    float *out = y + o * L;
    for (int p = 0; p < P; p++) {
      const float *s = rows + 2 * p * L, *t = rows + (2 * p + 1) * L;
      const float l = lo[p], h = hi[p];
      if (p == 0) for (int64_t j = 0; j < L; j++) out[j] = 0.0f + level(row[j], s[j], l, h) * t[j];
      else for (int64_t j = 0; j < L; j++) out[j] = out[j] + level(row[j], s[j], l, h) * t[j];
    }
  }
  free(rows);
  return 0;
}

/* grad_theta[p][ct] = sum of g * Q_p * s_p over channel c (ct == C) or the tensor, plus the scale
   output's part: out_scale[p][c] * gs[c] (ct == C), sum_k out_scale[p][k] * gs[k] (ct == 1).
   g or gs NULL: no such gradient. */
int mps_weight_backward(const float *w, const float *g, const float *scales, const float *gs, int64_t outer,
                        int64_t C, int64_t inner, int64_t cs, int64_t ct, int P, const float *lo, const float *hi,
                        float *grad_theta) {
  const float *qs = scales, *os = scales + P * cs;
  double *sums = calloc(P * C, sizeof(double));
  if (!sums) return -1;
  if (g && (inner >= SHORT_RUN || C == 1)) {
    float v[BLOCK];
    for (int64_t o = 0; o < outer; o++)
      for (int64_t c = 0; c < C; c++) {
        const float *run = w + (o * C + c) * inner, *grun = g + (o * C + c) * inner;
        for (int p = 0; p < P; p++) {
          const float s = qs[p * cs + (cs == 1 ? 0 : c)], l = lo[p], h = hi[p];
          for (int64_t b = 0; b < inner; b += BLOCK) {
            int64_t m = inner - b < BLOCK ? inner - b : BLOCK;
            for (int64_t i = 0; i < m; i++) v[i] = level(run[b + i], s, l, h);
            sums[p * C + c] += lane_dot(grun + b, v, m);
          }
        }
      }
  } else if (g) {
    int64_t L = C * inner;
    float *rows = malloc(sizeof(float) * (P + 1) * L);
    double *acc = calloc(P * L, sizeof(double));
    if (!rows || !acc) { free(rows); free(acc); free(sums); return -1; }
    for (int p = 0; p < P; p++) spread(qs + p * cs, cs > 1, C, inner, rows + p * L);
    float *v = rows + P * L;
    for (int64_t o = 0; o < outer; o++) {
      const float *row = w + o * L, *grow = g + o * L;
      for (int p = 0; p < P; p++) {
        const float *s = rows + p * L;
        const float l = lo[p], h = hi[p];
        double *a = acc + p * L;
        for (int64_t j = 0; j < L; j++) v[j] = level(row[j], s[j], l, h) * grow[j];
        for (int64_t j = 0; j < L; j++) a[j] += v[j];
      }
    }
    for (int p = 0; p < P; p++)
      for (int64_t c = 0; c < C; c++)
        for (int64_t i = 0; i < inner; i++) sums[p * C + c] += acc[p * L + c * inner + i];
    free(rows);
    free(acc);
  }
  for (int p = 0; p < P; p++) {
    if (ct > 1) {
      for (int64_t c = 0; c < C; c++)
        grad_theta[p * C + c] = (float)sums[p * C + c] + (gs ? os[p * cs + (cs == 1 ? 0 : c)] * gs[c] : 0.0f);
    } else {
      double total = 0.0, extra = 0.0;
      for (int64_t c = 0; c < C; c++) total += sums[p * C + c];
      if (gs) for (int64_t k = 0; k < cs; k++) extra += os[p * cs + k] * gs[k];
      grad_theta[p] = (float)total + (float)extra;
    }
  }
  free(sums);
  return 0;
}
""" % {"short_run": SHORT_RUN}


class WeightLayout(NamedTuple):
    """A weight seen as [outer, channels, inner]; ``scale_channels`` (C or 1) scales and
    ``theta_channels`` (C or 1) θ columns; the scale output has max of the two entries."""
    outer: int
    channels: int
    inner: int
    scale_channels: int
    theta_channels: int


@functools.lru_cache(maxsize=512)
def layout(shape: tuple[int, ...], axis: int, reduce_axes: tuple[int, ...], theta_shape: tuple[int, ...]
           ) -> WeightLayout | None:
    """The layout the kernel computes a mixture of, or None where it does not (a reduction other
    than per channel on ``axis`` or per tensor, θ columns other than the channels, an empty weight,
    a rank below 2: no layer has one)."""
    rank = len(shape)
    numel = 1
    for d in shape:
        numel *= d
    if numel == 0 or rank < 2 or not -1 <= axis < rank or len(theta_shape) not in (1, 2):
        return None
    reduced = {a % rank for a in reduce_axes if -rank <= a < rank}
    if len(reduced) != len(reduce_axes):
        return None
    others = set(range(rank)) - {axis}
    per_tensor, per_channel_scale = reduced == set(range(rank)), axis >= 0 and reduced == others and bool(others)
    per_channel_theta = len(theta_shape) == 2
    if not (per_tensor or per_channel_scale) or (per_channel_theta and (axis < 0 or theta_shape[1] != shape[axis])):
        return None
    if not (per_channel_scale or per_channel_theta):
        return WeightLayout(1, 1, numel, 1, 1)
    outer = 1
    for d in shape[:axis]:
        outer *= d
    channels = shape[axis]
    return WeightLayout(outer, channels, numel // max(outer * channels, 1),
                        channels if per_channel_scale else 1, channels if per_channel_theta else 1)


@functools.lru_cache(maxsize=64)
def _constants(bits: tuple[int, ...]):
    """(2^b − 1 (≥ 1), qmin, qmax) per precision as C float arrays (read-only)."""
    floats = ctypes.c_float * len(bits)
    return (floats(*[float(max(2 ** b - 1, 1)) for b in bits]),
            floats(*[float(-(2 ** (b - 1))) if b else 0.0 for b in bits]),
            floats(*[float(2 ** (b - 1) - 1) if b else 0.0 for b in bits]))


def _address(tensor: torch.Tensor | None) -> int | None:
    return tensor.data_ptr() if tensor is not None else None


class NativeWeightMixture:
    """The loaded kernel: `forward` and `theta_grad` on contiguous float32 CPU tensors."""

    def __init__(self, library: ctypes.CDLL) -> None:
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        self._forward = library.mps_weight_forward
        self._forward.restype = ctypes.c_int
        self._forward.argtypes = [pointer] * 4 + [size] * 5 + [ctypes.c_int] + [pointer] * 4
        self._backward = library.mps_weight_backward
        self._backward.restype = ctypes.c_int
        self._backward.argtypes = [pointer] * 4 + [size] * 5 + [ctypes.c_int] + [pointer] * 3

    def forward(self, weight: torch.Tensor, theta: torch.Tensor, bits: tuple[int, ...], shape: WeightLayout
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Σ_p θ_p·Q_p·s_p, Σ_p θ_p·s_p, the scales [2, P, scale channels]: quantizing ones, then
        the output ones, 0 where b = 0)."""
        count = len(bits)
        value = torch.empty_like(weight)  # (new_empty: on the weight's device whatever torch's default)
        scales = weight.new_empty((2, count, shape.scale_channels))
        scale = weight.new_empty(max(shape.scale_channels, shape.theta_channels))
        levels, lows, highs = _constants(bits)
        status = self._forward(weight.data_ptr(), value.data_ptr(), scales.data_ptr(), scale.data_ptr(),
                               shape.outer, shape.channels, shape.inner, shape.scale_channels,
                               shape.theta_channels, count, levels, lows, highs, theta.data_ptr())
        if status:
            raise MemoryError("the weight mixture's kernel could not allocate its work rows")
        return value, scale, scales

    def theta_grad(self, weight: torch.Tensor, scales: torch.Tensor, grad_value: torch.Tensor | None,
                   grad_scale: torch.Tensor | None, bits: tuple[int, ...], shape: WeightLayout) -> torch.Tensor:
        """∂/∂θ [P, θ columns]: ⟨g, Q_p·s_p⟩ per channel (or per layer) plus s_p·∂scale."""
        _, lows, highs = _constants(bits)
        grad = weight.new_empty((len(bits), shape.theta_channels))
        status = self._backward(weight.data_ptr(), _address(grad_value), scales.data_ptr(), _address(grad_scale),
                                shape.outer, shape.channels, shape.inner, shape.scale_channels,
                                shape.theta_channels, len(bits), lows, highs, grad.data_ptr())
        if status:
            raise MemoryError("the weight mixture's kernel could not allocate its sums")
        return grad


def supports(weight: torch.Tensor, theta: torch.Tensor, precisions: int) -> bool:
    """Whether the kernel computes a mixture of ``precisions`` of ``weight`` with ``theta``."""
    return (weight.dtype == torch.float32 and theta.dtype == torch.float32 and weight.device.type == "cpu"
            and theta.device.type == "cpu" and 1 <= precisions <= MAX_PRECISIONS)


@functools.lru_cache(maxsize=None)
def load() -> NativeWeightMixture | None:
    """The kernel, built and loaded once per process; None where it is turned off or cannot be built."""
    if os.environ.get(mps_native.ENABLE_ENV, "1").strip() == "0":
        return None
    try:
        return NativeWeightMixture(ctypes.CDLL(str(mps_native.build(source=SOURCE, stem="mps_weight"))))
    except (OSError, subprocess.SubprocessError, AttributeError):
        return None
