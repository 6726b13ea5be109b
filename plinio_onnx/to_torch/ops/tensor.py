"""Handlers: tensor ops (shapes, indexing, scatter, padding, resizing, einsum, ...).

Attributes and constant inputs are read at build time and handed to torch as Python ints/lists,
so the generated code is the straight-line torch a person would write. Inputs that are only
known at run time (a target shape computed by Shape -> Gather -> Concat with a symbolic batch
dimension, say) go through small module-level helpers that compute the same thing from the
run-time values.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..context import NodeContext, onnx_to_torch_dtype
from ..registry import Unsupported, register

# ONNX marks "to the end" with INT64_MIN/MAX; torch warns when it is sliced with INT64_MIN.
_BIG = 2 ** 62


# -- small helpers ---------------------------------------------------------------------------
def _str_attr(ctx: NodeContext, name: str, default: str) -> str:
    value = ctx.attr(name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def _norm_axis(axis: int, rank: int) -> int:
    axis = int(axis)
    if not -rank <= axis < rank:
        raise Unsupported(f"axis {axis} is out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def _needs_rank(ctx: NodeContext, axes, i: int = 0) -> int | None:
    """The rank of input ``i`` when some of ``axes`` are negative (else None: not needed)."""
    return ctx.rank(i) if any(int(a) < 0 for a in axes) else None


def _static_dim(ctx: NodeContext, i: int, axis: int):
    shape = ctx.shape(i)
    if shape is None or axis >= len(shape):
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) else None


def _as_int(value) -> int:
    """A Python int from a number, a one-element list or a one-element tensor (run-time K, k...)."""
    if isinstance(value, torch.Tensor):
        return int(value.reshape(-1)[0].item())
    if isinstance(value, (list, tuple)):
        return int(value[0])
    return int(value)


def _as_number(value):
    if isinstance(value, torch.Tensor):
        return value.reshape(-1)[0].item()
    return value


class _Constant(torch.nn.Module):
    """A tensor computed at build time, held as a (non-persistent) buffer so that it follows the
    module to its device; calling it returns the tensor."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value, persistent=False)

    def forward(self) -> torch.Tensor:
        return self.value


def _constant(ctx: NodeContext, value: np.ndarray):
    return ctx.module(_Constant(torch.from_numpy(np.ascontiguousarray(value))))


# -- Identity, Reshape, Flatten, Squeeze, Unsqueeze, Transpose -------------------------------
@register("Identity")
def identity(ctx: NodeContext):
    return ctx.input(0)


def _reshape_runtime(x: torch.Tensor, shape: list, allowzero: bool) -> torch.Tensor:
    if not allowzero:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return torch.reshape(x, shape)


def _reshape(ctx: NodeContext, shape, allowzero: bool):
    x = ctx.input(0)
    if not isinstance(shape, list):
        return ctx.call(_reshape_runtime, x, shape, allowzero)
    if allowzero or 0 not in shape:
        return ctx.call(torch.reshape, x, shape)
    # 0 copies the input's (run-time) dimension; when it is the only unknown, -1 infers it with
    # no extra call per step.
    copies = [i for i, s in enumerate(shape) if s == 0]
    if len(copies) == 1 and -1 not in shape:
        target = [-1 if s == 0 else s for s in shape]
    else:
        target = [ctx.method("size", x, i) if s == 0 else s for i, s in enumerate(shape)]
    return ctx.call(torch.reshape, x, target)


@register("Reshape")
def reshape_1(ctx: NodeContext):
    return _reshape(ctx, [int(s) for s in ctx.attr("shape", [])], False)


@register("Reshape", since=5)
def reshape_5(ctx: NodeContext):
    return _reshape(ctx, ctx.ints(1), bool(ctx.attr("allowzero", 0)))


@register("Flatten")
def flatten(ctx: NodeContext):
    rank = ctx.rank(0)
    axis = int(ctx.attr("axis", 1))
    axis = axis + rank if axis < 0 else axis
    if not 0 <= axis <= rank:
        raise Unsupported(f"axis {axis} is out of range for rank {rank}")
    x = ctx.input(0)
    if axis == 0:
        return ctx.call(torch.reshape, x, [1, -1])
    if axis == rank:
        return ctx.method("unsqueeze", ctx.call(torch.flatten, x), 1)
    y = x
    if axis < rank - 1:
        y = ctx.call(torch.flatten, y, axis)
    if axis > 1:
        y = ctx.call(torch.flatten, y, 0, axis - 1)
    return y


def _squeeze_runtime(x: torch.Tensor, axes: list) -> torch.Tensor:
    return torch.squeeze(x, tuple(axes)) if axes else torch.squeeze(x)


def _squeeze(ctx: NodeContext, axes):
    x = ctx.input(0)
    if axes is None or (isinstance(axes, list) and not axes):
        return ctx.call(torch.squeeze, x)
    if isinstance(axes, list):
        return ctx.call(torch.squeeze, x, tuple(int(a) for a in axes))
    return ctx.call(_squeeze_runtime, x, axes)


@register("Squeeze")
def squeeze_1(ctx: NodeContext):
    return _squeeze(ctx, ctx.attr("axes", None))


@register("Squeeze", since=13)
def squeeze_13(ctx: NodeContext):
    return _squeeze(ctx, ctx.ints(1) if ctx.has_input(1) else None)


def _unsqueeze_runtime(x: torch.Tensor, axes: list) -> torch.Tensor:
    rank = x.dim() + len(axes)
    for axis in sorted(a + rank if a < 0 else a for a in axes):
        x = torch.unsqueeze(x, axis)
    return x


def _unsqueeze(ctx: NodeContext, axes):
    x = ctx.input(0)
    if not isinstance(axes, list):
        return ctx.call(_unsqueeze_runtime, x, axes)
    axes = [int(a) for a in axes]
    rank = _needs_rank(ctx, axes)
    out_rank = (rank or 0) + len(axes)
    # Inserting in increasing output position keeps every later position valid.
    for axis in sorted(a + out_rank if a < 0 else a for a in axes):
        x = ctx.call(torch.unsqueeze, x, axis)
    return x


@register("Unsqueeze")
def unsqueeze_1(ctx: NodeContext):
    return _unsqueeze(ctx, list(ctx.attr("axes", [])))


