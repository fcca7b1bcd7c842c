"""Mean-square stability of minibatch SGD along the top Hessian direction (Wu et al. 2018).

Model (Wu et al. 2018, Thm. 1; Jastrzębski et al. 2020, eq. 1 and App. B): along the
top eigenvector the loss is a finite sum of N one-dimensional quadratics,
L(ψ) = (1/N) Σ_i ½ a_i ψ², all with their minimum at ψ = 0. The sharpness is the
mean curvature a = (1/N) Σ a_i and the *curvature variance* is the population
variance s² = (1/N) Σ (a_i − a)². A step uses the mean â of B distinct samples
drawn uniformly without replacement, so E[â] = a and

    Var[â] = s² · (N − B) / (B (N − 1))          (→ s²/B for N = ∞; 0 at B = N).

Plain SGD gives ψ ← (1 − ηâ)ψ, hence E[ψ²] ← ((1 − ηa)² + η² Var[â]) E[ψ²]:
mean-square stable iff

    (1 − ηa)² + η² s² (N − B)/(B (N − 1)) ≤ 1,   i.e.  η ≤ 2a / (a² + s²(N − B)/(B(N − 1))).

With momentum (PyTorch's b ← βb + (1 − d)g, θ ← θ − ηb, or Nesterov) the state
x = (ψ, b) follows x ← M(â) x with M affine in â, M(â) = M(a) + (â − a) M₁, and the
second moments S = E[x xᵀ] follow S ← M(a) S M(a)ᵀ + Var[â] M₁ S M₁ᵀ: a 3×3 linear
map on (E[ψ²], E[ψb], E[b²]). Mean-square stable iff its spectral radius is ≤ 1
(equality, marginal, counts as stable). The map is positive, so its spectral
radius grows with Var[â]: noise only shrinks the stable set.

The solvers return the threshold in any one of η, B, a and s² given the others,
in closed form without momentum and by bisection on the spectral radius with it.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .._checks import as_real, check_lr, check_nonnegative
from .iteration import largest_stable_value, spectral_radius
from .quadratic import _resolve, iteration_matrix

__all__ = [
    "minibatch_variance_factor",
    "second_moment_operator",
    "mean_square_radius",
    "is_mean_square_stable",
    "noisy_sgd_max_lr",
    "noisy_sgd_sharpness_range",
    "noisy_sgd_max_sharpness",
    "noisy_sgd_min_batch_size",
    "noisy_sgd_max_curvature_variance",
    "solve_noisy_sgd",
]


# --- the noise ---------------------------------------------------------------------------------


def _check_sizes(batch_size, dataset_size) -> tuple[float, Optional[float]]:
    b = as_real("batch_size", batch_size)
    if b < 1:
        raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size!r}")
    if dataset_size is None:
        return b, None
    n = as_real("dataset_size", dataset_size)
    if n < 1:
        raise ValueError(f"dataset_size must be >= 1, got dataset_size={dataset_size!r}")
    if b > n:
        raise ValueError(f"batch_size must not exceed dataset_size, got batch_size={batch_size!r}, "
                         f"dataset_size={dataset_size!r}")
    return b, n


def minibatch_variance_factor(batch_size, dataset_size=None) -> float:
    """(N − B)/(B (N − 1)): Var[mean of B of N samples, without replacement] / population variance.

    ``dataset_size=None`` is an infinite population: 1/B. B = N gives 0 (full batch).
    B may be fractional (the formula is continuous in B).
    """
    b, n = _check_sizes(batch_size, dataset_size)
    if n is None:
        return 1.0 / b
    if b == n:
        return 0.0
    return (n - b) / (b * (n - 1.0))


def second_moment_operator(mean_matrix, noise_matrix, variance) -> np.ndarray:
    """The linear map S ↦ M̄ S M̄ᵀ + v M₁ S M₁ᵀ on symmetric k×k S, in upper-triangle coordinates.

    For x ← (M̄ + ξ M₁) x with E[ξ] = 0, Var[ξ] = v, ξ independent of x, this maps
    E[x xᵀ] one step ahead. Coordinates: the upper triangle of S row by row
    (for k = 2: S₁₁, S₁₂, S₂₂). Returns a k(k+1)/2 square matrix.
    """
    mbar = np.atleast_2d(np.asarray(mean_matrix, dtype=np.float64))
    m1 = np.atleast_2d(np.asarray(noise_matrix, dtype=np.float64))
    v = check_nonnegative("variance", variance)
    k = mbar.shape[0]
    if mbar.shape != (k, k) or m1.shape != (k, k):
        raise ValueError(f"matrices must be square and of one shape, got {mbar.shape} and {m1.shape}")
    iu = np.triu_indices(k)
    out = np.empty((len(iu[0]), len(iu[0])))
    for col, (i, j) in enumerate(zip(*iu)):
        s = np.zeros((k, k))
        s[i, j] = s[j, i] = 1.0
        s_next = mbar @ s @ mbar.T + v * (m1 @ s @ m1.T)
        out[:, col] = s_next[iu]
    return out


# --- the SGD family on the finite-sum quadratic --------------------------------------------------


def _sgd_hp(kw) -> dict:
    _, hp = _resolve("sgd", kw)
    return hp


def _noise_matrix(lr: float, hp: dict) -> np.ndarray:
    """M₁ = dM/dλ of PyTorch SGD's iteration matrix (see iteration_matrix)."""
    beta = hp["momentum"]
    if beta == 0.0:
        return np.array([[-lr]])
    if hp["nesterov"]:
        return np.array([[-lr * (1.0 + beta), 0.0], [1.0, 0.0]])
    s = 1.0 - hp["dampening"]
    return np.array([[-lr * s, 0.0], [s, 0.0]])


