"""What every phase of an `optimize` run shares: the `Run` (recipe, task, splits, checkpoint,
progress) with its training epoch and validation, and the small tensor helpers around them."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import NonFiniteError
from ..graph import Graph
from .checkpoint import Checkpoint
from .config import Recipe
from .data import Split, Task, as_outputs
from .progress import Progress

__all__ = ["Run", "adam", "choose_threads", "evaluate", "state_of", "values_from_graph"]

_PHASE_SEEDS = {"warmup": 1, "search": 2, "finetune": 3}


def adam(parameters, **options) -> torch.optim.Adam:
    """The search's Adam: fused (one kernel over every parameter; on small models the per-parameter
    loop of the default implementation is a tenth of a training step)."""
    return torch.optim.Adam(parameters, fused=True, **options)


def evaluate(module: torch.nn.Module, split: Split, task: Task, batch: int = 512) -> dict[str, float]:
    """The task's loss and metric(s) on ``split`` (eval mode, no gradients)."""
    module.eval()
    totals: dict[str, float] = {}
    with torch.no_grad():
        for inputs, target in split.batches(batch):
            for key, value in task.scores(as_outputs(module(*inputs)), target).items():
                totals[key] = totals.get(key, 0.0) + value
    return {key: value / len(split) for key, value in totals.items()}


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module``'s state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def values_from_graph(module: torch.nn.Module, graph: Graph) -> dict[str, torch.Tensor]:
    """A state dict for ``module`` (made by to_torch) with the values of ``graph``'s initializers."""
    constants = graph.initializers()
    state = module.state_dict()
    out = {}
    for attr, onnx_name in module.initializer_names.items():
        if onnx_name in constants and attr in state:
            out[attr] = torch.from_numpy(np.array(constants[onnx_name].values)).to(state[attr].dtype).reshape(
                state[attr].shape)
    for path, param, names in getattr(module, "parameter_initializers", lambda: ())():
        if path not in out and path in state and names and all(n in constants for n in names):  # packed
            out[path] = torch.from_numpy(np.concatenate(
                [np.asarray(constants[n].values).reshape(-1) for n in names])).to(param.dtype)
    return out


def choose_threads(requested: int | None, macs: float, batch: int) -> int:
    """torch CPU threads: ``requested``, else 1 for small models (threads cost more than they
    bring below ~50 M MACs per batch) and otherwise the idle cores (an oversubscribed machine
    makes torch's spinning threads many times slower than one)."""
    if requested:
        return max(1, int(requested))
    if macs * batch < 50e6:
        return 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = 0.0
    idle = (os.cpu_count() or 1) - load
    return max(1, min(torch.get_num_threads(), int(idle)))


@dataclass
class Run:
    """The phases' shared state: the data, the task, the checkpoint and the progress display."""

    recipe: Recipe
    task: Task
    train: Split
    val: Split
    ckpt: Checkpoint
    bar: Progress
    seed: int
    callback: Callable[[str, int, dict], None] | None = None

    def rng(self, phase: str, epoch: int) -> np.random.Generator:
        """The shuffling of ``phase``'s epoch ``epoch`` (the same on a resumed run)."""
        return np.random.default_rng([self.seed, _PHASE_SEEDS[phase], epoch])

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Loss and metric on the validation split."""
        return evaluate(model, self.val, self.task)

    def info(self, scores: dict[str, float], extra: str = "") -> str:
        """An epoch's validation figures for the progress bar."""
        metric = scores[self.task.metric]
        shown = f"{100 * metric:.2f}%" if self.task.metric == "accuracy" else f"{metric:.4g}"
        return f"val loss {scores['loss']:.4f}  {self.task.metric} {shown}{extra}"

    def epoch_done(self, phase: str, epoch: int, info: dict) -> None:
        """Tell the caller's callback (after the epoch's checkpoint)."""
        if self.callback:
            self.callback(phase, epoch, info)

    def train_epoch(self, phase: str, model, optimizers, epoch: int, epochs: int,
                    regularizer: Callable[[], torch.Tensor] | None = None,
                    after_step: Callable[[], None] | None = None) -> float:
        """One epoch over the training split: every optimizer steps on ``task loss +
        regularizer()`` per batch, then ``after_step()``; returns the mean training loss."""
        model.train()
        count = self.train.num_batches(self.recipe.batch_size)
        # The loss is summed on the device and checked once per epoch: no host sync per step.
        total = torch.zeros((), dtype=torch.float64)
        for b, (inputs, target) in enumerate(self.train.batches(self.recipe.batch_size, self.rng(phase, epoch))):
            loss = self.task.loss(as_outputs(model(*inputs)), target)
            if regularizer is not None:
                loss = loss + regularizer()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            if after_step is not None:
                after_step()
            total = total + loss.detach()
            if b % 4 == 0:
                self.bar.step(epoch - 1 + (b + 1) / count)
        mean = float(total) / max(count, 1)
        if not math.isfinite(mean):
            raise NonFiniteError(f"NaN/Inf in the training loss: it diverged in {phase} epoch {epoch} "
                                 "(the data's scale — regression targets included — or a too high learning "
                                 "rate); nothing was written")
        return mean

    def reference_loss(self, initial: float) -> float:
        """The loss scale that sets the default strength and the first λ: the warmed-up model's
        validation loss, or — when it is ~0, as when distilling from the input model itself —
        1 % of the targets' variance (a 10 % RMS deviation from the teacher)."""
        spread = self.train.target_variance() if self.task.kind != "classification" else 1.0
        return max(initial, 1e-2 * spread, 1e-8)
