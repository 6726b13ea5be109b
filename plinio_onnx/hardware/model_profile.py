"""`for_model`: the hardware profile a search of one model runs against, by name.

An analytical profile (``gap8``, ``ne16``, ``diana``, ``mpic``, ``simd-mcu``, ``FILE.py:NAME``)
is the same for every model; a measured one (``ort-cpu``, ``openvino-cpu``) is the model's own
latency table (`plinio_onnx.hardware.measured`), read from its cache beside the model or
measured on the spot.
"""
from __future__ import annotations

import dataclasses
import os

from ..errors import PlinioOnnxError
from .measured import RUNTIMES, Progress, measured_profile
from .profile import HardwareProfile
from .registry import get

__all__ = ["DEFAULT_MEASURED_MULTIPLE", "channel_multiple_of", "for_model", "is_measured", "nchwc_block"]

#: The channel multiple a measured CPU profile searches on where the CPU is not known: ONNX
#: Runtime's blocked (NCHWc) convolution kernels work on blocks of 8 channels with AVX2.
DEFAULT_MEASURED_MULTIPLE = 8


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
        return measured_profile(model_path, name, channel_multiple=multiple, threads=threads, progress=progress)
    profile = get(name)
    if channel_multiple is not None and int(channel_multiple) != profile.channel_multiple:
        profile = dataclasses.replace(profile, channel_multiple=int(channel_multiple))
    return profile
