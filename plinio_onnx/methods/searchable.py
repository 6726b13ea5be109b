"""`SearchableModel`: what PIT, MPS and SuperNet share — a generated module plus its searchable graph."""
from __future__ import annotations

import abc

import os
from typing import Callable, Iterator

import onnx
import torch

from ..cost import BY_NAME, LayerSpec, layer_specs
from ..errors import PlinioOnnxError
from ..finalize import finalize
from ..graph import Graph
from ..load import load
from ..sync import sync
from ..to_torch import to_torch

CostFn = Callable[[LayerSpec], object]


def as_graph(model: "str | os.PathLike | onnx.ModelProto | Graph") -> Graph:
    return model.copy() if isinstance(model, Graph) else load(model)


def as_cost(cost: "CostFn | str") -> CostFn:
    if isinstance(cost, str):
        if cost not in BY_NAME:
            raise PlinioOnnxError(f"unknown cost model {cost!r}; choose from {sorted(BY_NAME)}")
        return BY_NAME[cost]
    return cost


class SearchableModel(torch.nn.Module, abc.ABC):
    """A searchable ``graph`` and the torch ``module`` generated from it.

    Subclasses say which parameters are architecture parameters (`_is_nas_parameter`) and how a
    layer's spec changes with them (`effective_spec`). ``model(x)`` runs the module; ``.cost`` is
    the differentiable cost; ``.export(path)`` syncs, finalizes and saves.
    """

    def __init__(self, graph: Graph, cost: "CostFn | str") -> None:
        super().__init__()
        self.graph = graph
        self.module = to_torch(graph)
        self.cost_model = as_cost(cost)
        self.specs = layer_specs(graph)
        self._onnx_to_attr = {onnx_name: attr for attr, onnx_name in self.module.initializer_names.items()}

    # -- running ------------------------------------------------------------------------------
    def forward(self, *inputs: torch.Tensor):
        return self.module(*inputs)

    def tensor(self, onnx_name: str) -> torch.Tensor:
        """The parameter/buffer holding initializer ``onnx_name``."""
        attr = self._onnx_to_attr[onnx_name]
        return getattr(self.module, attr)

    # -- parameters ---------------------------------------------------------------------------
    @abc.abstractmethod
    def _is_nas_parameter(self, onnx_name: str) -> bool:
        """Whether initializer ``onnx_name`` is an architecture parameter of this method."""

    def nas_parameters(self) -> Iterator[torch.nn.Parameter]:
        """Architecture parameters (masks, logits): for the search optimizer."""
        for attr, param in self.module.named_parameters():
            if self._is_nas_parameter(self.module.initializer_names.get(attr, "")):
                yield param

    def net_parameters(self) -> Iterator[torch.nn.Parameter]:
        """Network weights: everything that is not an architecture parameter."""
        for attr, param in self.module.named_parameters():
            if not self._is_nas_parameter(self.module.initializer_names.get(attr, "")):
                yield param

    # -- cost ---------------------------------------------------------------------------------
    def effective_spec(self, spec: LayerSpec) -> LayerSpec:
        return spec

    def cost_of(self, cost: "CostFn | str") -> torch.Tensor:
        """``cost`` summed over all layers at the current architecture (differentiable)."""
        fn = as_cost(cost)
        total = torch.zeros((), dtype=torch.float64)
        for spec in self.specs:
            total = total + fn(self.effective_spec(spec))
        return total

    @property
    def cost(self) -> torch.Tensor:
        """The cost model given at construction, summed over layers (differentiable)."""
        return self.cost_of(self.cost_model)

    # -- export -------------------------------------------------------------------------------
    def searchable_graph(self) -> Graph:
        """The searchable graph with the trained values (a checkpoint: save it to resume)."""
        return sync(self.graph, self.module)

    def export(self, path: "str | os.PathLike | None" = None, **options) -> Graph:
        """Finalize the current architecture into a deployable graph; save it when ``path`` is
        given. ``options`` go to the finalizers (e.g. ``format="qdq"``)."""
        deployable = finalize(self.searchable_graph(), **options)
        if path is not None:
            deployable.save(path)
        return deployable


def as_int(value) -> int:
    """A cost (tensor or number) as the integer it counts."""
    return int(round(float(value)))


def render_summary(table, skipped: list[str]) -> str:
    """A rich table as text, then what was not searched and why (the first 20)."""
    from io import StringIO

    from rich.console import Console

    buffer = StringIO()
    Console(file=buffer, width=120).print(table)
    if skipped:
        buffer.write("not searched: " + "; ".join(skipped[:20]) + (" …" if len(skipped) > 20 else "") + "\n")
    return buffer.getvalue()
