"""lambda_max at equal tolerance: pycurv.lanczos vs scipy's ARPACK eigsh(which="LA") vs power iteration.

The operator is A = Q diag(lambda) Q^T with a prescribed spectrum (pycurv.testing),
applied in O(n) by Householder reflections, so the eigensolvers' own costs show.
Every solver gets the same plain Python callable (pycurv therefore confirmed
convergence with one extra product when bench/RESULTS.md's tables were measured; it now
bounds the residual from its products' Gram-Schmidt coefficients and makes that product
only where they cannot vouch for tol). Recorded per run:
matvecs, the eigenvalue returned, its error against the known lambda_max, and
whether it is the right eigenvalue.

pycurv's default basis is 32 vectors, ARPACK's 20; the same two solvers at
each other's basis size ("pycurv_ncv20", "arpack_ncv32") give the comparison at
equal memory.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import scipy.sparse.linalg as sla

import pycurv
from pycurv.testing import SPECTRA, SpectrumOperator, spectrum

N = int(os.environ.get("PYCURV_BENCH_N", "100000"))
TOL = 1e-8
POWER_MAX = 20000
CASES = list(SPECTRA) + ["zero"]


def _operator(name):
    lam = np.zeros(N) if name == "zero" else spectrum(name, N, seed=0)
    return SpectrumOperator(lam, seed=0), lam


def _counting(op):
    count = [0]

    def mv(x):
        count[0] += 1
        return op.matvec(x)

    return mv, count


def _pycurv(op, ncv=None):
    mv, count = _counting(op)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pycurv.ConvergenceWarning)
        res = pycurv.lanczos(mv, 1, n=N, tol=TOL, seed=0, ncv=ncv, return_eigenvectors=False, max_matvecs=50000)
    return float(res.eigenvalues[0]), count[0], res.converged


def _arpack(op, ncv=None):
    mv, count = _counting(op)
    lin = sla.LinearOperator((N, N), matvec=mv, dtype=np.float64)
    try:
        w = sla.eigsh(lin, k=1, which="LA", tol=TOL, ncv=ncv, return_eigenvectors=False)
        return float(w[0]), count[0], True
    except sla.ArpackNoConvergence as exc:
        return (float(exc.eigenvalues[0]) if len(exc.eigenvalues) else float("nan")), count[0], False
    except sla.ArpackError:
        return float("nan"), count[0], False


def _power(op):
    """The usual shortcut: x <- A x / |A x| until |A x - theta x| <= tol |theta| (Rayleigh quotient theta)."""
    x = np.random.default_rng(0).standard_normal(N)
    x /= np.linalg.norm(x)
    y = op.matvec(x)
    count = 1
    theta = float(x @ y)
    while count < POWER_MAX:
        r = np.linalg.norm(y - theta * x)
        if r <= TOL * abs(theta) or not np.any(y):
            return theta, count, True
        x = y / np.linalg.norm(y)
        y = op.matvec(x)
        count += 1
        theta = float(x @ y)
    return theta, count, False


SOLVERS = {
    "pycurv": _pycurv,
    "arpack": _arpack,
    "power": _power,
    "pycurv_ncv20": lambda op: _pycurv(op, ncv=20),
    "arpack_ncv32": lambda op: _arpack(op, ncv=32),
}


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("case", CASES)
def test_lambda_max(benchmark, case, solver):
    op, lam = _operator(case)
    exact = float(lam.max())
    scale = max(float(np.max(np.abs(lam))), 1e-300)
    benchmark.group = f"lambda_max {case} n={N}"
    value, matvecs, converged = benchmark.pedantic(SOLVERS[solver], args=(op,), rounds=3, iterations=1)
    err = abs(value - exact) / scale if np.isfinite(value) else float("inf")
    benchmark.extra_info.update(
        case=case, solver=solver, n=N, tol=TOL, matvecs=matvecs, value=value, exact=exact,
        relative_error=err, converged=bool(converged), correct=bool(converged and err <= 1e-6),
    )
