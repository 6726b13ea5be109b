"""Peak host memory of one phase of work: the process's resident-set high-water mark.

torch's CPU allocations escape ``tracemalloc``, so the peak is read from the kernel
(``/proc/self/status`` VmHWM), whose high-water mark is reset before each phase by writing 5 to
``/proc/self/clear_refs`` (Linux ≥ 4.0). Run each measured phase in a fresh process
(`run_phase`) so phases' peaks and allocator caches do not mix.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    """The process's resident set now."""
    return _status_kib("VmRSS") * 1024


def peak_bytes() -> int:
    """The process's resident-set high-water mark since the last `reset_peak`."""
    return _status_kib("VmHWM") * 1024


def reset_peak() -> None:
    """Restart the high-water mark at the current resident set."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


@contextmanager
def measured() -> Iterator[dict]:
    """``with measured() as m: work()`` → ``m`` = {``seconds``, ``cpu_seconds`` (the process's
    CPU time, all threads: on a shared machine a steadier figure than the wall clock),
    ``rss_before``, ``peak`` (resident high-water mark during the block), ``added_peak`` (peak −
    rss_before), ``rss_after``} in bytes."""
    record: dict = {}
    reset_peak()
    record["rss_before"] = rss_bytes()
    start, cpu = time.perf_counter(), time.process_time()
    yield record
    record["seconds"] = time.perf_counter() - start
    record["cpu_seconds"] = time.process_time() - cpu
    record["peak"] = peak_bytes()
    record["added_peak"] = record["peak"] - record["rss_before"]
    record["rss_after"] = rss_bytes()


def run_phase(script: Path, *args: str, timeout: float = 1800.0) -> dict:
    """Run ``python script *args`` in a fresh process that prints one JSON line last; return it."""
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
