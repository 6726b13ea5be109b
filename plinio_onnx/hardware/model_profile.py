"""`for_model`: the hardware profile a search of one model runs against, by name.

An analytical profile (``gap8``, ``ne16``, ``diana``, ``mpic``, ``simd-mcu``, ``FILE.py:NAME``)
is the same for every model; a measured one (``ort-cpu``, ``openvino-cpu``) is the model's own
latency table (`plinio_onnx.hardware.measured`), read from its cache beside the model or
measured on the spot — OpenVINO's in a process of its own (`plinio_onnx.hardware.isolated`), so
the caller (`optimize`, which trains next with forked data loaders) never loads it.
"""
from __future__ import annotations

import dataclasses
import os

from ..errors import PlinioOnnxError
from ..runtime import ISOLATED_RUNTIMES
from .isolated import measure_in_child
from .measured import RUNTIMES, Progress, cached_table, measured_profile
from .profile import HardwareProfile
from .registry import get

__all__ = ["DEFAULT_MEASURED_MULTIPLE", "channel_multiple_of", "for_model", "is_measured", "nchwc_block"]

#: The channel multiple a measured CPU profile searches on where the CPU is not known: ONNX
#: Runtime's blocked (NCHWc) convolution kernels work on blocks of 8 channels with AVX2.
DEFAULT_MEASURED_MULTIPLE = 8
#: Timing rounds of a table measured for a search (`plinio_onnx.hardware.measured.measure`'s).
MEASURE_REPEATS = 20


def nchwc_block(cpuinfo: "str | os.PathLike" = "/proc/cpuinfo") -> int:
    """The channel block of ONNX Runtime's NCHWc convolution kernels on this CPU (MLAS): 16 where
    it has AVX-512F, else 8 (AVX2; elsewhere 8 still keeps channels in SIMD-friendly blocks)."""
    try:
        with open(cpuinfo) as file:
            flags = next((line for line in file if line.startswith("flags")), "")
    except OSError:
        return DEFAULT_MEASURED_MULTIPLE
    return 16 if "avx512f" in flags.split() else DEFAULT_MEASURED_MULTIPLE


def is_measured(name: "str | HardwareProfile") -> bool:
    """Whether ``name`` is a measured runtime profile (a per-model latency table)."""
    return isinstance(name, str) and name in RUNTIMES


def channel_multiple_of(name: "str | HardwareProfile") -> int:
    """The channel multiple a search for ``name`` uses by default (a measured runtime's: this
    CPU's NCHWc block), known without measuring anything."""
    if is_measured(name):
        return nchwc_block()
    return int(get(name).channel_multiple or 1)


def for_model(name: "str | HardwareProfile", model_path: "str | os.PathLike", *,
              channel_multiple: int | None = None, progress: Progress | None = None,
              threads: int = 1) -> HardwareProfile:
    """The profile called ``name`` for the model at ``model_path``.

    Analytical profiles come from `get` (``channel_multiple``, when given, replaces theirs);
    measured ones (``ort-cpu``, ``openvino-cpu``) are the model's latency table on the grid of
    ``channel_multiple`` (default: this CPU's NCHWc block, `nchwc_block`: 16 with AVX-512, else
    8), cached beside the model or measured now, calling
    ``progress(done, total, layer)`` while it times the layers."""
    if channel_multiple is not None and int(channel_multiple) < 1:
        raise PlinioOnnxError(f"channel multiple must be at least 1, not {channel_multiple}")
    if is_measured(name):
        multiple = nchwc_block() if channel_multiple is None else int(channel_multiple)
        if name in ISOLATED_RUNTIMES:
            _measure_isolated(name, model_path, multiple, threads, progress)
        return measured_profile(model_path, name, channel_multiple=multiple, threads=threads,
                                repeats=MEASURE_REPEATS, progress=progress)
    profile = get(name)
    if channel_multiple is not None and int(channel_multiple) != profile.channel_multiple:
        profile = dataclasses.replace(profile, channel_multiple=int(channel_multiple))
    return profile


def _measure_isolated(runtime: str, model_path: "str | os.PathLike", multiple: int, threads: int,
                      progress: Progress | None) -> None:
    """The table of ``runtime`` cached beside the model — timed in a child process when it is not
    — so that `measured_profile` only reads it and never loads the runtime here."""
    def cached():
        return cached_table(model_path, runtime=runtime, channel_multiple=multiple, threads=threads)
    if cached() is not None:
        return
    measure_in_child(model_path, runtime=runtime, channel_multiple=multiple, threads=threads,
                     repeats=MEASURE_REPEATS, progress=progress)
    if cached() is None:
        raise PlinioOnnxError(f"the {runtime} table measured in its own process does not describe the model "
                              "(was the model changed meanwhile?)", file=str(model_path))
