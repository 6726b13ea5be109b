"""What every phase of an `optimize` run shares: the `Run` (recipe, task, splits, checkpoint,
progress) with its training epoch and validation, and the small tensor helpers around them."""
from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..errors import NonFiniteError
from ..graph import Graph
from .checkpoint import Checkpoint
from .config import Recipe
from .data import Split, Task, as_outputs
from .distributed import Distributed
from .progress import Progress

__all__ = ["Run", "adam", "choose_threads", "evaluate", "state_of", "to_device", "values_from_graph"]

_PHASE_SEEDS = {"warmup": 1, "search": 2, "finetune": 3}


def adam(parameters, **options) -> torch.optim.Adam:
    """The search's Adam: fused (one kernel over every parameter; on small models the per-parameter
    loop of the default implementation is a tenth of a training step)."""
    return torch.optim.Adam(parameters, fused=True, **options)


def evaluate(module: torch.nn.Module, split: Split, task: Task, batch: int = 512,
             dist: Distributed | None = None) -> dict[str, float]:
    """The task's loss and metric(s) on ``split`` (eval mode, no gradients, float32), on the
    device of ``dist`` (default: the CPU); with several processes each rank evaluates its share of
    the batches and every rank gets the same sums (combined in rank order)."""
    dist = dist or Distributed()
    module.eval()
    totals: dict[str, float] = {}
    count = 0
    with torch.no_grad():
        for inputs, target in split.batches(batch, rank=dist.rank, world=dist.world):
            outputs = as_outputs(module(*to_device(inputs, dist.device)))
            count += int(outputs[0].shape[0])
            for key, value in task.scores(outputs, to_device(target, dist.device)).items():
                totals[key] = totals.get(key, 0.0) + value
    if dist.enabled:
        shares = dist.gather((count, totals))
        count, totals = 0, {}
        for share_count, share in shares:
            count += share_count
            for key, value in share.items():
                totals[key] = totals.get(key, 0.0) + value
    return {key: value / max(count, 1) for key, value in totals.items()}


def to_device(tensors: "list[torch.Tensor] | None", device: torch.device) -> "list[torch.Tensor] | None":
    """``tensors`` on ``device`` (host memory is copied asynchronously where it is pinned)."""
    if tensors is None or device.type == "cpu":
        return tensors
    return [t.to(device, non_blocking=True) for t in tensors]


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


def choose_threads(requested: int | None, macs: float, batch: int, processes: int = 1) -> int:
    """torch CPU threads: ``requested``, else 1 for small models (threads cost more than they
    bring below ~50 M MACs per batch) and otherwise the idle cores (an oversubscribed machine
    makes torch's spinning threads many times slower than one), shared by the ``processes`` of a
    data-parallel run on this machine."""
    if requested:
        return max(1, int(requested))
    if macs * batch < 50e6:
        return 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = 0.0
    idle = ((os.cpu_count() or 1) - load) / max(processes, 1)
    return max(1, min(torch.get_num_threads(), int(idle)))


class _Objective(torch.nn.Module):
    """One training step's loss, ``task loss + regularizer()``, as a module: under DDP the whole
    objective is the wrapped forward, so the gradient of every parameter it reaches — weights
    through the task loss, architecture parameters through the forward *and* the cost — is
    averaged over the ranks exactly once. The cost gradient is the same on every rank (the
    parameters are), so its average is itself; the task gradients average to the gradient of the
    global batch. The forward runs under autocast when asked; the loss and the cost do not (they
    stay float32 / float64)."""

    def __init__(self, model: torch.nn.Module, task: Task, autocast) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.autocast = autocast

    def forward(self, inputs: list[torch.Tensor], target, regularizer) -> torch.Tensor:
        with self.autocast():
            outputs = as_outputs(self.model(*inputs))
        loss = self.task.loss([o.float() if o.is_floating_point() else o for o in outputs], target)
        if regularizer is not None:
            loss = loss + regularizer()
        return loss


