"""Trace and spectral density of a torch MLP's Hessian against its dense torch.func.hessian."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import pycurv  # noqa: E402
import pycurv.torch as pt  # noqa: E402


def _model_and_data():
    """An MLP of 1243 parameters on 300 regression samples: a spectrum with a spread bulk and outliers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 40), nn.Tanh(), nn.Linear(40, 20), nn.Tanh(), nn.Linear(20, 3)).double()
    x = torch.randn(300, 8, dtype=torch.float64)
    y = torch.sin(x[:, :3] * 2.0) + 0.3 * torch.randn(300, 3, dtype=torch.float64)
    return model, (x, y)


def _dense_eigenvalues(model, data):
    """Eigenvalues of torch.func.hessian of the mean loss over the flat parameter vector."""
    x, y = data
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta):
        params = {k: t.reshape(s) for k, t, s in zip(names, torch.split(theta, sizes), shapes)}
        return F.mse_loss(torch.func.functional_call(model, params, (x,)), y)

    with warnings.catch_warnings():  # torch's first forward-mode use scripts its decompositions (deprecated API)
        warnings.simplefilter("ignore", DeprecationWarning)
        H = torch.func.hessian(loss)(flat).numpy()
    return np.linalg.eigvalsh((H + H.T) / 2)


@pytest.fixture(scope="module")
def setup():
    model, data = _model_and_data()
    return model, data, _dense_eigenvalues(model, data)


def test_density_matches_dense_eigenvalues(setup):
    """The density's distribution function within Kolmogorov distance 0.05 of the dense eigenvalues'.

    Both at the density's resolution, a Gaussian of sigma = 1/500 of the nodes' range (measured
    0.015, 0.009, 0.008 for seeds 0-2). Unsmoothed, the distance is 0.38: two thirds of this
    Hessian's eigenvalues lie within 1e-2 of zero, a cluster 80 nodes cannot split, and the
    quadrature's step function is then only as fine as its node there (Chebyshev-Markov-Stieltjes).
    """
    model, data, ev = setup
    H = pt.hessian(model, F.mse_loss, data)
    sd = pycurv.spectral_density(H, n_probes=10, n_steps=80, seed=0)
    assert sd.nodes.shape == (10, 80) and sd.n_matvecs == 800
    sigma = (sd.nodes.max() - sd.nodes.min()) / 500
    t = np.linspace(ev[0] - 5 * sigma, ev[-1] + 5 * sigma, 3000)
    true = np.array([0.5 * math.erfc((lam - u) / (sigma * math.sqrt(2))) for u in t for lam in ev])
    true = true.reshape(t.size, ev.size).mean(axis=1)
    dist = float(np.max(np.abs(sd.cdf(t, sigma) - true)))
    assert dist <= 0.05, dist
    # The density integrates to 1 on the same grid, and the extreme nodes find the extreme eigenvalues.
    rho = sd.density(t, sigma)
    assert abs(np.sum(0.5 * (rho[1:] + rho[:-1]) * np.diff(t)) - 1.0) <= 1e-3
    assert abs(sd.nodes.max() - ev[-1]) <= 1e-8 * abs(ev[-1])
    assert abs(sd.nodes.min() - ev[0]) <= 1e-3 * np.max(np.abs(ev))


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_matches_dense_eigenvalues(setup, method):
    """Within 3 stderr in >= 95% of 200 seeds; RMS stderr within 30% of the spread (30 products each).

    Measured: coverage 99.5% (Hutchinson) and 98.5% (Hutch++), ratios 0.93 and 1.01.
    """
    model, data, ev = setup
    H = pt.hessian(model, F.mse_loss, data)
    est = [pycurv.trace(H, n_matvecs=30, method=method, seed=s) for s in range(200)]
    values = np.array([e.value for e in est])
    stderr = np.array([e.stderr for e in est])
    true = float(ev.sum())
    covered = np.mean(np.abs(values - true) <= 3 * stderr)
    assert covered >= 0.95, covered
    ratio = math.sqrt(np.mean(stderr**2)) / np.std(values, ddof=1)
    assert 0.7 <= ratio <= 1.3, ratio
    assert all(e.n_matvecs == 30 for e in est)


def test_sharpness_spread_over_resampled_subsets():
    from pycurv.torch.spread import _t_quantile

    assert abs(_t_quantile(0.975, 9) - 2.2622) <= 1e-3 and abs(_t_quantile(0.95, 1000) - 1.6464) <= 2e-3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(64, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (64,))
    sp = pt.sharpness_spread(model, F.cross_entropy, (x, y), n_resamples=5, subset_size=16, seed=3, tol=1e-10)
    assert sp.values.shape == (5,) and sp.subset_size == 16 and sp.converged
    # Each value is λ1 on its subset, drawn as documented.
    rng = np.random.default_rng(3)
    for v in sp.values:
        idx = torch.as_tensor(np.sort(rng.choice(64, size=16, replace=False)))
        assert abs(v - pt.sharpness(model, F.cross_entropy, (x[idx], y[idx]), tol=1e-10)) <= 1e-8 * abs(v)
    assert sp.mean == pytest.approx(np.mean(sp.values)) and sp.std == pytest.approx(np.std(sp.values, ddof=1))
    half = 2.7764 * sp.std / math.sqrt(5)  # t(0.975, 4)
    assert sp.ci[0] == pytest.approx(sp.mean - half, rel=1e-3) and sp.ci[1] == pytest.approx(sp.mean + half, rel=1e-3)
    with pytest.raises(ValueError, match="n_resamples must be >= 2 for a spread, got n_resamples=1"):
        pt.sharpness_spread(model, F.cross_entropy, (x, y), n_resamples=1)
    with pytest.raises(ValueError, match="subset_size must satisfy 1 <= subset_size < 64"):
        pt.sharpness_spread(model, F.cross_entropy, (x, y), subset_size=64)


def test_stability_report_carries_top_k_and_ratios():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rep = pt.stability_report(model, F.cross_entropy, (x, y), opt, k=3, tol=1e-10)
    top = pycurv.lanczos(pt.hessian(model, F.cross_entropy, (x, y)), 3, tol=1e-10, seed=0).eigenvalues
    assert np.allclose(rep.top_k, top, rtol=1e-8) and rep.value == rep.top_k[0]
    assert rep.ratios[0] == 1.0 and np.allclose(rep.ratios, top / top[0])
    assert "top 3: λ1 = " in str(rep) and f"({top[1] / top[0]:.3g} λ1)" in str(rep)
    assert pt.stability_report(model, F.cross_entropy, (x, y), opt).top_k == ()
    with pytest.raises(ValueError, match="top_k must be descending and start with value"):
        pycurv.margin_report(1.0, 2.0, top_k=(2.0, 1.0))
