"""`sync`: write a trained module's values back into the graph's initializers, by name."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
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
        value = module.initializer(attr).detach().cpu().numpy()
        tensor.values = np.array(value, dtype=np.asarray(tensor.values).dtype, copy=True).reshape(
            np.asarray(tensor.values).shape)
    return graph
