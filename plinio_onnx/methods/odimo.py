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
from .accelerators import (ANALOG, CHANNELS_KEY, DEFAULT_ACCELERATORS, DIGITAL, Accelerator, ParallelLatency,
                           mapped_specs)
from .mps import MPS
from .searchable import CostFn, as_graph

#: ``po.odimo`` is this module: `ODiMO` and the accelerators it maps onto.
__all__ = ["ANALOG", "Accelerator", "DEFAULT_ACCELERATORS", "DIGITAL", "ODiMO", "ParallelLatency", "mapped_specs"]


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
        effective.weight_bits = (counts * self._bit_table(layer.bits, counts.device)).sum() / float(layer.channels)
        effective.input_bits = self._input_bits[spec.name]
        effective.extra = {**spec.extra, CHANNELS_KEY: dict(zip(mapped.accelerators, counts.unbind()))}
        return effective

    def effective_specs(self) -> list[LayerSpec]:
        """Layer by layer (`effective_spec`: channel counts per accelerator, not MPS's bits)."""
        return [self.effective_spec(spec) for spec in self.specs]

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
    cheapest_architecture = "every layer at its fastest split between the accelerators"

    def min_cost(self, cost) -> float | None:
        """The least parallel latency a mapping reaches: every layer at its fastest split (layers
        are independent, so this is exact; enumerated for layers with two units, None when a
        per-channel layer has more). Edits the mapping: call it on a throw-away model."""
        if not isinstance(cost, ParallelLatency):
            return super().min_cost(cost)
        best = {spec.name: self._fastest_counts(cost, spec) for spec in self.specs if spec.name in self._mapped}
        if any(counts is None for counts in best.values()):
            return None
        for node, counts in best.items():
            self._assign(node, counts)
        return self._discrete_cost(cost)

    def enforce_target(self, cost, target: float) -> bool:
        """Fallback for a search that ended above a latency ``target``: move layers to their
        fastest split (`min_cost`'s), the layer with most latency to gain first, and in each the
        channels whose logits choose their unit by the smallest margin, until the discrete
        latency is ≤ ``target``. Other costs: MPS's fallback."""
        if not isinstance(cost, ParallelLatency):
            return super().enforce_target(cost, target)
        gains = []
        with torch.no_grad():
            mapping = self.mapping()
            for spec in self.specs:
                counts = mapping.get(spec.name)
                fastest = self._fastest_counts(cost, spec, near=counts) if counts else None
                if fastest is not None:
                    gain = _layer_latency(cost, spec, counts) - _layer_latency(cost, spec, fastest)
                    gains.append((gain, spec.name, fastest))
        for gain, node, fastest in sorted(gains, key=lambda g: -g[0]):
            if self._discrete_cost(cost) <= target:
                return True
            if gain > 0:
                self._assign(node, fastest)
        return self._discrete_cost(cost) <= target

    def _discrete_cost(self, cost) -> float:
        was_training = self.training
        self.eval()   # the argmax mapping: what the export writes
        try:
            with torch.no_grad():
                return float(self.cost_of(cost))
        finally:
            self.train(was_training)

    def _fastest_counts(self, cost: ParallelLatency, spec: LayerSpec,
                        near: Mapping[str, int] | None = None) -> dict[str, int] | None:
        """The channels per unit of layer ``spec`` with the least latency under ``cost`` (ties:
        the split nearest ``near``); None for a per-channel layer on more than two units."""
        mapped, channels = self._mapped[spec.name], int(spec.out_channels)
        units = list(mapped.accelerators)
        if not mapped.per_channel or len(units) == 1:
            candidates = [{unit: channels if unit == chosen else 0 for unit in units} for chosen in units]
        elif len(units) == 2:
            candidates = [{units[0]: n, units[1]: channels - n} for n in range(channels + 1)]
        else:
            return None
        near = near or {}
        return min(candidates, key=lambda c: (_layer_latency(cost, spec, c),
                                              sum(abs(c[u] - near.get(u, 0)) for u in units)))

    @torch.no_grad()
    def _assign(self, node: str, counts: Mapping[str, int]) -> None:
        """Set layer ``node``'s logits so that its argmax mapping has ``counts`` channels per unit:
        the channels that change unit are those whose logits prefer their unit least."""
        mapped, layer = self._mapped[node], self._layers[node]
        alpha = self.tensor(layer.alpha)
        if not mapped.per_channel:
            chosen = max(counts, key=lambda unit: counts[unit])
            alpha.view(-1)[mapped.accelerators.index(chosen)] = alpha.max() + 1e-3
            return
        logits = alpha.view(len(mapped.accelerators), -1)
        choice = logits.argmax(0).cpu().numpy()
        for source, unit in enumerate(mapped.accelerators):
            surplus = int((choice == source).sum()) - int(counts.get(unit, 0))
            if surplus <= 0:
                continue
            other = 1 - source   # two units (see `_fastest_counts`)
            margin = (logits[source] - logits[other]).cpu().numpy()
            movers = [c for c in np.argsort(margin, kind="stable") if choice[c] == source][:surplus]
            for c in movers:
                logits[other, c] = logits[source, c] + 1e-3

    @classmethod
    def search_metadata_keys(cls, **options) -> tuple[str, ...]:
        return (MPSRecord.KEY, ODiMORecord.KEY)


def _layer_latency(cost: ParallelLatency, spec: LayerSpec, counts: Mapping[str, int]) -> float:
    """``cost`` of layer ``spec`` with ``counts`` output channels on each unit."""
    return float(cost(spec.with_(extra={**spec.extra, CHANNELS_KEY: dict(counts)})))


def _with_latency(cost, latency: ParallelLatency):
    """``cost`` with the name "latency" (alone or in a mapping) standing for ``latency``."""
    if isinstance(cost, str) and cost == "latency":
        return latency
    if isinstance(cost, Mapping):
        return {name: latency if fn == "latency" else fn for name, fn in cost.items()}
    return cost

