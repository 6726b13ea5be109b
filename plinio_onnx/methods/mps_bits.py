"""`BatchedBits`: every MPS layer's expected weight and input bit-widths in a handful of ops.

`plinio_onnx.methods.mps.MPS.weight_bits` and ``input_bits`` compute one layer at a time: a
relaxation (softmax) of its logits, a product with the bit table and a mean, each op and its
backward node per layer, every step — on a small model most of the cost's time. The logits train
packed in one flat parameter (`plinio_onnx.to_torch.pack_parameters`), so every quantizer's logit
column can be gathered at once: one gather per number of precisions into a [P, N] matrix, one
relaxation of it (`plinio_onnx.functions.relaxation.cost_weights` works column by column), one
weighted sum over the precisions, one segment sum into the layers' slots (a weight's columns: its
channels; an activation: one column) and one division by the slots' column counts.

The values are the per-layer ones (the same relaxation per column; in eval, where θ is one-hot,
exactly the same integers and means); in training the sums may be added in another order.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..functions import relaxation


class BatchedBits:
    """The plan of the batched computation over ``layers`` (`plinio_onnx.records.QuantizedLayer`s,
    with ``activations`` by tensor): per number of precisions, the logit positions in the packed
    parameter [P, N], the bit table [P, N] and each column's slot; every slot's column count."""

    def __init__(self, packed: str, columns: dict[int, list[tuple[list[int], list[int], int]]],
                 counts: list[int], slots: dict[str, tuple[int, int]]) -> None:
        self.packed = packed                  # the packed parameter's path in the module
        self._columns = columns               # P -> [(positions [P], bits [P], slot)]
        self._counts = counts                 # columns per slot
        self.slots = slots                    # layer -> (weight slot, input slot)
        self._tensors: dict = {}

    @classmethod
    def plan(cls, module, layers, activations, attribute_of: Callable[[str], str]) -> "BatchedBits | None":
        """The plan for ``module``'s layers, or None where one of their logit tensors is not in
        one packed parameter (a fixed choice's, or nothing packed) or an activation's is not [P]."""
        packed_at = getattr(module, "packed", {})
        places = {}
        for name in {layer.alpha for layer in layers} | {activations[layer.activation].alpha for layer in layers}:
            place = packed_at.get(attribute_of(name))
            if place is None:
                return None
            places[name] = place
        if len({path for path, _, _ in places.values()}) != 1:
            return None
        columns: dict[int, list] = {}
        counts: list[int] = []
        slots: dict[str, tuple[int, int]] = {}
        input_slots: dict[str, int] = {}

        def add(name: str, bits, slot: int) -> int:
            _, offset, shape = places[name]
            width = 1 if len(shape) == 1 else shape[1]
            for c in range(width):
                columns.setdefault(shape[0], []).append(([offset + p * width + c for p in range(shape[0])],
                                                         list(bits), slot))
            return width

        for layer in layers:
            act = activations[layer.activation]
            if len(places[act.alpha][2]) != 1 or len(places[layer.alpha][2]) not in (1, 2):
                return None
            weight_slot = len(counts)
            counts.append(add(layer.alpha, layer.bits, weight_slot))
            input_slot = input_slots.get(act.tensor)
            if input_slot is None:
                input_slot = input_slots[act.tensor] = len(counts)
                counts.append(add(act.alpha, act.bits, input_slot))
            slots[layer.node] = (weight_slot, input_slot)
        return cls(next(iter(places.values()))[0], columns, counts, slots)

    def _on(self, device: torch.device):
        """(per P: positions [P·N] long, bits [P, N] float64, slots [N] long; counts [S] float64),
        made once per device."""
        made = self._tensors.get(device)
        if made is None:
            groups = []
            for count, entries in self._columns.items():
                positions = torch.tensor([[e[0][p] for e in entries] for p in range(count)], device=device)
                bits = torch.tensor([[float(e[1][p]) for e in entries] for p in range(count)], dtype=torch.float64,
                                    device=device)
                groups.append((positions.reshape(-1), positions.shape, bits,
                               torch.tensor([e[2] for e in entries], device=device)))
            counts = torch.tensor([float(c) for c in self._counts], dtype=torch.float64, device=device)
            made = self._tensors[device] = (groups, counts)
        return made

    def __call__(self, logits: torch.Tensor, temperature, sampling: str, training: bool
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """layer -> (expected weight bits, expected input bits) as 0-dim float64 tensors, from the
        packed ``logits`` (θ as `plinio_onnx.functions.relaxation.cost_weights` gives it)."""
        groups, counts = self._on(logits.device)
        totals = torch.zeros(counts.shape, dtype=torch.float64, device=logits.device)
        for positions, shape, bits, slots in groups:
            theta = relaxation.cost_weights(logits[positions].view(shape), temperature, sampling, training)
            totals = totals.index_add(0, slots, (theta.to(torch.float64) * bits).sum(0))
        values = (totals / counts).unbind()
        return {node: (values[w], values[i]) for node, (w, i) in self.slots.items()}