def _radius(lr: float, a: float, variance: float, hp: dict) -> float:
    if hp["momentum"] == 0.0:
        # Closed form of the 1×1 case: (1 − ηℓ)² + η² v.
        ell = a + hp["weight_decay"]
        return (1.0 - lr * ell) ** 2 + lr * lr * variance
    mbar = iteration_matrix("sgd", a, lr, **hp)
    return spectral_radius(second_moment_operator(mbar, _noise_matrix(lr, hp), variance))


def mean_square_radius(lr, sharpness, curvature_variance, batch_size, dataset_size=None,
                       **sgd_hyperparameters) -> float:
    """Spectral radius of minibatch SGD's second-moment map; ≤ 1 is mean-square stable.

    Without momentum this is the left side of Jastrzębski et al.'s eq. 1,
    (1 − ηa)² + η² s² (N − B)/(B(N − 1)). ``sgd_hyperparameters``: ``momentum``,
    ``dampening``, ``nesterov``, ``weight_decay`` (PyTorch SGD's meanings).
    """
    lr = check_lr(lr)
    a = as_real("sharpness", sharpness)
    s2 = check_nonnegative("curvature_variance", curvature_variance)
    v = s2 * minibatch_variance_factor(batch_size, dataset_size)
    return _radius(lr, a, v, _sgd_hp(sgd_hyperparameters))


def is_mean_square_stable(lr, sharpness, curvature_variance, batch_size, dataset_size=None,
                          **sgd_hyperparameters) -> bool:
    """True when :func:`mean_square_radius` ≤ 1."""
    return mean_square_radius(lr, sharpness, curvature_variance, batch_size, dataset_size,
                              **sgd_hyperparameters) <= 1.0


def _bisect(stable, good: float, bad: float) -> float:
    """The boundary between a stable point ``good`` and an unstable point ``bad``, to the last float."""
    while True:
        mid = good + 0.5 * (bad - good)
        if mid == good or mid == bad:
            return good
        if stable(mid):
            good = mid
        else:
            bad = mid