@dataclass
class Run:
    """The phases' shared state: the data, the task, the checkpoint, the progress display, and
    where the run computes (``dist``: its device and, under torchrun, its rank among the
    processes; ``amp``: mixed precision in the forward pass)."""

    recipe: Recipe
    task: Task
    train: Split
    val: Split
    ckpt: Checkpoint
    bar: Progress
    seed: int
    callback: Callable[[str, int, dict], None] | None = None
    dist: Distributed = field(default_factory=Distributed)
    amp: bool = False
    _objective: tuple | None = field(default=None, init=False, repr=False)
    _scaler: torch.amp.GradScaler | None = field(default=None, init=False, repr=False)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def rng(self, phase: str, epoch: int) -> np.random.Generator:
        """The shuffling of ``phase``'s epoch ``epoch`` (the same on a resumed run, and one order
        for all the ranks, each of which trains on its share)."""
        return np.random.default_rng([self.seed, _PHASE_SEEDS[phase], epoch])

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one training epoch (each rank's share of the batches)."""
        return self.train.num_batches(self.recipe.batch_size, world=self.dist.world)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Loss and metric on the validation split (the same numbers on every rank)."""
        return evaluate(model, self.val, self.task, dist=self.dist)

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` moved to the run's device (float32 parameters stay float32)."""
        return model.to(self.device) if self.device.type != "cpu" else model

    def info(self, scores: dict[str, float], extra: str = "") -> str:
        """An epoch's validation figures for the progress bar."""
        metric = scores[self.task.metric]
        shown = f"{100 * metric:.2f}%" if self.task.metric == "accuracy" else f"{metric:.4g}"
        return f"val loss {scores['loss']:.4f}  {self.task.metric} {shown}{extra}"

    def epoch_done(self, phase: str, epoch: int, info: dict) -> None:
        """Tell the caller's callback (after the epoch's checkpoint)."""
        if self.callback:
            self.callback(phase, epoch, info)

    def _autocast(self):
        if not self.amp:
            return nullcontext()
        kind = self.device.type
        return torch.autocast(kind, dtype=torch.float16 if kind == "cuda" else torch.bfloat16)

    def objective(self, model: torch.nn.Module) -> torch.nn.Module:
        """The loss module of ``model`` (under DDP with several processes; one per model)."""
        if self._objective is None or self._objective[0] is not model:
            self._objective = (model, self.dist.wrap(_Objective(model, self.task, self._autocast)))
        return self._objective[1]

    def scaler(self) -> torch.amp.GradScaler:
        """The run's gradient scaler: active with ``amp`` on CUDA (float16), a pass-through
        otherwise. A resumed run goes on from the checkpointed loss scale (`commit`) instead of
        searching for it again from the initial one."""
        if self._scaler is None:
            self._scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp and self.device.type == "cuda")
            if self.ckpt.state.get("scaler"):
                self._scaler.load_state_dict(self.ckpt.state["scaler"])
        return self._scaler

    def commit(self, phase: str, record: dict) -> None:
        """Checkpoint ``phase``'s ``record``, and the gradient scaler's state with it."""
        self.ckpt.state["scaler"] = self.scaler().state_dict()
        self.ckpt.commit(phase, record)

    def scaler_state(self) -> dict:
        """The gradient scaler's state for a phase's checkpoint record (its loss scale and growth
        tracker, plain numbers; empty while the scaler is a pass-through)."""
        return self.scaler().state_dict()

    def restore_scaler(self, state: dict | None) -> None:
        """Go on from a checkpointed `scaler_state`: a resumed float16 run keeps the loss scale it
        had learned instead of searching for it again from the initial one."""
        if state:
            self.scaler().load_state_dict(state)

    def train_epoch(self, phase: str, model, optimizers, epoch: int, epochs: int,
                    regularizer: Callable[[], torch.Tensor] | None = None,
                    after_step: Callable[[], None] | None = None) -> float:
        """One epoch over (this rank's share of) the training split: every optimizer steps on
        ``task loss + regularizer()`` per batch, then ``after_step()``; returns the mean training
        loss over all ranks."""
        model.train()
        objective, scaler, device = self.objective(model), self.scaler(), self.device
        count = self.steps_per_epoch()
        # The loss is summed on the device and read once per epoch: no host sync per step.
        total = torch.zeros((), dtype=torch.float64, device=device)
        batches = self.train.batches(self.recipe.batch_size, self.rng(phase, epoch), rank=self.dist.rank,
                                     world=self.dist.world)
        for b, (inputs, target) in enumerate(batches):
            loss = objective(to_device(inputs, device), to_device(target, device), regularizer)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            for opt in optimizers:
                scaler.step(opt)
            scaler.update()
            if after_step is not None:
                after_step()
            total = total + loss.detach()
            if b % 4 == 0:
                self.bar.step(epoch - 1 + (b + 1) / count)
        self.dist.broadcast_buffers(model)
        mean = self.dist.all_sum([float(total)])[0] / max(count * self.dist.world, 1)
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