@register("Unsqueeze", since=13)
def unsqueeze_13(ctx: NodeContext):
    return _unsqueeze(ctx, ctx.ints(1))


@register("Transpose")
def transpose(ctx: NodeContext):
    perm = ctx.attr("perm", None)
    perm = list(reversed(range(ctx.rank(0)))) if perm is None else [int(p) for p in perm]
    return ctx.method("permute", ctx.input(0), perm)


# -- Concat, Split ---------------------------------------------------------------------------
@register("Concat")
def concat(ctx: NodeContext):
    axis = ctx.attr("axis", 1 if ctx.opset < 4 else None)
    if axis is None:
        raise Unsupported("Concat without axis")
    xs = [ctx.input(i) for i in range(ctx.num_inputs) if ctx.has_input(i)]
    return ctx.call(torch.cat, xs, int(axis))


def _split_ceil(x: torch.Tensor, n: int, axis: int):
    # Split-18 num_outputs: chunks of ceil(dim / n), the last one smaller.
    dim = x.shape[axis]
    chunk = -(-dim // n)
    sizes = [chunk] * (n - 1) + [dim - chunk * (n - 1)]
    return torch.split(x, sizes, axis)


def _split(ctx: NodeContext, split, num_outputs):
    x = ctx.input(0)
    axis = int(ctx.attr("axis", 0))
    n = ctx.num_outputs
    if split is not None:
        parts = ctx.call(torch.split, x, split, axis)
    else:
        dim = _static_dim(ctx, 0, _norm_axis(axis, ctx.rank(0)))
        if num_outputs is None:
            if dim is None:
                # Equal parts (the spec requires divisibility): tensor_split gives exactly n.
                parts = ctx.call(torch.tensor_split, x, n, axis)
            else:
                if dim % n:
                    raise Unsupported(f"dimension {dim} does not split into {n} equal parts")
                parts = ctx.call(torch.split, x, dim // n, axis)
        else:
            n = int(num_outputs)
            if dim is None:
                parts = ctx.call(_split_ceil, x, n, axis)
            else:
                chunk = -(-dim // n)
                last = dim - chunk * (n - 1)
                if last < 0:
                    raise Unsupported(f"dimension {dim} cannot be split into {n} outputs")
                parts = ctx.call(torch.split, x, [chunk] * (n - 1) + [last], axis)
    return [ctx.getitem(parts, j) for j in range(ctx.num_outputs)]


@register("Split")
def split_1(ctx: NodeContext):
    split = ctx.attr("split", None)
    if split is not None:
        split = [int(s) for s in split]
    elif ctx.has_input(1):  # Split-1 took it as an optional input
        split = ctx.ints(1)
    return _split(ctx, split, None)


@register("Split", since=13)
def split_13(ctx: NodeContext):
    return _split(ctx, ctx.ints(1) if ctx.has_input(1) else None, None)


@register("Split", since=18)
def split_18(ctx: NodeContext):
    return _split(ctx, ctx.ints(1) if ctx.has_input(1) else None, ctx.attr("num_outputs", None))


# -- Slice -----------------------------------------------------------------------------------
def _slice_bounds(dim: int, start: int, end: int, step: int) -> tuple[slice, bool]:
    """ONNX Slice on one axis of length ``dim`` as (positive-step slice, flip afterwards)."""
    if step > 0:
        return slice(start, end, step), False  # Python clamps exactly like ONNX here
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    start = min(max(start, 0), dim - 1)
    end = min(max(end, -1), dim - 1)
    count = max(0, (start - end + (-step) - 1) // (-step))
    if count == 0:
        return slice(0, 0), False
    last = start + (count - 1) * step
    return slice(last, start + 1, -step), True


def _clamp(v: int) -> int:
    return max(-_BIG, min(_BIG, int(v)))


def _slice_runtime(x: torch.Tensor, starts, ends, axes, steps) -> torch.Tensor:
    n = len(starts)
    axes = list(range(n)) if axes is None else axes
    steps = [1] * n if steps is None else steps
    index = [slice(None)] * x.dim()
    flips = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = a + x.dim() if a < 0 else a
        index[a], flip = _slice_bounds(x.shape[a], _clamp(s), _clamp(e), int(st))
        if flip:
            flips.append(a)
    y = x[tuple(index)]
    return torch.flip(y, flips) if flips else y


def _slice(ctx: NodeContext, starts, ends, axes, steps):
    x = ctx.input(0)
    if not all(v is None or isinstance(v, list) for v in (starts, ends, axes, steps)):
        return ctx.call(_slice_runtime, x, starts, ends, axes, steps)
    n = len(starts)
    axes = list(range(n)) if axes is None else [int(a) for a in axes]
    steps = [1] * n if steps is None else [int(s) for s in steps]
    rank = _needs_rank(ctx, axes)
    axes = [_norm_axis(a, rank) if a < 0 else a for a in axes]
    index: dict[int, slice] = {}
    flips = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st == 0:
            raise Unsupported("Slice with step 0")
        if st < 0 and e >= 2 ** 63 - 1:
            # The spec clamps this end to the last element (an empty slice); onnxruntime reads
            # INT64_MAX as "through the first element". The model's intent is ambiguous.
            raise Unsupported("a negative step with end=INT64_MAX (ONNX and onnxruntime disagree)")
        s, e = _clamp(s), _clamp(e)
        if st > 0:
            index[a] = slice(s if s else None, e if e < _BIG else None, st if st != 1 else None)
            continue
        dim = _static_dim(ctx, 0, a)
        if dim is None:  # negative steps clamp against the length: compute it at run time
            return ctx.call(_slice_runtime, x, starts, ends, axes, steps)
        index[a], flip = _slice_bounds(dim, s, e, st)
        if flip:
            flips.append(a)
    if index:
        x = ctx.getitem(x, tuple(index.get(i, slice(None)) for i in range(max(index) + 1)))
    return ctx.call(torch.flip, x, flips) if flips else x


@register("Slice")
def slice_1(ctx: NodeContext):
    axes = ctx.attr("axes", None)
    return _slice(ctx, [int(v) for v in ctx.attr("starts")], [int(v) for v in ctx.attr("ends")],
                  None if axes is None else [int(a) for a in axes], None)


@register("Slice", since=10)
def slice_10(ctx: NodeContext):
    return _slice(ctx, ctx.ints(1), ctx.ints(2), ctx.ints(3) if ctx.has_input(3) else None,
                  ctx.ints(4) if ctx.has_input(4) else None)


# -- Gather family ---------------------------------------------------------------------------
@register("Gather")
def gather(ctx: NodeContext):
    axis = int(ctx.attr("axis", 0))
    if axis < 0:
        axis += ctx.rank(0)
    x = ctx.input(0)
    lead = (slice(None),) * axis
    indices = ctx.static(1)
    if indices is not None and indices.ndim == 0:
        return ctx.getitem(x, lead + (int(indices),))  # a view (select)
    if indices is not None and indices.ndim == 1 and indices.size > 0 and indices.min() >= 0 \
            and np.array_equal(indices, np.arange(indices[0], indices[0] + indices.size)):
        return ctx.getitem(x, lead + (slice(int(indices[0]), int(indices[0]) + indices.size),))
    # Advanced indexing takes indices of any shape, negative ones too, like ONNX Gather.
    return ctx.getitem(x, lead + (ctx.input(1),))


def _gather_elements(x: torch.Tensor, indices: torch.Tensor, axis: int) -> torch.Tensor:
    indices = indices.long()
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    return torch.gather(x, axis, indices)


@register("GatherElements")
def gather_elements(ctx: NodeContext):
    axis = int(ctx.attr("axis", 0))
    indices = ctx.static(1)
    if indices is not None and indices.dtype == np.int64 and (indices.size == 0 or indices.min() >= 0):
        return ctx.call(torch.gather, ctx.input(0), axis, ctx.input(1))
    return ctx.call(_gather_elements, ctx.input(0), ctx.input(1), axis)


def _gather_nd(x: torch.Tensor, indices: torch.Tensor, batch_dims: int) -> torch.Tensor:
    indices = indices.long()
    k = indices.shape[-1]
    batch = x.shape[:batch_dims]
    nb = math.prod(batch)
    xf = x.reshape(nb, *x.shape[batch_dims:])
    idx = indices.reshape(nb, *indices.shape[batch_dims:])
    rows = torch.arange(nb, device=x.device).view(nb, *[1] * (idx.dim() - 2))
    out = xf[(rows,) + tuple(idx[..., i] for i in range(k))]
    return out.reshape([*batch, *out.shape[1:]])


@register("GatherND")
def gather_nd(ctx: NodeContext):
    return ctx.call(_gather_nd, ctx.input(0), ctx.input(1), int(ctx.attr("batch_dims", 0)))


# -- Scatter family --------------------------------------------------------------------------
_SCATTER_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _scatter_elements(x, indices, updates, axis: int, reduction: str):
    indices = indices.long()
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    if reduction == "none":
        return torch.scatter(x, axis, indices, updates)
    return torch.scatter_reduce(x, axis, indices, updates, _SCATTER_REDUCE[reduction],
                                include_self=True)


def _scatter_elements_handler(ctx: NodeContext):
    reduction = _str_attr(ctx, "reduction", "none")
    if reduction not in ("none", *_SCATTER_REDUCE):
        raise Unsupported(f"reduction={reduction!r}")
    return ctx.call(_scatter_elements, ctx.input(0), ctx.input(1), ctx.input(2),
                    int(ctx.attr("axis", 0)), reduction)


register("ScatterElements")(_scatter_elements_handler)
register("Scatter")(_scatter_elements_handler)


def _scatter_nd(x, indices, updates, reduction: str):
    indices = indices.long()
    k = indices.shape[-1]
    dims = torch.tensor(x.shape[:k], device=x.device)
    indices = torch.where(indices < 0, indices + dims, indices)
    # Row-major linear index over the first k dimensions, then scatter rows of the flat view.
    strides = torch.tensor([math.prod(x.shape[i + 1:k]) for i in range(k)], device=x.device)
    linear = (indices * strides).sum(-1).reshape(-1)
    flat = x.reshape(-1, *x.shape[k:])
    rows = updates.reshape(-1, *x.shape[k:])
    if reduction == "none":
        out = flat.index_copy(0, linear, rows)
    elif reduction == "add":
        out = flat.index_add(0, linear, rows)
    else:
        out = flat.index_reduce(0, linear, rows, _SCATTER_REDUCE[reduction], include_self=True)
    return out.reshape(x.shape)


@register("ScatterND")
def scatter_nd(ctx: NodeContext):
    reduction = _str_attr(ctx, "reduction", "none")
    if reduction not in ("none", *_SCATTER_REDUCE):
        raise Unsupported(f"reduction={reduction!r}")
    return ctx.call(_scatter_nd, ctx.input(0), ctx.input(1), ctx.input(2), reduction)


# -- Expand, Tile ----------------------------------------------------------------------------
def _expand_target(rank: int, shape: list) -> list:
    """ONNX's bidirectional broadcast as a torch ``expand`` argument: a 1 in ``shape`` keeps the
    input's dimension (-1), and ``shape`` may have fewer dimensions than the input."""
    n = max(rank, len(shape))
    shape = [1] * (n - len(shape)) + [int(s) for s in shape]
    return [-1 if s == 1 and i >= n - rank else s for i, s in enumerate(shape)]


def _expand_runtime(x: torch.Tensor, shape: list) -> torch.Tensor:
    return x.expand(_expand_target(x.dim(), shape))


@register("Expand")
def expand(ctx: NodeContext):
    shape = ctx.ints(1)
    if not isinstance(shape, list):
        return ctx.call(_expand_runtime, ctx.input(0), shape)
    return ctx.method("expand", ctx.input(0), _expand_target(ctx.rank(0), shape))


@register("Tile", since=6)
def tile(ctx: NodeContext):
    return ctx.method("repeat", ctx.input(0), ctx.ints(1))


# -- Shape, Size, ConstantOfShape, Range, EyeLike --------------------------------------------
def _shape(x: torch.Tensor, start: int, end) -> torch.Tensor:
    # Python slicing clamps start/end exactly as Shape-15 does.
    return torch.tensor(x.shape[start:end], dtype=torch.int64, device=x.device)


@register("Shape")
def shape(ctx: NodeContext):
    end = ctx.attr("end", None)
    return ctx.call(_shape, ctx.input(0), int(ctx.attr("start", 0)), None if end is None else int(end))


def _size(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@register("Size")
def size(ctx: NodeContext):
    return ctx.call(_size, ctx.input(0))


def _constant_of_shape(shape: torch.Tensor, value, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape.tolist(), value, dtype=dtype, device=shape.device)


@register("ConstantOfShape")
def constant_of_shape(ctx: NodeContext):
    value = ctx.attr("value", None)
    value = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    shape = ctx.static(0)
    if shape is not None:
        return _constant(ctx, np.full([int(s) for s in shape.reshape(-1)], value[0], value.dtype))
    return ctx.call(_constant_of_shape, ctx.input(0), value[0].item(), onnx_to_torch_dtype(value.dtype))


def _range(start, limit, delta, dtype: torch.dtype) -> torch.Tensor:
    device = next((v.device for v in (start, limit, delta) if isinstance(v, torch.Tensor)), None)
    start, limit, delta = (_as_number(v) for v in (start, limit, delta))
    return torch.arange(start, limit, delta, dtype=dtype, device=device)


@register("Range", since=11)
def range_(ctx: NodeContext):
    values = [ctx.static(i) for i in range(3)]
    dtype = ctx.dtype(0)
    if all(v is not None for v in values):
        return _constant(ctx, np.arange(*[v.reshape(-1)[0] for v in values]).astype(dtype))
    return ctx.call(_range, ctx.input(0), ctx.input(1), ctx.input(2), onnx_to_torch_dtype(dtype))


def _eye_like(x: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    cols = torch.arange(x.shape[1], device=x.device)
    return (cols - rows == k).to(dtype)


@register("EyeLike", since=9)
def eye_like(ctx: NodeContext):
    dtype = ctx.attr("dtype", None)
    dtype = onnx_to_torch_dtype(int(dtype)) if dtype is not None else onnx_to_torch_dtype(ctx.dtype(0))
    return ctx.call(_eye_like, ctx.input(0), int(ctx.attr("k", 0)), dtype)


# -- Pad -------------------------------------------------------------------------------------
_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _pad_arg(pads: list[tuple[int, int, int]], rank: int) -> list[int]:
    """(axis, begin, end) triples → F.pad's last-axis-first list, down to the first padded axis."""
    by_axis = {a: (b, e) for a, b, e in pads}
    first = min(by_axis)
    out: list[int] = []
    for a in range(rank - 1, first - 1, -1):
        out += list(by_axis.get(a, (0, 0)))
    return out


def _pad_apply(x: torch.Tensor, pads: list[tuple[int, int, int]], mode: str, value) -> torch.Tensor:
    """Pad ``x`` by (axis, begin, end) triples in an ONNX mode; negative amounts crop."""
    pads = [(a, b, e) for a, b, e in pads if b or e]
    if not pads:
        return x
    rank = x.dim()
    if mode == "constant":
        return F.pad(x, _pad_arg(pads, rank), value=_as_number(value))
    # Crop first (the other modes' F.pad refuses negative amounts), then pad one axis at a time
    # as a (rows, 1, length) tensor: F.pad's reflect/replicate/circular pad trailing dims only.
    if any(b < 0 or e < 0 for _, b, e in pads):
        index = [slice(None)] * rank
        for a, b, e in pads:
            index[a] = slice(max(-b, 0), x.shape[a] - max(-e, 0))
        x = x[tuple(index)]
    for a, b, e in pads:
        b, e = max(b, 0), max(e, 0)
        if not (b or e):
            continue
        y = x.movedim(a, -1)
        lead = y.shape[:-1]
        y = F.pad(y.reshape(-1, 1, y.shape[-1]), [b, e], mode=_PAD_MODES[mode])
        x = y.reshape(*lead, y.shape[-1]).movedim(-1, a)
    return x


def _pad_runtime(x: torch.Tensor, pads: list, mode: str, value, axes) -> torch.Tensor:
    rank = x.dim()
    axes = list(range(rank)) if axes is None else [a + rank if a < 0 else a for a in axes]
    n = len(axes)
    return _pad_apply(x, [(a, int(pads[i]), int(pads[n + i])) for i, a in enumerate(axes)], mode, value)


def _pad(ctx: NodeContext, pads, value, axes):
    mode = _str_attr(ctx, "mode", "constant")
    if mode not in _PAD_MODES or (mode == "wrap" and ctx.opset < 19):
        raise Unsupported(f"mode={mode!r}")
    x = ctx.input(0)
    if not isinstance(pads, list) or not (axes is None or isinstance(axes, list)) \
            or not isinstance(value, (int, float, bool)):
        return ctx.call(_pad_runtime, x, pads, mode, value, axes)
    rank = ctx.rank(0)
    axes = list(range(rank)) if axes is None else [_norm_axis(a, rank) for a in axes]
    if len(pads) != 2 * len(axes):
        raise Unsupported(f"{len(pads)} pads for {len(axes)} axes")
    n = len(axes)
    triples = [(a, int(pads[i]), int(pads[n + i])) for i, a in enumerate(axes) if pads[i] or pads[n + i]]
    if not triples:
        return x
    if mode == "constant":
        return ctx.call(F.pad, x, _pad_arg(triples, rank), value=value)
    shape = ctx.shape(0) or [None] * rank
    for a, b, e in triples:
        dim = shape[a]
        if isinstance(dim, int):
            kept = dim - max(-b, 0) - max(-e, 0)
            limit = kept - 1 if mode == "reflect" else kept
            if max(b, e) > limit and mode in ("reflect", "wrap"):
                # numpy repeats the reflection/wrap; torch (and onnxruntime) do not.
                raise Unsupported(f"{mode} padding of {max(b, e)} on an axis of {kept}")
    padded = sorted(a for a, _, _ in triples)
    k = len(padded)
    # Straight F.pad when it takes this layout: the last k<=3 axes of a (k+1)- or (k+2)-D input.
    if all(b >= 0 and e >= 0 for _, b, e in triples) and k <= 3 and rank in (k + 1, k + 2) \
            and padded == list(range(rank - k, rank)):
        return ctx.call(F.pad, x, _pad_arg(triples, rank), mode=_PAD_MODES[mode])
    return ctx.call(_pad_apply, x, triples, mode, 0)


@register("Pad")
def pad_1(ctx: NodeContext):
    pads = ctx.attr("paddings", None)
    return _pad(ctx, [int(p) for p in pads], float(ctx.attr("value", 0.0)), None)


@register("Pad", since=2)
def pad_2(ctx: NodeContext):
    return _pad(ctx, [int(p) for p in ctx.attr("pads")], float(ctx.attr("value", 0.0)), None)


@register("Pad", since=11)
def pad_11(ctx: NodeContext):
    value = ctx.scalar(2, 0) if ctx.has_input(2) else 0
    axes = ctx.ints(3) if ctx.opset >= 18 and ctx.has_input(3) else None
    return _pad(ctx, ctx.ints(1), value, axes)


# -- Resize / Upsample -----------------------------------------------------------------------
# ONNX Resize is separable: along each resized axis an output position is a fixed combination of
# input positions. The plan computes that combination with the ONNX reference's formulas (an
# index per position for nearest, a weight matrix for linear/cubic) from the shapes and scales;
# F.interpolate is used instead where a build-time probe shows it computes the same.
_COORD_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners",
                "asymmetric", "tf_half_pixel_for_nn", "tf_crop_and_resize")
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil", "simple")


class _ResizeSpec:
    def __init__(self, mode: str, coord: str, nearest: str, cubic_a: float, exclude_outside: bool,
                 extrapolation: float, antialias: bool, axes: list | None, policy: str) -> None:
        self.mode, self.coord, self.nearest = mode, coord, nearest
        self.cubic_a, self.exclude_outside, self.extrapolation = cubic_a, exclude_outside, extrapolation
        self.antialias, self.axes, self.policy = antialias, axes, policy


def _resize_sizes(in_shape: list[int], spec: _ResizeSpec, scales, sizes):
    """Full-rank (output sizes, scales) as the ONNX reference computes them. Scales keep the
    reference's number types (float32 when given, float64 when derived from sizes): the sampling
    positions are computed with its exact arithmetic, so rounding ties fall the same way."""
    r = len(in_shape)
    axes = _resize_axes(spec, r)
    if sizes is not None:
        out = list(in_shape)
        for i, a in enumerate(axes):
            out[a] = int(sizes[i])
        scale = [np.int64(out[d]) / in_shape[d] if in_shape[d] else np.float64(1) for d in range(r)]
        if spec.policy != "stretch":
            pick = min if spec.policy == "not_larger" else max
            s = pick(scale[a] for a in axes)
            scale = [s if d in axes else np.float64(1) for d in range(r)]
            out = [int(s * in_shape[d] + 0.5) if d in axes else in_shape[d] for d in range(r)]
        return out, scale
    scale = [np.float32(1)] * r
    for i, a in enumerate(axes):
        scale[a] = np.float32(scales[i])
    return [int(np.float64(scale[d]) * in_shape[d]) for d in range(r)], scale


def _resize_axes(spec: _ResizeSpec, rank: int) -> list[int]:
    return list(range(rank)) if spec.axes is None else [a + rank if a < 0 else a for a in spec.axes]


def _resize_coeffs(ratio: np.ndarray, scale: float, spec: _ResizeSpec) -> np.ndarray:
    """(positions, n) weights of input offsets -n/2+1 .. n/2 from floor-ish base (ratio in (0, 1])."""
    if spec.mode == "linear":
        if spec.antialias:
            s = min(scale, 1.0)
            start = int(np.floor(-1 / s) + 1)
            args = (np.arange(start, 2 - start)[None, :] - ratio[:, None]) * s
            c = np.clip(1 - np.abs(args), 0, 1)
            return c / c.sum(1, keepdims=True)
        return np.stack([1 - ratio, ratio], 1)
    a = spec.cubic_a
    if spec.antialias:
        s = min(scale, 1.0)
        i_start = int(np.floor(-2 / s) + 1)
        x = np.abs(s * (np.arange(i_start, 2 - i_start)[None, :] - ratio[:, None]))
        c = np.where(x <= 1, (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1,
                     np.where(x < 2, a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a, 0.0))
        return c / c.sum(1, keepdims=True)
    r = ratio
    return np.stack([((a * (r + 1) - 5 * a) * (r + 1) + 8 * a) * (r + 1) - 4 * a,
                     ((a + 2) * r - (a + 3)) * r * r + 1,
                     ((a + 2) * (1 - r) - (a + 3)) * (1 - r) * (1 - r) + 1,
                     ((a * ((1 - r) + 1) - 5 * a) * ((1 - r) + 1) + 8 * a) * ((1 - r) + 1) - 4 * a], 1)


def _resize_axis(in_size: int, out_size: int, scale: float, roi: tuple[float, float],
                 spec: _ResizeSpec):
    """One axis: ("index", int64 indices) or ("weights", (out, in) matrix), plus a validity mask
    (tf_crop_and_resize positions outside the input take the extrapolation value) or None."""
    # Written like the ONNX reference (same operand order and numpy types), see _resize_sizes.
    x = np.arange(out_size, dtype=np.int64)
    out_w = scale * in_size  # the reference uses the unrounded output length
    coord = spec.coord
    valid = None
    if coord == "align_corners":
        x_ori = np.zeros(out_size) if out_w == 1 else x * (in_size - 1) / (out_w - 1)
    elif coord == "asymmetric":
        x_ori = x / scale
    elif coord == "tf_crop_and_resize":
        lo, hi = np.float32(roi[0]), np.float32(roi[1])
        if out_w == 1:
            x_ori = np.full(out_size, (hi - lo) * (in_size - 1) / 2, dtype=np.float64)
        else:
            x_ori = x * (hi - lo) * (in_size - 1) / (out_w - 1)
        x_ori = x_ori + lo * (in_size - 1)
        valid = (x_ori >= 0) & (x_ori <= in_size - 1)
    elif coord == "pytorch_half_pixel":
        x_ori = np.full(out_size, -0.5) if out_w == 1 else (x + 0.5) / scale - 0.5
    elif coord == "half_pixel":
        x_ori = (x + 0.5) / scale - 0.5
    elif coord == "half_pixel_symmetric":
        offset = in_size / 2 * (1 - np.int64(out_size) / out_w)
        x_ori = offset + (x + 0.5) / scale - 0.5
    elif coord == "tf_half_pixel_for_nn":
        x_ori = (x + 0.5) / scale
    else:
        raise Unsupported(f"coordinate_transformation_mode={coord!r}")
    x_ori = np.asarray(x_ori, dtype=np.float64)
    base = np.ceil(x_ori) - 1  # the left neighbour, so that ratio lies in (0, 1]
    ratio = x_ori - base
    if spec.mode == "nearest":
        exact = ratio == 1
        mode = spec.nearest
        if mode == "simple":  # Resize-10/Upsample (onnxruntime): floor, but ceil when shrinking
            mode = "ceil" if scale < 1 else "floor"
        take_right = {"round_prefer_floor": ratio > 0.5, "round_prefer_ceil": ratio >= 0.5,
                      "floor": np.zeros_like(exact), "ceil": np.ones_like(exact)}[mode] | exact
        coeffs = None
        n = 2
    else:
        coeffs = _resize_coeffs(ratio, scale, spec)
        n = coeffs.shape[1]
    # The reference takes the n nearest indices (ties to the smaller) of the input padded by n/2
    # on both sides, locating x_ori + n/2 in float64: its rounding can shift the window by one.
    half = n // 2
    start = np.clip(np.ceil(x_ori + half) - half, 0, in_size) - half
    start = start.astype(np.int64)
    if coeffs is None:
        index = np.clip(start + take_right, 0, in_size - 1).astype(np.int64)
        return "index", index, valid
    idx = start[:, None] + np.arange(n)[None, :]
    if spec.exclude_outside:
        coeffs = np.where((idx < 0) | (idx >= in_size), 0.0, coeffs)
        coeffs = coeffs / coeffs.sum(1, keepdims=True)
    weights = np.zeros((out_size, in_size))
    np.add.at(weights, (np.repeat(np.arange(out_size), n), np.clip(idx, 0, in_size - 1).reshape(-1)),
              coeffs.reshape(-1))
    if valid is not None:
        weights[~valid] = 0
    return "weights", weights, valid


def _resize_plan(in_shape: list[int], spec: _ResizeSpec, roi, scales, sizes):
    out, scale = _resize_sizes(in_shape, spec, scales, sizes)
    r = len(in_shape)
    full_roi = _full_roi(roi, spec, r)
    steps = []
    for d in range(r):
        if out[d] == in_shape[d] and scale[d] == 1 and spec.coord != "tf_crop_and_resize":
            continue  # every mode maps an unscaled axis onto itself
        kind, data, valid = _resize_axis(in_shape[d], out[d], scale[d], (full_roi[d], full_roi[r + d]), spec)
        steps.append((d, kind, data, valid))
    return out, steps


def _apply_resize_steps(x: torch.Tensor, steps, extrapolation: float) -> torch.Tensor:
    rank = x.dim()
    mask = None
    for axis, kind, data, valid in steps:
        if kind == "index":
            x = x.index_select(axis, data)
        elif axis == rank - 1:
            x = x @ data.T
        elif axis == rank - 2:
            x = data @ x
        else:
            x = torch.movedim(torch.movedim(x, axis, -1) @ data.T, -1, axis)
        if valid is not None:
            m = valid.view([-1 if i == axis else 1 for i in range(rank)])
            mask = m if mask is None else mask & m
    if mask is not None:
        x = torch.where(mask, x, torch.tensor(extrapolation, dtype=x.dtype, device=x.device))
    return x


class _Resize(torch.nn.Module):
    """ONNX Resize by its separable plan; the plan (index/weight tensors) is computed once per
    input shape, scales/sizes/roi and device, then reused."""

    def __init__(self, spec: _ResizeSpec, roi, scales, sizes) -> None:
        super().__init__()
        self.spec = spec
        self.roi, self.scales, self.sizes = roi, scales, sizes
        self._plans: dict = {}

    def forward(self, x: torch.Tensor, roi=None, scales=None, sizes=None) -> torch.Tensor:
        roi = self.roi if roi is None else tuple(roi.tolist())
        scales = self.scales if scales is None else tuple(scales.tolist())
        sizes = self.sizes if sizes is None else tuple(sizes.tolist())
        if sizes is not None and len(sizes) == 0:
            sizes = None
        if sizes is not None:
            scales = None
        key = (tuple(x.shape), roi, scales, sizes, x.device, x.dtype)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 32:
                self._plans.clear()
            _, steps = _resize_plan(list(x.shape), self.spec, roi, scales, sizes)
            plan = [(axis, kind,
                     torch.from_numpy(data).to(x.device, torch.int64 if kind == "index" else x.dtype),
                     None if valid is None else torch.from_numpy(valid).to(x.device))
                    for axis, kind, data, valid in steps]
            self._plans[key] = plan
        return _apply_resize_steps(x, plan, self.spec.extrapolation)


def _interpolate_candidates(spec: _ResizeSpec, n_spatial: int, by_sizes: bool) -> list[dict]:
    """F.interpolate settings that may compute the ONNX result; the probe picks the one that does."""
    if spec.coord == "tf_crop_and_resize" or spec.exclude_outside:
        return []
    if spec.mode == "nearest":
        modes = [dict(mode="nearest"), dict(mode="nearest-exact")]
    elif spec.mode == "linear":
        name = {1: "linear", 2: "bilinear", 3: "trilinear"}[n_spatial]
        if spec.antialias and n_spatial != 2:
            return []
        modes = [dict(mode=name, align_corners=ac, antialias=spec.antialias) for ac in (False, True)]
    else:
        if n_spatial != 2 or spec.cubic_a != -0.75:
            return []
        modes = [dict(mode="bicubic", align_corners=ac, antialias=spec.antialias) for ac in (False, True)]
    how = ["size", "scale_factor"] if by_sizes else ["scale_factor", "size"]
    return [dict(m, how=h) for h in how for m in modes]


def _probe_interpolate(in_shape: list, spec: _ResizeSpec, roi, scales, sizes) -> dict | None:
    """A F.interpolate call that reproduces this Resize for the static spatial sizes, or None.

    Both are separable, so each spatial axis is probed alone: a length-L ramp of distinct values
    through the ONNX plan and through each candidate; a candidate must agree on every axis."""
    rank = len(in_shape)
    if rank not in (3, 4, 5) or any(not isinstance(d, int) for d in in_shape[2:]):
        return None
    axes = _resize_axes(spec, rank)
    shape = list(in_shape)
    for d in (0, 1):  # batch and channels: F.interpolate leaves them alone, so must the node
        if not isinstance(shape[d], int):
            if d in axes and sizes is not None:
                return None
            shape[d] = 1
    out, scale = _resize_sizes(shape, spec, scales, sizes)
    if any(out[d] != shape[d] or scale[d] != 1 for d in (0, 1)) or 0 in out[2:]:
        return None
    full_roi = _full_roi(roi, spec, rank)
    alive = _interpolate_candidates(spec, rank - 2, sizes is not None)
    gen = torch.Generator().manual_seed(0)
    for d in range(2, rank):
        length = shape[d]
        if spec.mode == "nearest":
            values = torch.randperm(length, generator=gen).double()
        else:
            values = torch.rand(length, generator=gen, dtype=torch.float64)
        kind, data, valid = _resize_axis(length, out[d], scale[d], (full_roi[d], full_roi[rank + d]), spec)
        expected = values[torch.from_numpy(data)] if kind == "index" else torch.from_numpy(data) @ values
        view = [1, 1] + [length if j == d else 1 for j in range(2, rank)]
        survivors = []
        for cand in alive:
            kwargs = _interpolate_kwargs(cand, [out[j] if j == d else 1 for j in range(2, rank)],
                                         [scale[j] if j == d else 1.0 for j in range(2, rank)])
            try:
                got = F.interpolate(values.view(view), **kwargs).reshape(-1)
            except (RuntimeError, ValueError, NotImplementedError):
                continue
            tol = 0.0 if spec.mode == "nearest" else 1e-6
            if got.shape == expected.shape and torch.allclose(got, expected, rtol=0, atol=tol):
                survivors.append(cand)
        alive = survivors
    if not alive:
        return None
    return _interpolate_kwargs(alive[0], out[2:], scale[2:])


def _interpolate_kwargs(cand: dict, size: list[int], scale: list) -> dict:
    kwargs = {k: v for k, v in cand.items() if k != "how"}
    if cand["how"] == "size":
        kwargs["size"] = [int(s) for s in size]
    else:
        kwargs["scale_factor"] = [float(s) for s in scale]
        kwargs["recompute_scale_factor"] = False
    return kwargs


def _full_roi(roi, spec: _ResizeSpec, r: int) -> list[float]:
    full = [0.0] * r + [1.0] * r
    if roi is not None and len(roi):
        axes = _resize_axes(spec, r)
        for i, a in enumerate(axes):
            full[a], full[r + a] = float(roi[i]), float(roi[len(axes) + i])
    return full


def _resize_build(ctx: NodeContext, spec: _ResizeSpec, roi_i: int | None, scales_i: int | None,
                  sizes_i: int | None, scales_attr=None):
    if spec.mode not in ("nearest", "linear", "cubic"):
        raise Unsupported(f"mode={spec.mode!r}")
    if spec.coord not in _COORD_MODES:
        raise Unsupported(f"coordinate_transformation_mode={spec.coord!r}")
    if spec.mode == "nearest" and spec.nearest not in _NEAREST_MODES:
        raise Unsupported(f"nearest_mode={spec.nearest!r}")
    if spec.mode == "nearest" and spec.antialias:
        raise Unsupported("antialias with mode='nearest'")
    if spec.policy not in ("stretch", "not_larger", "not_smaller"):
        raise Unsupported(f"keep_aspect_ratio_policy={spec.policy!r}")
    dtype = ctx.dtype(0)
    if spec.mode != "nearest" and dtype is not None and dtype.kind != "f":
        raise Unsupported(f"{spec.mode} resize of a {dtype} tensor (the result would be rounded)")

    def present(i):
        return i is not None and ctx.has_input(i)

    def static(i):
        value = ctx.static(i)
        return None if value is None else tuple(value.reshape(-1).tolist())

    roi = static(roi_i) if present(roi_i) else None
    scales = tuple(float(s) for s in scales_attr) if scales_attr is not None else \
        (static(scales_i) if present(scales_i) else None)
    sizes = static(sizes_i) if present(sizes_i) else None
    runtime = {name: ctx.input(i) for name, i in (("roi", roi_i), ("scales", scales_i), ("sizes", sizes_i))
               if present(i) and ctx.static(i) is None and (name != "roi" or spec.coord == "tf_crop_and_resize")
               and not (name == "scales" and scales_attr is not None)}
    if sizes is not None and len(sizes) == 0:
        sizes = None
    if scales is not None and len(scales) == 0:
        scales = None
    if sizes is not None:
        scales = None
    x = ctx.input(0)
    if not runtime:
        if sizes is None and scales is None:
            raise Unsupported("Resize with neither scales nor sizes")
        in_shape = ctx.shape(0)
        if in_shape is not None and dtype is not None and dtype.kind == "f":  # F.interpolate: floats
            kwargs = _probe_interpolate(in_shape, spec, roi, scales, sizes)
            if kwargs is not None:
                return ctx.call(F.interpolate, x, **kwargs)
    return ctx.module(_Resize(spec, roi, scales, sizes), x, **runtime)


def _resize_spec(ctx: NodeContext, **defaults) -> _ResizeSpec:
    mode = _str_attr(ctx, "mode", "nearest")
    axes = ctx.attr("axes", None)
    return _ResizeSpec(
        mode="linear" if mode in ("bilinear", "trilinear") else mode,
        coord=defaults.get("coord") or _str_attr(ctx, "coordinate_transformation_mode", "half_pixel"),
        nearest=defaults.get("nearest") or _str_attr(ctx, "nearest_mode", "round_prefer_floor"),
        cubic_a=float(ctx.attr("cubic_coeff_a", -0.75)),
        exclude_outside=bool(ctx.attr("exclude_outside", 0)),
        extrapolation=float(ctx.attr("extrapolation_value", 0.0)),
        antialias=bool(ctx.attr("antialias", 0)),
        axes=None if axes is None else [int(a) for a in axes],
        policy=_str_attr(ctx, "keep_aspect_ratio_policy", "stretch"))


@register("Resize", since=10)
def resize_10(ctx: NodeContext):
    # Resize-10 (as onnxruntime runs it): asymmetric coordinates; nearest floors, or rounds up
    # when shrinking.
    spec = _resize_spec(ctx, coord="asymmetric", nearest="simple")
    if spec.mode == "cubic":
        raise Unsupported("mode='cubic' is not in Resize-10")
    return _resize_build(ctx, spec, None, 1, None)


@register("Resize", since=11)
def resize_11(ctx: NodeContext):
    spec = _resize_spec(ctx)
    if spec.coord == "tf_half_pixel_for_nn" and ctx.opset >= 13:
        raise Unsupported("tf_half_pixel_for_nn was removed in Resize-13")
    if spec.coord == "half_pixel_symmetric" and ctx.opset < 19:
        raise Unsupported("half_pixel_symmetric needs Resize-19")
    return _resize_build(ctx, spec, 1, 2, 3)


@register("Upsample", since=7)
def upsample_7(ctx: NodeContext):
    spec = _resize_spec(ctx, coord="asymmetric", nearest="simple")
    if spec.mode not in ("nearest", "linear"):
        raise Unsupported(f"mode={spec.mode!r}")
    return _resize_build(ctx, spec, None, None, None, scales_attr=list(ctx.attr("scales")))


@register("Upsample", since=9)
def upsample_9(ctx: NodeContext):
    spec = _resize_spec(ctx, coord="asymmetric", nearest="simple")
    if spec.mode not in ("nearest", "linear"):
        raise Unsupported(f"mode={spec.mode!r}")
    return _resize_build(ctx, spec, None, 1, None)


# -- Einsum, DepthToSpace, SpaceToDepth ------------------------------------------------------
@register("Einsum", since=12)
def einsum(ctx: NodeContext):
    equation = _str_attr(ctx, "equation", "").replace(" ", "")
    return ctx.call(torch.einsum, equation, *[ctx.input(i) for i in range(ctx.num_inputs)])


def _depth_to_space_dcr(x: torch.Tensor, bs: int) -> torch.Tensor:
    b, c, h, w = x.shape
    y = x.reshape(b, bs, bs, c // (bs * bs), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(b, c // (bs * bs), h * bs, w * bs)


@register("DepthToSpace")
def depth_to_space(ctx: NodeContext):
    bs = int(ctx.attr("blocksize"))
    mode = _str_attr(ctx, "mode", "DCR")
    if ctx.rank(0) != 4:
        raise Unsupported("DepthToSpace of a non-4-D tensor")
    if mode == "CRD":
        return ctx.call(F.pixel_shuffle, ctx.input(0), bs)  # CRD is exactly pixel_shuffle
    if mode != "DCR":
        raise Unsupported(f"mode={mode!r}")
    return ctx.call(_depth_to_space_dcr, ctx.input(0), bs)


def _space_to_depth(x: torch.Tensor, bs: int) -> torch.Tensor:
    b, c, h, w = x.shape
    y = x.reshape(b, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(b, c * bs * bs, h // bs, w // bs)


@register("SpaceToDepth")
def space_to_depth(ctx: NodeContext):
    if ctx.rank(0) != 4:
        raise Unsupported("SpaceToDepth of a non-4-D tensor")
    return ctx.call(_space_to_depth, ctx.input(0), int(ctx.attr("blocksize")))


# -- TopK, Trilu, OneHot, NonZero, Compress --------------------------------------------------
def _topk(x: torch.Tensor, k, axis: int, largest: bool):
    # A stable sort keeps the lower index first among equal values, as ONNX requires
    # (torch.topk does not promise an order for ties).
    k = _as_int(k)
    values, indices = torch.sort(x, dim=axis, descending=largest, stable=True)
    return values.narrow(axis, 0, k), indices.narrow(axis, 0, k)


def _topk_build(ctx: NodeContext, k):
    result = ctx.call(_topk, ctx.input(0), k, int(ctx.attr("axis", -1)), bool(ctx.attr("largest", 1)))
    return [ctx.getitem(result, 0), ctx.getitem(result, 1)]


@register("TopK")
def topk_1(ctx: NodeContext):
    return _topk_build(ctx, int(ctx.attr("k")))


@register("TopK", since=10)
def topk_10(ctx: NodeContext):
    k = ctx.ints(1)
    return _topk_build(ctx, k[0] if isinstance(k, list) else k)


def _trilu(x: torch.Tensor, k, upper: bool) -> torch.Tensor:
    k = _as_int(k)
    return torch.triu(x, k) if upper else torch.tril(x, k)


@register("Trilu", since=14)
def trilu(ctx: NodeContext):
    upper = bool(ctx.attr("upper", 1))
    k = ctx.scalar(1, 0) if ctx.has_input(1) else 0
    if isinstance(k, (int, np.integer)):
        return ctx.call(torch.triu if upper else torch.tril, ctx.input(0), int(k))
    return ctx.call(_trilu, ctx.input(0), k, upper)


def _one_hot(indices: torch.Tensor, depth, values: torch.Tensor, axis: int) -> torch.Tensor:
    depth = int(_as_number(depth))
    idx = indices.long()  # float indices are truncated, as the spec says
    idx = torch.where(idx < 0, idx + depth, idx)
    out_rank = idx.dim() + 1
    axis = axis + out_rank if axis < 0 else axis
    classes = torch.arange(depth, device=idx.device).view([-1 if i == axis else 1 for i in range(out_rank)])
    return torch.where(idx.unsqueeze(axis) == classes, values[1], values[0])


@register("OneHot", since=9)
def one_hot(ctx: NodeContext):
    return ctx.call(_one_hot, ctx.input(0), ctx.scalar(1), ctx.input(2), int(ctx.attr("axis", -1)))


@register("NonZero", since=9)
def non_zero(ctx: NodeContext):
    return ctx.method("t", ctx.call(torch.nonzero, ctx.input(0)))


def _compress(x: torch.Tensor, condition: torch.Tensor, axis) -> torch.Tensor:
    index = torch.nonzero(condition.reshape(-1)).reshape(-1)
    if axis is None:
        return x.reshape(-1).index_select(0, index)
    return x.index_select(axis, index)


@register("Compress", since=9)
def compress(ctx: NodeContext):
    axis = ctx.attr("axis", None)
    return ctx.call(_compress, ctx.input(0), ctx.input(1), None if axis is None else int(axis))