def noisy_sgd_max_lr(sharpness, curvature_variance, batch_size, dataset_size=None,
                     **sgd_hyperparameters) -> float:
    """Largest mean-square stable learning rate: 2a/(a² + s²(N − B)/(B(N − 1))) without momentum.

    ``sharpness`` a (mean curvature, > 0 after adding weight decay), ``curvature_variance`` s².
    """
    a = as_real("sharpness", sharpness)
    s2 = check_nonnegative("curvature_variance", curvature_variance)
    v = s2 * minibatch_variance_factor(batch_size, dataset_size)
    hp = _sgd_hp(sgd_hyperparameters)
    ell = a + hp["weight_decay"]
    if ell <= 0:
        raise ValueError(f"sharpness must be > 0 for a finite learning-rate bound, got sharpness={a!r}")
    if hp["momentum"] == 0.0:
        return 2.0 * ell / (ell * ell + v)
    return largest_stable_value(lambda lr: _radius(lr, a, v, hp) <= 1.0, 1.0 / ell)


def noisy_sgd_sharpness_range(lr, curvature_variance, batch_size, dataset_size=None,
                              **sgd_hyperparameters) -> Optional[tuple[float, float]]:
    """The interval [a_lo, a_hi] of mean-square stable sharpness, or None when it is empty.

    With curvature noise a small mean curvature is unstable too: at a = 0 the noise
    alone makes E[ψ²] grow. Without momentum a ∈ [(1 − √(1 − η²v))/η, (1 + √(1 − η²v))/η]
    with v = s²(N − B)/(B(N − 1)) (minus the weight decay), empty when η²v > 1.
    """
    lr = check_lr(lr)
    s2 = check_nonnegative("curvature_variance", curvature_variance)
    v = s2 * minibatch_variance_factor(batch_size, dataset_size)
    hp = _sgd_hp(sgd_hyperparameters)
    wd = hp["weight_decay"]
    if hp["momentum"] == 0.0:
        disc = 1.0 - lr * lr * v
        if disc < 0:
            return None
        root = math.sqrt(disc)
        return (1.0 - root) / lr - wd, (1.0 + root) / lr - wd

    def stable(a: float) -> bool:
        return _radius(lr, a, v, hp) <= 1.0

    # Noise only shrinks the stable set, so it lies inside the noise-free one, (-wd, a_det].
    a_det = largest_stable_value(lambda a: _radius(lr, a, 0.0, hp) <= 1.0, 1.0 / lr)
    if v == 0.0:
        return -wd, a_det
    grid = -wd + (a_det + wd) * np.arange(1, 256) / 256.0
    radii = np.array([_radius(lr, a, v, hp) for a in grid])
    best = int(np.argmin(radii))
    if radii[best] > 1.0:
        return None
    inside = float(grid[best])
    hi = _bisect(stable, inside, a_det) if not stable(a_det) else a_det
    lo = _bisect(stable, inside, -wd)
    return lo, hi


def noisy_sgd_max_sharpness(lr, curvature_variance, batch_size, dataset_size=None,
                            **sgd_hyperparameters) -> float:
    """Largest mean-square stable sharpness (upper end of :func:`noisy_sgd_sharpness_range`).

    Without momentum (1 + √(1 − η²v))/η, which is 2/η at v = 0. Raises ValueError
    when no sharpness is stable (η²v > 1 without momentum).
    """
    rng = noisy_sgd_sharpness_range(lr, curvature_variance, batch_size, dataset_size,
                                    **sgd_hyperparameters)
    if rng is None:
        raise ValueError(f"no sharpness is mean-square stable at lr={float(lr)!r}: the curvature noise "
                         "alone is too large; use a smaller learning rate or a larger batch")
    return rng[1]


