"""Truncated-SVD factors of a weight matrix: W [out, in] ≈ B @ A with A = √S Vᵀ [rank, in] and
B = U √S [out, rank], for the SuperNet's low-rank alternatives (`supernet_builtins`).

* Small matrices (≤ `GRAM_ENTRIES` entries): the exact thin SVD in float64.
* Bigger ones: from the eigenvectors of the Gram matrix of the smaller side (W·Wᵀ or Wᵀ·W, one
  BLAS product): σᵢ² are its eigenvalues and the other side's singular vectors are W's
  projection on them divided by σᵢ. In float32: the factors only initialize a branch.
* Where that side exceeds `EXACT_SIDE` rows and the rank asked for is well below it, the dense
  eigensolver (O(n³), half of it memory-bound: minutes for the 4096 × 4096 Gram matrix of an
  AlexNet/VGG classifier layer on a busy machine) gives way to a randomized subspace iteration
  with a Rayleigh–Ritz step (Halko, Martinsson & Tropp 2011, algorithms 4.4 and 5.3): a few
  products of the Gram matrix with rank + oversampling vectors, QR factorizations of them, and
  an eigensolver on the small projected matrix. Seeded, so a build is reproducible. Its
  rank-k approximation's error is within 1.5 % of the best one's and its σᵢ within 4 % on a
  flat spectrum (random weights: the method's worst case), exact to rounding on a decaying one
  (trained weights) — tests/test_low_rank.py.

One `Decomposition` per matrix serves every rank planned for it (`decomposition`, `factors`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

__all__ = ["Decomposition", "decomposition", "leading_eigenpairs", "rank_factors", "svd"]

#: Above this many entries a matrix's factors come from its Gram matrix (a full SVD of a
#: 4096 × 9216 classifier layer takes minutes).
GRAM_ENTRIES = 1 << 20
#: Gram sides up to this many rows get the dense eigensolver (seconds at most).
EXACT_SIDE = 1024
#: Subspace iterations of the randomized eigensolver (each: one Gram product and one QR).
POWER_STEPS = 2


def svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD in float64 (batched over leading axes), on one thread.

    The matrices are small; a multithreaded LAPACK on a busy machine spends seconds spinning
    (measured: 3–5 s for a 128×640 matrix under load, 15 ms on one thread)."""
    with one_thread():
        u, s, vt = torch.linalg.svd(torch.from_numpy(np.asarray(matrix, dtype=np.float64)), full_matrices=False)
    return u.numpy(), s.numpy(), vt.numpy()


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread in the block: its LAPACK solvers spin on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def rank_factors(matrix: np.ndarray, rank: int, memo: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """matrix [out, in] ≈ B @ A: (A [rank, in], B [out, rank]); float64 for small matrices,
    float32 from the Gram matrix. ``memo``: see `decomposition`."""
    return decomposition(matrix, rank, memo).factors(rank)


def decomposition(matrix: np.ndarray, rank: int, memo: dict | None = None) -> "Decomposition":
    """The `Decomposition` of ``matrix``, told that ``rank`` will be asked of it. ``memo`` (a
    region's): one per matrix shape, so every rank of a layer comes from one decomposition made
    for the largest (ask for the factors once every rank is planned)."""
    key = ("factors", matrix.shape)
    found = memo.get(key) if memo is not None else None
    if found is None:
        found = Decomposition(matrix)
        if memo is not None:
            memo[key] = found
    found.plan(rank)
    return found


class Decomposition:
    """The truncated SVD of one matrix, made when factors are first asked for, as far as the
    largest planned rank needs, and dropped once every planned rank got its factors."""

    def __init__(self, matrix: np.ndarray) -> None:
        self.matrix = matrix
        self.exact = matrix.size <= GRAM_ENTRIES
        self._planned = 0        # the largest rank planned
        self._pending = 0        # planned requests not served yet
        self._ready = 0          # leading singular triplets known
        self._state: tuple | None = None

    def plan(self, rank: int) -> None:
        """Announce that the factors of ``rank`` will be asked for."""
        self._planned = max(self._planned, int(rank))
        self._pending += 1

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(A [rank, in], B [out, rank]) with B @ A the rank-``rank`` truncated SVD."""
        if self._state is None or rank > self._ready:
            self._state = self._decompose(max(rank, self._planned))
        result = self._exact(rank) if self.exact else self._from_gram(rank)
        self._pending -= 1
        if self._pending <= 0:   # every planned rank served: free the Gram matrix and vectors
            self._state, self._ready, self._planned = None, 0, 0
        return result

    def _decompose(self, rank: int) -> tuple:
        if self.exact:
            self._ready = min(self.matrix.shape)
            return svd(self.matrix)
        if self._state is not None:                     # a larger rank than planned: same Gram
            tall, side, gram = self._state[:3]
        else:
            w = torch.from_numpy(np.ascontiguousarray(self.matrix, dtype=np.float32))
            tall = w.shape[0] > w.shape[1]
            side = w.T if tall else w                   # [small, big]
            gram = side @ side.T                        # BLAS: all threads
        values, vectors, self._ready = leading_eigenpairs(gram, rank)
        return tall, side, gram, values.double().clamp(min=0).sqrt(), vectors

    def _exact(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        u, s, vt = self._state
        root = np.sqrt(s[:rank])
        return root[:, None] * vt[:rank], u[:, :rank] * root[None, :]

    def _from_gram(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """σᵢ² are the Gram matrix's eigenvalues; the big side's singular vectors are W's
        projection on its eigenvectors, divided by σᵢ (directions of σᵢ ≈ 0 get zeros: they add
        nothing to B @ A). Row i of either factor depends on i alone: both are made once for the
        largest planned rank and sliced."""
        tall, side, _, sigma, vectors = self._state[:5]
        if len(self._state) == 5 or self._state[5].shape[1] < rank:   # (an unplanned larger rank)
            self._state = self._state[:5]
            top = max(self._planned, rank)
            s = sigma[:top]
            alive = s > s[0] * 1e-6 if top else s > 0
            root = s.sqrt().float()
            inverse = torch.where(alive, 1.0 / root.clamp(min=1e-30), torch.zeros_like(root))
            near = vectors[:, :top] * root[None, :]                         # [small, top]
            far = (vectors[:, :top].T @ side) * inverse[:, None]            # [top, big]
            self._state += (near, far)
        near, far = self._state[5][:, :rank], self._state[6][:rank]
        first, second = (near.T, far.T) if tall else (far, near)
        return first.numpy(), second.numpy()


def leading_eigenpairs(gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(eigenvalues, eigenvectors as columns, how many are exact to the method) of the symmetric
    positive semi-definite ``gram``, largest first, at least ``rank`` of them: all of them from
    the dense eigensolver where the matrix is small or the rank near its size, else from the
    randomized subspace iteration (module docstring)."""
    n = gram.shape[0]
    width = min(n, rank + max(64, rank // 8))           # oversampling
    if n <= EXACT_SIDE or 4 * width >= 3 * n:
        with one_thread():
            values, vectors = torch.linalg.eigh(gram)
        order = torch.argsort(values, descending=True)
        return values[order], vectors[:, order], n
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(n, width, generator=generator, dtype=gram.dtype)
    for _ in range(POWER_STEPS):
        product = gram @ basis                          # BLAS: all threads
        with one_thread():
            basis, _ = torch.linalg.qr(product)
    projected = basis.T @ (gram @ basis)
    projected = (projected + projected.T) * 0.5         # symmetric to the last bit
    with one_thread():
        values, rotation = torch.linalg.eigh(projected)
    order = torch.argsort(values, descending=True)[:rank]
    return values[order], basis @ rotation[:, order], rank
