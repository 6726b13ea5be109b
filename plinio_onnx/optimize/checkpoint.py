"""Checkpoints of an `optimize` run: ``state.json`` + epoch-numbered ONNX graphs and optimizer
``.npz`` files in one folder, and the optimizer state's conversion to and from arrays.

Layout (unchanged since the first release, so old checkpoints resume): ``state.json`` holds
``{"version": 1, "fingerprint": <sha256 of model, data and options>, "phases": {name: record}}``;
a record names its files in keys ending in ``_file`` (``warmup-e0003.onnx``,
``search-e0007.optim.npz``, ``search.best.onnx``, …). An optimizer's arrays are
``p<i>.<state key>`` for the i-th parameter with state, whose names are listed in ``__names__``;
the search phase prefixes its two optimizers' arrays with ``net.`` and ``nas.``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_path, remove_stale_temporaries, write_text
from ..errors import CheckpointError, PlinioOnnxError
from ..graph import Graph
from ..load import load

__all__ = ["Checkpoint", "STATE_VERSION", "PHASES", "dumps", "fingerprint", "load_optimizer",
           "optimizer_arrays", "parameter_names"]

STATE_VERSION = 1
PHASES = ("warmup", "search", "finetune")


def dumps(value: Any, indent: int) -> str:
    """JSON text of ``value``; numpy scalars and paths as plain numbers and strings."""
    return json.dumps(value, indent=indent, default=_json_default)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


class Checkpoint:
    """``state.json`` + epoch-numbered ONNX graphs and optimizer ``.npz`` files in one folder
    (without a folder: the same, kept in memory for the run).

    Files are written first, ``state.json`` (which names them) last and atomically, so a run killed
    at any moment leaves the previous consistent state; files no longer named are removed.

    ``writer=False`` (the ranks other than 0 of a data-parallel run): the folder is only read —
    the state and files rank 0 wrote before this run — and what this process saves is kept in
    memory under the same names (every rank saves the same values; rank 0 writes them).
    """

    def __init__(self, folder: Path | None, fingerprint: str, writer: bool = True) -> None:
        self.folder = folder
        self.writer = writer
        self.fingerprint = fingerprint
        self.state: dict[str, Any] = {"version": STATE_VERSION, "fingerprint": fingerprint, "phases": {}}
        self.resumed = False
        self.discarded = False
        self._memory: dict[str, Any] = {}   # without a folder: the "files", kept in memory

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    def open(self) -> None:
        """Read the folder's state when it was made by the same command (else start over)."""
        if not self.enabled:
            return
        if self.folder.exists() and not self.folder.is_dir():
            raise PlinioOnnxError("the checkpoint path exists and is not a folder", file=str(self.folder))
        if self.writer:
            self.folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.folder)   # of a killed run; the caller holds the folder's lock
        path = self.folder / "state.json"
        if path.is_file():
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                state = None
            if isinstance(state, dict) and state.get("version") == STATE_VERSION \
                    and state.get("fingerprint") == self.fingerprint:
                check_state(state, path)
                self.state = state
                self.resumed = bool(state.get("phases"))
            else:
                self.discarded = True

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

    @property
    def _writes(self) -> bool:
        return self.enabled and self.writer

    def save_graph(self, graph: Graph, name: str) -> str:
        if self._writes:
            graph.save(self.folder / name)
        else:
            self._memory[name] = graph.to_onnx(check=False)
        return name

    def load_graph(self, name: str) -> Graph:
        if name in self._memory or not self.enabled:
            return load(self._memory[name])
        return load(self.folder / name)

    def save_arrays(self, arrays: dict[str, np.ndarray], name: str) -> str:
        if not self._writes:
            self._memory[name] = {k: np.array(v) for k, v in arrays.items()}
            return name
        with atomic_path(self.folder / name) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        return name

    def load_arrays(self, name: str) -> dict[str, np.ndarray]:
        if name in self._memory or not self.enabled:
            return dict(self._memory[name])
        path = self.folder / name
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise CheckpointError(f"damaged checkpoint file ({type(err).__name__}: {' '.join(str(err).split())[:120]}); "
                                  f"delete {self.folder} to start over", file=str(path)) from None

    def commit(self, phase: str, record: dict) -> None:
        """Record ``phase``'s state; files no phase names any more are removed."""
        self.state["phases"][phase] = record
        referenced = set()
        for rec in self.state["phases"].values():
            for key, value in rec.items():
                if key.endswith("_file") and value:
                    referenced.add(value)
        for name in [n for n in self._memory if n not in referenced]:
            del self._memory[name]
        if not self._writes:
            return
        write_text(self.folder / "state.json", dumps(self.state, indent=1))
        for entry in self.folder.iterdir():
            if entry.is_file() and entry.name not in referenced \
                    and re.match(r"(warmup|search|finetune)[-.].*\.(onnx|npz)$", entry.name):
                entry.unlink()


