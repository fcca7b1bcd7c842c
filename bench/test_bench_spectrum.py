"""Trace and spectral density of a PyTorch model's Hessian: pycurv against PyHessian.

Both tools get the same float32 model, loss and batch on the CPU: the built-in example
of ``pycurv sharpness`` (a tanh MLP 8-32-32-1, mean squared error on 512 samples, 1,377
parameters, a spectrum with a large negative part), cast to float32. The reference is
the dense float64 Hessian (``torch.func.hessian`` of a float64 copy) and its eigenvalues.

- Trace. ``pycurv.trace(H, n_matvecs=m, method=...)`` for Hutch++ and Hutchinson;
  PyHessian's ``hessian(model, loss_fn, data=(x, y), cuda=False).trace(maxIter=m, tol=...)``
  (Hutchinson; the estimate is the mean of the returned list), at its default ``tol=1e-3``
  (it stops when the running mean changes by less than that) and with ``tol=0`` (meant to
  use all m products; it stops early anyway, at the first product after its running mean
  turned negative, where ``|mean - previous| / (previous + 1e-6)`` is negative). Over 50
  seeds (``torch.manual_seed`` for PyHessian): RMS and median relative error,
  mean products, and for pycurv the ratio of its RMS reported standard error to the
  RMS error (1 is honest).
- Density. ``pycurv.spectral_density(H, n_probes=p, n_steps=s)`` against PyHessian's
  ``density(iter=s, n_v=p)`` at PyHessian's defaults (1 x 100) and at pycurv's (10 x 80).
  Accuracy: the Kolmogorov distance between the tool's distribution function and the
  reference's, both smoothed by a Gaussian of sigma = 1/500 of the reference spectrum's
  range (the density's resolution; tests/test_spectrum_torch.py says why not unsmoothed),
  and the nodes outside the reference spectrum (a float32 recurrence or a lost
  orthogonality produces spurious ones). PyHessian 0.1's density calls ``torch.eig``,
  which torch removed (1.9 deprecated it): it is run as released (it fails) and with
  ``torch.eig`` replaced by ``torch.linalg.eigh`` on its tridiagonal matrix.

Install: a virtual environment with pycurv and ``pip install pyhessian`` (the
``test_bench_peers.py`` environment has it). Run::

    pytest bench/test_bench_spectrum.py -s --benchmark-json=spectrum.json
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import pycurv  # noqa: E402
import pycurv.torch as pt  # noqa: E402
from pycurv._builtin_model import setup as builtin_setup  # noqa: E402

SEEDS = 50
BUDGETS = (30, 100, 300)
RESULTS = []


def _model():
    torch.set_num_threads(1)
    model, loss_fn, (x, y), _ = builtin_setup()
    return model.float(), loss_fn, (x.float(), y.float())


@pytest.fixture(scope="module")
def reference():
    model, loss_fn, (x, y) = _model()
    m64 = __import__("copy").deepcopy(model).double()
    names = [k for k, _ in m64.named_parameters()]
    shapes = [p.shape for _, p in m64.named_parameters()]
    sizes = [p.numel() for _, p in m64.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in m64.parameters()])

    def loss(theta):
        params = {k: t.reshape(s) for k, t, s in zip(names, torch.split(theta, sizes), shapes)}
        return loss_fn(torch.func.functional_call(m64, params, (x.double(),)), y.double())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        D = torch.func.hessian(loss)(flat).numpy()
    return np.linalg.eigvalsh((D + D.T) / 2)


def _smoothed_cdf(nodes, weights, t, sigma):
    z = (t[:, None] - nodes.reshape(-1)[None, :]) / (sigma * math.sqrt(2.0))
    erf = np.vectorize(math.erf)
    return (0.5 * (1.0 + erf(z))) @ weights.reshape(-1) / nodes.shape[0]


def _eig_shim(T, eigenvectors=False):
    """torch.eig's old return, (eigenvalues as (n, 2) real and imaginary parts, eigenvectors), for symmetric T."""
    w, V = torch.linalg.eigh(T)
    return torch.stack([w, torch.zeros_like(w)], dim=1), V


def _record(**row):
    RESULTS.append(row)
    print(" | ".join(f"{k}={v}" for k, v in row.items()))


