"""torch ``Dataset``\\ s and ``DataLoader``\\ s as the splits of an `optimize` run (the Python
API's ``train=``, ``val=``, ``test=``).

An item (a ``DataLoader``'s batch) is ``(x, y)`` or ``x`` for a single-input model, ``(x1, ...,
xk, y)`` or ``(x1, ..., xk)`` for k inputs, or a dict by input name (``x`` for a single input)
with an optional ``y``; without ``y`` the model is distilled from the input model's outputs
(ONNX Runtime, batch by batch).

* A ``Dataset`` is batched and shuffled by the run (the recipe's batch size, the run's seeded
  generator per phase and epoch): the same seed gives the same batches, and a resumed run
  repeats the interrupted epoch exactly.
* A ``DataLoader`` keeps its own batching, shuffling, sampler and workers: the run's seed does
  not reach its order (give it ``generator=torch.Generator().manual_seed(S)`` for repeatable
  runs), and a resumed run restarts the interrupted epoch in whatever order the loader gives.
  Under data parallelism, each rank takes every ``world``-th batch unless the loader's sampler
  is a ``DistributedSampler`` (then it already holds the rank's share).

The task, the input shapes and the model probe are decided on the first batch of ``train``;
NaN/Inf and out-of-range class labels are checked as the batches are read. The splits are the
caller's: ``test`` (optional) is used only for the report's test metrics. The checkpoint's
fingerprint holds each split's kind, size and first items (not the whole data set): rerun with
the same splits, a run resumes.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, default_collate

from ..data import input_arrays
from ..errors import DataError
from ..finite import check_finite_arrays, check_finite_weights
from ..load import load
from .data import Batch, Problem, Split, concrete_shapes, infer_task, probe_model
from .streams import SAMPLE, BatchMaker, Teacher

__all__ = ["DatasetSplit", "LoaderSplit", "batch_arrays", "prepare_datasets"]


def batch_arrays(batch: Any, input_names: list[str], source: str) -> dict[str, np.ndarray]:
    """A collated batch → arrays by graph input name (and ``y``)."""
    def array(value) -> np.ndarray:
        return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)

    if isinstance(batch, dict):
        named = dict(batch)
        if len(input_names) == 1 and input_names[0] not in named and "x" in named:
            named[input_names[0]] = named.pop("x")
        missing = [n for n in input_names if n not in named]
        if missing:
            raise DataError(f"the items have no {missing} (keys {sorted(named)}); use the graph inputs' names "
                            "(or 'x' for a single input) and 'y'", file=source)
        return {k: array(v) for k, v in named.items() if k in input_names or k == "y"}
    parts = list(batch) if isinstance(batch, (tuple, list)) else [batch]
    k = len(input_names)
    if len(parts) not in (k, k + 1):
        raise DataError(f"an item has {len(parts)} parts; the model has {k} input(s): give ({'x, ' * k}y), "
                        f"the inputs alone, or a dict by input name", file=source)
    arrays = {name: array(v) for name, v in zip(input_names, parts)}
    if len(parts) == k + 1:
        arrays["y"] = array(parts[-1])
    return arrays


class _Sourced(Split):
    """What the two splits share: the batch maker and the name errors give."""

    maker: BatchMaker
    input_names: list[str]
    source: str

    def _make(self, batch: Any, rows: np.ndarray | None = None) -> Batch:
        arrays = batch_arrays(batch, self.input_names, self.source)
        self.maker.check(arrays, self.source)
        return self.maker.make(arrays, rows)


class DatasetSplit(_Sourced):
    """A map-style ``Dataset`` (``len`` and ``[i]``), batched and shuffled by the run."""

    def __init__(self, dataset: Dataset, maker: BatchMaker, input_names: list[str], source: str):
        self.dataset, self.maker, self.input_names, self.source = dataset, maker, input_names, source

    def __len__(self) -> int:
        return len(self.dataset)

    def take(self, index: np.ndarray) -> Batch:
        return self._make(default_collate([self.dataset[int(i)] for i in index]), np.asarray(index))


class LoaderSplit(_Sourced):
    """A ``DataLoader``: its own batches, order and workers."""

    def __init__(self, loader: DataLoader, maker: BatchMaker, input_names: list[str], source: str):
        self.loader, self.maker, self.input_names, self.source = loader, maker, input_names, source
        try:
            self.count = len(loader)
            self.samples = self.count * loader.batch_size if loader.drop_last and loader.batch_size \
                else len(loader.dataset)
        except TypeError:   # an iterable dataset without a length: count one pass
            self.count = self.samples = 0
            for batch in loader:
                self.count += 1
                self.samples += len(next(iter(batch_arrays(batch, input_names, source).values())))

    def __len__(self) -> int:
        return self.samples

    def batches(self, batch_size: int, rng: np.random.Generator | None = None, *, rank: int = 0,
                world: int = 1) -> Iterator[Batch]:
        sharded = world > 1 and not isinstance(getattr(self.loader, "sampler", None), DistributedSampler)
        limit = self.num_batches(batch_size, rng is not None, world=world)
        taken = 0
        for b, batch in enumerate(self.loader):
            if taken == limit:
                break
            if sharded and b % world != rank:
                continue
            taken += 1
            yield self._make(batch)

    def num_batches(self, batch_size: int, shuffled: bool = True, *, world: int = 1) -> int:
        if world == 1 or isinstance(getattr(self.loader, "sampler", None), DistributedSampler):
            return self.count
        return self.count // world if shuffled else -(-self.count // world)

    def head(self, n: int) -> Batch:
        inputs: list[list[torch.Tensor]] = []
        targets: list[list[torch.Tensor]] = []
        for batch_inputs, batch_target in self.batches(1):
            inputs.append(batch_inputs)
            targets.append(batch_target or [])
            if sum(len(b[0]) for b in inputs) >= n:
                break
        joined = [torch.cat(parts)[:n] for parts in zip(*inputs)]
        return joined, [torch.cat(parts)[:n] for parts in zip(*targets)] or None


def prepare_datasets(model: "str | os.PathLike", train, val, test, labels: str) -> Problem:
    """The `Problem` of splits given as torch Datasets or DataLoaders (see the module)."""
    base = load(model)
    check_finite_weights(base)
    input_names = [t.name for t in base.gs.inputs]
    sample = batch_arrays(_first_batch(train), input_names, "train")
    base, shapes_note = concrete_shapes(model, base, sample)
    inputs = input_arrays(base, sample, "train")
    check_finite_arrays(sample, what="data", source="train")
    outputs = probe_model(base, inputs, "train")
    task, _ = infer_task(labels, sample.get("y"), outputs, base, "train")
    dtypes = [np.dtype(t.dtype) for t in base.gs.inputs]

    def wrap(data, name: str) -> Split | None:
        if data is None:
            return None
        if not isinstance(data, (Dataset, DataLoader)):
            raise DataError(f"{name}= is a {type(data).__name__}; give a torch Dataset or DataLoader")
        teacher = None
        if task.kind == "distill":
            samples = len(data) if isinstance(data, Dataset) and hasattr(data, "__len__") else 0
            teacher = Teacher(base.to_onnx(), input_names, samples, [o.shape[1:] for o in outputs], source=str(model))
        maker = BatchMaker(input_names, dtypes, task, teacher)
        if isinstance(data, DataLoader):
            return LoaderSplit(data, maker, input_names, name)
        if not hasattr(data, "__len__"):   # an iterable dataset: the run batches it
            return LoaderSplit(DataLoader(data, batch_size=SAMPLE), maker, input_names, name)
        return DatasetSplit(data, maker, input_names, name)

    splits = [wrap(data, name) for data, name in ((train, "train"), (val, "val"), (test, "test"))]
    kinds = ", ".join(f"{name} {type(d).__name__} ({len(s):,} samples)"
                      for d, s, name in zip((train, val, test), splits, ("train", "val", "test")) if s is not None)
    note = (f"data: {kinds}; task, input shapes and the model probe from the first {len(inputs[0])} samples "
            "of train; NaN/Inf checked as the batches are read" + ("" if test is not None else "; no test data"))
    given = [(name, data) for name, data in (("train", train), ("val", val), ("test", test)) if data is not None]
    return Problem(base, task, splits[0], splits[1], splits[2], input_names, _identity(given, input_names),
                   "train", shapes_note, note)


def _first_batch(data) -> Any:
    """The first batch of ``train``: a loader's, or up to `SAMPLE` items of a dataset, collated."""
    if isinstance(data, DataLoader):
        return next(iter(data))
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return default_collate([data[i] for i in range(min(len(data), SAMPLE))])
    if isinstance(data, Dataset):
        return next(iter(DataLoader(data, batch_size=SAMPLE)))
    raise DataError(f"train= is a {type(data).__name__}; give a torch Dataset or DataLoader")


def _identity(given: list, input_names: list[str]) -> tuple:
    """What the checkpoint's fingerprint hashes: each split's kind and size and its data set's
    first items (map-style; an iterable one: its kind and size only). A Dataset is not hashed
    whole: a resumed run trusts that it holds the same data."""
    digest = hashlib.sha256()
    for name, data in given:
        dataset = data.dataset if isinstance(data, DataLoader) else data
        size = len(dataset) if hasattr(dataset, "__len__") else -1
        digest.update(f"{name}:{type(data).__name__}:{size};".encode())
        if size > 0 and not isinstance(dataset, IterableDataset):
            arrays = batch_arrays(default_collate([dataset[i] for i in range(min(size, 16))]), input_names, name)
            for key in sorted(arrays):
                digest.update(key.encode())
                digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    return {}, {"datasets.sha256": np.frombuffer(digest.digest(), np.uint8)}
