"""A native CPU kernel for MPS's activation mixture (`plinio_onnx.functions.mps_train`).

The ATen path of the mixture makes about 12 passes over an activation in the forward and 20 in
the backward (a multiply, a round, a clamp and an accumulation per precision; masks, sums and
dots in the backward), and each pass costs about as much as the others. This kernel makes one
pass each way: every 256 values are quantized at every precision while they sit in the L1 cache.

It is C without any torch header, built on first use with the system's C compiler (``$CC``, else
``cc``, ``gcc`` or ``clang``) into the per-user cache ``$XDG_CACHE_HOME/plinio_onnx`` (else
``~/.cache/plinio_onnx``), and loaded with ctypes: nothing is downloaded, and a machine without
a compiler (or a failed build, or ``PLINIO_ONNX_NATIVE=0`` in the environment) simply runs the
ATen path. `plinio_onnx.functions.mps_train` also checks the loaded kernel against the ATen path
once per process before it uses it.

Values are those of the ATen path op for op: x·(1/s) (or x/s when exact) rounded half to even,
clamped with the same NaN and signed-zero behaviour, accumulated as y = v_0·a_0 then
y = fma(v_p, a_p, y) (what ``add_`` with ``alpha`` computes); the input gradient the same way.
Only the sums (inside sums, Σ g·Q_p, the outside sum) are added in another order: float lanes
of 16 values, blocks of 256 flushed into float64 (the ATen path: float32 chunk sums).

The calls take the whole quantizer (`NativeMixture.quant_forward`, `quant_backward`): θ and the
raw clips are read from their tensors and the per-precision numbers (clip, scale, 1/s, θ·s, the
scale output, the θ and clip gradients) computed in C as the ATen path computes them in Python,
because on a small layer that Python and its tensor ops cost more than the pass itself.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

import torch

from ..atomic import atomic_path

#: The most precisions one call takes (the backward's sums live on the C stack).
MAX_PRECISIONS = 8
#: Set to ``0`` to keep the ATen path.
ENABLE_ENV = "PLINIO_ONNX_NATIVE"
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=c99", "-shared", "-fPIC")

SOURCE = r"""
#include <math.h>
#include <stdint.h>

#define BLOCK 256
#define LANES 16
#define MAX_P %(max_p)d

/* One precision of the forward over m values: v = clamp(round(x * q), lo, hi) (exact: x / q), with
   ATen's clamp (NaN stays NaN, -0 below a bound of +0 becomes +0: a bound wins on equality);
   y = v * a (first) else fma(v, a, y). The flags are constants where it is called, so each
   combination compiles to its own vectorized loop. */
static inline void forward_one(const float *x, float *y, int64_t m, float q, float a, float lo, float hi,
                               const int exact, const int first) {
  for (int64_t i = 0; i < m; i++) {
    float v = nearbyintf(exact ? x[i] / q : x[i] * q);
    v = v <= lo ? lo : v;
    v = v >= hi ? hi : v;
    y[i] = first ? v * a : fmaf(v, a, y[i]);
  }
}

/* y = sum_p a[p] * clamp(round(x * q[p]), lo[p], hi[p])  (exact: x / q[p]), block by block */
void mps_act_forward(const float *x, float *y, int64_t n, int P, const float *q, const float *a,
                     const float *lo, const float *hi, int exact) {
  for (int64_t b = 0; b < n; b += BLOCK) {
    int64_t m = n - b < BLOCK ? n - b : BLOCK;
    for (int p = 0; p < P; p++) {
#define FORWARD(E, F) forward_one(x + b, y + b, m, q[p], a[p], lo[p], hi[p], E, F)
      switch (exact * 2 + (p == 0)) {
        case 0: FORWARD(0, 0); break;
        case 1: FORWARD(0, 1); break;
        case 2: FORWARD(1, 0); break;
        default: FORWARD(1, 1);
      }
#undef FORWARD
    }
  }
}

