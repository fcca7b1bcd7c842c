"""Gradient noise and curvature noise from microbatches, for the noisy-SGD stability condition.

Two estimates, both from the microbatches an adapter operator passes over
(``pycurv.torch.hessian(..., microbatch_size=M)`` or a list of batches):

- **Gradient covariance K** (Jastrzębski et al. 2020, App. C): the L microbatch
  gradients g_b, centred on the full-batch gradient g, give the L×L Gram matrix
  K^M_ij = (1/L)<g_i − g, g_j − g>, whose nonzero eigenvalues are those of the
  covariance of size-M minibatch gradients. That covariance is K·(N − M)/(M(N − 1))
  with K = (1/N) Σ_i (g_i − g)(g_i − g)^T the per-example covariance, so λ1(K) and
  tr(K) follow, and the gradient noise scale B_simple = tr(K)/||g||²
  (McCandlish et al. 2018). Costs one gradient per microbatch and 8·n·L bytes.
- **Curvature variance s²** along a direction v (the top Hessian eigenvector):
  the per-sample curvatures a_i = v^T H_i v have mean a = v^T H v and population
  variance s² = (1/N) Σ (a_i − a)², the quantity in the condition of Wu et al.
  (2018), eq. 1 of Jastrzębski et al.: (1 − ηa)² + η² s² (N − B)/(B(N − 1)) ≤ 1.
  Microbatch means â_b = v^T H_b v estimate it as
  s² ≈ (1/L) Σ_b (â_b − a)² · n_b(N − 1)/(N − n_b), unbiased when the microbatches
  are a random partition of the data (shuffle once before splitting); with
  ``microbatch_size=1`` it is exact. Costs one HVP pass over the data.

Both feed :func:`pycurv.stability.noisy_sgd_max_lr` (or ``pycurv lr-max
--batch-size B --dataset-size N --curvature-variance S2``); ``pycurv sharpness
--batch-size B`` does it all in one command.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = [
    "GradientNoise",
    "CurvatureVariance",
    "gradient_noise",
    "gram_statistics",
    "curvature_variance",
    "curvature_variance_from_batches",
]


def _variance_factor(n_b: np.ndarray, N: int) -> np.ndarray:
    """(N − n)/(n (N − 1)): variance of a mean of n of N samples drawn without replacement, per unit variance."""
    n_b = np.asarray(n_b, dtype=np.float64)
    return (N - n_b) / (n_b * (N - 1.0))


def _check_partition(sizes: np.ndarray, what: str) -> int:
    if sizes.size < 2:
        raise ValueError(
            f"{what} needs the data in at least two microbatches, got {sizes.size}; build the operator with "
            "microbatch_size= (e.g. microbatch_size=1 for per-sample values) or pass a list of batches"
        )
    if np.any(sizes < 1):
        raise ValueError(f"microbatch sizes must be >= 1, got {sizes.tolist()}")
    return int(sizes.sum())


@dataclass(frozen=True)
class GradientNoise:
    """Gradient-noise statistics from L microbatch gradients (Jastrzębski et al. 2020, App. C).

    Attributes
    ----------
    lambda_max : float
        Top eigenvalue of the per-example gradient covariance K.
    trace : float
        tr(K) = (1/N) Σ_i ||g_i − g||².
    grad_norm_sq : float
        ||g||², the full-batch gradient's squared norm.
    noise_scale : float
        B_simple = tr(K)/||g||² (``inf`` when g = 0).
    minibatch_eigenvalues : (L,) float64
        Eigenvalues of K^M, the covariance of the microbatch gradients (descending;
        the last is ~0: L centred vectors span L − 1 dimensions).
    n_batches, n_samples : int
        L and N.
    batch_size : float
        Mean microbatch size M.
    direction : (n,) float64 or None
        Unit top eigenvector of K (when requested).
    """

    lambda_max: float
    trace: float
    grad_norm_sq: float
    noise_scale: float
    minibatch_eigenvalues: np.ndarray
    n_batches: int
    n_samples: int
    batch_size: float
    direction: Optional[np.ndarray] = None


@dataclass(frozen=True)
class CurvatureVariance:
    """Mean and variance of the per-sample curvature along one direction.

    Attributes
    ----------
    sharpness : float
        a = v^T H v (the sharpness when v is the top eigenvector).
    variance : float
        s², the population variance of the per-sample curvatures v^T H_i v.
    batch_curvatures : (L,) float64
        â_b = v^T H_b v per microbatch.
    batch_sizes : (L,) int
    n_samples : int
        N.
    """

    sharpness: float
    variance: float
    batch_curvatures: np.ndarray
    batch_sizes: np.ndarray
    n_samples: int

    def max_lr(self, batch_size, **sgd_hyperparameters) -> float:
        """Largest mean-square stable SGD learning rate at ``batch_size`` (Wu et al. 2018).

        Passes through :func:`pycurv.stability.noisy_sgd_max_lr` with N = ``n_samples``.
        """
        from .stability import noisy_sgd_max_lr

        return noisy_sgd_max_lr(self.sharpness, self.variance, batch_size, self.n_samples, **sgd_hyperparameters)


def gram_statistics(gradients, sizes, *, return_direction: bool = False) -> GradientNoise:
    """:class:`GradientNoise` from microbatch gradients that partition a data set.

    Parameters
    ----------
    gradients : (L, n) array
        Gradient of each microbatch's *mean* loss.
    sizes : (L,) ints
        Samples per microbatch; N = sum(sizes), and the full-batch gradient is
        the size-weighted mean of the rows.
    """
    G = np.asarray(gradients, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1)
    if G.ndim != 2 or G.shape[0] != sizes.size:
        raise ValueError(f"gradients must have shape (L, n) with L = len(sizes) = {sizes.size}, got shape {G.shape}")
    if not np.all(np.isfinite(G)):
        raise ValueError("gradients contain NaN or Inf")
    N = _check_partition(sizes, "the gradient covariance")
    L = sizes.size
    g = (sizes[:, None] * G).sum(axis=0) / N
    C = G - g
    # K ~ (1/L) sum_b c_b (g_b - g)(g_b - g)^T, c_b undoing the minibatch averaging of size n_b.
    w = np.sqrt(1.0 / _variance_factor(sizes, N) / L)
    if not np.all(np.isfinite(w)):
        raise ValueError("a microbatch holds the whole data set; the covariance needs smaller microbatches")
    Cw = C * w[:, None]
    gram = Cw @ Cw.T
    ev, U = np.linalg.eigh(gram)
    order = np.argsort(ev)[::-1]
    ev, U = ev[order], U[:, order]
    mini = np.linalg.eigvalsh(C @ C.T / L)[::-1]
    direction = None
    if return_direction:
        d = Cw.T @ U[:, 0]
        nrm = np.linalg.norm(d)
        direction = d / nrm if nrm > 0 else d
    from .stability import simple_noise_scale

    trace = float(np.trace(gram))
    g2 = float(g @ g)
    return GradientNoise(lambda_max=float(max(ev[0], 0.0)), trace=trace, grad_norm_sq=g2,
                         noise_scale=simple_noise_scale(max(trace, 0.0), g2), minibatch_eigenvalues=mini,
                         n_batches=L, n_samples=N, batch_size=N / L, direction=direction)


def _require(op, method: str):
    if not hasattr(op, method):
        raise TypeError(
            f"{type(op).__name__} has no {method}(): gradient and curvature noise need a framework operator "
            "(pycurv.torch.hessian or pycurv.jax.hessian), which knows its microbatches"
        )


def gradient_noise(op, *, max_batches: Optional[int] = None, return_direction: bool = False) -> GradientNoise:
    """Gradient covariance statistics of an adapter operator's data, one gradient per microbatch.

    ``max_batches`` stops after that many microbatches (their sizes define N then:
    the estimate is for that subset). Memory: 8·n·L bytes on the host.
    With a preconditioned operator the gradients are P^{-1/2} g.
    """
    _require(op, "batch_gradients")
    rows, sizes = [], []
    for i, (n_b, g) in enumerate(op.batch_gradients()):
        if max_batches is not None and i >= max_batches:
            break
        rows.append(op._to_numpy(g))
        sizes.append(n_b)
    return gram_statistics(np.stack(rows) if rows else np.empty((0, op.shape[0])), sizes,
                           return_direction=return_direction)


def curvature_variance_from_batches(values, sizes) -> tuple[float, float]:
    """(a, s²) from microbatch curvatures â_b = v^T H_b v over a partition of the data.

    a = Σ n_b â_b / N; s² = (1/L) Σ_b (â_b − a)² n_b (N − 1)/(N − n_b), unbiased for
    the population variance of per-sample curvatures when the partition is random
    (exact for n_b = 1).
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1)
    if v.shape != sizes.shape:
        raise ValueError(f"values and sizes must have the same length, got {v.size} and {sizes.size}")
    if not np.all(np.isfinite(v)):
        raise ValueError("values contain NaN or Inf")
    N = _check_partition(sizes, "the curvature variance")
    a = float((sizes * v).sum() / N)
    fac = _variance_factor(sizes, N)
    if np.any(fac <= 0):
        raise ValueError("a microbatch holds the whole data set; the curvature variance needs smaller microbatches")
    s2 = float(np.mean((v - a) ** 2 / fac))
    return a, s2


def curvature_variance(op, direction) -> CurvatureVariance:
    """Per-sample curvature mean and variance along ``direction`` (normalised here), one HVP pass.

    Pass the top eigenvector (``pycurv.lanczos(op, 1).eigenvectors[:, 0]``) to get
    the sharpness a and the s² of the noisy-SGD condition.
    """
    _require(op, "batch_hvps")
    v = np.asarray(direction, dtype=np.float64).reshape(-1)
    if v.shape != (op.shape[0],):
        raise ValueError(f"direction must have shape ({op.shape[0]},), got {v.shape}")
    nrm = np.linalg.norm(v)
    if not np.isfinite(nrm) or nrm == 0:
        raise ValueError("direction must be a finite nonzero vector")
    v = v / nrm
    t = op._from_numpy(v)
    vals, sizes = [], []
    for n_b, hv in op.batch_hvps(t):
        vals.append(float(v @ op._to_numpy(hv)))
        sizes.append(n_b)
    a, s2 = curvature_variance_from_batches(vals, sizes)
    return CurvatureVariance(sharpness=a, variance=s2, batch_curvatures=np.asarray(vals),
                             batch_sizes=np.asarray(sizes, dtype=np.int64), n_samples=int(np.sum(sizes)))
