"""`HardwareProfile`: what the search needs to know of a deployment target, and where to find one.

A profile bundles a latency cost model (and an energy one where published), the channel
multiple the target profits from (its hardware computes channels in blocks of that size), the
bit-widths it runs and the precision it runs a float model at. Cost models are functions of a
`plinio_onnx.cost.LayerSpec` written with arithmetic (and `plinio_onnx.hardware.rounding`), so
they count exactly on a static graph and are differentiable in a search.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..cost import LayerSpec
from ..errors import PlinioOnnxError

CostFn = Callable[[LayerSpec], Any]
KINDS = ("latency", "energy")


@dataclass(frozen=True)
class AtPrecision:
    """A cost model seeing float layers (bit-widths None) at ``bits``: how a target runs a float
    model. Quantized layers (an MPS search, a QDQ model) keep their own bit-widths."""

    model: CostFn
    bits: int | None

    def __call__(self, spec: LayerSpec) -> Any:
        if self.bits is not None and (spec.weight_bits is None or spec.input_bits is None):
            spec = spec.with_(weight_bits=self.bits if spec.weight_bits is None else spec.weight_bits,
                              input_bits=self.bits if spec.input_bits is None else spec.input_bits)
        return self.model(spec)


@dataclass(frozen=True)
class HardwareProfile:
    """A deployment target for the search.

    ``latency`` / ``energy``: per-layer cost models (energy optional). ``channel_multiple``:
    the channel count granularity the target computes in (1: none). ``weight_bits`` /
    ``activation_bits``: the bit-widths it runs (what an MPS search should choose from).
    ``default_bits``: the precision of a float layer on it (None: the models take float layers
    as they are). A user-defined target needs only a name, a latency function and usually a
    channel multiple::

        profile = po.hardware.HardwareProfile("my-mcu", latency=my_cycles, channel_multiple=8)
        model = po.PIT("model.onnx", cost=profile.cost())
    """

    name: str
    latency: CostFn
    channel_multiple: int = 1
    weight_bits: tuple[int, ...] = (8,)
    activation_bits: tuple[int, ...] = (8,)
    default_bits: int | None = 8
    energy: CostFn | None = None
    latency_unit: str = "cycles"
    energy_unit: str = "J"
    description: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if not callable(self.latency):
            raise PlinioOnnxError(f"hardware profile {self.name!r}: latency must be a function of a LayerSpec")
        if self.energy is not None and not callable(self.energy):
            raise PlinioOnnxError(f"hardware profile {self.name!r}: energy must be a function of a LayerSpec")
        if int(self.channel_multiple) < 1:
            raise PlinioOnnxError(f"hardware profile {self.name!r}: channel_multiple must be ≥ 1, "
                                  f"not {self.channel_multiple}")

    @property
    def has_energy(self) -> bool:
        return self.energy is not None

    def cost(self, kind: str = "latency") -> CostFn:
        """The ``kind`` ("latency" or "energy") cost model at this target's precision: pass it as
        the ``cost`` of `po.PIT`, `po.MPS`, `po.SuperNet`, or to `po.cost.total`."""
        if kind not in KINDS:
            raise PlinioOnnxError(f"unknown hardware cost {kind!r}; choose from {KINDS}")
        model = self.latency if kind == "latency" else self.energy
        if model is None:
            raise PlinioOnnxError(f"hardware profile {self.name!r} has no {kind} model")
        return AtPrecision(model, self.default_bits)


def load_profile(reference: str) -> HardwareProfile:
    """The `HardwareProfile` named by ``FILE.py:NAME`` or ``package.module:NAME`` (that file's
    code runs, as any Python file you import)."""
    where, _, attr = reference.rpartition(":")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise PlinioOnnxError(f"{where}: no such file (hardware profile {reference!r})")
            spec = importlib.util.spec_from_file_location(f"_plinio_onnx_hardware_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except PlinioOnnxError:
        raise
    except Exception as err:
        raise PlinioOnnxError(f"{where}: cannot load hardware profile {attr!r}: {type(err).__name__}: {err}") from err
    profile = getattr(module, attr, None)
    if not isinstance(profile, HardwareProfile):
        raise PlinioOnnxError(f"{where}: {attr!r} is not a plinio_onnx.hardware.HardwareProfile")
    return profile
