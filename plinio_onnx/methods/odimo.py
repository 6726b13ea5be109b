"""`ODiMO`: map every output channel of each layer onto one of several accelerators that run in
parallel, as a differentiable search (ODiMO, arXiv 2306.05060; PLiNIO's ``ODiMO_MPS``).

    model = po.ODiMO("model.onnx")                        # DIANA: digital 8-bit + analog ternary
    model.calibrate(x_batch)                              # activation clips from data
    loss = criterion(model(x), y) + strength * model.cost # cost: the parallel latency (cycles)
    model.export("mapped.onnx")                           # one QDQ sub-layer per accelerator

The search is MPS's per-channel precision search (`plinio_onnx.methods.mps.MPS`, whose API this
model keeps: ``calibrate``, ``freeze``, temperature and annealing) where the logit rows of a
layer stand for accelerators (`plinio_onnx.passes.odimo`): θ = softmax(α/T) over the
accelerators of each channel, the channel's weight quantized at Σ_k θ_k·Q_k(W). The cost
(``cost="latency"``, `ParallelLatency`) gives each accelerator the expected number of channels
n_k = Σ_c θ_k,c (in eval: the argmax counts) and takes the maximum of the accelerators'
latencies per layer, summed over layers. The export (`plinio_onnx.passes.odimo_split`) splits
every layer into one sub-layer per accelerator, quantized at its precision, and records in the
model's metadata (``odimo.mapping``) which node runs where.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import torch

from plinio_onnx.passes.odimo import LAYER_OPS, check_accelerators, odimo
from plinio_onnx.records import MPSRecord, ODiMORecord

from ..cost import LayerSpec
from ..errors import PlinioOnnxError
from ..graph import Graph
from .accelerators import ANALOG, CHANNELS_KEY, DEFAULT_ACCELERATORS, DIGITAL, Accelerator, ParallelLatency
from .mps import MPS
from .searchable import CostFn, as_graph

#: ``po.odimo`` is this module: `ODiMO` and the accelerators it maps onto.
__all__ = ["ANALOG", "Accelerator", "DEFAULT_ACCELERATORS", "DIGITAL", "ODiMO", "ParallelLatency"]


class ODiMO(MPS):
    """Multi-accelerator channel mapping on an ONNX model (module docstring).

    ``model``: a path, ``onnx.ModelProto`` or `Graph` (a searchable ODiMO graph resumes as it
    is). ``accelerators``: `Accelerator`s (default `DEFAULT_ACCELERATORS`: DIANA's digital and
    analog units). ``cost``: ``"latency"`` (`ParallelLatency` over the accelerators, with
    ``reduction`` and ``data_movement``), any other cost model or name (MPS's bit-level costs
    see the expected weight bits), or a mapping of named costs. ``sampling``: "softmax" or
    "gumbel"; the other options are MPS's (`plinio_onnx.passes.odimo.odimo`).
    """

    def __init__(self, model: "str | os.PathLike | onnx.ModelProto | Graph", *,
                 accelerators: Sequence[Accelerator] = DEFAULT_ACCELERATORS,
                 cost: "CostFn | str | Mapping[str, CostFn | str]" = "latency", reduction: str = "max",
                 data_movement: Callable[[LayerSpec, Mapping[str, Any]], Any] | None = None,
                 sampling: str = "softmax", temperature: float = 1.0, include: Iterable[str] | None = None,
                 exclude: Iterable[str] | None = None, op_types: Iterable[str] = LAYER_OPS,
                 clip_init: float = 6.0, fold_bn: bool = True) -> None:
        graph = as_graph(model)
        chosen = tuple(accelerators)
        if not ODiMORecord.present(graph):
            graph = odimo(graph, chosen, sampling=sampling, temperature=temperature, include=include,
                          exclude=exclude, op_types=op_types, clip_init=clip_init, fold_bn=fold_bn)
        record = ODiMORecord.of(graph)
        given = [vars(a) for a in check_accelerators(chosen, graph.source)]
        if [vars(a) for a in record.accelerators] != given:
            raise PlinioOnnxError("the searchable graph was built for the accelerators "
                                  f"{[a.name for a in record.accelerators]} with other precisions or names "
                                  "than those given", file=graph.source)
        latency = ParallelLatency(chosen, reduction, data_movement)
        super().__init__(graph, cost=_with_latency(cost, latency))
        self.accelerators = chosen
        #: The parallel-latency cost model of these accelerators (also the ``"latency"`` cost).
        self.latency = latency
        self.mapping_record = record
        self._mapped = {layer.node: layer for layer in record.layers}
        # One activation precision (the accelerators'): a layer's input bits are a constant.
        self._input_bits = {node: int(self._activations[layer.activation].bits[0])
                            for node, layer in self._layers.items()}
        self._bit_tables = {node: torch.tensor(layer.bits, dtype=torch.float64) for node, layer in self._layers.items()}

    # -- effective architecture ---------------------------------------------------------------
    def channels_per_accelerator(self, node: str) -> dict[str, torch.Tensor] | None:
        """Expected (eval: chosen) number of output channels of layer ``node`` on each of its
        accelerators; None for a layer ODiMO does not map."""
        mapped = self._mapped.get(node)
        if mapped is None:
            return None
        layer = self._layers[node]
        theta = self._theta(self.tensor(layer.alpha)).to(torch.float64)
        counts = theta.sum(1) if mapped.per_channel else theta * float(layer.channels)
        return dict(zip(mapped.accelerators, counts.unbind()))

    def effective_spec(self, spec: LayerSpec) -> LayerSpec:
        """The layer with its expected (eval: chosen) channel counts per accelerator, mean weight
        bits and input bits (one softmax per layer and step: the cost runs every step)."""
        mapped = self._mapped.get(spec.name)
        if mapped is None:
            return super().effective_spec(spec)
        layer = self._layers[spec.name]
        theta = self._theta(self.tensor(layer.alpha).to(torch.float64))
        counts = theta.sum(1) if mapped.per_channel else theta * float(layer.channels)
        effective = copy.copy(spec)   # `LayerSpec.with_` without dataclasses.replace's cost
        effective.weight_bits = (counts * self._bit_tables[spec.name]).sum() / float(layer.channels)
        effective.input_bits = self._input_bits[spec.name]
        effective.extra = {**spec.extra, CHANNELS_KEY: dict(zip(mapped.accelerators, counts.unbind()))}
        return effective

    # -- reporting ----------------------------------------------------------------------------
    @torch.no_grad()
    def mapping(self) -> dict[str, dict[str, int]]:
        """The argmax mapping: per layer, the number of output channels on each accelerator."""
        out = {}
        for node, mapped in self._mapped.items():
            layer = self._layers[node]
            alpha = self.tensor(layer.alpha).detach().cpu().numpy()
            choice = np.argmax(alpha, 0) if mapped.per_channel else np.full(layer.channels, int(np.argmax(alpha)))
            out[node] = {name: int((choice == k).sum()) for k, name in enumerate(mapped.accelerators)}
        return out

    @torch.no_grad()
    def single_accelerator_latency(self, name: str) -> float:
        """The modelled latency with every layer on accelerator ``name`` (a layer it cannot run
        stays on its first possible accelerator): the baselines a mapping is compared with."""
        if name not in {a.name for a in self.accelerators}:
            raise PlinioOnnxError(f"no accelerator {name!r}; these are {[a.name for a in self.accelerators]}")
        total = 0.0
        for spec in self.specs:
            mapped = self._mapped.get(spec.name)
            if mapped is not None:
                target = name if name in mapped.accelerators else mapped.accelerators[0]
                spec = spec.with_(extra={**spec.extra, CHANNELS_KEY: {target: spec.out_channels}})
            total += float(self.latency(spec))
        return total

    def architecture(self) -> dict:
        """The chosen mapping, precisions and modelled latencies (mapping and single-accelerator)."""
        was_training = self.training
        self.eval()
        try:
            latencies = {"mapping": float(self.cost_of(self.latency))}
            latencies.update({f"all_{a.name}": self.single_accelerator_latency(a.name) for a in self.accelerators})
        finally:
            self.train(was_training)
        return {"mapping": self.mapping(), "latency": latencies, "precisions": self.chosen_precisions(),
                "accelerators": {a.name: {"weight_bits": a.weight_bits, "act_bits": a.act_bits}
                                 for a in self.accelerators}}

    def summary(self) -> str:
        """MPS's table of precisions, then the mapping: per layer the channels on each accelerator
        and its modelled latency, and the totals of the mapping and of every single accelerator."""
        from io import StringIO

        from rich.console import Console
        from rich.table import Table

        was_training = self.training
        self.eval()
        names = [a.name for a in self.accelerators]
        table = Table(title="ODiMO mapping (argmax accelerators)")
        for col in ["layer", *names, "latency"]:
            table.add_column(col, justify="left" if col == "layer" else "right")
        try:
            with torch.no_grad():
                mapping = self.mapping()
                for spec in self.specs:
                    counts = mapping.get(spec.name, {})
                    table.add_row(spec.name, *[str(counts.get(n, "")) for n in names],
                                  f"{float(self.latency(self.effective_spec(spec))):,.0f}")
                latency = self.architecture()["latency"]
        finally:
            self.train(was_training)
        buffer = StringIO()
        Console(file=buffer, width=140).print(table)
        buffer.write(f"latency: mapping {latency['mapping']:,.0f}; "
                     + "; ".join(f"all on {n} {latency[f'all_{n}']:,.0f}" for n in names) + "\n")
        return super().summary() + buffer.getvalue()

    # -- search hooks -------------------------------------------------------------------------
    default_cost = "latency"

    @classmethod
    def search_metadata_keys(cls, **options) -> tuple[str, ...]:
        return (MPSRecord.KEY, ODiMORecord.KEY)


def _with_latency(cost, latency: ParallelLatency):
    """``cost`` with the name "latency" (alone or in a mapping) standing for ``latency``."""
    if isinstance(cost, str) and cost == "latency":
        return latency
    if isinstance(cost, Mapping):
        return {name: latency if fn == "latency" else fn for name, fn in cost.items()}
    return cost

