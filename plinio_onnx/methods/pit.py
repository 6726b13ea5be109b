"""`PIT`: the PLiNIO-style entry point for PIT on an ONNX model.

    model = po.PIT("model.onnx", cost=po.cost.params)
    loss = criterion(model(x), y) + strength * model.cost
    model.export("pruned.onnx")
"""
from __future__ import annotations

import os
from typing import Iterable

import numpy as np
import onnx
import torch

from plinio_onnx.passes.pit import LAYER_OPS, MASKS, pit
from plinio_onnx.records import PITRecord

from ..cost import LayerSpec, ModelCost, macs, params
from ..graph import Graph
from ..to_torch.fuse_pit_masks import fuse_pit_masks
from .pit_channels import PITChannels
from .pit_edits import PITMaskEdits
from .searchable import CostFn, SearchableModel, as_graph, as_int, layer_table, render_summary



class PIT(SearchableModel):
    """PIT (channel, receptive-field and dilation masks) on an ONNX model.

    ``model``: a path, ``onnx.ModelProto`` or `Graph`; a graph already searchable by PIT (a
    checkpoint written by `searchable_graph().save(...)`) resumes as it is. The other arguments
    are those of `plinio_onnx.passes.pit` (``channel_multiple`` N: channels searched in blocks of
    N, so that every pruned layer keeps a multiple of N). ``discrete_cost``: cost from binarized masks
    (straight-through gradients) — the exported model's cost — instead of continuous |θ|.

    In eval and train mode alike the forward uses binarized masks, so what you evaluate is what
    `export` writes. The module computes every mask in one fused node (`fuse_pit_masks`); the
    cost (`cost`, `cost_of`) reuses the masks of the last forward while they are current.
    ``pit``: the `PITChannels` that counts the kept channels and taps.
    """

    module_passes = (fuse_pit_masks,)

    def __init__(self, model: "str | os.PathLike | onnx.ModelProto | Graph", *,
                 cost: "CostFn | str" = "params", include: Iterable[str] | None = None,
                 exclude: Iterable[str] | None = None, op_types: Iterable[str] = LAYER_OPS,
                 masks: Iterable[str] = MASKS, threshold: float = 0.5, discrete_cost: bool = True,
                 channel_multiple: int = 1) -> None:
        graph = as_graph(model)
        if not PITRecord.present(graph):
            graph = pit(graph, include=include, exclude=exclude, op_types=op_types, masks=masks,
                        threshold=threshold, channel_multiple=channel_multiple)
        super().__init__(graph, cost)
        self.pit = PITChannels(self.module, PITRecord.of(graph), discrete_cost)
        self._nas_names = frozenset(self.info.mask_parameters())

    @property
    def info(self) -> PITRecord:
        """The PIT record of the searchable graph (groups, masks, layers)."""
        return self.pit.info

    @property
    def threshold(self) -> float:
        """Kept means |θ| > threshold (`PITChannels.threshold`)."""
        return self.pit.threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.pit.threshold = float(value)

    @property
    def discrete_cost(self) -> bool:
        """Whether the cost counts binarized masks (`PITChannels.discrete_cost`)."""
        return self.pit.discrete_cost

    @discrete_cost.setter
    def discrete_cost(self, value: bool) -> None:
        self.pit.discrete_cost = bool(value)

    def _is_nas_parameter(self, onnx_name: str) -> bool:
        return onnx_name in self._nas_names

    # -- effective sizes ----------------------------------------------------------------------
    def cost_of(self, cost: "CostFn | str | ModelCost") -> torch.Tensor:
        if isinstance(cost, ModelCost):
            return cost.of(self)
        return self.pit.cost_of(self.cost_fn(cost), self.specs)

    def channels(self, gid: int) -> torch.Tensor | int:
        """Effective channel count of analysis group ``gid`` (static when not searched)."""
        return self.pit.channels(gid)

    def part(self, gid: int, channels: list[int] | None) -> torch.Tensor | int:
        """Effective count of ``channels`` of group ``gid`` (all of them: None)."""
        return self.pit.part(gid, channels)

    def kernel(self, node: str, static: int):
        """Effective kernel size of Conv1d ``node``."""
        return self.pit.kernel(node, static)

    def effective_spec(self, spec: LayerSpec) -> LayerSpec:
        return self.pit.effective_spec(spec)

    # -- reporting ----------------------------------------------------------------------------
    def kept_channels(self) -> dict[str, tuple[int, int]]:
        """For every searched group (named after its first producer): (kept, total)."""
        return self.pit.kept_channels()

    # -- search hooks (`SearchHooks`: what `plinio_onnx.optimize` asks) -----------------------
    @classmethod
    def search_metadata_keys(cls, **options) -> tuple[str, ...]:
        return (PITRecord.KEY,)

    def architecture(self) -> dict:
        """A JSON-able description of the chosen architecture: kept/total channels per group."""
        return {"kept_channels": {name: {"kept": kept, "total": total}
                                  for name, (kept, total) in self.kept_channels().items()}}

    def _mask_edits(self, cost) -> PITMaskEdits:
        return PITMaskEdits(self.pit, lambda: self.cost_of(cost))

    def architecture_snapshot(self) -> dict[str, np.ndarray]:
        return self._mask_edits("params").kept()

    def restore_marginal(self, cost, floor: float, before) -> int:
        """Re-keep the channels that crossed the threshold since ``before``, those closest to it
        first, until the cost is back at ``floor``."""
        return self._mask_edits(cost).restore(floor, before)

    def enforce_target(self, cost, target: float) -> bool:
        """Greedy fallback: prune the kept channel with the smallest mask until the cost fits."""
        return self._mask_edits(cost).enforce(target)

    def summary(self) -> str:
        """A readable table: every layer's kept input/output channels and kernel, and the costs."""
        rows = []
        with torch.no_grad():
            for spec in self.specs:
                eff = self.effective_spec(spec)
                rows.append((spec.name, spec.op, f"{as_int(eff.in_channels)}/{spec.in_channels}",
                             f"{as_int(eff.out_channels)}/{spec.out_channels}",
                             f"{as_int(eff.kernel_size)}/{spec.kernel_size}",
                             f"{as_int(params(eff)):,}", f"{as_int(macs(eff)):,}"))
            total = (f"{as_int(self.cost_of('params')):,}", f"{as_int(self.cost_of('macs')):,}")
        table = layer_table("PIT architecture", rows, total)
        return render_summary(table, [f"{s.group} ({s.reason})" for s in self.info.skipped])
