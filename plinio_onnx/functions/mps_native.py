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
from typing import NamedTuple, Sequence

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

/* ATen's clamp: NaN stays NaN, -0 below a bound of +0 becomes +0 */
static inline float clamp_(float v, float lo, float hi) {
  v = (v > lo || v != v) ? v : lo;
  return (v < hi || v != v) ? v : hi;
}

static void integers(const float *x, float *v, int64_t m, float q, float lo, float hi, int exact, int clamp) {
  if (exact && clamp) for (int64_t i = 0; i < m; i++) v[i] = clamp_(nearbyintf(x[i] / q), lo, hi);
  else if (clamp) for (int64_t i = 0; i < m; i++) v[i] = clamp_(nearbyintf(x[i] * q), lo, hi);
  else if (exact) for (int64_t i = 0; i < m; i++) v[i] = nearbyintf(x[i] / q);
  else for (int64_t i = 0; i < m; i++) v[i] = nearbyintf(x[i] * q);
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

/* y = sum_p a[p] * clamp(round(x * q[p]), lo[p], hi[p])  (exact: x / q[p]) */
void mps_act_forward(const float *x, float *y, int64_t n, int P, const float *q, const float *a,
                     const float *lo, const float *hi, int exact) {
  float v[BLOCK];
  for (int64_t b = 0; b < n; b += BLOCK) {
    int64_t m = n - b < BLOCK ? n - b : BLOCK;
    const float *xb = x + b;
    float *yb = y + b;
    for (int p = 0; p < P; p++) {
      integers(xb, v, m, q[p], lo[p], hi[p], exact, 1);
      const float ap = a[p];
      if (p == 0) for (int64_t i = 0; i < m; i++) yb[i] = v[i] * ap;
      else for (int64_t i = 0; i < m; i++) yb[i] = fmaf(v[i], ap, yb[i]);
    }
  }
}

/* inside_p = g where low[p] < x < high[p], else 0 (hardtanh_backward).
   out[p] = sum inside_p (signed: * sign x), out[P + p] = sum inside_p * round(x * q[p]),
   out[2P] = sum g where x > 0 (signed: sum g * sign x);
   gx (NULL: not wanted) = inside_0 * theta[0], then fma(inside_p, theta[p], gx). */
void mps_act_backward(const float *x, const float *g, float *gx, int64_t n, int P, const float *q,
                      const float *low, const float *high, const float *theta, int exact, int is_signed,
                      double *out) {
  double total[2 * MAX_P + 1] = {0};
  float inside[BLOCK], v[BLOCK], sign[BLOCK];
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
      integers(xb, v, m, q[p], 0.0f, 0.0f, exact, 0);
      total[P + p] += lane_sum(inside, v, m);
      if (gx) {
        float *gxb = gx + b;
        if (p == 0) for (int64_t i = 0; i < m; i++) gxb[i] = inside[i] * t;
        else for (int64_t i = 0; i < m; i++) gxb[i] = fmaf(inside[i], t, gxb[i]);
      }
    }
  }
  for (int k = 0; k < 2 * P + 1; k++) out[k] = total[k];
}
""" % {"max_p": MAX_PRECISIONS}


class Sums(NamedTuple):
    """What the backward adds up: per precision Σ inside (signed: ·sign x) and Σ inside·round(x/s),
    and Σ g where x > 0 (signed: Σ g·sign x)."""
    inside: list[float]
    products: list[float]
    outside: float


def _floats(values: Sequence[float]):
    return (ctypes.c_float * len(values))(*values)


def _pointer(tensor: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr() if tensor is not None else None)


class NativeMixture:
    """The loaded kernel: `forward` and `backward` on contiguous float32 CPU tensors."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._forward = library.mps_act_forward
        self._forward.restype = None
        self._backward = library.mps_act_backward
        self._backward.restype = None

    def forward(self, x: torch.Tensor, y: torch.Tensor, multipliers: Sequence[float], weights: Sequence[float],
                lows: Sequence[float], highs: Sequence[float], exact: bool) -> None:
        """y = Σ_p weights[p]·clamp(round(x·multipliers[p]), lows[p], highs[p]) (exact: x/multipliers[p])."""
        self._forward(_pointer(x), _pointer(y), ctypes.c_int64(x.numel()), ctypes.c_int(len(weights)),
                      _floats(multipliers), _floats(weights), _floats(lows), _floats(highs), ctypes.c_int(exact))

    def backward(self, x: torch.Tensor, grad: torch.Tensor, grad_x: torch.Tensor | None,
                 multipliers: Sequence[float], lows: Sequence[float], highs: Sequence[float],
                 theta: Sequence[float], exact: bool, signed: bool) -> Sums:
        """Fill ``grad_x`` (if given) and return the `Sums` (see the C source for the definitions)."""
        count = len(theta)
        out = (ctypes.c_double * (2 * count + 1))()
        self._backward(_pointer(x), _pointer(grad), _pointer(grad_x), ctypes.c_int64(x.numel()),
                       ctypes.c_int(count), _floats(multipliers), _floats(lows), _floats(highs), _floats(theta),
                       ctypes.c_int(exact), ctypes.c_int(signed), out)
        return Sums(list(out[:count]), list(out[count:2 * count]), out[2 * count])


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
