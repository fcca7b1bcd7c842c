"""Operators with prescribed spectra, for tests, benchmarks and the demo.

``SpectrumOperator`` applies A = Q diag(eigenvalues) Q^T with Q a product of
a few Householder reflections: O(n) per product, exact eigenvectors known,
float64 arithmetic. ``dense_with_spectrum`` builds the dense matrix instead.
"""

from __future__ import annotations

from typing import Callable, Dict

import numpy as np

from .operators import Operator

__all__ = ["SpectrumOperator", "dense_with_spectrum", "random_orthogonal", "SPECTRA", "spectrum"]


def random_orthogonal(n: int, seed=0) -> np.ndarray:
    """A Haar-distributed random orthogonal n x n matrix."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def dense_with_spectrum(eigenvalues, seed=0) -> np.ndarray:
    """Dense symmetric matrix Q diag(eigenvalues) Q^T, Q random orthogonal (exactly symmetric)."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    q = random_orthogonal(lam.size, seed)
    a = (q * lam) @ q.T
    return (a + a.T) * 0.5


class SpectrumOperator(Operator):
    """A = Q diag(eigenvalues) Q^T, Q = H_1 ... H_r (Householder reflections).

    ``eigenvectors(i)`` returns the eigenvector of ``eigenvalues[i]``.
    """

    exact = True

    def __init__(self, eigenvalues, *, reflections: int = 3, seed=0):
        lam = np.asarray(eigenvalues, dtype=np.float64)
        if lam.ndim != 1 or lam.size < 1:
            raise ValueError(f"eigenvalues must be a non-empty 1-D array, got shape {lam.shape}")
        rng = np.random.default_rng(seed)
        n = lam.size
        u = rng.standard_normal((reflections, n))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        self._u = u
        self.eigenvalues = lam
        self.shape = (n, n)
        self.dtype = np.dtype(np.float64)

    def _q(self, x):  # Q x = H_1 (H_2 (... H_r x))
        y = np.array(x, dtype=np.float64, copy=True)
        for u in self._u[::-1]:
            y -= 2.0 * (u @ y) * u
        return y

    def _qt(self, x):  # Q^T x = H_r (... (H_1 x))
        y = np.array(x, dtype=np.float64, copy=True)
        for u in self._u:
            y -= 2.0 * (u @ y) * u
        return y

    def matvec(self, x):
        return self._q(self.eigenvalues * self._qt(x))

    def eigenvector(self, i: int) -> np.ndarray:
        e = np.zeros(self.shape[0])
        e[i] = 1.0
        return self._q(e)


def _hessian_like(n, rng):
    out = np.geomspace(20.0, 1.0, 10)
    return np.r_[out, rng.gamma(0.3, 0.05, n - 10)]


def _negative_dominant(n, rng):
    out = np.geomspace(20.0, 1.0, 10)
    return np.r_[out, -30.0, rng.normal(0.0, 0.05, n - 11)]


def _eos_cluster(n, rng):
    top = np.r_[20.0, 20.0 * (1 - 1e-3), 20.0 * (1 - 2e-3), np.geomspace(15.0, 1.0, 7)]
    return np.r_[top, rng.gamma(0.3, 0.05, n - 10)]


SPECTRA: Dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    # Loss Hessians: a few outliers (one per class) above a bulk near zero.
    "hessian_like": _hessian_like,
    # Power iteration returns -30 here, not the sharpness 20.
    "negative_dominant": _negative_dominant,
    # Edge of stability: the top eigenvalues nearly coincide.
    "eos_cluster": _eos_cluster,
    # lambda_1 at the edge of a continuum (square-root density of states).
    "continuum_edge": lambda n, rng: 20.0 * np.sqrt(np.linspace(0.0, 1.0, n)),
    # Equispaced: the classic hard case for Krylov methods.
    "uniform": lambda n, rng: np.linspace(-1.0, 1.0, n),
    "gap_1e-2": lambda n, rng: np.r_[1.0, np.linspace(-0.5, 0.99, n - 1)],
    "power_law": lambda n, rng: 1.0 / np.arange(1, n + 1, dtype=np.float64),
    "rank_one_plus_noise": lambda n, rng: np.r_[5.0, rng.normal(0.0, 1e-3, n - 1)],
    "repeated_top": lambda n, rng: np.r_[4.0, 4.0, 4.0, np.linspace(-1.0, 3.5, n - 3)],
}


def spectrum(name: str, n: int, seed=0) -> np.ndarray:
    """Eigenvalues of a named benchmark spectrum (see ``SPECTRA``)."""
    if name not in SPECTRA:
        raise ValueError(f"unknown spectrum {name!r}; choose from {', '.join(SPECTRA)}")
    return SPECTRA[name](n, np.random.default_rng(seed)).astype(np.float64)
