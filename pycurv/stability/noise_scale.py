"""The gradient noise scale B_simple = tr(Σ)/‖G‖² (McCandlish et al. 2018, eq. 2.9).

G is the full-batch gradient and Σ the per-example gradient covariance, so a
minibatch gradient of size B has E‖G_B − G‖² = tr(Σ)/B: B_simple is the batch size
at which the noise in a step is as large as the signal, and it predicts the
critical batch size when the Hessian is close to a multiple of the identity.
"""

from __future__ import annotations

import math

import numpy as np

from .._checks import as_real, check_nonnegative

__all__ = ["simple_noise_scale", "noise_scale_from_gradients", "noise_scale_from_batch_norms"]


def simple_noise_scale(trace_covariance, grad_norm_sq) -> float:
    """tr(Σ)/‖G‖²; ``math.inf`` when ‖G‖² = 0 (pure noise)."""
    tr = check_nonnegative("trace_covariance", trace_covariance)
    g2 = check_nonnegative("grad_norm_sq", grad_norm_sq)
    return math.inf if g2 == 0 else tr / g2


def noise_scale_from_gradients(per_example_gradients) -> float:
    """B_simple from an (n, p) array of per-example gradients.

    G is their mean, tr(Σ) the sum of their per-coordinate variances with the
    unbiased 1/(n − 1) normalisation, and ‖G‖² is corrected for its own noise,
    ‖mean‖² − tr(Σ)/n (its expectation is the true ‖G‖²; clipped at 0).
    """
    g = np.asarray(per_example_gradients, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] < 2:
        raise ValueError(f"per_example_gradients must have shape (n, p) with n >= 2, got shape {g.shape}")
    if not np.all(np.isfinite(g)):
        raise ValueError("per_example_gradients contains NaN or Inf")
    n = g.shape[0]
    mean = g.mean(axis=0)
    tr = float(np.sum(g.var(axis=0, ddof=1)))
    g2 = max(float(mean @ mean) - tr / n, 0.0)
    return simple_noise_scale(tr, g2)


def noise_scale_from_batch_norms(batch_small, norm_sq_small, batch_big, norm_sq_big) -> float:
    """B_simple from squared gradient norms measured at two batch sizes, as in Appendix A.1 of McCandlish et al.

    E‖G_B‖² = ‖G‖² + tr(Σ)/B, so two batch sizes give unbiased estimates
    ‖G‖² = (B_big‖G_big‖² − B_small‖G_small‖²)/(B_big − B_small) and
    tr(Σ) = (‖G_small‖² − ‖G_big‖²)/(1/B_small − 1/B_big). Average each over many
    batches before dividing: the ratio of single measurements is very noisy.
    """
    bs = as_real("batch_small", batch_small)
    bb = as_real("batch_big", batch_big)
    if not 0 < bs < bb:
        raise ValueError(f"need 0 < batch_small < batch_big, got batch_small={bs!r}, batch_big={bb!r}")
    ns = check_nonnegative("norm_sq_small", norm_sq_small)
    nb = check_nonnegative("norm_sq_big", norm_sq_big)
    g2 = (bb * nb - bs * ns) / (bb - bs)
    tr = (ns - nb) / (1.0 / bs - 1.0 / bb)
    if g2 <= 0:
        return math.inf
    return max(tr, 0.0) / g2
