"""Where an `optimize` run computes: its device, and — under ``torchrun`` — its place among the
processes of one data-parallel search (`torch.distributed`).

``torchrun --nproc-per-node N -m plinio_onnx.cli optimize ...`` starts N processes with
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` in their environment;
`start` joins them into one process group (gloo on the CPU, NCCL on CUDA devices; a group the
caller already initialized is used as it is and left open). Every rank trains on its share of
each epoch's batches under `torch.nn.parallel.DistributedDataParallel` (`Distributed.wrap`) and
holds the same parameters at every step, so every decision the flow takes from them (mask
binarization, λ, re-keeping, early stopping, the best epoch) is the same on every rank; values
that come from a rank's own data (validation sums, the training loss) are combined with
`all_sum` / `gather` so that every rank sees the same numbers. Only rank 0 (`is_main`) writes
checkpoints, the output and the report.

Debugging aid: with ``PLINIO_ONNX_RANK_DUMP=DIR`` in the environment every rank writes its final
state (`dump_state`) to ``DIR/rank<R>.npz``, so two ranks can be compared array by array.
"""
from __future__ import annotations

import datetime
import inspect
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist

from ..errors import SettingError

__all__ = ["DUMP_ENV", "Distributed", "check_device_name", "resolve_device", "start"]

#: The environment variable naming the folder where every rank dumps its final state.
DUMP_ENV = "PLINIO_ONNX_RANK_DUMP"

_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_device_name(name: str) -> None:
    """`SettingError` unless ``name`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not isinstance(name, str) or not _DEVICE_NAME.fullmatch(name):
        raise SettingError(f"unknown device {name!r}; choose auto, cpu, cuda or cuda:N")


def resolve_device(name: str, local_rank: int = 0, launched: bool = False) -> torch.device:
    """The device ``name`` means for this process: ``auto`` is CUDA when torch sees a CUDA device
    and the CPU otherwise; ``cuda`` under ``torchrun`` (``launched``) is the local rank's GPU.
    A CUDA device that is not there is one clear `SettingError`."""
    check_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = f"torch {torch.__version__} " + ("has CUDA support but finds no GPU" if torch.version.cuda
                                                 else "is a CPU-only build")
        raise SettingError(f"--device {name}: no CUDA device is available ({built}); use --device cpu or auto")
    index = int(name.split(":")[1]) if ":" in name else (local_rank if launched else torch.cuda.current_device())
    if index >= torch.cuda.device_count():
        raise SettingError(f"--device {name}: there is no CUDA device {index} "
                           f"({torch.cuda.device_count()} visible)")
    return torch.device("cuda", index)


@dataclass
class Distributed:
    """This process's place in a data-parallel run (``world`` 1: a run of its own) and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False   # `start` initialized the process group: `close` ends it

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, the output and the report."""
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        return dist.get_backend() if self.enabled else None

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.enabled:
            dist.barrier()

    def all_sum(self, values: Iterable[float]) -> list[float]:
        """``values`` summed over the ranks (float64; the same numbers on every rank)."""
        values = list(values)
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        self._collective(dist.all_reduce, tensor)
        return tensor.cpu().tolist()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (JSON: numbers, strings, lists, dicts; a tuple comes back as a
        list), in rank order, on every rank."""
        if not self.enabled:
            return [value]
        payload = self._bytes(value)
        sizes = [torch.zeros(1, dtype=torch.int64, device=payload.device) for _ in range(self.world)]
        self._collective(dist.all_gather, sizes, torch.tensor([payload.numel()], device=payload.device))
        longest = max(int(size) for size in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8, device=payload.device)
        padded[:payload.numel()] = payload
        parts = [torch.empty(longest, dtype=torch.uint8, device=payload.device) for _ in range(self.world)]
        self._collective(dist.all_gather, parts, padded)
        return [json.loads(part[:int(size)].cpu().numpy().tobytes()) for part, size in zip(parts, sizes)]

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (JSON, as `gather`'s) on every rank."""
        if not self.enabled:
            return value
        payload = self._bytes(value if self.is_main else None)
        size = torch.tensor([payload.numel()], device=payload.device)
        self._collective(dist.broadcast, size, src=0)
        if not self.is_main:
            payload = torch.empty(int(size), dtype=torch.uint8, device=payload.device)
        self._collective(dist.broadcast, payload, src=0)
        return json.loads(payload.cpu().numpy().tobytes())

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (batch-norm statistics) on every rank, after each training epoch:
        during the epoch each rank updates them from its own batches (training-mode batch norm
        does not read them), so validation, checkpoints and the next phase start identical."""
        if self.enabled:
            for buffer in module.buffers():
                self._collective(dist.broadcast, buffer.data, src=0)

    def _bytes(self, value: Any) -> torch.Tensor:
        data = json.dumps(value).encode()   # (JSON, not pickle: no object a rank sends is code)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self._comm_device())

    def _collective(self, operation, *args, **kwargs) -> None:
        """``operation(*args, **kwargs)`` on the group, returning once the backend has let go of
        its tensors (gloo).

        gloo wakes the caller when a collective is done, but its worker thread drops the work (and
        with it the tensors) a moment later. A tensor whose Python object is gone by then is
        released by that thread, which must take the GIL to do it; if the interpreter is already
        finalizing (a rank's last collective, then exit), the thread is ended inside a destructor
        and the process aborts ("terminate called without an active exception"). Waiting for the
        release here keeps it on this side of our own references (microseconds)."""
        tensors = [t for arg in args for t in (arg if isinstance(arg, list) else [arg])
                   if isinstance(t, torch.Tensor)]
        held = [t._use_count() for t in tensors]
        operation(*args, **kwargs)
        if self.backend != "gloo":
            return
        deadline = time.monotonic() + 10.0
        while any(t._use_count() > n for t, n in zip(tensors, held)) and time.monotonic() < deadline:
            time.sleep(1e-4)

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` under `DistributedDataParallel` (as it is in a run of its own).

        DDP broadcasts rank 0's parameters and buffers once here, so every rank starts from the
        same values, and averages the gradients over the ranks in every backward pass. Buffers are
        not sent at every step but once per epoch (`broadcast_buffers`): the same rank-0
        statistics in the end, without a broadcast of every constant per step.
        ``find_unused_parameters``: the objective reaches some parameters only in some runs
        (architecture parameters only through the cost, masks of layers a method leaves alone)."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel
        # (named forward_sync_buffers since torch 2.13; before, broadcast_buffers)
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
            DistributedDataParallel).parameters else "broadcast_buffers"
        return DistributedDataParallel(module, find_unused_parameters=True, **{no_sync: False})

    def dump_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Write ``arrays`` to ``$PLINIO_ONNX_RANK_DUMP/rank<R>.npz`` when that variable is set."""
        folder = os.environ.get(DUMP_ENV)
        if not folder:
            return
        Path(folder).mkdir(parents=True, exist_ok=True)
        np.savez(Path(folder) / f"rank{self.rank}.npz", **arrays)

    def close(self) -> None:
        """End the process group when `start` began it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def start(device: str) -> Distributed:
    """Join the processes ``torchrun`` started (``WORLD_SIZE`` > 1), or run alone; the device
    ``device`` names (`resolve_device`) for this rank. The backend is NCCL on CUDA, gloo on
    the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    launched = world > 1 or dist.is_initialized()
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    where = resolve_device(device, local_rank, launched)
    if not launched:
        return Distributed(device=where)
    if where.type == "cuda":
        torch.cuda.set_device(where)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
        owns = True
    return Distributed(rank=dist.get_rank(), world=dist.get_world_size(), device=where, owns_group=owns)
