"""Low-rank factors of the SuperNet's rank alternatives (`plinio_onnx.passes.low_rank`): the Gram
and randomized paths against the exact truncated SVD, on matrices small enough to decompose
exactly (the thresholds are lowered so the small matrices take the big ones' paths)."""
from __future__ import annotations

import functools

import numpy as np
import pytest

from plinio_onnx.passes import low_rank


def _singular_values(matrix: np.ndarray) -> np.ndarray:
    key = (matrix.shape, matrix.tobytes()[:4096])
    if key not in _SINGULAR:
        _SINGULAR[key] = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
    return _SINGULAR[key]


_SINGULAR: dict = {}


def _best_error(matrix: np.ndarray, rank: int) -> float:
    """‖W − W_k‖_F of the best rank-k approximation (Eckart–Young)."""
    return float(np.sqrt(np.sum(_singular_values(matrix)[rank:] ** 2)))


def _error(matrix: np.ndarray, factors) -> float:
    first, second = factors
    return float(np.linalg.norm(matrix.astype(np.float64) - second.astype(np.float64) @ first.astype(np.float64)))


@functools.lru_cache(maxsize=1)
def _matrices():
    rng = np.random.default_rng(0)
    flat = rng.standard_normal((300, 700)).astype(np.float32)             # random weights (the bench)
    u, _ = np.linalg.qr(rng.standard_normal((700, 300)))
    v, _ = np.linalg.qr(rng.standard_normal((300, 300)))
    decaying = ((u * (0.97 ** np.arange(300))) @ v.T).astype(np.float32)  # a trained layer's spectrum
    return {"flat": flat, "decaying_tall": decaying}


@pytest.fixture
def big_paths(monkeypatch):
    """Matrices above 1,000 entries go through the Gram matrix; sides above 64 rows through the
    randomized eigensolver."""
    monkeypatch.setattr(low_rank, "GRAM_ENTRIES", 1000)
    monkeypatch.setattr(low_rank, "EXACT_SIDE", 64)


#: (‖W − BA‖ over the best rank-k error, relative error of σᵢ) at most: a flat spectrum (random
#: weights) is the randomized method's worst case; a decaying one (trained weights) its usual.
_TOLERANCE = {"flat": (1.015, 0.04), "decaying_tall": (1.0005, 1e-3)}


@pytest.mark.parametrize("name", ["flat", "decaying_tall"])
@pytest.mark.parametrize("rank", [20, 75])
def test_randomized_factors_are_nearly_the_best_rank_k_approximation(big_paths, name, rank):
    matrix = _matrices()[name]
    ratio, rtol = _TOLERANCE[name]
    decomposition = low_rank.decomposition(matrix, rank)
    first, second = decomposition.factors(rank)
    assert first.shape == (rank, matrix.shape[1]) and second.shape == (matrix.shape[0], rank)
    assert _error(matrix, (first, second)) <= ratio * _best_error(matrix, rank)
    # Balanced factors: row i of A and column i of B both have norm √σᵢ.
    sigma = _singular_values(matrix)[:rank]
    np.testing.assert_allclose(np.linalg.norm(first, axis=1) ** 2, sigma, rtol=rtol)
    np.testing.assert_allclose(np.linalg.norm(second, axis=0) ** 2, sigma, rtol=rtol)


def test_randomized_factors_are_reproducible_and_exact_on_a_low_rank_matrix(big_paths):
    rng = np.random.default_rng(1)
    matrix = (rng.standard_normal((200, 12)) @ rng.standard_normal((12, 500))).astype(np.float32)
    first, second = low_rank.rank_factors(matrix, 16)
    np.testing.assert_allclose(second @ first, matrix, atol=1e-3 * np.abs(matrix).max())
    again = low_rank.rank_factors(matrix, 16)
    assert np.array_equal(first, again[0]) and np.array_equal(second, again[1])


def test_one_decomposition_made_for_the_largest_planned_rank_serves_every_rank(big_paths, monkeypatch):
    matrix = _matrices()["flat"]
    made = []
    eigenpairs = low_rank.leading_eigenpairs
    monkeypatch.setattr(low_rank, "leading_eigenpairs", lambda gram, rank: made.append(rank) or eigenpairs(gram, rank))
    memo: dict = {}
    decomposition = low_rank.decomposition(matrix, 20, memo)
    assert low_rank.decomposition(matrix, 75, memo) is decomposition
    small, large = decomposition.factors(20), decomposition.factors(75)
    assert made == [75]                            # once, for the largest: the randomized path
    assert decomposition._state is None            # every planned rank served: memory freed
    assert _error(matrix, large) <= 1.015 * _best_error(matrix, 75)
    assert _error(matrix, small) <= 1.015 * _best_error(matrix, 20)
    # An unplanned larger rank after a planned one decomposes again (from the same Gram matrix).
    decomposition.plan(20)
    decomposition.plan(20)
    decomposition.factors(20)
    decomposition.factors(90)
    assert made == [75, 20, 90]


def test_small_sides_keep_the_dense_eigensolver_and_small_matrices_the_exact_svd(monkeypatch):
    matrix = _matrices()["flat"][:60]
    exact = low_rank.rank_factors(matrix, 10)
    assert exact[0].dtype == np.float64
    assert _error(matrix, exact) == pytest.approx(_best_error(matrix, 10), rel=1e-9)
    monkeypatch.setattr(low_rank, "GRAM_ENTRIES", 1000)      # 60 rows ≤ EXACT_SIDE: dense eigh
    decomposition = low_rank.decomposition(matrix, 10)
    decomposition.plan(10)                                  # kept for a second request
    gram = decomposition.factors(10)
    assert decomposition._ready == 60 and gram[0].dtype == np.float32   # every eigenpair
    wider = decomposition.factors(25)                       # unplanned, more than the factors made
    assert wider[0].shape == (25, 700) and _error(matrix, wider) == pytest.approx(_best_error(matrix, 25), rel=1e-4)
    assert _error(matrix, gram) == pytest.approx(_best_error(matrix, 10), rel=1e-4)
