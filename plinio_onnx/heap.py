"""Give the C heap's free memory back to the operating system after a phase that freed a lot.

Building a searchable model or exporting one frees transient copies of the weights (the parsed
file, quantized integers, decompositions). glibc's allocator keeps such memory mapped for reuse
once its thresholds have grown past the freed blocks' sizes, so the process's resident set
stays at the phase's peak: a model built from a file holds its weights once but a resident
set of about twice them, and the next phase (export, training) peaks on top of that.
``malloc_trim(0)`` returns those free pages. Elsewhere (another C library, another system) it
does nothing.
"""
from __future__ import annotations

import ctypes
import functools
import sys

__all__ = ["release_free_memory"]


def release_free_memory() -> bool:
    """Return the C heap's free pages to the operating system (glibc); True where it could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` from the C library the process already runs (looked up once:
    ``ctypes.util.find_library`` would run ``ldconfig`` in a subprocess at every call, and
    quantizing exports call this once per large layer); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):   # not glibc (musl has no malloc_trim)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim
