"""The task and the data of an `optimize` run: reading the arrays, inferring the task
(classification, regression or distillation), and the tool's own train/validation/test splits.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from ..data import data_input_shapes, fixed_batch, input_arrays, load_npz, symbolic_inputs
from ..errors import DataError, PlinioOnnxError
from ..finite import check_finite_arrays, check_finite_weights
from ..graph import Graph
from ..load import load
from ..to_torch import to_torch

__all__ = ["TASKS", "Batch", "Problem", "Split", "Task", "TensorSplit", "batch_plan", "index_batches", "infer_task", "ort_outputs",
           "prepare", "split_indices", "split_ort_scores", "task_scores"]

#: The ``labels`` modes.
TASKS = ("auto", "classification", "regression", "distill")


class Split(ABC):
    """One split of the data as the training loop sees it: its size, its batches (shuffled by
    the run's generator, a rank's share under data parallelism) and its first samples. In
    memory (`TensorSplit`), streamed from shards (`optimize.streams`) or read from a torch
    ``Dataset`` / ``DataLoader`` (`optimize.datasets`)."""

    @abstractmethod
    def __len__(self) -> int: ...

    def take(self, index: np.ndarray) -> Batch:
        """The samples at positions ``index`` of the split (a split that can index)."""
        raise NotImplementedError(f"{type(self).__name__} has no random access")

    def batches(self, batch_size: int, rng: np.random.Generator | None = None, *, rank: int = 0,
                world: int = 1) -> Iterator[Batch]:
        """One epoch's (inputs, target) batches, shuffled by ``rng`` (None: in order). With
        ``world`` > 1 this is rank ``rank``'s share: every ``world``-th batch of the one shuffled
        order, the same number on every rank (the training loop's only view of a split)."""
        for index in batch_plan(len(self), batch_size, rng, rank, world):
            yield self.take(index)

    def num_batches(self, batch_size: int, shuffled: bool = True, *, world: int = 1) -> int:
        """How many batches `batches` yields on each rank."""
        rng = np.random.default_rng(0) if shuffled else None
        return len(batch_plan(len(self), batch_size, rng, 0, world))

    def head(self, n: int) -> Batch:
        """The first ``n`` samples (or all): calibration data."""
        return self.take(np.arange(min(len(self), n)))

    def target_variance(self) -> float:
        """The mean over the target tensors of their (unbiased) variance, read batch by batch."""
        sums: list[list[float]] = []
        for _, target in self.batches(512):
            for i, t in enumerate(target or []):
                t = t.double()
                if i == len(sums):
                    sums.append([0.0, 0.0, 0.0])
                sums[i][0] += float(t.sum())
                sums[i][1] += float((t * t).sum())
                sums[i][2] += t.numel()
        variances = [(sq - s * s / n) / max(n - 1, 1) for s, sq, n in sums]
        return float(np.mean(variances)) if variances else 0.0


@dataclass
class TensorSplit(Split):
    """A split held in memory: inputs and targets (labels: one tensor; teacher outputs: one per
    output), indexed by sample."""

    inputs: list[torch.Tensor]
    target: list[torch.Tensor] | None

    def __len__(self) -> int:
        return int(self.inputs[0].shape[0])

    def take(self, index: np.ndarray | slice) -> Batch:
        inputs = [t[index] for t in self.inputs]
        target = None if self.target is None else [t[index] for t in self.target]
        return inputs, target

    def target_variance(self) -> float:
        return float(np.mean([float(t.float().var()) for t in self.target or []]))


Batch = tuple[list[torch.Tensor], "list[torch.Tensor] | None"]


def index_batches(n: int, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Index batches over ``n`` samples, shuffled by ``rng`` (None: in order, for evaluation)."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    out = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if rng is not None and len(out) > 1 and len(out[-1]) < 2:
        out.pop()   # a batch of one breaks batch normalization
    return out


def batch_plan(n: int, batch_size: int, rng: np.random.Generator | None, rank: int = 0, world: int = 1
               ) -> list[np.ndarray]:
    """Rank ``rank``'s index batches of one epoch over ``n`` samples (see `Split.batches`)."""
    return _share(index_batches(n, batch_size, rng), rank, world, rng is not None)


def _share(batches: list[np.ndarray], rank: int, world: int, equal: bool) -> list[np.ndarray]:
    """Rank ``rank``'s batches of ``world``; ``equal``: cut to the same count on every rank (a
    training epoch's ranks step together)."""
    if world == 1:
        return batches
    mine = batches[rank::world]
    return mine[:len(batches) // world] if equal else mine


@dataclass
class Task:
    """The training objective and the metric reported for it."""

    kind: str                    # classification | regression | distill
    metric: str                  # accuracy | mse
    higher_is_better: bool
    output_kind: str = "logits"  # classification: logits | probabilities | log_probabilities
    classes: int = 0                        # classification: labels are 0..classes-1
    target_shape: tuple[int, ...] = ()      # regression: a sample's target (the output's) shape

    def target(self, y: np.ndarray, source: str | None = None) -> np.ndarray:
        """Labels ``y`` (a batch, as read) in the form the loss wants; a class label out of range
        is one `DataError` naming ``source``."""
        if self.kind == "classification":
            if y.size and (int(y.min()) < 0 or int(y.max()) >= self.classes):
                raise DataError(f"class labels 'y' range over {int(y.min())}..{int(y.max())}, but the model "
                                f"outputs {self.classes} classes (labels 0..{self.classes - 1})", file=source)
            return y.astype(np.int64)
        return y.astype(np.float32).reshape((y.shape[0], *self.target_shape))

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


def task_scores(task: Task, outputs: list[torch.Tensor], target: list[torch.Tensor]) -> dict[str, float]:
    """The task's loss and metric(s), averaged over the samples."""
    n = outputs[0].shape[0]
    with torch.no_grad():
        return {k: v / n for k, v in task.scores(outputs, target).items()}


def as_outputs(result) -> list[torch.Tensor]:
    """A module's result as a list of output tensors."""
    return [result] if isinstance(result, torch.Tensor) else list(result)


def ort_outputs(model: onnx.ModelProto, graph_inputs: list[str], inputs: list[np.ndarray],
                *, source: str | None, batch: int = 256) -> list[np.ndarray]:
    """``model``'s outputs on ``inputs`` in ONNX Runtime, in batches."""
    from ..runtime import ort_session
    session = ort_session(model, source=source)
    chunks: list[list[np.ndarray]] = []
    n = inputs[0].shape[0]
    for start in range(0, n, batch):
        feeds = {name: value[start:start + batch] for name, value in zip(graph_inputs, inputs)}
        chunks.append(session.run(None, feeds))
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]


# -- reading ----------------------------------------------------------------------------------
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


def split_indices(n: int, labels: np.ndarray | None, seed: int, test: float, val: float
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


def _classification(y: np.ndarray, out: np.ndarray, graph: Graph, *, auto: bool) -> "tuple[Task, np.ndarray] | None":
    """The classification task, when ``y`` holds class labels of ``out`` (None: not, under
    ``auto``; an error when classification was asked for)."""
    integer = np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)
    classification_shape = (integer and out.ndim >= 2 and tuple(out.shape[2:]) == tuple(y.shape[1:])
                            and y.size > 0 and y.min() >= 0 and int(y.max()) < out.shape[1])
    out_of_range = (integer and out.ndim >= 2 and out.shape[1] > 1 and tuple(out.shape[2:]) == tuple(y.shape[1:])
                    and y.size > 0 and (y.min() < 0 or int(y.max()) >= out.shape[1]))
    regression_fits = int(np.prod(y.shape[1:], dtype=np.int64)) == int(np.prod(out.shape[1:], dtype=np.int64))
    if out_of_range and not (auto and regression_fits):
        raise DataError(f"class labels 'y' range over {int(y.min())}..{int(y.max())}, but the model outputs "
                        f"{out.shape[1]} classes (labels 0..{out.shape[1] - 1})")
    if auto and not classification_shape:
        return None
    if not integer:
        raise PlinioOnnxError(f"classification needs integer class labels in 'y' (got {y.dtype})")
    if not classification_shape:
        raise PlinioOnnxError(f"labels 'y' {list(y.shape)} (classes {int(y.min())}..{int(y.max())}) do not "
                              f"match the model output {['N', *out.shape[1:]]} for classification")
    producer = graph.gs.outputs[0].inputs[0].op if graph.gs.outputs[0].inputs else ""
    kind = {"Softmax": "probabilities", "LogSoftmax": "log_probabilities"}.get(producer, "logits")
    task = Task("classification", "accuracy", True, kind, classes=int(out.shape[1]))
    return task, task.target(y)


def infer_task(labels: str, y: np.ndarray | None, outputs: list[np.ndarray], graph: Graph,
               source: str | None = None) -> tuple[Task, np.ndarray | None]:
    """The task and the label array in the form its loss wants; an error about the labels names
    ``source``."""
    try:
        return _infer_task(labels, y, outputs, graph)
    except PlinioOnnxError as err:
        if err.file is not None:
            raise
        raise type(err)(err.message, file=source) from None


def _infer_task(labels: str, y: np.ndarray | None, outputs: list[np.ndarray], graph: Graph) -> tuple[Task, np.ndarray | None]:
    if labels not in TASKS:
        raise PlinioOnnxError(f"unknown --labels {labels!r}; choose from {', '.join(TASKS)}")
    if labels == "distill" or y is None:
        if labels in ("classification", "regression"):
            raise PlinioOnnxError(f"--labels {labels} needs a 'y' array in the data file")
        return Task("distill", "mse", False), None
    out = outputs[0]
    if labels in ("auto", "classification"):
        found = _classification(y, out, graph, auto=labels == "auto")
        if found is not None:
            return found
    # regression: y must have the output's per-sample size
    per_sample = int(np.prod(out.shape[1:], dtype=np.int64))
    if int(np.prod(y.shape[1:], dtype=np.int64)) != per_sample:
        raise PlinioOnnxError(f"regression targets 'y' {list(y.shape)} do not match the model output "
                              f"{['N', *out.shape[1:]]}")
    task = Task("regression", "mse", False, target_shape=tuple(int(d) for d in out.shape[1:]))
    return task, task.target(y)


# -- the problem ------------------------------------------------------------------------------
@dataclass
class Problem:
    """The model, the task and the train/validation/test splits (the tool's own, or given)."""

    base: Graph
    task: Task
    train: Split
    val: Split
    test: Split | None               # None: no test data given (the report's test metrics are n/a)
    input_names: list[str]
    identity: tuple                  # (data, arrays): what the checkpoint's fingerprint hashes
    source: str
    shapes_note: str | None = None   # symbolic input sizes taken from the data (for the report)
    data_note: str | None = None     # where the data came from, when not one .npz (for the report)


def split_ort_scores(model: onnx.ModelProto, split: Split | None, task: Task, input_names: list[str],
                     *, source: str | None, batch: int = 256) -> dict[str, float]:
    """The task's loss and metric(s) of ``model`` in ONNX Runtime on ``split``, batch by batch
    (empty without a split)."""
    if split is None:
        return {}
    from ..runtime import ort_session
    session = ort_session(model, source=source)
    totals: dict[str, float] = {}
    with torch.no_grad():
        for inputs, target in split.batches(batch):
            feeds = {name: t.numpy() for name, t in zip(input_names, inputs)}
            outputs = [torch.from_numpy(o) for o in session.run(None, feeds)]
            for key, value in task.scores(outputs, target).items():
                totals[key] = totals.get(key, 0.0) + value
    return {key: value / len(split) for key, value in totals.items()}


def probe_model(base: Graph, inputs: list[np.ndarray], data_source: str) -> list[np.ndarray]:
    """One forward of the input model: does it run on this data, and what does it output?"""
    module = to_torch(base)
    module.eval()
    try:
        with torch.no_grad():
            return [o.numpy() for o in as_outputs(module(*[torch.from_numpy(v[:2]) for v in inputs]))]
    except PlinioOnnxError:
        raise
    except Exception as err:
        raise PlinioOnnxError(f"the model does not run on the data ({type(err).__name__}: "
                              f"{' '.join(str(err).split())[:200]})", file=data_source) from None


def prepare(model: "str | os.PathLike", data, labels: str, seed: int, test_fraction: float,
            val_fraction: float) -> Problem:
    """Load ``model`` and ``data`` (an .npz path or a dict of arrays), infer the task and split."""
    base = load(model)
    check_finite_weights(base)
    arrays, data_source = _file_or_arrays(data)
    base, shapes_note = concrete_shapes(model, base, arrays)
    inputs, y = _read_data(base, arrays, data_source)
    _check_finite_data(base, arrays, inputs, y, data_source)
    input_names = [t.name for t in base.gs.inputs]
    outputs = probe_model(base, inputs, data_source)
    task, y = infer_task(labels, y, outputs, base, data_source)

    train_idx, val_idx, test_idx = split_indices(
        len(inputs[0]), y if task.kind == "classification" and y.ndim == 1 else None, seed,
        test_fraction, val_fraction)
    if task.kind == "distill":
        teacher = ort_outputs(base.to_onnx(), input_names, inputs, source=str(model))
        targets = [torch.from_numpy(np.ascontiguousarray(t.astype(np.float32))) for t in teacher]
    else:
        targets = [torch.from_numpy(np.ascontiguousarray(y))]
    tensors = [torch.from_numpy(v) for v in inputs]

    def make_split(index: np.ndarray) -> TensorSplit:
        idx = torch.from_numpy(index)
        return TensorSplit([t[idx] for t in tensors], [t[idx] for t in targets])

    return Problem(base, task, make_split(train_idx), make_split(val_idx), make_split(test_idx), input_names,
                   (data, arrays), data_source, shapes_note)


def concrete_shapes(model, base: Graph, arrays: dict[str, np.ndarray]) -> tuple[Graph, str | None]:
    """``base`` with the data's sizes for symbolic non-batch input dimensions (height, width...),
    and a note saying so for the report; a fixed batch size is refused here, in one line."""
    fixed = fixed_batch(base)
    if fixed is not None:
        shapes = {t.name: list(t.shape) for t in base.gs.inputs}
        raise DataError(f"the model fixes the batch size to {fixed} (inputs {shapes}); training needs a "
                        "symbolic batch axis: re-export it with one (torch.onnx.export(..., "
                        "dynamic_axes={INPUT: {0: 'N'}}))", file=str(model))
    symbolic = symbolic_inputs(base)
    if not symbolic:
        return base, None
    shapes = {name: shape for name, shape in data_input_shapes(base, arrays).items() if name in symbolic}
    if not shapes:
        return base, None   # no array for them: input_arrays names what is missing
    graph = load(model, input_shapes=shapes)
    note = "; ".join(f"{name} {symbolic[name]} → {['N', *shape[1:]]}" for name, shape in shapes.items())
    return graph, f"symbolic input sizes taken from the data: {note}"


def _check_finite_data(graph: Graph, arrays: dict[str, np.ndarray], inputs: list[np.ndarray],
                       y: np.ndarray | None, source: str) -> None:
    """NaN/Inf in an input array or in the labels stops the run, naming the array of the file."""
    named = {(t.name if t.name in arrays else "x"): v for t, v in zip(graph.gs.inputs, inputs)}
    if y is not None:
        named["y"] = y
    check_finite_arrays(named, what="data", source=source)
