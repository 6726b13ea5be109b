"""The optimization flow behind ``plinio-onnx optimize``: warm-up → search → export → fine-tune.

PLiNIO's recommended recipe (``METHODS.md``, "Training flow") on an ONNX model and an ``.npz``
dataset, with nothing but the model, the data, an output path and (optionally) a cost target::

    report = optimize("model.onnx", "data.npz", output="small.onnx", target_params="50%")

1. **Data.** ``x`` (or one array per graph input, named after it) and optional ``y``. The tool
   holds out its own splits with a fixed seed: a test split (20 %) that no phase ever sees, and a
   validation split (20 % of the rest) for early stopping and architecture selection; class
   labels are split stratified. The task is inferred (``labels="auto"``): classification when
   ``y`` is integer and the model outputs ``[N, K, ...]`` with ``K > max(y)``, else regression
   (MSE); without ``y`` the pruned model is distilled from the input model's outputs (MSE).
2. **Warm-up.** Plain training of the input model (SGD lr 0.01, momentum 0.9, wd 1e-4, early
   stopping on the validation loss; the untouched input model competes as "epoch 0", so an
   already trained model is not spoiled). Skipped in distillation mode, where the input model
   *is* the teacher.
3. **Search.** The method's searchable model (``method="pit"``: `plinio_onnx.PIT`) with two
   Adam optimizers: weights (lr 1e-3, wd 1e-4) and architecture parameters (wd 0; lr 5e-4 or
   more, scaled so a mask can cross its threshold within a fraction of the epoch budget). Both
   step on every training batch with ``task loss + regularizer``:

   * ``strength=S``: ``S · cost`` (PLiNIO's regularizer); by default ``S = L0 / C0``, the
     warmed-up model's validation loss over its cost;
   * a target (``target_params`` / ``target_macs``, absolute or ``"50%"`` of the input model):
     ``λ · max(0, cost − 0.97·T) / target`` against a *moving* target ``T`` that goes
     geometrically from the input model's cost to the target over the first 40 % of the search
     (gradual pruning). ``λ`` (first value: the warmed-up validation loss) is raised
     geometrically on every step whose discrete cost — the exported model's — is above ``T`` and
     relaxed while it is below; masks move together under Adam, so when many cross the
     threshold at once, the ones nearest to it are re-kept until the cost is back at ``0.95·T``
     (no collapse past the schedule, no budget left unused). After the ramp both learning rates
     anneal (cosine), so the architecture freezes and the weights converge. Among the epochs whose discrete
     cost meets the target, the one with the best validation metric is kept (its searchable
     graph is the checkpoint). Should none meet it, the channels with the smallest masks are
     pruned until it is met.

   Deliberate difference from PLiNIO's notebook: the architecture parameters step on the
   training batches too (not on the validation split), so the validation split stays an
   unbiased judge for early stopping and for picking the architecture.
4. **Export + fine-tune.** ``model.export()`` → the deployable graph, fine-tuned with the warm-up
   recipe, written atomically to ``output``.
5. **Report.** Cost (params, MACs) and the test metric before (warmed-up input model) and after
   (the written file, run in ONNX Runtime), the kept channels per layer, per-phase summaries;
   ``OUT.report.json`` and ``OUT.report.md`` next to the output.

Every completed epoch is checkpointed in ``checkpoint_dir`` (default ``OUT.ckpt/``): the ONNX
graphs (the searchable one in the search phase), optimizer state as ``.npz`` and a small
``state.json``; rerunning the same command resumes from the last completed epoch.
"""
from __future__ import annotations

import abc

import hashlib
import json
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from .cost import BY_NAME, layer_specs
from .cost import macs as macs_cost
from .cost import params as params_cost
from .cost import total as cost_total
from .data import input_arrays, load_npz
from .errors import PlinioOnnxError
from .graph import Graph
from .load import load
from .sync import sync
from .to_torch import to_torch

__all__ = ["METHODS", "Recipe", "Report", "optimize", "parse_amount"]

STATE_VERSION = 1
PHASES = ("warmup", "search", "finetune")
TASKS = ("auto", "classification", "regression", "distill")


# ==============================================================================================
# Methods: how to build, resume and (if needed) force a searchable model onto a target
# ==============================================================================================
class Method(abc.ABC):
    """What the flow needs of a search method (PIT, MPS/QAT/PIT+MPS, SuperNet, SuperNet+PIT)."""

    name = ""
    metadata_key = ""

    @abc.abstractmethod
    def build(self, graph: Graph, cost) -> torch.nn.Module:
        """A fresh searchable model on ``graph`` (or the resumed one, for a checkpoint)."""

    def resume(self, graph: Graph, cost) -> torch.nn.Module:
        return self.build(graph, cost)

    def architecture(self, model) -> dict:
        """A JSON-able description of the chosen architecture (for the report)."""
        return {}

    def enforce(self, model, cost, target: float) -> bool:
        """Make the discrete cost ≤ ``target`` by editing architecture parameters; True on success."""
        return False

    def snapshot(self, model):
        """What `restore` needs to know of the architecture before a step (None: nothing)."""
        return None

    def restore(self, model, cost, floor: float, before) -> int:
        """Undo the most marginal pruning decisions of the last step (``before``: its
        `snapshot`) until the discrete cost is ≥ ``floor`` (the search then follows its moving
        target instead of collapsing); returns how many."""
        return 0

    #: The cost model when neither --cost nor a target names one.
    default_cost = "params"
    #: Whether --target-params / --target-macs apply.
    supports_targets = True
    #: A floor for the architecture parameters' learning rate (logits move further than masks).
    min_lr_nas = 0.0

    @property
    def metadata_keys(self) -> tuple[str, ...]:
        """Every metadata record a checkpoint of this method holds (`export_searchable` resumes
        a checkpoint with the method that matches the most of them)."""
        return (self.metadata_key,)

    def nas_param_groups(self, model, lr_nas: float) -> list[dict]:
        """The architecture optimizer's parameter groups (one at ``lr_nas`` unless a method mixes
        parameters that move at different speeds)."""
        return [{"params": list(model.nas_parameters())}]

    def min_cost(self, model, cost) -> float | None:
        """The cheapest architecture's cost (an impossible target fails before training)."""
        with torch.no_grad():
            for p in model.nas_parameters():
                p.zero_()
            return float(model.cost_of(cost))

    def before_search(self, model, inputs: list[torch.Tensor]) -> None:
        """Called once on a fresh searchable model with a batch of training inputs."""

    def after_epoch(self, model, epoch: int, epochs: int) -> None:
        """Called after every search epoch (temperature schedules)."""

    def export(self, model) -> Graph:
        """The deployable graph of the chosen architecture."""
        return model.export()

    #: Whether the exported graph is fine-tuned as a plain float model (not for quantized ones,
    #: whose weights train during the search with straight-through rounding).
    finetune_export = True


class PITMethod(Method):
    name = "pit"

    @property
    def metadata_key(self) -> str:  # type: ignore[override]
        from plinio_onnx.passes.pit import METADATA_KEY
        return METADATA_KEY

    def build(self, graph: Graph, cost):
        from .methods import PIT
        return PIT(graph, cost=cost, discrete_cost=True)

    def snapshot(self, model):
        from .functions import pit as fn
        return {name: fn.keep_alive(model.tensor(name).detach().cpu().numpy()) > model.threshold
                for group in model.info.groups for name in group.alpha}

    def restore(self, model, cost, floor: float, before) -> int:
        """Re-keep the channels that crossed the threshold in the last step, those closest to it
        first, until the cost is back at ``floor``."""
        from .functions import pit as fn
        threshold = model.threshold
        restored = 0
        with torch.no_grad():
            if before is None or float(model.cost_of(cost)) >= floor:
                return 0
            candidates = []
            for name, kept_before in before.items():
                theta = fn.keep_alive(model.tensor(name).detach().cpu().numpy())
                for i in np.flatnonzero(kept_before & (theta <= threshold)):
                    candidates.append((-float(theta[i]), name, int(i)))
            candidates.sort()
            for _, name, index in candidates:
                alpha = model.tensor(name)
                alpha[index] = (threshold + 1e-3) * (1.0 if float(alpha[index]) >= 0 else -1.0)
                restored += 1
                if float(model.cost_of(cost)) >= floor:
                    break
        return restored

    def architecture(self, model) -> dict:
        return {"kept_channels": {name: {"kept": kept, "total": total}
                                  for name, (kept, total) in model.kept_channels().items()}}

    def enforce(self, model, cost, target: float) -> bool:
        """Greedy fallback: prune the kept channel with the smallest |α| until the cost fits."""
        from .functions import pit as fn
        threshold = model.threshold
        with torch.no_grad():
            candidates = []
            for group in model.info.groups:
                for name in group.alpha:
                    values = fn.keep_alive(model.tensor(name).detach().cpu().numpy())
                    for i in range(values.size - 1):  # the last channel is kept alive
                        if values[i] > threshold:
                            candidates.append((float(values[i]), name, i))
            candidates.sort()
            for _, name, index in candidates:
                if float(model.cost_of(cost)) <= target:
                    return True
                model.tensor(name)[index] = 0.0
            return float(model.cost_of(cost)) <= target