def _max_variance(lr: float, a: float, hp: dict) -> float:
    """Largest Var[â] with a stable second-moment map; raises when unstable even at 0."""
    if _radius(lr, a, 0.0, hp) > 1.0:
        raise ValueError(f"unstable even without gradient noise at lr={lr!r}, sharpness={a!r}: "
                         "no batch size or curvature variance helps")
    if hp["momentum"] == 0.0:
        ell = a + hp["weight_decay"]
        return max(ell * (2.0 / lr - ell), 0.0)
    if _radius(lr, a, 0.0, hp) == 1.0:
        return 0.0
    ell = max(abs(a + hp["weight_decay"]), 1e-300)
    return largest_stable_value(lambda v: _radius(lr, a, v, hp) <= 1.0, ell * ell)


def noisy_sgd_max_curvature_variance(lr, sharpness, batch_size, dataset_size=None,
                                     **sgd_hyperparameters) -> float:
    """Largest stable curvature variance s²: (2a/η − a²)(B(N − 1))/(N − B) without momentum.

    ``math.inf`` at B = N (no noise). Raises ValueError when the configuration is
    unstable even without noise.
    """
    lr = check_lr(lr)
    a = as_real("sharpness", sharpness)
    f = minibatch_variance_factor(batch_size, dataset_size)
    vmax = _max_variance(lr, a, _sgd_hp(sgd_hyperparameters))
    return math.inf if f == 0.0 else vmax / f


def noisy_sgd_min_batch_size(lr, sharpness, curvature_variance, dataset_size=None,
                             **sgd_hyperparameters) -> float:
    """Smallest mean-square stable batch size B (a real number ≥ 1; round it up).

    Solves s²(N − B)/(B(N − 1)) = v_max, v_max the largest stable noise variance:
    B = N / (1 + (v_max/s²)(N − 1)), or s²/v_max for N = ∞. Raises ValueError when
    even the full batch is unstable.
    """
    lr = check_lr(lr)
    a = as_real("sharpness", sharpness)
    s2 = check_nonnegative("curvature_variance", curvature_variance)
    if dataset_size is not None:
        _check_sizes(1, dataset_size)
    vmax = _max_variance(lr, a, _sgd_hp(sgd_hyperparameters))
    if s2 == 0.0:
        return 1.0
    c = vmax / s2
    if dataset_size is None:
        if c == 0.0:
            raise ValueError("the configuration is only marginally stable without noise: "
                             "no finite batch size is stable from an infinite dataset")
        return max(1.0, 1.0 / c)
    n = float(dataset_size)
    return max(1.0, n / (1.0 + c * (n - 1.0)))


def solve_noisy_sgd(*, lr=None, sharpness=None, batch_size=None, curvature_variance=None,
                    dataset_size=None, **sgd_hyperparameters) -> float:
    """Solve the mean-square stability condition for the one of η, a, B, s² given as None.

    Returns the largest stable ``lr``, the largest stable ``sharpness``, the smallest
    stable ``batch_size`` or the largest stable ``curvature_variance``.
    """
    given = {"lr": lr, "sharpness": sharpness, "batch_size": batch_size,
             "curvature_variance": curvature_variance}
    missing = [k for k, v in given.items() if v is None]
    if len(missing) != 1:
        raise ValueError("give all but one of lr, sharpness, batch_size, curvature_variance; "
                         f"missing: {', '.join(missing) or 'none'}")
    want = missing[0]
    if want == "lr":
        return noisy_sgd_max_lr(sharpness, curvature_variance, batch_size, dataset_size,
                                **sgd_hyperparameters)
    if want == "sharpness":
        return noisy_sgd_max_sharpness(lr, curvature_variance, batch_size, dataset_size,
                                       **sgd_hyperparameters)
    if want == "batch_size":
        return noisy_sgd_min_batch_size(lr, sharpness, curvature_variance, dataset_size,
                                        **sgd_hyperparameters)
    return noisy_sgd_max_curvature_variance(lr, sharpness, batch_size, dataset_size,
                                            **sgd_hyperparameters)