#: The types of the keys a checkpoint's records hold (at any depth); others are not checked.
_NUMBER = (int, float)
_KEY_TYPES: dict[str, tuple] = {
    "done": (bool,), "budget": (int,), "epoch": (int,), "best_epoch": (int, type(None)),
    "met_epoch": (int, type(None)), "best_loss": _NUMBER, "initial": (dict,), "seconds": _NUMBER,
    "info": (dict,), "best_scores": (dict, type(None)), "state": (dict,), "history": (list,),
    "best": (list, type(None)), "method": (str,),
}


def check_state(state: dict, path: Path) -> None:
    """`CheckpointError` when ``state.json`` (of this command) holds a value of the wrong type."""
    def fail(where: str, value, expected: str) -> None:
        raise CheckpointError(f"damaged checkpoint state: {where} is {type(value).__name__} {value!r:.40}, "
                              f"expected {expected}; delete {path.parent} to start over", file=str(path))

    phases = state.get("phases")
    if not isinstance(phases, dict):
        fail("'phases'", phases, "an object")
    if not isinstance(state.get("scaler", {}), dict):
        fail("'scaler'", state["scaler"], "an object")
    for phase, record in phases.items():
        if phase not in PHASES or not isinstance(record, dict):
            fail(f"phase {phase!r}", record, f"an object named one of {', '.join(PHASES)}")
        _check_record(record, phase, fail)


def _check_record(record: dict, where: str, fail) -> None:
    for key, value in record.items():
        place = f"{where}.{key}"
        if key.endswith("_file"):
            if not (value is None or isinstance(value, str) and value and "/" not in value and "\\" not in value
                    and not value.startswith(".")):
                fail(place, value, "a file name in the checkpoint folder")
        elif key in _KEY_TYPES:
            allowed = _KEY_TYPES[key]
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                fail(place, value, " or ".join(t.__name__ for t in allowed))
        if isinstance(value, dict) and key != "info":
            _check_record(value, place, fail)


def fingerprint(model: "str | os.PathLike", data, arrays: dict[str, np.ndarray], options: dict) -> str:
    """sha256 of the model file, the data (file, or arrays by sorted name) and ``options``."""
    digest = hashlib.sha256()
    _hash_file(model, digest)
    if isinstance(data, dict):
        for key in sorted(arrays):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    else:
        _hash_file(data, digest)
    digest.update(json.dumps(options, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _hash_file(path: "str | os.PathLike", digest) -> None:
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)


# -- optimizer state --------------------------------------------------------------------------
def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The generated module (a searchable model wraps one in ``.module``)."""
    return getattr(model, "module", model) if not hasattr(model, "initializer_names") else model


def parameter_names(model: torch.nn.Module) -> dict[int, str]:
    """A stable name for each parameter (by ``id``): its ONNX initializers' names."""
    inner = _inner(model)
    if not hasattr(inner, "parameter_initializers"):
        return {id(p): attr for attr, p in inner.named_parameters()}
    return {id(p): "|".join(names) if names else attr for attr, p, names in inner.parameter_initializers()}


def optimizer_arrays(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, np.ndarray]:
    """``optimizer``'s state as arrays (see the module's docstring)."""
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


def load_optimizer(optimizer: torch.optim.Optimizer, arrays: dict[str, np.ndarray], names: dict[int, str]) -> None:
    """Give ``optimizer`` the state `optimizer_arrays` wrote, parameter by parameter name."""
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
                if key.startswith(prefix):   # on the parameter's device (fused Adam keeps its step there)
                    state[key[len(prefix):]] = torch.from_numpy(np.array(value)).to(p.device)
            optimizer.state[p] = state
