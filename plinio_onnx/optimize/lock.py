"""One `optimize` run per output at a time: a lock file holding the running process's id.

The file is created exclusively (``O_EXCL``), so of two runs started together exactly one gets
it; the other stops with one clear error. A lock left by a killed process (its pid no longer
runs on this host) is stale and taken over; the lock is removed when the run ends, however it ends.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

from ..errors import CheckpointError

__all__ = ["RunLock"]


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process: alive
        return True
    return True


class RunLock:
    """``path`` held by this process while a run writes one output (a context manager)."""

    def __init__(self, path: "str | os.PathLike") -> None:
        self.path = Path(path)
        self.held = False

    def acquire(self) -> None:
        """Take the lock, replacing a stale one; `CheckpointError` while another run holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        owner = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and self._alive(holder):
                    raise CheckpointError(
                        f"another optimize run (pid {holder['pid']} on {holder['host']}) is writing this "
                        "output; wait for it to finish, or give another -o", file=str(self.path)) from None
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()   # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(owner, handle)
            self.held = True
            return
        raise CheckpointError("could not take the run lock (it keeps reappearing)", file=str(self.path))

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
        except (OSError, ValueError):
            return None   # unreadable or half written by a killed process: stale

    @staticmethod
    def _alive(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return True   # another machine's process cannot be checked: assume it runs
        return holder["pid"] != os.getpid() and _running(holder["pid"])

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
