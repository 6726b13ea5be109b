"""Splits streamed from a folder of shards (`optimize.shards`): batches are read when the
training loop asks for them, a window of batches at a time, never the whole data set.

The epoch's batch order is the in-memory split's (`data.batch_plan`: the same global shuffle of
the same samples), so a run on shards equals the run on the same samples in one ``.npz``. The
task, the input shapes and the model probe are decided on a sample (the first shard's first
rows); class labels of one number per sample are read whole (they stratify the splits). NaN/Inf
and out-of-range class labels are checked as each shard's rows are read, naming the shard.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from ..data import input_arrays
from ..finite import check_finite_arrays, check_finite_weights
from ..graph import Graph
from ..load import load
from .data import Batch, Problem, Split, Task, batch_plan, concrete_shapes, infer_task, probe_model, split_indices
from .shards import ShardSet, open_shards

__all__ = ["BatchMaker", "StreamSplit", "Teacher", "prepare_folder"]

#: Samples the task, the input shapes and the model probe are decided on.
SAMPLE = 256
#: Bytes of samples read at once (a window of batches; each shard is read once per window).
WINDOW_BYTES = 16 << 20
#: Teacher outputs (distillation) are kept per sample while they fit in this many bytes.
TEACHER_CACHE_BYTES = 256 << 20


class Teacher:
    """The input model's outputs on a batch, the distillation targets (ONNX Runtime); kept per
    sample number when all of them fit in `TEACHER_CACHE_BYTES`."""

    def __init__(self, model: onnx.ModelProto, input_names: list[str], samples: int,
                 output_shapes: list[tuple[int, ...]], source: str | None = None):
        self.model, self.input_names, self.source = model, input_names, source
        self.session = None
        size = samples * sum(int(np.prod(s, dtype=np.int64)) for s in output_shapes) * 4
        self.cache = [np.empty((samples, *s), np.float32) for s in output_shapes] \
            if size <= TEACHER_CACHE_BYTES else None
        self.known = np.zeros(samples, bool)

    def outputs(self, inputs: list[np.ndarray], rows: np.ndarray | None) -> list[torch.Tensor]:
        """The outputs on ``inputs``, the samples ``rows`` (None: unnumbered, not cached)."""
        cached = self.cache is not None and rows is not None
        if cached and self.known[rows].all():
            return [torch.from_numpy(c[rows]) for c in self.cache]
        if self.session is None:
            from ..runtime import ort_session
            self.session = ort_session(self.model, source=self.source)
        parts = [self.session.run(None, {n: v[i:i + 256] for n, v in zip(self.input_names, inputs)})
                 for i in range(0, len(inputs[0]), 256)]
        outs = [np.ascontiguousarray(np.concatenate([p[k] for p in parts]).astype(np.float32))
                for k in range(len(parts[0]))]
        if cached:
            for store, value in zip(self.cache, outs):
                store[rows] = value
            self.known[rows] = True
        return [torch.from_numpy(o) for o in outs]


@dataclass
class BatchMaker:
    """A batch's arrays as read (graph inputs by name, ``y``) → the training loop's tensors:
    inputs cast to the graph's dtypes, labels in the loss's form or the teacher's outputs."""

    columns: list[str]           # the array feeding each graph input
    dtypes: list[np.dtype]
    task: Task
    teacher: Teacher | None = None
    names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.names = self.columns + (["y"] if self.teacher is None else [])

    def check(self, arrays: dict[str, np.ndarray], source: "Path | str") -> None:
        """NaN/Inf in the arrays, or class labels out of range: one error naming ``source``."""
        check_finite_arrays(arrays, what="data", source=str(source))
        if "y" in arrays and self.teacher is None:
            self.task.target(arrays["y"], str(source))

    def make(self, arrays: dict[str, np.ndarray], rows: np.ndarray | None = None) -> Batch:
        inputs = [np.ascontiguousarray(arrays[c].astype(d, copy=False)) for c, d in zip(self.columns, self.dtypes)]
        if self.teacher is not None:
            target = self.teacher.outputs(inputs, rows)
        else:
            target = [torch.from_numpy(np.ascontiguousarray(self.task.target(arrays["y"])))]
        return [torch.from_numpy(v) for v in inputs], target


