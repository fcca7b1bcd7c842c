"""How often each stopping rule returns lambda_1 to the accuracy asked: the residual and eigenvalue criteria, and ARPACK.

A Krylov solver sees the spectrum through the Ritz values of the space it has built. The
residual r = |A y - theta y| proves that *some* eigenvalue lies within r of theta; whether
it is lambda_1 depends on the space having resolved the top of the spectrum.
``criterion="eigenvalue"`` goes further and estimates the error as r^2 / gap (for lambda_1,
Lehmann's sharper bound under the same assumption), with the gap read off the other Ritz
values: it stops earlier, and it is optimistic wherever eigenvalues
closer than the gap are still unresolved (a cluster at the top, as at the edge of
stability). This bench measures both effects on the benchmark spectra of
``pycurv.testing`` plus two clustered tops, over many random starts:

- ``miss``: the fraction of starts whose returned value is further than ``tol * scale``
  from lambda_1 (scale = max(|lambda_1|, ||A||), the scale both criteria test against);
- ``worst``: the largest error over the starts, in units of ``tol * scale``;
- ``beyond r``: the fraction whose error exceeds the returned residual (lambda_1 not found,
  or not resolved from its neighbours, at the stop);
- ``matvecs``: the mean number of products.

pycurv runs at its defaults (no convergence declared before 12 products, ``min_matvecs``)
and with ``min_matvecs=0``, which stops at the first passing test.

Every solver gets the same operator (``SpectrumOperator``, n = 2000 by default) and the
same random start per seed (ARPACK's ``v0``; pycurv's ``seed``, so the two draw different
vectors from the same distribution). Run::

    pytest bench/test_bench_criteria.py -s --benchmark-json=criteria.json
    python bench/summarize.py criteria.json
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import scipy.sparse.linalg as sla

import pycurv
from pycurv.testing import SPECTRA, SpectrumOperator, spectrum

N = int(os.environ.get("PYCURV_BENCH_N_CRITERIA", "2000"))
SEEDS = int(os.environ.get("PYCURV_BENCH_SEEDS", "50"))
TOLS = (1e-2, 1e-3, 1e-4, 1e-6)
SOLVERS = ("residual", "eigenvalue", "residual, min_matvecs=0", "eigenvalue, min_matvecs=0", "arpack")


def _clustered_top(n, rng):
    """Six eigenvalues within 12% at the top (spacing 1.4-4.5%), a skewed bulk below: a BatchNorm convnet's shape."""
    return np.r_[[4.42, 4.34, 4.28, 4.2, 4.1, 3.9], 3.5 * rng.beta(0.5, 3.0, n - 6) - 0.3]


def _two_clusters(n, rng):
    """Eight evenly spaced eigenvalues in [9, 10] above a bulk in [0, 5]."""
    return np.r_[np.linspace(9.0, 10.0, 8), np.linspace(0.0, 5.0, n - 8)]


EXTRA = {"clustered_top": _clustered_top, "two_clusters": _two_clusters}
CASES = list(SPECTRA) + list(EXTRA)


def _eigenvalues(name):
    if name in EXTRA:
        return EXTRA[name](N, np.random.default_rng(0)).astype(np.float64)
    return spectrum(name, N, seed=0)


def _solve(solver, op, tol, seed):
    """(value, residual, matvecs) of one start."""
    if solver == "arpack":
        count = [0]

        def mv(x):
            count[0] += 1
            return op.matvec(np.ravel(x))

        lin = sla.LinearOperator((N, N), matvec=mv, dtype=np.float64)
        v0 = np.random.default_rng(seed).standard_normal(N)
        w, v = sla.eigsh(lin, k=1, which="LA", tol=tol, v0=v0, maxiter=5000)
        y = v[:, 0]
        return float(w[0]), float(np.linalg.norm(op.matvec(y) - w[0] * y)), count[0]
    criterion, _, minimum = solver.partition(", min_matvecs=")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pycurv.ConvergenceWarning)
        res = pycurv.lanczos(op.matvec, 1, n=N, tol=tol, seed=seed, criterion=criterion,
                             min_matvecs=int(minimum) if minimum else None, return_eigenvectors=False,
                             max_matvecs=20000)
    return float(res.eigenvalues[0]), float(res.residual_norms[0]), int(res.n_matvecs)


def _measure(name):
    lam = _eigenvalues(name)
    op = SpectrumOperator(lam, seed=0)
    lam1 = float(lam.max())
    scale = max(abs(lam1), float(np.abs(lam).max()))
    rows = []
    for tol in TOLS:
        for solver in SOLVERS:
            err, beyond, mvs = [], [], []
            for seed in range(SEEDS):
                value, r, mv = _solve(solver, op, tol, seed)
                e = lam1 - value
                err.append(e / (tol * scale))
                beyond.append(e > r * (1 + 1e-9) + 1e-13 * scale)
                mvs.append(mv)
            err = np.asarray(err)
            rows.append(dict(tol=tol, solver=solver, miss=float(np.mean(err > 1.0)), worst=float(err.max()),
                             beyond_r=float(np.mean(beyond)), matvecs=float(np.mean(mvs))))
    return rows


@pytest.mark.parametrize("name", CASES)
def test_criteria(benchmark, name):
    rows = benchmark.pedantic(_measure, args=(name,), rounds=1, iterations=1)
    benchmark.extra_info.update(spectrum=name, n=N, seeds=SEEDS, rows=rows)
    for row in rows:
        print(f"| {name} | {row['tol']:g} | {row['solver']} | {row['miss']:.2f} | {row['worst']:.2g} | "
              f"{row['beyond_r']:.2f} | {row['matvecs']:.1f} |")
    by = {(r["tol"], r["solver"]): r for r in rows}
    for tol in TOLS:  # the eigenvalue criterion never takes more products than the residual one
        for suffix in ("", ", min_matvecs=0"):
            assert by[(tol, "eigenvalue" + suffix)]["matvecs"] <= by[(tol, "residual" + suffix)]["matvecs"] + 1e-9