class MPSMethod(Method):
    """Mixed-precision search ("mps"), 8-bit QAT ("qat") and PIT + MPS ("pit+mps")."""

    default_cost = "size"
    supports_targets = False
    min_lr_nas = 1e-2
    finetune_export = False

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def metadata_key(self) -> str:  # type: ignore[override]
        from plinio_onnx.passes.mps import METADATA_KEY
        return METADATA_KEY

    def build(self, graph: Graph, cost):
        from .methods.mps import build_searchable
        return build_searchable(self.name, graph, cost)

    def before_search(self, model, inputs) -> None:
        model.calibrate(*inputs)

    def after_epoch(self, model, epoch: int, epochs: int) -> None:
        model.anneal(0.9)

    def export(self, model) -> Graph:
        return model.export(format="qdq")

    def architecture(self, model) -> dict:
        return model.architecture()


class SuperNetMethod(Method):
    name = "supernet"
    default_cost = "macs"
    min_lr_nas = 5e-2

    @property
    def metadata_key(self) -> str:  # type: ignore[override]
        from plinio_onnx.passes.supernet import METADATA_KEY
        return METADATA_KEY

    def build(self, graph: Graph, cost):
        from .methods.supernet import build_searchable
        return build_searchable(graph, cost)

    def min_cost(self, model, cost) -> float | None:
        return None  # `enforce` picks the cheapest branches when the search falls short

    def after_epoch(self, model, epoch: int, epochs: int) -> None:
        from .methods.supernet import exponential_temperature
        model.set_temperature(exponential_temperature(epoch, max(epochs, 1), 1.0, 0.05))

    def architecture(self, model) -> dict:
        return model.architecture()

    def enforce(self, model, cost, target: float) -> bool:
        return model.enforce(cost, target)


class _PITView:
    """The PIT side of a `SuperNet` with ``pit``, shaped as `PITMethod` reads a `PIT` model."""

    def __init__(self, model) -> None:
        self.model = model
        self.info = model.pit.info
        self.threshold = model.pit.threshold
        self.tensor = model.tensor
        self.cost_of = model.cost_of


class SuperNetPITMethod(SuperNetMethod):
    """SuperNet layer selection and PIT channel pruning searched jointly (``po.SuperNet(...,
    pit=True)``): the logits anneal like "supernet", the masks learn like "pit" (their own
    learning rate, re-keeping the most marginal channels under a target); a target the search
    misses is met by switching to cheaper branches, then by pruning the smallest masks."""

    name = "supernet+pit"
    min_lr_nas = 0.0  # the masks' learning rate; the logits get at least SuperNetMethod's

    @property
    def metadata_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        from plinio_onnx.passes.pit import METADATA_KEY as PIT_KEY
        return (self.metadata_key, PIT_KEY)

    def build(self, graph: Graph, cost):
        from .methods.supernet import build_searchable
        return build_searchable(graph, cost, pit=True)

    def nas_param_groups(self, model, lr_nas: float) -> list[dict]:
        choice_logits = set(model.info.logits())
        logits, masks = [], []
        for _, param, names in model.module.parameter_initializers():
            if model._holds_nas(names):
                (logits if all(n in choice_logits for n in names) else masks).append(param)
        groups = [{"params": logits, "lr": max(lr_nas, SuperNetMethod.min_lr_nas)}] if logits else []
        return groups + ([{"params": masks, "lr": lr_nas}] if masks else [])

    def snapshot(self, model):
        return PITMethod.snapshot(self, _PITView(model)) if model.pit is not None else None

    def restore(self, model, cost, floor: float, before) -> int:
        return PITMethod.restore(self, _PITView(model), cost, floor, before) if model.pit is not None else 0

    def enforce(self, model, cost, target: float) -> bool:
        if model.enforce(cost, target):
            return True
        if model.pit is None:
            return False
        was_training = model.training
        model.eval()  # the argmax branches: the exported model's cost
        try:
            return PITMethod.enforce(self, _PITView(model), cost, target)
        finally:
            model.train(was_training)


#: Search methods by name; `optimize(method=...)` picks one.
METHODS: dict[str, Method] = {"pit": PITMethod(), "mps": MPSMethod("mps"), "qat": MPSMethod("qat"),
                              "pit+mps": MPSMethod("pit+mps"), "supernet": SuperNetMethod(),
                              "supernet+pit": SuperNetPITMethod()}
PLANNED: tuple[str, ...] = ()


def adam(parameters, **options) -> torch.optim.Adam:
    """The search's Adam: fused (one kernel over every parameter; on small models the per-parameter
    loop of the default implementation is a tenth of a training step)."""
    return torch.optim.Adam(parameters, fused=True, **options)


def get_method(name: str) -> Method:
    key = str(name).lower()
    if key in METHODS:
        return METHODS[key]
    supported = ", ".join(sorted(METHODS))
    if key in PLANNED:
        raise PlinioOnnxError(f"method {name!r} is not available yet; supported: {supported}")
    raise PlinioOnnxError(f"unknown method {name!r}; supported: {supported}")


# ==============================================================================================
# Options
# ==============================================================================================
@dataclass(frozen=True)
class Recipe:
    """Training hyper-parameters of the three phases (defaults: PLiNIO's, tuned on digits)."""

    warmup_epochs: int | None = None        # None: 100 (0 in distillation mode)
    search_epochs: int = 100
    finetune_epochs: int = 100
    patience: int = 10                      # warm-up / fine-tune early stopping
    search_patience: int = 15               # once the target is met (or from the start)
    batch_size: int = 32
    # warm-up and fine-tune (SGD)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # search (Adam on weights, Adam on architecture parameters)
    lr_net: float = 1e-3
    weight_decay_net: float = 1e-4
    lr_nas: float | None = None             # None: 1 / (reach · steps in the search) in [5e-4, 1e-2]
    nas_reach: float = 0.3                  # fraction of the search in which α can cross 0.5
    # target control
    ramp: float = 0.4                       # the moving target reaches the target at 40 % of the search
    lambda_up: float = 1.01                 # per step while the discrete cost is above the moving target
    lambda_down: float = 0.99               # per step while it is below `relax` · the moving target
    relax: float = 0.97
    lambda_init: float = 1.0                # first λ, relative to the reference loss
    settle: bool = True                     # after the ramp, anneal both learning rates (cosine)
    floor: float = 0.95                     # never fall below floor · the moving target (0: off)
    margin: float = 0.97                    # the hinge aims at margin · the moving target
    # splits
    test_fraction: float = 0.2
    val_fraction: float = 0.2


def parse_amount(value: "int | float | str | None", base: float, *, what: str) -> float | None:
    """``1234``, ``"1234"``, ``"1.2e4"``, ``"12k"`` or ``"50%"`` (of ``base``) → an absolute number."""
    if value is None:
        return None
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        number = float(value)
    else:
        text = str(value).strip().replace(",", "").replace("_", "")
        match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([%kKmMgG]?)", text)
        if not match:
            raise PlinioOnnxError(f"{what}: {value!r} is not a number or a percentage like '50%'")
        number = float(match.group(1))
        unit = match.group(2).lower()
        if unit == "%":
            if not 0 < number <= 100:
                raise PlinioOnnxError(f"{what}: a percentage must be in (0, 100], got {value!r}")
            number = base * number / 100.0
        elif unit:
            number *= {"k": 1e3, "m": 1e6, "g": 1e9}[unit]
    if not math.isfinite(number) or number <= 0:
        raise PlinioOnnxError(f"{what}: must be positive, got {value!r}")
    return number


# ==============================================================================================
# Data and task
# ==============================================================================================
@dataclass
class Split:
    inputs: list[torch.Tensor]
    target: list[torch.Tensor] | None   # labels (one tensor) or teacher outputs (one per output)

    def __len__(self) -> int:
        return int(self.inputs[0].shape[0])

    def take(self, index: np.ndarray | slice) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        inputs = [t[index] for t in self.inputs]
        target = None if self.target is None else [t[index] for t in self.target]
        return inputs, target


