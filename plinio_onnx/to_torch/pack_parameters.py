"""The fx pass `pack_read_parameters`: small parameters that many calls read, held as one.

An MPS search holds one logit tensor per quantizer (α [P] or [P, C]): tens of tiny parameters.
An optimizer step, ``zero_grad`` and the backward's gradient accumulation then run once per
tensor, which on a small model is a sizable part of the step (digits CNN: Adam over its 10 logit
tensors took ~0.5 ms of a ~6.8 ms step). Packed into one flat parameter that the forward splits
into views, they are one optimizer entry and one gradient; the values and the optimizer's
element-wise updates are the same.
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch
import torch.fx as fx

from .builder import OnnxModule


def split_views(flat: torch.Tensor, sizes: Sequence[int], shapes: Sequence[Sequence[int]]) -> tuple[torch.Tensor, ...]:
    """``flat`` cut into consecutive parts of ``sizes`` elements, each viewed as its shape."""
    return tuple(part.view(shape) for part, shape in zip(flat.split(list(sizes)), shapes))


def pack_read_parameters(module: OnnxModule, readers: tuple[type, ...], position: int, name: str) -> None:
    """Pack the trainable parameters that calls of ``readers`` modules take as argument
    ``position`` (buffers and frozen parameters aside) into one flat parameter ``name`` of
    ``module`` (`OnnxModule.pack`), read once at the first of them and split into views
    (`split_views`); in place. Fewer than two such
    parameters, or parameters of different dtypes or devices: the module is left as it is."""
    graph = module.graph
    sources: list[fx.Node] = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) <= position:
            continue
        source = node.args[position]
        if isinstance(module.get_submodule(node.target), readers) and isinstance(source, fx.Node) \
                and source.op == "get_attr" and source not in sources:
            param = module._parameters.get(source.target)
            if param is not None and param.requires_grad:  # (a fixed choice's logits are a buffer)
                sources.append(source)
    params = [module._parameters[node.target] for node in sources]
    if len(sources) < 2 or len({(p.dtype, p.device) for p in params}) != 1:
        return
    order = {node: k for k, node in enumerate(graph.nodes)}
    first = min(sources, key=order.__getitem__)
    module.pack([node.target for node in sources], "", name)
    with graph.inserting_before(first):
        views = graph.call_function(split_views, (graph.get_attr(name), tuple(p.numel() for p in params),
                                                  tuple(tuple(p.shape) for p in params)))
        parts = [graph.call_function(operator.getitem, (views, k)) for k in range(len(sources))]
    for node, part in zip(sources, parts):
        node.replace_all_uses_with(part)
        graph.erase_node(node)
    graph.lint()
    module.recompile()
