"""Data sets larger than memory: a folder of shards, read row by row without loading it whole.

``--data DIR`` takes one of three layouts (samples are numbered shard by shard, shards in the
sorted order of their names, rows in file order — the order ``np.concatenate`` of the shards
would give, so the tool's splits are those of the same samples in one ``.npz``)::

    DIR/shard_000.npz, shard_001.npz, ...   .npz shards, each with the same arrays
    DIR/x.npy, DIR/y.npy                    one data set of memory-mapped .npy arrays
    DIR/shard_000/x.npy, .../y.npy, ...     shard folders of .npy arrays

The arrays are those of a single ``.npz``: ``x`` (or one per graph input, named after it) and an
optional ``y``; every shard holds the same names with the same per-sample shapes and dtypes.
``.npy`` files and uncompressed ``.npz`` members (``numpy.savez``) are memory-mapped and only the
rows asked for are read; a compressed member (``numpy.savez_compressed``) is decompressed whenever
rows of it are read (slower: prefer ``savez`` for shards).
"""
from __future__ import annotations

import hashlib
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError

__all__ = ["ArrayInfo", "Shard", "ShardSet", "open_shards"]

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")   # a zip member's local file header (30 bytes)


@dataclass(frozen=True)
class ArrayInfo:
    """Where one array of a shard lies: its dtype and shape, and its bytes' offset in ``file``
    (None: a compressed ``.npz`` member, read whole)."""

    dtype: np.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int | None
    fortran: bool = False