/* sum of a[i]*b[i] (b NULL: of a[i]) in float lanes */
static double lane_sum(const float *a, const float *b, int64_t m) {
  float lanes[LANES] = {0};
  int64_t i = 0;
  if (b) for (; i + LANES <= m; i += LANES) for (int j = 0; j < LANES; j++) lanes[j] += a[i + j] * b[i + j];
  else for (; i + LANES <= m; i += LANES) for (int j = 0; j < LANES; j++) lanes[j] += a[i + j];
  double total = 0.0;
  for (int j = 0; j < LANES; j++) total += lanes[j];
  for (; i < m; i++) total += b ? a[i] * b[i] : a[i];
  return total;
}

/* lane_sum(inside, round(x * q)) (exact: x / q; unclamped: the products inside the clip range)
   without storing the rounded values */
static double product_sum(const float *inside, const float *x, int64_t m, float q, int exact) {
  float lanes[LANES] = {0};
  int64_t i = 0;
  if (exact)
    for (; i + LANES <= m; i += LANES)
      for (int j = 0; j < LANES; j++) lanes[j] += inside[i + j] * nearbyintf(x[i + j] / q);
  else
    for (; i + LANES <= m; i += LANES)
      for (int j = 0; j < LANES; j++) lanes[j] += inside[i + j] * nearbyintf(x[i + j] * q);
  double total = 0.0;
  for (int j = 0; j < LANES; j++) total += lanes[j];
  for (; i < m; i++) total += inside[i] * nearbyintf(exact ? x[i] / q : x[i] * q);
  return total;
}

/* inside_p = g where low[p] < x < high[p], else 0 (hardtanh_backward).
   out[p] = sum inside_p (signed: * sign x), out[P + p] = sum inside_p * round(x * q[p]),
   out[2P] = sum g where x > 0 (signed: sum g * sign x);
   gx (NULL: not wanted) = inside_0 * theta[0], then fma(inside_p, theta[p], gx). */
void mps_act_backward(const float *x, const float *g, float *gx, int64_t n, int P, const float *q,
                      const float *low, const float *high, const float *theta, int exact, int is_signed,
                      double *out) {
  double total[2 * MAX_P + 1] = {0};
  float inside[BLOCK], sign[BLOCK];
  for (int64_t b = 0; b < n; b += BLOCK) {
    int64_t m = n - b < BLOCK ? n - b : BLOCK;
    const float *xb = x + b, *gb = g + b;
    if (is_signed) {
      for (int64_t i = 0; i < m; i++) sign[i] = (float)((0.0f < xb[i]) - (xb[i] < 0.0f));
      total[2 * P] += lane_sum(gb, sign, m);
    } else {
      for (int64_t i = 0; i < m; i++) inside[i] = (xb[i] <= 0.0f || xb[i] >= INFINITY) ? 0.0f : gb[i];
      total[2 * P] += lane_sum(inside, 0, m);
    }
    for (int p = 0; p < P; p++) {
      const float lo = low[p], hi = high[p], t = theta[p];
      for (int64_t i = 0; i < m; i++) inside[i] = (xb[i] <= lo || xb[i] >= hi) ? 0.0f : gb[i];
      total[p] += lane_sum(inside, is_signed ? sign : 0, m);
      total[P + p] += product_sum(inside, xb, m, q[p], exact);
      if (gx) {
        float *gxb = gx + b;
        if (p == 0) for (int64_t i = 0; i < m; i++) gxb[i] = inside[i] * t;
        else for (int64_t i = 0; i < m; i++) gxb[i] = fmaf(inside[i], t, gxb[i]);
      }
    }
  }
  for (int k = 0; k < 2 * P + 1; k++) out[k] = total[k];
}

/* The whole quantizer from theta and the raw clips (the ATen path's Python numbers, computed here):
   clip_p = max(clip[p], min_clip) and s_p = clip_p / qmax_p in float32; 1/s_p and theta_p * s_p
   in double, then rounded to float (what a float argument of the calls above receives). */
