"""scikit-learn 8x8 digits dataset, packed for plinio-onnx tests/examples.

Usage::

    python models/digits.py [--out models/digits.npz]

``prepare()`` writes an ``.npz`` with

* ``x``    float32 ``[1797, 1, 8, 8]``, pixel values / 16 (range [0, 1]),
* ``y``    int64 ``[1797]``, labels 0..9,
* ``perm`` int64 ``[1797]``, a fixed-seed permutation of the sample indices
  (use e.g. the first 80% for training and the rest for validation).

``load_digits_npz()`` reads it back.
"""

from __future__ import annotations

import argparse
import os
from typing import NamedTuple

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PATH = os.path.join(_HERE, "digits.npz")
SEED = 0


class Digits(NamedTuple):
    x: np.ndarray  # float32 [N, 1, 8, 8] in [0, 1]
    y: np.ndarray  # int64 [N]
    perm: np.ndarray  # int64 [N], fixed-seed permutation of range(N)


def make_digits(seed: int = SEED) -> Digits:
    """Load scikit-learn's digits and convert to the layout above (no file I/O)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(y)).astype(np.int64)
    return Digits(np.ascontiguousarray(x), y, perm)


def prepare(path: str = DEFAULT_PATH, seed: int = SEED) -> str:
    """Write the digits ``.npz`` to ``path`` and return the path."""
    d = make_digits(seed)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    np.savez_compressed(path, x=d.x, y=d.y, perm=d.perm)
    return path


def load_digits_npz(path: str = DEFAULT_PATH) -> Digits:
    """Load a file written by :func:`prepare` as ``Digits(x, y, perm)``."""
    with np.load(path) as f:
        return Digits(f["x"], f["y"], f["perm"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write the 8x8 digits dataset as .npz")
    ap.add_argument("--out", default=DEFAULT_PATH, help="output path (default: models/digits.npz)")
    ap.add_argument("--seed", type=int, default=SEED, help="permutation seed (default: 0)")
    args = ap.parse_args(argv)
    path = prepare(args.out, args.seed)
    d = load_digits_npz(path)
    print(f"wrote {path}: x {d.x.dtype}{list(d.x.shape)} in [{d.x.min():.1f}, {d.x.max():.1f}], "
          f"y {d.y.dtype}{list(d.y.shape)} classes={np.bincount(d.y).tolist()}, "
          f"perm {d.perm.dtype}{list(d.perm.shape)}, {os.path.getsize(path)} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
