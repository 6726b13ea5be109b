"""Atomic file writes: a file is either its old content or its complete new content, never a part.

The new content goes to a temporary file in the destination's folder (the same file system, so
the final rename is atomic), is flushed to disk, then renamed over the destination. The temporary
file is created with the permissions any other new file gets (0666 less the umask), not
``tempfile.mkstemp``'s 0600, so the result is readable by whoever could read the old one.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "check_writable", "remove_stale_temporaries", "write_bytes", "write_text"]

#: The temporary files `atomic_path` creates: ``.NAME.<8 hex digits>.tmp`` next to ``NAME``.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.tmp$")


def _reserve(path: Path) -> Path:
    """Create an empty, new temporary file next to ``path`` (mode 0666 & ~umask)."""
    while True:
        candidate = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate


def remove_stale_temporaries(folder: "str | os.PathLike", names: "set[str] | None" = None) -> list[Path]:
    """Remove the temporary files a killed writer left in ``folder`` (only of `atomic_path`'s
    naming pattern; with ``names``, only those of these destination names). Call it only while no
    other writer uses the folder (the caller holds its lock). Returns the removed paths."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match and (names is None or match["name"] in names) and entry.is_file():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return removed


def check_writable(folder: "str | os.PathLike") -> None:
    """Raise `OSError` when files cannot be created in ``folder``: a file is created and removed
    in it, or — while it does not exist yet — in its nearest existing parent (nothing is left
    behind). Lets a long run fail before the work that would end in writing there."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(20, "Not a directory", str(existing))
    os.unlink(_reserve(existing / "write-test"))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (where the platform lets a folder be opened)."""
    try:
        _fsync(folder)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_path(path: "str | os.PathLike") -> Iterator[Path]:
    """A temporary path next to ``path`` for the caller to write; when the block ends normally it
    is flushed to disk and renamed over ``path``, otherwise removed (``path`` stays as it was).

        with atomic_path("model.onnx") as tmp:
            onnx.save_model(model, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _reserve(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def write_bytes(path: "str | os.PathLike", data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: "str | os.PathLike", text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return write_bytes(path, text.encode("utf-8"))
