"""`SearchHooks`: what the optimization flow (`plinio_onnx.optimize`) asks of a searchable model.

The flow trains every method the same way (weights and architecture parameters, a cost
regularizer or a moving cost target, checkpoints); what differs between PIT, MPS and SuperNet is
answered by the model itself through these hooks. Every hook has a neutral default, so a method
overrides only what it needs. A new method is searchable by ``optimize`` once its model class
derives from `SearchableModel` (which carries these hooks) and is listed in
`plinio_onnx.optimize.methods`.

Besides the hooks the flow uses the model's public API: ``net_parameters()``, ``cost_of(cost)``,
``searchable_graph()``, ``export()``, ``train()``/``eval()`` and the forward.
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch


class SearchHooks:
    """The search phase's questions to a searchable model; the defaults suit a model whose
    architecture parameters are all alike and which has no cost-target repair of its own."""

    #: The cost model when neither ``cost`` nor a target names one.
    default_cost: ClassVar[str] = "params"
    #: Whether cost targets (``target_params`` / ``target_macs``) apply to the method.
    supports_targets: ClassVar[bool] = True
    #: Whether the exported graph is fine-tuned as a plain float model afterwards (not for
    #: quantized models, whose weights train during the search with straight-through rounding).
    finetune_export: ClassVar[bool] = True
    #: What `min_cost`'s architecture is, for the error of a target below it.
    cheapest_architecture: ClassVar[str] = ("one channel block per searched layer, the lowest precisions, "
                                            "unsearched layers whole")

    @classmethod
    def search_metadata_keys(cls, **options: Any) -> tuple[str, ...]:
        """The metadata records a searchable graph built with ``options`` holds (a checkpoint is
        resumed by the method whose records it holds, the method with most records first)."""
        return ()

    @property
    def nas_lr_floor(self) -> float:
        """The least learning rate of the architecture parameters (logits move further than
        masks, so they need more)."""
        return 0.0

    def nas_param_groups(self, lr_nas: float) -> list[dict]:
        """The architecture optimizer's parameter groups: one at ``lr_nas`` unless the model mixes
        parameters that move at different speeds (a group may carry its own ``"lr"``)."""
        return [{"params": list(self.nas_parameters())}]

    def min_cost(self, cost) -> float | None:
        """The cheapest reachable architecture's cost (an impossible target fails before any
        training); None when unknown. Edits the architecture: call it on a throw-away model."""
        with torch.no_grad():
            for param in self.nas_parameters():
                param.zero_()
            return float(self.cost_of(cost))

    def before_search(self, inputs: Sequence[torch.Tensor]) -> None:
        """Called once on a fresh searchable model with a batch of training inputs."""

    def after_search_epoch(self, epoch: int, epochs: int) -> None:
        """Called after every search epoch (temperature schedules)."""

    def architecture(self) -> dict:
        """A JSON-able description of the chosen architecture (for the report)."""
        return {}

    def architecture_snapshot(self) -> Any:
        """What `restore_marginal` needs to know of the architecture before a step (None: nothing)."""
        return None

    def restore_marginal(self, cost, floor: float, before: Any) -> int:
        """Undo the most marginal pruning decisions taken since ``before`` (an
        `architecture_snapshot`) until the discrete cost is ≥ ``floor``, so a search follows its
        moving target instead of collapsing past it; returns how many were undone."""
        return 0

    def enforce_target(self, cost, target: float) -> bool:
        """Edit the architecture parameters until the discrete cost is ≤ ``target`` (for a search
        that ended above it); True on success."""
        return False
