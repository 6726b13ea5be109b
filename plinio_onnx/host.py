"""Where a tensor's work runs: on the host CPU, or on a device (CUDA, …) behind a queue.

Code on a training step's path has two forms where it matters. On the host it may read values
back (``float(t)``, ``.tolist()``, numpy, ``torch.equal`` to skip work that did not change):
that costs nothing there and is often the fastest way. On a device every such read waits for
the device's queue to drain (a host round trip), so the device form keeps every number a
tensor and decides with tensor ops (``torch.where``) instead of Python branches.

`runs_on_host` is the one switch between the two forms. Tests replace it (``monkeypatch``) with
a function returning False to run the device forms on the CPU, under a guard that fails on any
host read (tests/test_device_sync.py).
"""
from __future__ import annotations

import torch


def runs_on_host(tensor: torch.Tensor) -> bool:
    """Whether work on ``tensor`` runs on the host CPU (it may then read values back freely)."""
    return tensor.is_cpu   # (ten times cheaper than asking its device's type)
