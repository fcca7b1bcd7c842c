"""How much λ1 depends on the data sample: sharpness on resampled subsets (PyHessian issue 5's complaint)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .. import _checks
from .._progress import measure_top
from .functions import hessian

__all__ = ["sharpness_spread", "SharpnessSpread"]


@dataclass(frozen=True, eq=False)
class SharpnessSpread:
    """Outcome of :func:`sharpness_spread`.

    Attributes
    ----------
    values : (R,) float64
        λ1 of the loss on each resampled subset, in the order drawn.
    mean, std : float
        Their mean and sample standard deviation (ddof=1): the spread of λ1 over subsets.
    ci : (float, float)
        Confidence interval of the mean λ1 over subsets of this size (Student t with R - 1
        degrees of freedom, level ``confidence``).
    confidence : float
        Level of ``ci``.
    subset_size : int
        Samples per subset.
    n_matvecs : (R,) int
        Products each solve used (each after the first starts from the previous Ritz vector).
    converged : bool
        Whether every solve met its tolerance.
    """

    values: np.ndarray
    mean: float
    std: float
    ci: tuple
    confidence: float
    subset_size: int
    n_matvecs: np.ndarray
    converged: bool


def sharpness_spread(model, loss_fn: Callable, data, *, n_resamples: int = 10, subset_size: Optional[int] = None,
                     confidence: float = 0.95, tol: Optional[float] = None, seed: int = 0,
                     **hessian_kwargs) -> SharpnessSpread:
    """λ1 of the loss on ``n_resamples`` random subsets of ``data``: its mean, spread and a confidence interval.

    ``data`` is one batch ``(inputs, targets)``; each subset draws ``subset_size``
    samples (default half) without replacement, with ``numpy.random.default_rng(seed)``.
    Each solve after the first starts from the previous subset's top Ritz vector
    (``v0``), which the neighbouring subsets' top directions are close to, so it
    needs fewer products. Other keyword arguments go to :func:`hessian`.
    """
    import torch

    r = _checks.check_int("n_resamples", n_resamples)
    if r < 2:
        raise ValueError(f"n_resamples must be >= 2 for a spread, got n_resamples={r}")
    confidence = _checks.check_interval("confidence", confidence, 0.0, 1.0, lo_open=True, hi_open=True)
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and hasattr(data[0], "shape")):
        raise TypeError("data must be one batch (inputs, targets) of tensors to resample from, got "
                        f"{type(data).__name__}")
    x, y = data
    total = int(x.shape[0])
    size = total // 2 if subset_size is None else _checks.check_int("subset_size", subset_size)
    if not 1 <= size < total:
        raise ValueError(f"subset_size must satisfy 1 <= subset_size < {total} (the samples in data), got {size}")
    rng = np.random.default_rng(seed)
    values, mvs, conv = [], [], True
    v0 = None
    for _ in range(r):
        idx = torch.as_tensor(np.sort(rng.choice(total, size=size, replace=False)), device=x.device)
        H = hessian(model, loss_fn, (x[idx], y[idx]), **hessian_kwargs)
        res = measure_top(H, tol=tol, seed=seed, v0=v0, progress=False)
        values.append(float(res.eigenvalues[0]))
        mvs.append(int(res.n_matvecs))
        conv = conv and bool(res.converged)
        v0 = res.eigenvectors[:, 0]  # a device array for a model on a GPU: lanczos takes it there
    vals = np.asarray(values)
    mean, std = float(vals.mean()), float(vals.std(ddof=1))
    half = _t_quantile(0.5 + confidence / 2, r - 1) * std / math.sqrt(r)
    vals.flags.writeable = False
    mv = np.asarray(mvs)
    mv.flags.writeable = False
    return SharpnessSpread(vals, mean, std, (mean - half, mean + half), confidence, size, mv, conv)


def _t_quantile(p: float, dof: int) -> float:
    """Quantile of Student's t (dof degrees of freedom) by bisection on its CDF, integrated numerically."""
    def cdf(t: float) -> float:
        u = np.linspace(0.0, t, 4001)
        c = math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)) / math.sqrt(dof * math.pi)
        f = c * (1 + u * u / dof) ** (-(dof + 1) / 2)
        return 0.5 + float(np.sum(0.5 * (f[1:] + f[:-1]) * np.diff(u)))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return 0.5 * (lo + hi)
