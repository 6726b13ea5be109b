"""What a SuperNet search offers: the automatic `Menu` per layer kind, and JSON spec files
(`load_spec`) that hold the `plinio_onnx.passes.supernet.supernet` arguments."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from plinio_onnx.errors import PassError

from .supernet_builtins import parse_builtin

__all__ = ["Menu", "load_spec"]


@dataclass(frozen=True)
class Menu:
    """Automatic alternatives per layer kind (see the module docstring for each).

    ``kernels``: Conv kernel sizes (the original's is skipped); ``separable``: depthwise-separable
    Conv; ``groups``: grouped Conv forms; ``identity``: skip where shapes allow; ``ranks``:
    low-rank Gemm/MatMul (float = fraction of min(in, out), int = rank); ``conv_ranks``: the same
    for group-1 Convs (off by default).
    """

    kernels: tuple[int, ...] = (1, 3, 5)
    separable: bool = True
    groups: tuple[int, ...] = (2,)
    identity: bool = True
    ranks: tuple[float, ...] = (0.25, 0.5)
    conv_ranks: tuple[float, ...] = ()

    @classmethod
    def of(cls, value: "Menu | Mapping[str, Any] | None") -> "Menu":
        """The default menu for None, else ``value`` (a `Menu` or a dict of its fields)."""
        if value is None:
            return cls()
        if isinstance(value, Menu):
            return value
        known = {f.name for f in fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise PassError(f"unknown SuperNet menu entries {sorted(unknown)}; choose from {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in value.items()})

    def requests(self, op: str) -> list[tuple[str, Any]]:
        """(kind, argument) of every automatic alternative for a layer of type ``op``."""
        if op == "Conv":
            out = [("kernel", int(k)) for k in self.kernels]
            out += [("separable", None)] if self.separable else []
            out += [("group", int(g)) for g in self.groups]
            out += [("rank", r) for r in self.conv_ranks]
        else:
            out = [("rank", r) for r in self.ranks]
        return out + ([("identity", None)] if self.identity else [])


def load_spec(path: "str | os.PathLike") -> dict:
    """Read a JSON SuperNet spec into `supernet` keyword arguments; alternative paths are resolved
    relative to the file. Keys: ``automatic``, ``include``, ``exclude``, ``op_types``, ``menu``,
    ``layers`` ({node: [alternatives]}), ``regions`` ([{input, output, alternatives, name?}]),
    ``sampling``, ``temperature``."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PassError(f"cannot read the SuperNet spec ({' '.join(str(err).split())[:200]})", file=str(path)) from None
    if not isinstance(spec, dict):
        raise PassError("a SuperNet spec is a JSON object", file=str(path))
    known = {"automatic", "include", "exclude", "op_types", "menu", "layers", "regions", "sampling", "temperature"}
    unknown = set(spec) - known
    if unknown:
        raise PassError(f"unknown SuperNet spec keys {sorted(unknown)}; choose from {sorted(known)}", file=str(path))

    def resolve(alts) -> list:
        if not isinstance(alts, list):
            raise PassError("alternatives are a JSON list", file=str(path))
        return [a if parse_builtin(a) is not None else str((path.parent / a).resolve()) for a in alts]

    if "layers" in spec:
        spec["layers"] = {node: resolve(alts) for node, alts in spec["layers"].items()}
    if "regions" in spec:
        spec["regions"] = [{**r, "alternatives": resolve(r.get("alternatives", []))} for r in spec["regions"]]
    return spec