@dataclass
class Shard:
    """One shard: its file (or folder) and its arrays by name."""

    path: Path
    arrays: dict[str, ArrayInfo]

    @property
    def rows(self) -> int:
        return next(iter(self.arrays.values())).shape[0]

    def read(self, names: list[str], rows: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``rows`` (sorted, local) of the arrays ``names``; nothing is kept open."""
        out = {}
        compressed = [n for n in names if self.arrays[n].offset is None]
        if compressed:
            with np.load(self.path, allow_pickle=False) as archive:
                out = {n: archive[n][rows] for n in compressed}
        for name in names:
            info = self.arrays[name]
            if info.offset is not None:
                mapped = np.memmap(info.file, dtype=info.dtype, mode="r", offset=info.offset, shape=info.shape,
                                   order="F" if info.fortran else "C")
                out[name] = np.asarray(mapped[rows])   # fancy indexing copies the rows
                del mapped   # unmapped now: the pages read leave the process's memory
        return out


@dataclass
class ShardSet:
    """The shards of a folder, one data set: ``rows(index)`` reads samples by global number."""

    folder: Path
    layout: str
    shards: list[Shard]
    starts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.starts = np.concatenate([[0], np.cumsum([s.rows for s in self.shards])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def names(self) -> list[str]:
        return list(self.shards[0].arrays)

    def info(self, name: str) -> ArrayInfo:
        return self.shards[0].arrays[name]

    def row_bytes(self, names: list[str]) -> int:
        """Bytes of one sample of ``names``."""
        return sum(int(np.prod(self.info(n).shape[1:], dtype=np.int64)) * self.info(n).dtype.itemsize for n in names)

    def rows(self, index: np.ndarray, names: list[str],
             check: Callable[[dict[str, np.ndarray], Path], None] | None = None) -> dict[str, np.ndarray]:
        """Samples ``index`` (global numbers, any order) of the arrays ``names``, each shard read
        once in row order; ``check(arrays, shard_path)`` sees every shard's part as read."""
        index = np.asarray(index, dtype=np.int64)
        out = {n: np.empty((len(index), *self.info(n).shape[1:]), self.info(n).dtype) for n in names}
        which = np.searchsorted(self.starts, index, side="right") - 1
        for s in np.unique(which):
            where = np.flatnonzero(which == s)
            local = index[where] - self.starts[s]
            order = np.argsort(local, kind="stable")
            part = self.shards[s].read(names, local[order])
            if check is not None:
                check(part, self.shards[s].path)
            for name in names:
                out[name][where[order]] = part[name]
        return out

    def sample(self, n: int) -> dict[str, np.ndarray]:
        """The first ``n`` rows of the first shard, every array."""
        first = self.shards[0]
        return first.read(self.names, np.arange(min(n, first.rows)))

    def column(self, name: str) -> np.ndarray:
        """One array whole, shard by shard (for the labels: one number per sample)."""
        return np.concatenate([s.read([name], np.arange(s.rows))[name] for s in self.shards])

    def digest(self) -> bytes:
        """sha256 of every shard file's name and bytes (the checkpoint's fingerprint)."""
        digest = hashlib.sha256()
        for file in sorted({info.file for s in self.shards for info in s.arrays.values()}):
            digest.update(str(file.relative_to(self.folder)).encode())
            with open(file, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        return digest.digest()


def open_shards(folder: "str | Path") -> ShardSet:
    """The shards of ``folder`` (see the module's layouts), their arrays checked alike; a folder
    the tool cannot read is one `DataError` naming the folder or the shard."""
    folder = Path(folder)
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    npz = [p for p in entries if p.is_file() and p.suffix == ".npz"]
    npy = [p for p in entries if p.is_file() and p.suffix == ".npy"]
    subfolders = [p for p in entries if p.is_dir() and any(p.glob("*.npy"))]
    kinds = [k for k, found in (("npz", npz), ("npy", npy), ("folders", subfolders)) if found]
    if not kinds:
        raise DataError("no data in the folder: expected .npz shards (shard_000.npz, ...), .npy arrays "
                        "(x.npy, y.npy) or shard folders of .npy arrays", file=str(folder))
    if len(kinds) > 1:
        raise DataError(f"the folder mixes data layouts ({', '.join(kinds)}); keep one: .npz shards, .npy "
                        "arrays or shard folders of .npy arrays", file=str(folder))
    if npz:
        shards, layout = [Shard(p, _npz_arrays(p)) for p in npz], ".npz shards"
    elif npy:
        shards, layout = [_npy_shard(folder)], "memory-mapped .npy arrays"
    else:
        shards, layout = [_npy_shard(p) for p in subfolders], ".npy shard folders"
    _check_alike(shards)
    return ShardSet(folder, layout, shards)


def _header(handle, source: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    """An .npy header's (shape, fortran order, dtype); the handle is left at the data."""
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    except (ValueError, OSError, struct.error) as err:
        raise DataError(f"not a readable .npy array ({' '.join(str(err).split())[:160]})", file=str(source)) from None
    if dtype.hasobject:
        raise DataError("the array holds Python objects (pickles); save numeric arrays", file=str(source))
    if not shape:
        raise DataError("a scalar array; a data array has one row per sample", file=str(source))
    return tuple(int(d) for d in shape), bool(fortran), dtype


def _npy_shard(folder: Path) -> Shard:
    arrays = {}
    for path in sorted(folder.glob("*.npy")):
        with open(path, "rb") as handle:
            shape, fortran, dtype = _header(handle, path)
            arrays[path.stem] = ArrayInfo(dtype, shape, path, handle.tell(), fortran)
    return _checked(Shard(folder, arrays))


def _npz_arrays(path: Path) -> dict[str, ArrayInfo]:
    """The arrays of an .npz shard from the archive's directory and the members' headers only."""
    arrays = {}
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
            for member in archive.infolist():
                if not member.filename.endswith(".npy"):
                    continue
                with archive.open(member) as handle:
                    shape, fortran, dtype = _header(handle, path)
                    header_bytes = handle.tell()
                offset = None
                if member.compress_type == zipfile.ZIP_STORED:
                    raw.seek(member.header_offset)
                    fields = _LOCAL_HEADER.unpack(raw.read(_LOCAL_HEADER.size))
                    offset = member.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1] + header_bytes
                arrays[member.filename[:-4]] = ArrayInfo(dtype, shape, path, offset, fortran)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"not a readable .npz shard ({' '.join(str(err).split())[:160]}); save shards with "
                        "numpy.savez(PATH, x=inputs, y=labels)", file=str(path)) from None
    return _checked(Shard(path, arrays)).arrays


def _checked(shard: Shard) -> Shard:
    """A shard holds arrays, all with the same number of rows, at least one."""
    if not shard.arrays:
        raise DataError("the shard holds no arrays", file=str(shard.path))
    counts = {name: info.shape[0] for name, info in shard.arrays.items()}
    if len(set(counts.values())) > 1:
        raise DataError(f"the shard's arrays have different numbers of samples ({counts})", file=str(shard.path))
    if shard.rows == 0:
        raise DataError("the shard holds no samples", file=str(shard.path))
    return shard


def _check_alike(shards: list[Shard]) -> None:
    """Every shard has the first one's arrays, with its per-sample shapes and dtypes."""
    first = shards[0]
    for shard in shards[1:]:
        missing = sorted(set(first.arrays) - set(shard.arrays))
        extra = sorted(set(shard.arrays) - set(first.arrays))
        if missing or extra:
            what = "; ".join(part for part in (f"no {missing}" if missing else "",
                                               f"extra {extra}" if extra else "") if part)
            raise DataError(f"the shard's arrays differ from those of {first.path.name} ({what}: every shard "
                            f"holds {sorted(first.arrays)})", file=str(shard.path))
        for name, info in shard.arrays.items():
            ref = first.arrays[name]
            if info.shape[1:] != ref.shape[1:] or info.dtype != ref.dtype:
                raise DataError(f"array {name!r} is {info.dtype} of per-sample shape {list(info.shape[1:])}, "
                                f"in {first.path.name} {ref.dtype} of {list(ref.shape[1:])}", file=str(shard.path))
