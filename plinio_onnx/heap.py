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
import ctypes.util
import sys

__all__ = ["release_free_memory"]


def release_free_memory() -> bool:
    """Return the C heap's free pages to the operating system (glibc); True where it could."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):   # not glibc (musl has no malloc_trim)
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True