static void rows(int P, const float *clip, const float *qmax, float min_clip, float *clips, float *scales) {
  for (int p = 0; p < P; p++) {
    float c = clip[p];
    clips[p] = (c > min_clip || c != c) ? c : min_clip;
    scales[p] = clips[p] / qmax[p];
  }
}

/* y = the mixture over the precisions with theta_p != 0 (none: 0); *scale = sum_p theta_p * s_p
   added in float32, in order. */
void mps_act_quant_forward(const float *x, float *y, int64_t n, int P, const float *theta, const float *clip,
                           const float *qmin, const float *qmax, float min_clip, int exact, float *scale) {
  float clips[MAX_P], scales[MAX_P], q[MAX_P], a[MAX_P], lo[MAX_P], hi[MAX_P];
  rows(P, clip, qmax, min_clip, clips, scales);
  float total = 0.0f;
  int k = 0;
  for (int p = 0; p < P; p++) {
    total = total + theta[p] * scales[p];
    if (theta[p] == 0.0f) continue;
    q[k] = exact ? scales[p] : (float)(1.0 / (double)scales[p]);
    a[k] = (float)((double)theta[p] * (double)scales[p]);
    lo[k] = qmin[p];
    hi[k] = qmax[p];
    k++;
  }
  *scale = total;
  if (k) mps_act_forward(x, y, n, k, q, a, lo, hi, exact);
  else for (int64_t i = 0; i < n; i++) y[i] = 0.0f;
}

/* The gradients of theta and the raw clips (double, rounded to float at the end), from the sums of
   mps_act_backward (g NULL: all 0) and, with has_scale, the gradient of the scale output:
   d theta_p = (P_p + qmax_p (out - in_p)) s_p [+ gs max(c_p, min_clip_d) / qmax_p],
   d c_p = theta_p (out - in_p) [+ gs theta_p / qmax_p where c_p >= min_clip_d]. */
void mps_act_quant_backward(const float *x, const float *g, float *gx, int64_t n, int P, const float *theta,
                            const float *clip, const float *qmax, float min_clip, double min_clip_d, int exact,
                            int is_signed, int has_scale, double gs, float *grad_theta, float *grad_clip) {
  float clips[MAX_P], scales[MAX_P], q[MAX_P], low[MAX_P];
  double sums[2 * MAX_P + 1] = {0};
  rows(P, clip, qmax, min_clip, clips, scales);
  for (int p = 0; p < P; p++) {
    q[p] = exact ? scales[p] : (float)(1.0 / (double)scales[p]);
    low[p] = is_signed ? -clips[p] : 0.0f;
  }
  if (g) mps_act_backward(x, g, gx, n, P, q, low, clips, theta, exact, is_signed, sums);
  for (int p = 0; p < P; p++) {
    double clipped = sums[2 * P] - sums[p], high = (double)qmax[p], c = (double)clip[p];
    double dt = (sums[P + p] + high * clipped) * (double)scales[p];
    double dc = (double)theta[p] * clipped;
    if (has_scale) {
      dt = dt + gs * (c > min_clip_d || c != c ? c : min_clip_d) / high;
      dc = dc + (c >= min_clip_d ? gs * (double)theta[p] / high : 0.0);
    }
    grad_theta[p] = (float)dt;
    grad_clip[p] = (float)dc;
  }
}
""" % {"max_p": MAX_PRECISIONS}


def _floats(values: Sequence[float]):
    return (ctypes.c_float * len(values))(*values)


def _pointer(tensor: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr() if tensor is not None else None)


class NativeMixture:
    """The loaded kernel: `forward` and `backward` on contiguous float32 CPU tensors."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._quant_forward = library.mps_act_quant_forward
        self._quant_forward.restype = None
        self._quant_backward = library.mps_act_quant_backward
        self._quant_backward.restype = None

    def quant_forward(self, x: torch.Tensor, theta: torch.Tensor, clip: torch.Tensor, plan: "QuantPlan"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, scale) of the whole quantizer on contiguous float32 ``x``, ``theta`` and ``clip``
        (the rows from θ and the clips computed in C: see `mps_act_quant_forward`)."""
        y, scale = torch.empty_like(x), torch.empty(1, dtype=x.dtype)
        self._quant_forward(_pointer(x), _pointer(y), ctypes.c_int64(x.numel()), plan.count, _pointer(theta),
                            _pointer(clip), plan.lows, plan.highs, plan.min_clip, plan.exact, _pointer(scale))
        return y, scale

    def quant_backward(self, x: torch.Tensor, grad: torch.Tensor | None, grad_scale: float | None,
                       theta: torch.Tensor, clip: torch.Tensor, plan: "QuantPlan", need_x: bool
                       ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(∂x (None unless ``need_x`` and ``grad``), ∂θ, ∂clip) of the whole quantizer; ``grad``
        contiguous (or None: only the scale output has a gradient, ``grad_scale``)."""
        grad_x = torch.empty_like(x) if need_x and grad is not None else None
        count = plan.count.value
        grad_theta, grad_clip = torch.empty(count, dtype=x.dtype), torch.empty(count, dtype=x.dtype)
        self._quant_backward(_pointer(x), _pointer(grad), _pointer(grad_x), ctypes.c_int64(x.numel()), plan.count,
                             _pointer(theta), _pointer(clip), plan.highs, plan.min_clip, plan.min_clip_d, plan.exact,
                             plan.signed, ctypes.c_int(grad_scale is not None),
                             ctypes.c_double(0.0 if grad_scale is None else grad_scale),
                             _pointer(grad_theta), _pointer(grad_clip))
        return grad_x, grad_theta, grad_clip

class QuantPlan:
    """An activation quantizer's fixed numbers as the C calls take them (made once per quantizer):
    qmin_p and qmax_p, the smallest clip (float and double), exact, signed."""

    def __init__(self, ranges: Sequence[tuple[int, int]], signed: bool, min_clip: float, exact: bool) -> None:
        self.count = ctypes.c_int(len(ranges))
        self.lows = _floats([float(lo) for lo, _ in ranges])
        self.highs = _floats([float(hi) for _, hi in ranges])
        self.min_clip, self.min_clip_d = ctypes.c_float(min_clip), ctypes.c_double(min_clip)
        self.exact, self.signed = ctypes.c_int(exact), ctypes.c_int(signed)


def supports(x: torch.Tensor, precisions: int) -> bool:
    """Whether the kernel computes a mixture of ``precisions`` on ``x``."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and 1 <= precisions <= MAX_PRECISIONS


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def _machine() -> str:
    """What -march=native compiles for: the architecture and, on Linux, the CPU's feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()} {flags}"


def cache_folder() -> Path:
    """Where the built kernel is kept (per user)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "plinio_onnx"


def build(folder: Path | None = None, source: str = SOURCE, stem: str = "mps_native") -> Path:
    """Build the kernel (``source``: another C source, e.g. the weight mixture's) unless the cache
    already holds it, and return its path; raises `OSError` or `subprocess.SubprocessError` when
    it cannot be built."""
    compiler = _compiler()
    if compiler is None:
        raise FileNotFoundError("no C compiler found (set CC)")
    key = hashlib.sha256("\0".join([source, compiler, *FLAGS, _machine()]).encode()).hexdigest()[:20]
    target = (folder or cache_folder()) / f"{stem}_{key}.so"
    if not target.exists():
        with atomic_path(target) as tmp:
            source_file = tmp.with_name(tmp.name + ".c")
            try:
                source_file.write_text(source)
                subprocess.run([compiler, *FLAGS, str(source_file), "-o", str(tmp), "-lm"], check=True,
                               capture_output=True, timeout=120)
            finally:
                source_file.unlink(missing_ok=True)
    return target


@functools.lru_cache(maxsize=None)
def load() -> NativeMixture | None:
    """The kernel, built and loaded once per process; None where it is turned off or cannot be built."""
    if os.environ.get(ENABLE_ENV, "1").strip() == "0":
        return None
    try:
        return NativeMixture(ctypes.CDLL(str(build())))
    except (OSError, subprocess.SubprocessError, AttributeError):
        return None
