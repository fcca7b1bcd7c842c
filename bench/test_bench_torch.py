"""lambda_1 of a real model: pycurv vs scipy's eigsh vs power iteration, all on the same torch HVP.

The model is an MLP with 1.05M parameters (512-1024-512-10, tanh) on 1,024 synthetic
samples (PYCURV_BENCH_SAMPLES) with cross-entropy, in float64 so that every solver can reach tol = 1e-6.
Each solver gets the same float64 NumPy matvec (``pycurv.torch.hessian(...).matvec``,
the determinism probe off): pycurv.lanczos(tol=1e-6); ARPACK eigsh(which="LA",
tol=1e-6), whose criterion ||r|| <= tol |theta| is the same; power iteration, the
usual approach, stopped at ||A x - theta x|| <= tol |theta| or after POWER_MAX products.

Recorded per solver: HVPs, wall time, the value and its error against a reference
(pycurv at tol 1e-10); for pycurv also the time in the HVPs and outside them (the
compiled core plus the Python driver). ``python bench/summarize.py RUN.json`` prints
the table of bench/RESULTS.md.
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sla = pytest.importorskip("scipy.sparse.linalg")

import pycurv  # noqa: E402
import pycurv.torch as pt  # noqa: E402

TOL = 1e-6
POWER_MAX = int(os.environ.get("PYCURV_BENCH_POWER_MAX", "500"))
SAMPLES = int(os.environ.get("PYCURV_BENCH_SAMPLES", "1024"))
THREADS = int(os.environ.get("PYCURV_BENCH_TORCH_THREADS", "1"))


def _problem():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n, d, k = SAMPLES, 512, 10
    x = torch.tensor(rng.standard_normal((n, d)))
    y = torch.tensor(rng.integers(0, k, n))
    model = torch.nn.Sequential(torch.nn.Linear(d, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 512), torch.nn.Tanh(),
                                torch.nn.Linear(512, k)).double()
    return model, torch.nn.functional.cross_entropy, (x, y)


@pytest.fixture(scope="module")
def problem():
    torch.set_num_threads(THREADS)
    model, loss_fn, data = _problem()
    H = pt.hessian(model, loss_fn, data, check_determinism=False)
    ref = pycurv.lanczos(H, 1, tol=1e-10, seed=1, return_eigenvectors=False)
    assert ref.converged
    # the cost of one product alone, for the overhead figure
    v = np.random.default_rng(0).standard_normal(H.shape[0])
    H.matvec(v)
    t0 = time.perf_counter()
    for _ in range(5):
        H.matvec(v)
    hvp_s = (time.perf_counter() - t0) / 5
    return H, float(ref.eigenvalues[0]), hvp_s


class _Counting:
    def __init__(self, H):
        self.H = H
        self.count = 0

    def __call__(self, x):
        self.count += 1
        return self.H.matvec(x)


def _pycurv(H):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pycurv.ConvergenceWarning)
        res = pycurv.lanczos(H, 1, tol=TOL, seed=0, return_eigenvectors=False)
    return float(res.eigenvalues[0]), res.n_matvecs, res.converged, res


def _eigsh(H):
    mv = _Counting(H)
    lin = sla.LinearOperator(H.shape, matvec=mv, dtype=np.float64)
    try:
        w = sla.eigsh(lin, k=1, which="LA", tol=TOL, return_eigenvectors=False,
                      v0=np.random.default_rng(0).standard_normal(H.shape[0]))
        return float(w[0]), mv.count, True, None
    except sla.ArpackNoConvergence as exc:
        return (float(exc.eigenvalues[0]) if len(exc.eigenvalues) else float("nan")), mv.count, False, None


def _power(H):
    x = np.random.default_rng(0).standard_normal(H.shape[0])
    x /= np.linalg.norm(x)
    y = H.matvec(x)
    count = 1
    theta = float(x @ y)
    while count < POWER_MAX:
        if np.linalg.norm(y - theta * x) <= TOL * abs(theta):
            return theta, count, True, None
        x = y / np.linalg.norm(y)
        y = H.matvec(x)
        count += 1
        theta = float(x @ y)
    return theta, count, False, None


# One round each: a product takes ~0.4 s on one core, and the counts are deterministic.
SOLVERS = {"pycurv": (_pycurv, 1), "eigsh": (_eigsh, 1), "power": (_power, 1)}


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_mlp_lambda_max(benchmark, problem, solver):
    H, exact, hvp_s = problem
    fn, rounds = SOLVERS[solver]
    benchmark.group = f"lambda_1 of a {H.shape[0]:,}-parameter MLP (float64 HVPs)"
    value, hvps, converged, res = benchmark.pedantic(fn, args=(H,), rounds=rounds, iterations=1)
    err = abs(value - exact) / abs(exact)
    info = dict(case=f"MLP {H.shape[0]:,} params", solver=solver, n=H.shape[0], tol=TOL, hvps=hvps, value=value,
                exact=exact, relative_error=err, converged=bool(converged), correct=bool(converged and err <= 1e-6),
                hvp_seconds=hvp_s, samples=SAMPLES, torch_threads=THREADS, torch=torch.__version__)
    if res is not None:
        info.update(time_matvec=res.time_matvec, time_core=res.time_core, time_other=res.time_other,
                    time_total=res.time_total,
                    overhead=(res.time_core + res.time_other) / res.time_matvec)
    benchmark.extra_info.update(info)
