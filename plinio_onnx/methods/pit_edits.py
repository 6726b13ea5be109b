"""Direct edits of PIT channel masks for a cost-constrained search (`SearchHooks` of PIT, and of
a SuperNet searched jointly with PIT): remember which channels are kept, re-keep the channels a
step pruned past a cost floor, prune the weakest channels down to a cost target.

A channel is kept while its mask value θ (`plinio_onnx.functions.pit_keep.keep_alive`: the last
channel of a group always counts as kept) is above the threshold.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ..functions.pit_keep import keep_alive

if TYPE_CHECKING:
    from .pit_channels import PITChannels


class PITMaskEdits:
    """The channel masks of ``pit`` (a model's `PITChannels`), read and written in place;
    ``cost()`` is the model's current discrete cost (a tensor)."""

    def __init__(self, pit: "PITChannels", cost: Callable[[], torch.Tensor]) -> None:
        self.tensor = pit.tensor
        self.threshold = pit.threshold
        self._names = pit.mask_names
        self.cost = cost

    def _theta(self, name: str) -> np.ndarray:
        return keep_alive(self.tensor(name).detach().cpu().numpy())

    def kept(self) -> dict[str, np.ndarray]:
        """Which channels each mask parameter keeps now (a snapshot for `restore`)."""
        return {name: self._theta(name) > self.threshold for name in self._names()}

    def restore(self, floor: float, before: dict[str, np.ndarray] | None) -> int:
        """Re-keep the channels pruned since ``before`` (a `kept` snapshot), those closest to the
        threshold first, until the cost is back at ``floor``; returns how many."""
        restored = 0
        with torch.no_grad():
            if before is None or float(self.cost()) >= floor:
                return 0
            candidates = []
            for name, kept_before in before.items():
                theta = self._theta(name)
                for i in np.flatnonzero(kept_before & (theta <= self.threshold)):
                    candidates.append((-float(theta[i]), name, int(i)))
            candidates.sort()
            for _, name, index in candidates:
                alpha = self.tensor(name)
                alpha[index] = (self.threshold + 1e-3) * (1.0 if float(alpha[index]) >= 0 else -1.0)
                restored += 1
                if float(self.cost()) >= floor:
                    break
        return restored

    def enforce(self, target: float) -> bool:
        """Prune the kept channel with the smallest θ until the cost is ≤ ``target``; True on
        success (the last channel of a group is never pruned)."""
        with torch.no_grad():
            candidates = []
            for name in self._names():
                values = self._theta(name)
                for i in range(values.size - 1):  # the last channel is kept alive
                    if values[i] > self.threshold:
                        candidates.append((float(values[i]), name, i))
            candidates.sort()
            for _, name, index in candidates:
                if float(self.cost()) <= target:
                    return True
                self.tensor(name)[index] = 0.0
            return float(self.cost()) <= target
