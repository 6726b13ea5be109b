"""Where an `optimize` run's data come from: one ``.npz`` or a dict of arrays (in memory), a
folder of shards (streamed), or torch ``Dataset``\\ s / ``DataLoader``\\ s given as splits."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from .data import Problem, prepare

__all__ = ["DataSources", "load_problem"]


@dataclass
class DataSources:
    """The data arguments of `optimize`: ``data``, or ``train``/``val`` (and ``test``) splits."""

    data: Any = None
    train: Any = None
    val: Any = None
    test: Any = None


def load_problem(model: "str | os.PathLike", sources: DataSources, labels: str, seed: int,
                 test_fraction: float, val_fraction: float) -> Problem:
    """The run's `Problem` from whichever data were given."""
    given = [name for name in ("train", "val", "test") if getattr(sources, name) is not None]
    if sources.data is not None and given:
        raise DataError(f"give either data or the splits ({', '.join(given)}=), not both")
    if sources.data is None:
        if sources.train is None or sources.val is None:
            raise DataError("no data: give data (an .npz, a dict of arrays or a folder of shards) or "
                            "train= and val= (torch Datasets or DataLoaders; test= optional)")
        from .datasets import prepare_datasets
        return prepare_datasets(model, sources.train, sources.val, sources.test, labels)
    data = sources.data
    if isinstance(data, (str, os.PathLike)) and Path(data).is_dir():
        from .streams import prepare_folder
        return prepare_folder(model, data, labels, seed, test_fraction, val_fraction)
    return prepare(model, data, labels, seed, test_fraction, val_fraction)