@pytest.mark.parametrize("m", BUDGETS)
@pytest.mark.parametrize("tool", ["pycurv hutch++", "pycurv hutchinson", "pyhessian tol=1e-3", "pyhessian tol=0"])
def test_trace(benchmark, reference, tool, m):
    true = float(reference.sum())
    model, loss_fn, data = _model()
    values, stderrs, products, seconds = [], [], [], []
    if tool.startswith("pyhessian"):
        pyhessian = pytest.importorskip("pyhessian")
        tol = 1e-3 if tool.endswith("1e-3") else 0.0
        for s in range(SEEDS):
            torch.manual_seed(s)
            t0 = time.perf_counter()
            with warnings.catch_warnings():  # its backward(create_graph=True) warns of a reference cycle
                warnings.simplefilter("ignore", UserWarning)
                h = pyhessian.hessian(model, loss_fn, data=data, cuda=False)
                vhv = h.trace(maxIter=m, tol=tol)
            seconds.append(time.perf_counter() - t0)
            values.append(float(np.mean(vhv)))
            products.append(len(vhv))
    else:
        method = tool.split()[1]
        H = pt.hessian(model, loss_fn, data)
        for s in range(SEEDS):
            t0 = time.perf_counter()
            est = pycurv.trace(H, n_matvecs=m, method=method, seed=s)
            seconds.append(time.perf_counter() - t0)
            values.append(est.value)
            stderrs.append(est.stderr)
            products.append(est.n_matvecs)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    err = np.asarray(values) - true
    rms = float(np.sqrt(np.mean(err**2)))
    row = dict(what="trace", tool=tool, budget=m, true=round(true, 4), rms_rel_error=f"{rms / abs(true):.2e}",
               median_rel_error=f"{np.median(np.abs(err)) / abs(true):.2e}",
               mean_products=float(np.mean(products)), seconds_per_estimate=f"{np.mean(seconds):.3f}")
    if stderrs:
        row["stderr_over_rms_error"] = f"{math.sqrt(np.mean(np.square(stderrs))) / rms:.2f}"
    benchmark.extra_info.update(row)
    _record(**row)


@pytest.mark.parametrize("probes,steps", [(1, 100), (10, 80)])
@pytest.mark.parametrize("tool", ["pycurv", "pyhessian", "pyhessian, torch.eig shimmed"])
def test_density(benchmark, reference, tool, probes, steps, monkeypatch):
    model, loss_fn, data = _model()
    ev = reference
    sigma = (ev[-1] - ev[0]) / 500
    t = np.linspace(ev[0] - 5 * sigma, ev[-1] + 5 * sigma, 2000)
    true = _smoothed_cdf(ev[None, :], np.full((1, ev.size), 1.0 / ev.size), t, sigma)
    row = dict(what="density", tool=tool, probes=probes, steps=steps)
    t0 = time.perf_counter()
    try:
        if tool.startswith("pyhessian"):
            pyhessian = pytest.importorskip("pyhessian")
            if "shimmed" in tool:  # what a user who patched the removed torch.eig would run
                monkeypatch.setattr(torch, "eig", _eig_shim, raising=False)
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                h = pyhessian.hessian(model, loss_fn, data=data, cuda=False)
                nodes, weights = h.density(iter=steps, n_v=probes)
            nodes, weights = np.asarray(nodes, dtype=np.float64), np.asarray(weights, dtype=np.float64)
            products = probes * steps
        else:
            H = pt.hessian(model, loss_fn, data)
            sd = pycurv.spectral_density(H, n_probes=probes, n_steps=steps, seed=0)
            nodes, weights, products = sd.nodes, sd.weights, sd.n_matvecs
    except Exception as exc:  # noqa: BLE001 - a peer that fails is a result
        row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}",
                   seconds=f"{time.perf_counter() - t0:.2f}")
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
        benchmark.extra_info.update(row)
        _record(**row)
        return
    seconds = time.perf_counter() - t0
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    dist = float(np.max(np.abs(_smoothed_cdf(nodes, weights, t, sigma) - true)))
    span = ev[-1] - ev[0]
    outside = int(np.sum((weights > 0) & ((nodes < ev[0] - 1e-3 * span) | (nodes > ev[-1] + 1e-3 * span))))
    row.update(products=int(products), seconds=f"{seconds:.2f}", kolmogorov_smoothed=f"{dist:.3f}",
               row_sums=f"{np.min(weights.sum(axis=1)):.6f}..{np.max(weights.sum(axis=1)):.6f}",
               nodes_outside_spectrum=outside, top_node_rel_error=f"{abs(float(nodes.max()) - ev[-1]) / ev[-1]:.1e}",
               bottom_node_rel_error=f"{abs(float(nodes.min()) - ev[0]) / abs(ev[0]):.1e}")
    benchmark.extra_info.update(row)
    _record(**row)
