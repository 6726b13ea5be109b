"""`sync`: write a trained module's values back into the graph's initializers, by name."""
from __future__ import annotations

import bisect

import numpy as np
import torch

from .errors import PlinioOnnxError
from .graph import Graph


def sync(graph: Graph, module: torch.nn.Module) -> Graph:
    """Copy every parameter and buffer of ``module`` (made by `to_torch` from ``graph``) into the
    initializer of the same ONNX name, in place; returns ``graph``.

    The round trip is lossless: ``to_torch(sync(g, m))`` computes what ``m`` computes.
    """
    names = getattr(module, "initializer_names", None)
    if names is None:
        raise PlinioOnnxError("sync needs a module made by plinio_onnx.to_torch (or a searchable "
                              "model wrapping one)", file=graph.source)
    constants = graph.initializers()
    for attr, onnx_name in names.items():
        tensor = constants.get(onnx_name)
        if tensor is None:
            raise PlinioOnnxError(f"initializer {onnx_name!r} of the module is not in the graph; "
                                  "was the module made from another graph?", file=graph.source)
        held = np.asarray(tensor.values)
        value = module.initializer(attr).detach()
        if _is_memory_of(value, held):
            continue  # the module trains the graph's array itself (to_torch(share_weights=True))
        tensor.values = np.array(value.cpu().numpy(), dtype=held.dtype, copy=True).reshape(held.shape)
    return graph


def unshare(graph: Graph, module: torch.nn.Module) -> Graph:
    """Give every initializer of ``graph`` whose array lies in ``module``'s memory (a graph
    derived from one whose weights the module trains in place) an array of its own, in place, so
    ``graph`` keeps today's values whatever the module does next; returns ``graph``."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
                   for t in list(module.parameters()) + list(module.buffers())
                   if t.device.type == "cpu" and t.numel())
    starts = [start for start, _ in spans]
    for tensor in graph.initializers().values():
        if not isinstance(tensor._values, np.ndarray) or not tensor._values.size:
            continue
        low, high = _byte_bounds(tensor._values)
        at = bisect.bisect_right(starts, low)
        if (at > 0 and spans[at - 1][1] > low) or (at < len(starts) and starts[at] < high):
            tensor.values = tensor._values.copy()
    return graph


def _byte_bounds(array: np.ndarray) -> tuple[int, int]:
    try:
        from numpy.lib.array_utils import byte_bounds  # numpy >= 2
    except ImportError:
        byte_bounds = np.byte_bounds
    return byte_bounds(array)


def _is_memory_of(value: torch.Tensor, array: np.ndarray) -> bool:
    """Whether ``value`` is exactly ``array``'s memory (same place, dtype, shape and layout)."""
    if value.device.type != "cpu" or array.size == 0 or not value.is_contiguous() \
            or not array.flags.c_contiguous or value.data_ptr() != array.ctypes.data \
            or tuple(value.shape) != array.shape:
        return False
    try:
        return value.numpy().dtype == array.dtype
    except TypeError:  # a dtype numpy lacks (bfloat16)
        return False
