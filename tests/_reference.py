"""Dense references and the three checks every eigenvalue test makes.

Tolerances are multiples of machine epsilon times ||A||, like scipy's ARPACK
tests (2000 * eps): a Lanczos result converged to a residual r has eigenvalue
errors of order r**2 / gap plus rounding of order n * eps * ||A||.
"""

from __future__ import annotations

import numpy as np

EPS = np.finfo(np.float64).eps


def dense(eigenvalues, seed=0) -> np.ndarray:
    """Q diag(eigenvalues) Q^T with Q Haar-random orthogonal, exactly symmetric."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((lam.size, lam.size)))
    q = q * np.sign(np.diag(r))
    a = (q * lam) @ q.T
    return (a + a.T) * 0.5


def reference(a: np.ndarray, k: int, which: str) -> np.ndarray:
    """The k wanted eigenvalues from numpy.linalg.eigh, in pycurv's output order."""
    w = np.linalg.eigh(a)[0]
    if which == "LA":
        return w[::-1][:k]
    if which == "SA":
        return w[:k]
    lo = k // 2
    both = np.r_[w[:lo], w[w.size - (k - lo):]]
    return np.sort(both)[::-1]


def check(a: np.ndarray, res, k: int, which: str = "LA", *, tol: float, value_factor: float = 2000.0):
    """Eigenvalues against eigh, explicit residuals, orthonormality of the Ritz vectors."""
    n = a.shape[0]
    norm = max(float(np.max(np.abs(np.linalg.eigvalsh(a)))), np.finfo(float).tiny)
    ref = reference(a, k, which)
    assert res.converged, res.message
    assert res.eigenvalues.shape == (k,)
    err = np.abs(res.eigenvalues - ref)
    assert np.all(err <= value_factor * EPS * norm), (res.eigenvalues, ref, err / (EPS * norm))
    y = res.eigenvectors
    assert y is not None and y.shape == (n, k)
    r = a @ y - y * res.eigenvalues
    rn = np.linalg.norm(r, axis=0)
    scale = np.maximum(np.abs(res.eigenvalues), norm)
    # Residual meets the tolerance it claims (plus rounding of forming A y).
    assert np.all(rn <= tol * scale + 100 * EPS * norm * np.sqrt(n)), (rn, tol * scale)
    # The reported residuals bound the true ones (up to rounding).
    assert np.all(rn <= res.residual_norms + 100 * EPS * norm * np.sqrt(n)), (rn, res.residual_norms)
    orth = np.max(np.abs(y.T @ y - np.eye(k)))
    assert orth <= 1e-12, orth
    return err