@dataclass
class Task:
    """The training objective and the metric reported for it."""

    kind: str                    # classification | regression | distill
    metric: str                  # accuracy | mse
    higher_is_better: bool
    output_kind: str = "logits"  # classification: logits | probabilities | log_probabilities

    def loss(self, outputs: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.kind == "classification":
            out, y = outputs[0], target[0]
            if self.output_kind == "logits":
                return F.cross_entropy(out, y)
            logp = out if self.output_kind == "log_probabilities" else torch.log(out.clamp_min(1e-12))
            return F.nll_loss(logp, y)
        if self.kind == "regression":
            return F.mse_loss(outputs[0], target[0])
        return sum(F.mse_loss(o, t) for o, t in zip(outputs, target)) / len(target)

    def scores(self, outputs: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> dict[str, float]:
        """Sums over the batch (divided by the split size by the caller)."""
        n = outputs[0].shape[0]
        loss = float(self.loss(outputs, target)) * n
        if self.kind == "classification":
            hit = (outputs[0].argmax(1) == target[0]).float()
            correct = float((hit.flatten(1).mean(1) if hit.dim() > 1 else hit).sum())
            return {"loss": loss, "accuracy": correct}
        result = {"loss": loss, "mse": loss}
        if self.kind == "distill" and outputs[0].dim() == 2 and outputs[0].shape[1] > 1:
            result["agreement"] = float((outputs[0].argmax(1) == target[0].argmax(1)).sum())
        return result


def _file_or_arrays(data) -> tuple[dict[str, np.ndarray], str]:
    if isinstance(data, dict):
        return {k: np.asarray(v) for k, v in data.items()}, "<arrays>"
    return load_npz(data), str(data)


def _read_data(graph: Graph, arrays: dict[str, np.ndarray], source: str) -> tuple[list[np.ndarray], np.ndarray | None]:
    values = input_arrays(graph, arrays, source)
    counts = {int(v.shape[0]) for v in values}
    y = arrays.get("y")
    if y is not None:
        counts.add(int(np.asarray(y).shape[0]) if np.ndim(y) else -1)
    if len(counts) != 1:
        raise PlinioOnnxError(f"the arrays have different numbers of samples ({sorted(counts)})", file=source)
    n = counts.pop()
    if n < 10:
        raise PlinioOnnxError(f"too few samples ({n}); at least 10 are needed to hold out "
                              "validation and test splits", file=source)
    return values, (None if y is None else np.asarray(y))


def _split_indices(n: int, labels: np.ndarray | None, seed: int, test: float, val: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train/val/test indices; stratified by ``labels`` (1-D class labels) when given."""
    rng = np.random.default_rng([seed, 7919])
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    parts: list[list[np.ndarray]] = [[], [], []]
    # Fractional allocation carried across classes so the totals match the fractions.
    carry_test = carry_val = 0.0
    for members in groups:
        members = rng.permutation(members)
        want_test = len(members) * test + carry_test
        n_test = int(round(want_test))
        carry_test = want_test - n_test
        rest = len(members) - n_test
        want_val = rest * val + carry_val
        n_val = int(round(want_val))
        carry_val = want_val - n_val
        parts[2].append(members[:n_test])
        parts[1].append(members[n_test:n_test + n_val])
        parts[0].append(members[n_test + n_val:])
    train, valid, test_idx = (rng.permutation(np.concatenate(p)) for p in parts)
    if min(len(train), len(valid), len(test_idx)) == 0:
        raise PlinioOnnxError(f"cannot split {n} samples into non-empty train/validation/test sets")
    return train, valid, test_idx


def _infer_task(labels: str, y: np.ndarray | None, outputs: list[np.ndarray], graph: Graph) -> tuple[Task, np.ndarray | None]:
    """The task and the label array in the form its loss wants."""
    if labels not in TASKS:
        raise PlinioOnnxError(f"unknown --labels {labels!r}; choose from {', '.join(TASKS)}")
    if labels == "distill" or y is None:
        if labels in ("classification", "regression"):
            raise PlinioOnnxError(f"--labels {labels} needs a 'y' array in the data file")
        return Task("distill", "mse", False), None
    out = outputs[0]
    n = out.shape[0]
    integer = np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)
    classification_shape = (integer and out.ndim >= 2 and tuple(out.shape[2:]) == tuple(y.shape[1:])
                            and y.size > 0 and y.min() >= 0 and int(y.max()) < out.shape[1])
    if labels == "auto":
        labels = "classification" if classification_shape else "regression"
    if labels == "classification":
        if not integer:
            raise PlinioOnnxError(f"classification needs integer class labels in 'y' (got {y.dtype})")
        if not classification_shape:
            raise PlinioOnnxError(f"labels 'y' {list(y.shape)} (classes {int(y.min())}..{int(y.max())}) do not "
                                  f"match the model output {['N', *out.shape[1:]]} for classification")
        producer = graph.gs.outputs[0].inputs[0].op if graph.gs.outputs[0].inputs else ""
        kind = {"Softmax": "probabilities", "LogSoftmax": "log_probabilities"}.get(producer, "logits")
        return Task("classification", "accuracy", True, kind), y.astype(np.int64)
    # regression: y must have the output's per-sample size
    per_sample = int(np.prod(out.shape[1:], dtype=np.int64))
    if int(np.prod(y.shape[1:], dtype=np.int64)) != per_sample:
        raise PlinioOnnxError(f"regression targets 'y' {list(y.shape)} do not match the model output "
                              f"{['N', *out.shape[1:]]}")
    return Task("regression", "mse", False), y.astype(np.float32).reshape((y.shape[0], *out.shape[1:]))


def _as_outputs(result) -> list[torch.Tensor]:
    return [result] if isinstance(result, torch.Tensor) else list(result)


def _ort_outputs(model: onnx.ModelProto, graph_inputs: list[str], inputs: list[np.ndarray],
                 *, source: str | None, batch: int = 256) -> list[np.ndarray]:
    from .runtime import ort_session
    session = ort_session(model, source=source)
    chunks: list[list[np.ndarray]] = []
    n = inputs[0].shape[0]
    for start in range(0, n, batch):
        feeds = {name: value[start:start + batch] for name, value in zip(graph_inputs, inputs)}
        chunks.append(session.run(None, feeds))
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]


# ==============================================================================================
# Training helpers
# ==============================================================================================
def _batches(n: int, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if rng is not None and len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()   # a batch of one breaks batch normalization
    return batches


def _evaluate(module: torch.nn.Module, split: Split, task: Task, batch: int = 512) -> dict[str, float]:
    module.eval()
    totals: dict[str, float] = {}
    with torch.no_grad():
        for index in _batches(len(split), batch, None):
            inputs, target = split.take(index)
            for key, value in task.scores(_as_outputs(module(*inputs)), target).items():
                totals[key] = totals.get(key, 0.0) + value
    return {key: value / len(split) for key, value in totals.items()}


def _state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _values_from_graph(module: torch.nn.Module, graph: Graph) -> dict[str, torch.Tensor]:
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


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The generated module (a searchable model wraps one in ``.module``)."""
    return getattr(model, "module", model) if not hasattr(model, "initializer_names") else model


def _param_names(model: torch.nn.Module) -> dict[int, str]:
    inner = _inner(model)
    if not hasattr(inner, "parameter_initializers"):
        return {id(p): attr for attr, p in inner.named_parameters()}
    return {id(p): "|".join(names) if names else attr for attr, p, names in inner.parameter_initializers()}


def _optimizer_arrays(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    listed = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            i = len(listed)
            listed.append(names[id(p)])
            for key, value in state.items():
                if value is None:
                    continue
                arrays[f"p{i}.{key}"] = (value.detach().cpu().numpy() if isinstance(value, torch.Tensor)
                                         else np.asarray(value, dtype=np.float64))
    arrays["__names__"] = np.array(listed, dtype=str)
    return arrays


def _load_optimizer(optimizer: torch.optim.Optimizer, arrays: dict[str, np.ndarray], names: dict[int, str]) -> None:
    listed = [str(s) for s in arrays.get("__names__", np.array([], dtype=str)).tolist()]
    by_name = {name: i for i, name in enumerate(listed)}
    for group in optimizer.param_groups:
        for p in group["params"]:
            i = by_name.get(names[id(p)])
            if i is None:
                continue
            prefix = f"p{i}."
            state = {}
            for key, value in arrays.items():
                if key.startswith(prefix):
                    state[key[len(prefix):]] = torch.from_numpy(np.array(value))
            optimizer.state[p] = state


# ==============================================================================================
# Checkpoints
# ==============================================================================================
class Checkpoint:
    """``state.json`` + epoch-numbered ONNX graphs and optimizer ``.npz`` files in one folder.

    Files are written first, ``state.json`` (which names them) last and atomically, so a run killed
    at any moment leaves the previous consistent state; files no longer named are removed.
    """

    def __init__(self, folder: Path | None, fingerprint: str) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self.state: dict[str, Any] = {"version": STATE_VERSION, "fingerprint": fingerprint, "phases": {}}
        self.resumed = False
        self.discarded = False
        self._memory: dict[str, Any] = {}   # without a folder: the "files", kept in memory

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    def open(self) -> None:
        if not self.enabled:
            return
        path = self.folder / "state.json"
        if path.is_file():
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                state = None
            if state and state.get("version") == STATE_VERSION and state.get("fingerprint") == self.fingerprint:
                self.state = state
                self.resumed = bool(state.get("phases"))
            else:
                self.discarded = True
        if self.folder.exists() and not self.folder.is_dir():
            raise PlinioOnnxError("the checkpoint path exists and is not a folder", file=str(self.folder))
        self.folder.mkdir(parents=True, exist_ok=True)

    def phase(self, name: str) -> dict:
        return self.state["phases"].get(name, {})

    def keep_budgets(self, budgets: dict[str, int]) -> list[str]:
        """Forget a finished phase whose epoch budget changed, and every phase after it.

        An unfinished phase simply continues under the new budget; returns the phases dropped."""
        dropped: list[str] = []
        for name in PHASES:
            rec = self.state["phases"].get(name)
            if rec is None:
                continue
            if dropped or (rec.get("done") and rec.get("budget") != budgets[name]):
                dropped.append(name)
                del self.state["phases"][name]
        return dropped

    def save_graph(self, graph: Graph, name: str) -> str:
        if self.enabled:
            graph.save(self.folder / name)
        else:
            self._memory[name] = graph.to_onnx(check=False)
        return name

    def load_graph(self, name: str) -> Graph:
        if self.enabled:
            return load(self.folder / name)
        return load(self._memory[name])

    def save_arrays(self, arrays: dict[str, np.ndarray], name: str) -> str:
        if not self.enabled:
            self._memory[name] = {k: np.array(v) for k, v in arrays.items()}
            return name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.folder)
        os.close(fd)
        try:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)
            os.replace(tmp, self.folder / name)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return name

    def load_arrays(self, name: str) -> dict[str, np.ndarray]:
        if not self.enabled:
            return dict(self._memory[name])
        with np.load(self.folder / name, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def commit(self, phase: str, record: dict) -> None:
        """Record ``phase``'s state; files no phase names any more are removed."""
        self.state["phases"][phase] = record
        referenced = set()
        for rec in self.state["phases"].values():
            for key, value in rec.items():
                if key.endswith("_file") and value:
                    referenced.add(value)
        if not self.enabled:
            for name in [n for n in self._memory if n not in referenced]:
                del self._memory[name]
            return
        _write_text(self.folder / "state.json", json.dumps(self.state, indent=1, default=_json_default))
        for entry in self.folder.iterdir():
            if entry.is_file() and entry.name not in referenced \
                    and re.match(r"(warmup|search|finetune)[-.].*\.(onnx|npz)$", entry.name):
                entry.unlink()


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _hash_file(path: str | os.PathLike, digest) -> None:
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)


# ==============================================================================================
# Progress
# ==============================================================================================
class _Progress:
    """A rich progress bar per phase on stderr; silent when quiet or not a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.progress = None
        self.task = None
        if enabled:
            from rich.console import Console
            self.console = Console(stderr=True)
            self.enabled = self.console.is_terminal

    def start(self, description: str, total: int, done: int = 0) -> None:
        if not self.enabled:
            return
        from rich.progress import (BarColumn, Progress, TextColumn,
                                   TimeElapsedColumn)
        self.stop()
        self.progress = Progress(TextColumn("[bold]{task.description:<9}"), BarColumn(bar_width=28),
                                 TextColumn("epoch {task.fields[epoch]}/{task.total:.0f}"),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                 console=self.console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task(description, total=max(total, 1), completed=done,
                                           epoch=done, info="")

    def step(self, completed: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=completed)

    def epoch(self, epoch: int, info: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=epoch, epoch=epoch, info=info)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.print(message)


# ==============================================================================================
# Report
# ==============================================================================================
@dataclass
class Report:
    """What `optimize` did; ``to_json()`` / ``to_markdown()`` are what lands next to the output."""

    model: str
    output: str
    method: str
    task: str
    metric: str
    cost: str
    target: dict | None
    strength: float | None
    splits: dict
    before: dict
    after: dict
    layers: list[dict]
    architecture: dict
    phases: dict
    seed: int
    resumed: bool
    seconds: float
    files: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    def _fmt_metric(self, value: float | None) -> str:
        if value is None:
            return "n/a"
        return f"{100 * value:.2f}%" if self.metric == "accuracy" else f"{value:.4g}"

    def headline(self) -> str:
        b, a = self.before, self.after
        parts = [f"params {b['params']:,} → {a['params']:,} ({_pct(a['params'], b['params'])})",
                 f"MACs {b['macs']:,} → {a['macs']:,} ({_pct(a['macs'], b['macs'])})",
                 f"test {self.metric} {self._fmt_metric(b['test'].get(self.metric))} → "
                 f"{self._fmt_metric(a['test'].get(self.metric))}"]
        return "; ".join(parts)

    def to_markdown(self) -> str:
        lines = [f"# plinio-onnx optimize: {Path(self.model).name} → {Path(self.output).name}", "",
                 f"- method: {self.method}, cost: {self.cost}"
                 + (f", target: {self.target['kind']} ≤ {self.target['value']:,.0f} ({self.target['given']})"
                    if self.target else "")
                 + (f", strength: {self.strength:.3g}" if self.strength is not None else ""),
                 f"- task: {self.task} (metric: {self.metric}); splits: train {self.splits['train']}, "
                 f"validation {self.splits['val']}, test {self.splits['test']} (seed {self.seed})",
                 f"- {self.headline()}",
                 f"- test metrics measured in ONNX Runtime; 'before' is the input model after warm-up",
                 f"- wall time {self.seconds:.1f} s" + (" (resumed)" if self.resumed else ""), "",
                 "| | params | MACs | test " + self.metric + " | test loss |", "|---|---:|---:|---:|---:|"]
        for label, d in (("before", self.before), ("after", self.after)):
            lines.append(f"| {label} | {d['params']:,} | {d['macs']:,} | {self._fmt_metric(d['test'].get(self.metric))} "
                         f"| {d['test'].get('loss', float('nan')):.4g} |")
        lines += ["", "| layer | op | in | out | kernel | params | MACs |", "|---|---|---:|---:|---:|---:|---:|"]
        for row in self.layers:
            lines.append(f"| {row['name']} | {row['op']} | {row['in_after']}/{row['in_before']} | "
                         f"{row['out_after']}/{row['out_before']} | {row['kernel_after']}/{row['kernel_before']} | "
                         f"{row['params_after']:,}/{row['params_before']:,} | {row['macs_after']:,}/{row['macs_before']:,} |")
        lines += ["", "| phase | epochs | best epoch | val loss | val " + self.metric + " | seconds |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, p in self.phases.items():
            lines.append(f"| {name} | {p.get('epochs', 0)} | {p.get('best_epoch', '')} | "
                         f"{p.get('val_loss', float('nan')):.4g} | {self._fmt_metric(p.get('val_metric'))} | "
                         f"{p.get('seconds', 0):.1f} |")
        if self.files:
            lines += [""] + [f"- {k}: `{v}`" for k, v in self.files.items()]
        return "\n".join(lines) + "\n"

    def print(self, console=None) -> None:
        from rich.console import Console
        from rich.table import Table
        if console is None:
            console = Console()
            if not console.is_terminal:   # logs: wide enough for the whole table
                console = Console(width=120)
        table = Table(title=f"{Path(self.output).name}: {self.method} ({self.task})")
        for col in ("layer", "op", "in", "out", "kernel", "params", "MACs"):
            table.add_column(col, justify="left" if col in ("layer", "op") else "right")
        for row in self.layers:
            table.add_row(row["name"], row["op"], f"{row['in_after']}/{row['in_before']}",
                          f"{row['out_after']}/{row['out_before']}", f"{row['kernel_after']}/{row['kernel_before']}",
                          f"{row['params_after']:,}/{row['params_before']:,}", f"{row['macs_after']:,}/{row['macs_before']:,}")
        table.add_row("total", "", "", "", "", f"{self.after['params']:,}/{self.before['params']:,}",
                      f"{self.after['macs']:,}/{self.before['macs']:,}", style="bold")
        console.print(table)
        console.print(self.headline(), highlight=False)
        for key, value in self.files.items():
            console.print(f"  {key}: {value}", highlight=False)


def _pct(a: float, b: float) -> str:
    return f"{100.0 * a / b:.1f}%" if b else "n/a"


def _layer_rows(before: Graph, after: Graph) -> list[dict]:
    final = {spec.name: spec for spec in layer_specs(after)}
    rows = []
    for spec in layer_specs(before):
        new = final.get(spec.name)
        rows.append({
            "name": spec.name, "op": spec.op,
            "in_before": int(spec.in_channels), "in_after": int(new.in_channels) if new else 0,
            "out_before": int(spec.out_channels), "out_after": int(new.out_channels) if new else 0,
            "kernel_before": int(spec.kernel_size), "kernel_after": int(new.kernel_size) if new else 0,
            "params_before": int(params_cost(spec)), "params_after": int(params_cost(new)) if new else 0,
            "macs_before": int(macs_cost(spec)), "macs_after": int(macs_cost(new)) if new else 0,
        })
    return rows


# ==============================================================================================
# The flow
# ==============================================================================================
@dataclass
class _Problem:
    """The model, the task and the tool's own train/validation/test splits."""

    base: Graph
    task: Task
    train: Split
    val: Split
    test: Split
    input_names: list[str]
    test_inputs: list[np.ndarray]
    arrays: dict[str, np.ndarray]
    source: str


def _prepare(model: "str | os.PathLike", data, labels: str, seed: int, recipe: Recipe) -> _Problem:
    base = load(model)
    arrays, data_source = _file_or_arrays(data)
    inputs, y = _read_data(base, arrays, data_source)
    input_names = [t.name for t in base.gs.inputs]
    # One forward of the input model: does it run on this data, and what does it output?
    probe_module = to_torch(base)
    probe_module.eval()
    try:
        with torch.no_grad():
            probe = [o.numpy() for o in _as_outputs(probe_module(*[torch.from_numpy(v[:2]) for v in inputs]))]
    except PlinioOnnxError:
        raise
    except Exception as err:
        raise PlinioOnnxError(f"the model does not run on the data ({type(err).__name__}: "
                              f"{' '.join(str(err).split())[:200]})", file=data_source) from None
    del probe_module
    task, y = _infer_task(labels, y, probe, base)

    train_idx, val_idx, test_idx = _split_indices(
        len(inputs[0]), y if task.kind == "classification" and y.ndim == 1 else None, seed,
        recipe.test_fraction, recipe.val_fraction)
    if task.kind == "distill":
        teacher = _ort_outputs(base.to_onnx(), input_names, inputs, source=str(model))
        targets = [torch.from_numpy(np.ascontiguousarray(t.astype(np.float32))) for t in teacher]
    else:
        targets = [torch.from_numpy(np.ascontiguousarray(y))]
    tensors = [torch.from_numpy(v) for v in inputs]

    def make_split(index: np.ndarray) -> Split:
        idx = torch.from_numpy(index)
        return Split([t[idx] for t in tensors], [t[idx] for t in targets])

    return _Problem(base, task, make_split(train_idx), make_split(val_idx), make_split(test_idx), input_names,
                    [v[test_idx] for v in inputs], arrays, data_source)


def baseline(model: "str | os.PathLike", data, *, epochs: int, seed: int = 0, labels: str = "auto",
             batch_size: int | None = None, recipe: Recipe | None = None, threads: int | None = None) -> dict:
    """The unpruned model trained "the same way" for comparison (benchmarks).

    The warm-up recipe (SGD) for ``epochs`` epochs without early stopping, on the splits
    `optimize` makes for the same ``seed``. ``test_by_epoch[e]`` is the test metric (in ONNX
    Runtime) of the checkpoint with the best validation loss among epochs 0..e — what early
    stopping with that budget would deliver.
    """
    recipe = recipe or Recipe()
    if batch_size:
        recipe = replace(recipe, batch_size=batch_size)
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    problem = _prepare(model, data, labels, seed, recipe)
    task = problem.task
    graph = problem.base.copy()
    module = to_torch(graph)
    optimizer = torch.optim.SGD(module.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    flow = _Flow(recipe, task, problem.train, problem.val, Checkpoint(None, ""), _Progress(False), seed, None)

    def test_metric() -> dict:
        sync(graph, module)
        outs = _ort_outputs(graph.to_onnx(), problem.input_names, problem.test_inputs, source=None)
        return task_scores(task, [torch.from_numpy(o) for o in outs], problem.test.target)

    best_loss = _evaluate(module, problem.val, task)["loss"]
    best_test = test_metric()
    by_epoch = [best_test[task.metric]]
    for epoch in range(1, epochs + 1):
        flow._train_epoch("warmup", module, [optimizer], epoch, epochs)
        loss = _evaluate(module, problem.val, task)["loss"]
        if loss < best_loss:
            best_loss, best_test = loss, test_metric()
        by_epoch.append(best_test[task.metric])
    return {"metric": task.metric, "test_by_epoch": by_epoch, "test": best_test,
            "params": cost_total(problem.base, params_cost), "macs": cost_total(problem.base, macs_cost)}


def _default_output_files(output: Path) -> tuple[Path, Path, Path]:
    stem = output.with_suffix("") if output.suffix == ".onnx" else output
    return (Path(f"{stem}.report.json"), Path(f"{stem}.report.md"), Path(f"{stem}.ckpt"))


def optimize(model: "str | os.PathLike", data: "str | os.PathLike | dict[str, np.ndarray]", *,
             output: "str | os.PathLike", method: str = "pit", cost: "str | Callable | None" = None,
             strength: float | None = None, target_params: "int | float | str | None" = None,
             target_macs: "int | float | str | None" = None, epochs: int | None = None,
             warmup_epochs: int | None = None, finetune_epochs: int | None = None,
             batch_size: int | None = None, seed: int = 0, labels: str = "auto",
             checkpoint_dir: "str | os.PathLike | None | bool" = None, progress: bool = True,
             quiet: bool = False, threads: int | None = None, recipe: Recipe | None = None,
             callback: Callable[[str, int, dict], None] | None = None) -> Report:
    """Optimize ``model`` on ``data`` and write the deployable result to ``output``.

    ``method``: one of `METHODS` — "pit", "mps", "qat", "pit+mps", "supernet", "supernet+pit".
    ``cost``: the cost model the regularizer uses (``"params"``, ``"macs"``, … or a callable;
    with a target, the target's kind). ``strength`` and ``target_params`` / ``target_macs`` are
    mutually exclusive; a target is an absolute number or a percentage string of the input
    model's cost. ``epochs`` is the search budget; ``warmup_epochs`` / ``finetune_epochs`` those of
    the other phases (0 skips a phase). ``checkpoint_dir=False`` disables checkpoints.
    ``callback(phase, epoch, info)`` is called after every completed (and checkpointed) epoch.
    ``threads``: torch CPU threads during the call (default: 1 for small models or a busy
    machine, else the idle cores).
    Returns the `Report`, also written as ``OUT.report.json`` / ``OUT.report.md``.
    """
    previous = torch.get_num_threads()
    try:
        return _optimize(model, data, output=output, method=method, cost=cost, strength=strength,
                         target_params=target_params, target_macs=target_macs, epochs=epochs,
                         warmup_epochs=warmup_epochs, finetune_epochs=finetune_epochs, batch_size=batch_size,
                         seed=seed, labels=labels, checkpoint_dir=checkpoint_dir, progress=progress,
                         quiet=quiet, threads=threads, recipe=recipe, callback=callback)
    finally:
        torch.set_num_threads(previous)


def _choose_threads(requested: int | None, macs: float, batch: int) -> int:
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


def _optimize(model, data, *, output, method, cost, strength, target_params, target_macs, epochs,
              warmup_epochs, finetune_epochs, batch_size, seed, labels, checkpoint_dir, progress, quiet,
              threads, recipe, callback) -> "Report":
    started = time.perf_counter()
    recipe = recipe or Recipe()
    overrides = {k: v for k, v in (("search_epochs", epochs), ("warmup_epochs", warmup_epochs),
                                   ("finetune_epochs", finetune_epochs), ("batch_size", batch_size)) if v is not None}
    recipe = replace(recipe, **overrides)
    for key in ("search_epochs", "finetune_epochs", "batch_size"):
        if getattr(recipe, key) < (1 if key == "batch_size" else 0):
            raise PlinioOnnxError(f"{key.replace('_', ' ')} must not be negative" if key != "batch_size"
                                  else "batch size must be at least 1")
    if recipe.warmup_epochs is not None and recipe.warmup_epochs < 0:
        raise PlinioOnnxError("warm-up epochs must not be negative")
    method_impl = get_method(method)
    if labels not in TASKS:
        raise PlinioOnnxError(f"unknown labels mode {labels!r}; choose from {', '.join(TASKS)}")

    # -- paths --------------------------------------------------------------------------------
    model_path = Path(model)
    output = Path(output)
    if output.suffix != ".onnx":
        raise PlinioOnnxError("the output file name must end in .onnx", file=str(output))
    if model_path.exists() and output.exists() and os.path.samefile(model_path, output):
        raise PlinioOnnxError("refusing to overwrite the input model; choose another output path",
                              file=str(output))
    if output.is_dir():
        raise PlinioOnnxError("the output path is a folder", file=str(output))
    report_json, report_md, default_ckpt = _default_output_files(output)
    if checkpoint_dir is False:
        ckpt_folder = None
    else:
        ckpt_folder = Path(checkpoint_dir) if checkpoint_dir else default_ckpt

    # -- targets and cost ---------------------------------------------------------------------
    if target_params is not None and target_macs is not None:
        raise PlinioOnnxError("give at most one of --target-params and --target-macs")
    target_kind = "params" if target_params is not None else "macs" if target_macs is not None else None
    if strength is not None and target_kind:
        raise PlinioOnnxError(f"--strength and --target-{target_kind} are mutually exclusive")
    if strength is not None and (not math.isfinite(float(strength)) or float(strength) < 0):
        raise PlinioOnnxError(f"--strength must be a non-negative number, got {strength!r}")
    if target_kind and cost is not None and cost != target_kind:
        raise PlinioOnnxError(f"--cost {cost if isinstance(cost, str) else 'callable'} conflicts with "
                              f"--target-{target_kind}; the target decides the cost")
    if target_kind and not method_impl.supports_targets:
        raise PlinioOnnxError(f"--target-{target_kind} does not apply to --method {method_impl.name}; "
                              "use --strength (or the default)")
    cost_name = target_kind or (cost if isinstance(cost, str) else
                                ("custom" if cost is not None else method_impl.default_cost))
    if isinstance(cost, str) or cost is None:
        if cost_name not in BY_NAME:
            raise PlinioOnnxError(f"unknown cost model {cost_name!r}; choose from {', '.join(sorted(BY_NAME))}")
        cost_fn = BY_NAME[cost_name]
    else:
        cost_fn = cost

    torch.manual_seed(seed)

    # -- model and data -----------------------------------------------------------------------
    problem = _prepare(model_path, data, labels, seed, recipe)
    base, task, arrays = problem.base, problem.task, problem.arrays
    train, val, test = problem.train, problem.val, problem.test
    input_names, test_inputs_np = problem.input_names, problem.test_inputs
    base_params = cost_total(base, params_cost)
    base_macs = cost_total(base, macs_cost)
    base_cost = float(cost_total(base, cost_fn)) if target_kind is None else float(
        base_params if target_kind == "params" else base_macs)
    target = parse_amount(target_params if target_kind == "params" else target_macs, base_cost,
                          what=f"--target-{target_kind}") if target_kind else None
    torch.set_num_threads(_choose_threads(threads, base_macs, recipe.batch_size))
    if recipe.warmup_epochs is None:
        recipe = replace(recipe, warmup_epochs=0 if task.kind == "distill" else 100)

    # The smallest architecture the method can reach: an impossible target fails now.
    min_cost = None
    if target is not None:
        probe_model = method_impl.build(base, cost_fn)
        min_cost = method_impl.min_cost(probe_model, cost_fn)
        del probe_model
        if min_cost is not None and target < min_cost - 1e-6:
            raise PlinioOnnxError(f"target {target_kind} {target:,.0f} is below the smallest architecture "
                                  f"{method_impl.name} can reach ({min_cost:,.0f} {target_kind}: one channel "
                                  "per searched layer, unsearched layers whole)")
    # -- checkpoint ---------------------------------------------------------------------------
    digest = hashlib.sha256()
    _hash_file(model_path, digest)
    if isinstance(data, dict):
        for key in sorted(arrays):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    else:
        _hash_file(data, digest)
    options = {"method": method_impl.name, "cost": cost_name, "strength": strength, "target_kind": target_kind,
               "target": target, "labels": labels, "seed": seed, "batch_size": recipe.batch_size,
               "recipe": {k: v for k, v in asdict(recipe).items() if not k.endswith("_epochs")}}
    digest.update(json.dumps(options, sort_keys=True, default=str).encode())
    ckpt = Checkpoint(ckpt_folder, digest.hexdigest())
    ckpt.open()
    dropped = ckpt.keep_budgets({"warmup": recipe.warmup_epochs, "search": recipe.search_epochs,
                                 "finetune": recipe.finetune_epochs})
    ckpt.resumed = bool(ckpt.state["phases"])
    bar = _Progress(progress and not quiet)
    if dropped:
        bar.note(f"epoch budget changed: redoing {', '.join(dropped)}")
    if ckpt.discarded:
        bar.note(f"[yellow]checkpoint in {ckpt_folder} was made by another command; starting over[/yellow]")
    elif ckpt.resumed:
        bar.note(f"resuming from {ckpt_folder}")
    flow = _Flow(recipe, task, train, val, ckpt, bar, seed, callback)

    # -- 1. warm-up ---------------------------------------------------------------------------
    try:
        warmed, warm_info = flow.train_plain("warmup", base, recipe.warmup_epochs)

        # -- 2. search --------------------------------------------------------------------------
        searched, search_info = flow.search(method_impl, warmed, cost_fn, strength, target, base_cost)

        # -- 3. export + fine-tune --------------------------------------------------------------
        exported = method_impl.export(searched)
        if method_impl.finetune_export:
            final, fine_info = flow.train_plain("finetune", exported, recipe.finetune_epochs)
        else:
            final, fine_info = exported, {"epochs": 0, "note": "trained during the search (quantized)"}
    finally:
        bar.stop()
    final_params = cost_total(final, params_cost)
    final_macs = cost_total(final, macs_cost)
    final_cost = float(cost_total(final, cost_fn))
    if target is not None and final_cost > target + 1e-6:
        raise PlinioOnnxError(f"internal error: the exported model's {target_kind} ({final_cost:,.0f}) exceed "
                              f"the target ({target:,.0f}); nothing was written")
    final.source = str(model_path)   # save() then refuses to overwrite the input model
    final.save(output)

    # -- 4. report ------------------------------------------------------------------------------

    def ort_scores(proto: onnx.ModelProto, source: str) -> dict[str, float]:
        outs = _ort_outputs(proto, input_names, test_inputs_np, source=source)
        return task_scores(task, [torch.from_numpy(o) for o in outs], test.target)

    before_test = ort_scores(warmed.to_onnx(), str(model_path))
    after_test = ort_scores(onnx.load(str(output)), str(output))
    phases = {"warmup": warm_info, "search": search_info, "finetune": fine_info}
    files = {"output": str(output), "report_json": str(report_json), "report_md": str(report_md)}
    if ckpt.enabled:
        files["checkpoint_dir"] = str(ckpt_folder)
        if search_info.get("best_file"):
            files["searchable_checkpoint"] = str(ckpt_folder / search_info["best_file"])
    report = Report(
        model=str(model_path), output=str(output), method=method_impl.name, task=task.kind,
        metric=task.metric, cost=cost_name,
        target=({"kind": target_kind, "value": target, "given": str(target_params if target_kind == "params"
                                                                   else target_macs),
                 "min_reachable": min_cost} if target is not None else None),
        strength=search_info.get("strength"),
        splits={"train": len(train), "val": len(val), "test": len(test)},
        before={"params": int(base_params), "macs": int(base_macs), "test": before_test},
        after={"params": int(final_params), "macs": int(final_macs), "test": after_test},
        layers=_layer_rows(base, final), architecture=search_info.pop("architecture", {}),
        phases=phases, seed=seed, resumed=ckpt.resumed, seconds=time.perf_counter() - started, files=files)
    _write_text(report_json, json.dumps(report.to_json(), indent=2, default=_json_default))
    _write_text(report_md, report.to_markdown())
    if not quiet:
        report.print()
    return report


def task_scores(task: Task, outputs: list[torch.Tensor], target: list[torch.Tensor]) -> dict[str, float]:
    n = outputs[0].shape[0]
    with torch.no_grad():
        return {k: v / n for k, v in task.scores(outputs, target).items()}


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


class _Flow:
    """The phases, sharing the data, the task, the checkpoint and the progress display."""

    def __init__(self, recipe: Recipe, task: Task, train: Split, val: Split, ckpt: Checkpoint,
                 bar: _Progress, seed: int, callback) -> None:
        self.recipe = recipe
        self.task = task
        self.train = train
        self.val = val
        self.ckpt = ckpt
        self.bar = bar
        self.seed = seed
        self.callback = callback

    def _rng(self, phase: str, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, {"warmup": 1, "search": 2, "finetune": 3}[phase], epoch])

    def _info(self, scores: dict[str, float], extra: str = "") -> str:
        metric = scores[self.task.metric]
        shown = f"{100 * metric:.2f}%" if self.task.metric == "accuracy" else f"{metric:.4g}"
        return f"val loss {scores['loss']:.4f}  {self.task.metric} {shown}{extra}"

    # -- warm-up and fine-tune: plain training with early stopping ---------------------------
    def train_plain(self, phase: str, graph: Graph, epochs: int) -> tuple[Graph, dict]:
        rec = self.ckpt.phase(phase)
        if rec.get("done"):
            result = self.ckpt.load_graph(rec["result_file"])
            return result, rec["info"]
        t0 = time.perf_counter()
        if rec:
            graph = self.ckpt.load_graph(rec["current_file"])
        else:
            graph = graph.copy()
        module = to_torch(graph)
        optimizer = torch.optim.SGD(module.parameters(), lr=self.recipe.lr, momentum=self.recipe.momentum,
                                    weight_decay=self.recipe.weight_decay)
        names = _param_names(module)
        if rec:
            _load_optimizer(optimizer, self.ckpt.load_arrays(rec["optim_file"]), names)
            best_state = _values_from_graph(module, self.ckpt.load_graph(rec["best_file"]))
            start, best_epoch, best_loss, best_scores = rec["epoch"], rec["best_epoch"], rec["best_loss"], rec["best_scores"]
            initial = rec["initial"]
            elapsed = rec.get("seconds", 0.0)
        else:
            initial = _evaluate(module, self.val, self.task)
            start, best_epoch, best_loss, best_scores = 0, 0, initial["loss"], initial
            best_state = _state_of(module)
            elapsed = 0.0
            rec = {"initial": initial, "best_file": self.ckpt.save_graph(graph, f"{phase}-e0000.onnx")}
        self.bar.start(phase, epochs, start)
        epoch = start
        stopped = "budget"
        while epoch < epochs:
            if epoch - best_epoch >= self.recipe.patience:
                stopped = "early"
                break
            epoch += 1
            self._train_epoch(phase, module, [optimizer], epoch, epochs)
            scores = _evaluate(module, self.val, self.task)
            if scores["loss"] < best_loss:
                best_epoch, best_loss, best_scores = epoch, scores["loss"], scores
                best_state = _state_of(module)
                improved = True
            else:
                improved = False
            sync(graph, module)
            current_file = self.ckpt.save_graph(graph, f"{phase}-e{epoch:04d}.onnx")
            if improved:
                rec["best_file"] = current_file
            rec.update(epoch=epoch, best_epoch=best_epoch, best_loss=best_loss, best_scores=best_scores,
                       current_file=current_file,
                       optim_file=self.ckpt.save_arrays(_optimizer_arrays(optimizer, names),
                                                        f"{phase}-e{epoch:04d}.optim.npz"),
                       seconds=elapsed + time.perf_counter() - t0)
            self.ckpt.commit(phase, rec)
            self.bar.epoch(epoch, self._info(scores))
            if self.callback:
                self.callback(phase, epoch, {"val": scores})
        module.load_state_dict(best_state)
        sync(graph, module)
        info = {"epochs": epoch, "best_epoch": best_epoch, "val_loss": best_loss,
                "val_metric": best_scores[self.task.metric], "initial_val_loss": initial["loss"],
                "initial_val_metric": initial[self.task.metric], "stopped": stopped if epochs else "skipped",
                "seconds": elapsed + time.perf_counter() - t0}
        result_file = self.ckpt.save_graph(graph, f"{phase}.result.onnx")
        self.ckpt.commit(phase, {"done": True, "result_file": result_file, "info": info, "budget": epochs})
        self.bar.stop()
        return graph, info

    def _train_epoch(self, phase: str, model, optimizers, epoch: int, epochs: int,
                     regularizer: Callable[[], torch.Tensor] | None = None,
                     after_step: Callable[[], None] | None = None) -> float:
        model.train()
        batches = _batches(len(self.train), self.recipe.batch_size, self._rng(phase, epoch))
        total = 0.0
        for b, index in enumerate(batches):
            inputs, target = self.train.take(index)
            loss = self.task.loss(_as_outputs(model(*inputs)), target)
            if regularizer is not None:
                loss = loss + regularizer()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            if after_step is not None:
                after_step()
            total += float(loss.detach())
            if b % 4 == 0:
                self.bar.step(epoch - 1 + (b + 1) / len(batches))
        return total / max(len(batches), 1)

    def _reference_loss(self, initial: float) -> float:
        """The loss scale that sets the default strength and the first λ: the warmed-up model's
        validation loss, or — when it is ~0, as when distilling from the input model itself —
        1 % of the targets' variance (a 10 % RMS deviation from the teacher)."""
        spread = float(np.mean([float(t.float().var()) for t in self.train.target])) \
            if self.task.kind != "classification" else 1.0
        return max(initial, 1e-2 * spread, 1e-8)

    # -- search -------------------------------------------------------------------------------
    def search(self, method: Method, warmed: Graph, cost_fn, strength: float | None, target: float | None,
               base_cost: float):
        r = self.recipe
        epochs = r.search_epochs
        rec = self.ckpt.phase("search")
        if rec.get("done"):
            model = method.resume(self.ckpt.load_graph(rec["best_file"]), cost_fn)
            return model, rec["info"]
        t0 = time.perf_counter()
        steps_per_epoch = len(_batches(len(self.train), r.batch_size, self._rng("search", 0)))
        lr_nas = r.lr_nas or max(method.min_lr_nas,
                                 min(1e-2, max(5e-4, 1.0 / (r.nas_reach * max(epochs, 1) * steps_per_epoch))))
        if rec:
            model = method.resume(self.ckpt.load_graph(rec["current_file"]), cost_fn)
        else:
            model = method.build(warmed, cost_fn)
            method.before_search(model, self.train.take(np.arange(min(len(self.train), 256)))[0])
        net_opt = adam(model.net_parameters(), lr=r.lr_net, weight_decay=r.weight_decay_net)
        nas_groups = [group for group in method.nas_param_groups(model, lr_nas) if group["params"]]
        # QAT has no architecture parameters: a dummy keeps the flow (and checkpoints) uniform.
        nas_opt = adam(nas_groups or [torch.nn.Parameter(torch.zeros(1))], lr=lr_nas, weight_decay=0.0)
        names = _param_names(model)
        if rec:
            arrays = self.ckpt.load_arrays(rec["optim_file"])
            _load_optimizer(net_opt, {k[4:]: v for k, v in arrays.items() if k.startswith("net.")}, names)
            _load_optimizer(nas_opt, {k[4:]: v for k, v in arrays.items() if k.startswith("nas.")}, names)
            state = rec["state"]
            elapsed = rec.get("seconds", 0.0)
        else:
            initial = _evaluate(model, self.val, self.task)
            with torch.no_grad():
                initial_cost = float(model.cost_of(cost_fn))
            reference = self._reference_loss(initial["loss"])
            if strength is None and target is None:
                strength_value = reference / max(initial_cost, 1e-12)
            else:
                strength_value = strength
            state = {"epoch": 0, "lam": reference * r.lambda_init if target is not None else None, "step": 0,
                     "strength": strength_value, "best": None, "best_epoch": None, "met_epoch": None,
                     "initial": initial, "initial_cost": initial_cost, "history": []}
            elapsed = 0.0
            rec = {}
        higher = self.task.higher_is_better
        control = _TargetControl(r, target, state, epochs * steps_per_epoch,
                                 restore=lambda floor, before: method.restore(model, cost_fn, floor, before),
                                 snapshot=lambda: method.snapshot(model)) if target is not None else None

        def cost_now() -> torch.Tensor:
            return model.cost_of(cost_fn)

        if control is not None:
            regularizer, after_step = control.regularizer(cost_now), control.after_step
        else:
            s = state["strength"]

            def regularizer() -> torch.Tensor:
                return s * cost_now()

            after_step = None
        ramp_epochs = math.ceil(r.ramp * epochs) if target is not None else 0
        if control is not None:
            control.settle(net_opt, r.lr_net, 0.05)
            control.settle(nas_opt, lr_nas, 0.0)

        self.bar.start("search", epochs, state["epoch"])
        epoch = state["epoch"]
        stopped = "budget"
        while epoch < epochs:
            # Early stop once a qualifying architecture exists and has not improved for a while.
            anchor = state["best_epoch"]
            if anchor is not None and epoch - max(anchor, ramp_epochs) >= r.search_patience:
                stopped = "early"
                break
            epoch += 1
            train_loss = self._train_epoch("search", model, [net_opt, nas_opt], epoch, epochs,
                                           regularizer, after_step)
            method.after_epoch(model, epoch, epochs)
            scores = _evaluate(model, self.val, self.task)
            with torch.no_grad():
                c = float(cost_now())
            if target is not None:
                eligible = c <= target + 1e-6
                score = scores[self.task.metric]
                key = (score if higher else -score, -scores["loss"])
            else:
                eligible = True
                key = (-(scores["loss"] + state["strength"] * c),)
            improved = eligible and (state["best"] is None or tuple(key) > tuple(state["best"]))
            if eligible and state["met_epoch"] is None:
                state["met_epoch"] = epoch
            method_graph = model.searchable_graph()
            current_file = self.ckpt.save_graph(method_graph, f"search-e{epoch:04d}.onnx")
            if improved:
                state["best"], state["best_epoch"] = list(key), epoch
                state["best_scores"], state["best_cost"] = scores, c
                rec["best_file"] = current_file
            state["epoch"] = epoch
            state["history"].append({"epoch": epoch, "train_loss": train_loss, "val": scores, "cost": c,
                                     "lambda": state["lam"] if target is not None else state["strength"],
                                     **({"aim": control.aim(), "restored": state.get("restored", 0)}
                                        if control else {})})
            rec.update(state=state, current_file=current_file,
                       optim_file=self.ckpt.save_arrays(
                           {**{f"net.{k}": v for k, v in _optimizer_arrays(net_opt, names).items()},
                            **{f"nas.{k}": v for k, v in _optimizer_arrays(nas_opt, names).items()}},
                           f"search-e{epoch:04d}.optim.npz"),
                       seconds=elapsed + time.perf_counter() - t0)
            self.ckpt.commit("search", rec)
            extra = f"  {c:,.0f} ({_pct(c, base_cost)})"
            if target is not None:
                extra += f" → {control.aim():,.0f}  λ {state['lam']:.3g}"
            self.bar.epoch(epoch, self._info(scores, extra))
            if self.callback:
                self.callback("search", epoch, {"val": scores, "cost": c})

        # The chosen architecture: the best qualifying epoch, else the fallback.
        fallback = False
        if state["best_epoch"] is not None:
            model = method.resume(self.ckpt.load_graph(rec["best_file"]), cost_fn)
        elif target is not None:
            fallback = True
            if not method.enforce(model, cost_fn, target):
                raise PlinioOnnxError(f"the search could not reach the target ({target:,.0f}); "
                                      "try a larger target or more --epochs")
            rec["best_file"] = self.ckpt.save_graph(model.searchable_graph(), "search-best-fallback.onnx")
        else:
            rec["best_file"] = current_file if epoch else self.ckpt.save_graph(model.searchable_graph(),
                                                                              "search-e0000.onnx")
        model.eval()
        with torch.no_grad():
            final_scores = _evaluate(model, self.val, self.task)
            final_cost = float(cost_now())
        info = {"epochs": epoch, "best_epoch": state["best_epoch"], "val_loss": final_scores["loss"],
                "val_metric": final_scores[self.task.metric], "cost": final_cost, "lr_nas": lr_nas,
                "strength": state["strength"], "lambda": state["lam"] if target is not None else None,
                "target_met_epoch": state["met_epoch"], "fallback": fallback, "stopped": stopped,
                "initial_val_loss": state["initial"]["loss"], "initial_cost": state["initial_cost"],
                "history": state["history"], "seconds": elapsed + time.perf_counter() - t0,
                "best_file": rec["best_file"], "architecture": method.architecture(model)}
        # The chosen searchable graph under a stable name: `plinio-onnx export` takes it.
        info["best_file"] = self.ckpt.save_graph(model.searchable_graph(), "search.best.onnx")
        self.ckpt.commit("search", {"done": True, "best_file": info["best_file"], "info": info, "budget": epochs})
        self.bar.stop()
        return model, info


def export_searchable(searchable: "str | os.PathLike", output: "str | os.PathLike") -> tuple[Graph, str]:
    """A searchable checkpoint (e.g. ``OUT.ckpt/search.best.onnx``) → the deployable model at ``output``."""
    path, output = Path(searchable), Path(output)
    if output.suffix != ".onnx":
        raise PlinioOnnxError("the output file name must end in .onnx", file=str(output))
    if path.exists() and output.exists() and os.path.samefile(path, output):
        raise PlinioOnnxError("refusing to overwrite the input model; choose another output path",
                              file=str(output))
    graph = load(path)
    for method in sorted(METHODS.values(), key=lambda m: -len(m.metadata_keys)):
        if all(key in graph.metadata for key in method.metadata_keys):
            model = method.resume(graph, "params")
            return model.export(output), method.name
    raise PlinioOnnxError("not a searchable checkpoint (no search metadata); give a file written by "
                          "'plinio-onnx optimize' (OUT.ckpt/search.best.onnx) or PIT.searchable_graph().save()",
                          file=str(path))


class _TargetControl:
    """λ and the moving target of a cost-constrained search.

    The regularizer is ``λ · max(0, cost − margin·T(s)) / target``. ``T(s)`` goes geometrically
    from the initial cost to the target over the first ``ramp`` of the search steps. ``λ`` is
    multiplied by ``lambda_up`` after every step whose discrete cost is above ``T(s)`` and by
    ``lambda_down`` while it is below ``relax · T(s)``, so it settles where the pressure
    balances the task loss. Adam moves all masks at about the same speed while the pressure
    dominates, so many can cross the threshold in the same step: ``restore`` then re-keeps the
    most marginal of them until the cost is back at ``floor · T(s)``. After the ramp both
    learning rates anneal (cosine; weights down to 5 %, masks to 0) so the architecture freezes
    and the weights converge. State (λ, step) lives in ``state`` (the checkpointed dict).
    """

    def __init__(self, recipe: Recipe, target: float, state: dict, total_steps: int,
                 restore: Callable[[float, Any], int] | None = None,
                 snapshot: Callable[[], Any] | None = None) -> None:
        self.r = recipe
        self.target = target
        self.state = state
        self.start = float(state["initial_cost"])
        self.ramp_steps = max(1, int(recipe.ramp * total_steps))
        self.total_steps = max(total_steps, self.ramp_steps + 1)
        self._last = None
        self._before = None
        self.restore = restore
        self.snapshot = snapshot if restore is not None and recipe.floor > 0 else None
        self.schedules: list[tuple[torch.optim.Optimizer, float, float]] = []

    def settle(self, optimizer: torch.optim.Optimizer, lr: float, minimum: float) -> None:
        """After the ramp, anneal ``optimizer``'s learning rate (cosine, down to ``minimum``·lr);
        ``lr`` is the base rate, and parameter groups created at other rates keep their ratio."""
        ratios = [group["lr"] / lr if lr else 1.0 for group in optimizer.param_groups]
        self.schedules.append((optimizer, lr, minimum, ratios))
        self._apply_schedules()

    def _apply_schedules(self) -> None:
        if not self.r.settle:
            return
        done = (self.state["step"] - self.ramp_steps) / (self.total_steps - self.ramp_steps)
        factor = 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, done))))
        for optimizer, lr, minimum, ratios in self.schedules:
            for group, ratio in zip(optimizer.param_groups, ratios):
                group["lr"] = lr * ratio * max(factor, minimum)

    def aim(self) -> float:
        progress = min(1.0, self.state["step"] / self.ramp_steps)
        if self.start <= self.target:
            return self.target
        return self.start * (self.target / self.start) ** progress

    def regularizer(self, cost: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def term() -> torch.Tensor:
            if self.snapshot is not None:
                self._before = self.snapshot()
            c = cost()
            self._last = float(c.detach())
            return self.state["lam"] * torch.relu(c - self.r.margin * self.aim()) / self.target
        return term

    def after_step(self) -> None:
        aim = self.aim()
        if self._last is not None:
            if self._last > aim:
                self.state["lam"] *= self.r.lambda_up
            elif self._last < self.r.relax * aim:
                self.state["lam"] = max(self.state["lam"] * self.r.lambda_down, 1e-8)
        if self.restore is not None and self.r.floor > 0:
            self.state["restored"] = self.state.get("restored", 0) + self.restore(self.r.floor * aim, self._before)
        self.state["step"] += 1
        self._apply_schedules()