class StreamSplit(Split):
    """The samples ``indices`` (global numbers) of a `ShardSet`, read a window at a time."""

    def __init__(self, shards: ShardSet, indices: np.ndarray, maker: BatchMaker, window_bytes: int | None = None):
        self.shards, self.indices, self.maker, self.window_bytes = shards, indices, maker, window_bytes

    def __len__(self) -> int:
        return len(self.indices)

    def _read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return self.shards.rows(rows, self.maker.names, self.maker.check)

    def take(self, index: np.ndarray) -> Batch:
        rows = self.indices[index]
        return self.maker.make(self._read(rows), rows)

    def batches(self, batch_size: int, rng: np.random.Generator | None = None, *, rank: int = 0,
                world: int = 1):
        plan = batch_plan(len(self), batch_size, rng, rank, world)
        per_window = max(1, (self.window_bytes or WINDOW_BYTES) // max(1, batch_size * self.shards.row_bytes(self.maker.names)))
        for start in range(0, len(plan), per_window):
            group = plan[start:start + per_window]
            rows = self.indices[np.concatenate(group)]
            arrays = self._read(rows)
            at = 0
            for index in group:
                # copies: a batch the loop still holds must not keep its window alive
                part = {name: value[at:at + len(index)].copy() for name, value in arrays.items()}
                yield self.maker.make(part, rows[at:at + len(index)])
                at += len(index)
            del arrays, part   # before the next window is read


def prepare_folder(model: "str | os.PathLike", folder: "str | os.PathLike", labels: str, seed: int,
                   test_fraction: float, val_fraction: float) -> Problem:
    """`data.prepare` for a folder of shards: the same task and splits, the data streamed."""
    shards = open_shards(folder)
    first = str(shards.shards[0].path)
    base = load(model)
    check_finite_weights(base)
    sample = shards.sample(SAMPLE)
    base, shapes_note = concrete_shapes(model, base, sample)
    inputs = input_arrays(base, sample, first)              # names and shapes: alike in every shard
    columns = _columns(base, sample)
    check_finite_arrays(sample, what="data", source=first)
    outputs = probe_model(base, inputs, first)
    whole_labels = "y" in shards.names and len(shards.info("y").shape) == 1
    y = shards.column("y") if whole_labels else sample.get("y")
    task, y = infer_task(labels, y, outputs, base, str(folder) if whole_labels else first)
    n = len(shards)
    train, val, test = split_indices(n, y if task.kind == "classification" and whole_labels else None, seed,
                                     test_fraction, val_fraction)
    input_names = [t.name for t in base.gs.inputs]
    teacher = None
    if task.kind == "distill":
        teacher = Teacher(base.to_onnx(), input_names, n, [o.shape[1:] for o in outputs], source=str(model))
    maker = BatchMaker(columns, [np.dtype(t.dtype) for t in base.gs.inputs], task, teacher)
    note = (f"data: {len(shards.shards)} {shards.layout} in {shards.folder} ({n:,} samples), streamed in "
            f"batches; task, input shapes and the model probe from the first {len(inputs[0])} samples of "
            f"{Path(first).name}{'; class labels read whole for the split' if whole_labels else ''}; "
            "NaN/Inf checked as the batches are read")
    identity = ({}, {"shards.sha256": np.frombuffer(shards.digest(), np.uint8)})
    return Problem(base, task, *(StreamSplit(shards, i, maker) for i in (train, val, test)), input_names,
                   identity, str(folder), shapes_note, note)


def _columns(graph: Graph, arrays: dict[str, np.ndarray]) -> list[str]:
    """The array feeding each graph input (``x`` for a single-input graph without its name)."""
    return [t.name if t.name in arrays else "x" for t in graph.gs.inputs]
