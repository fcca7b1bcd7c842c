"""Stability of a linear recurrence from the spectral radius of its iteration matrix.

On a quadratic loss every optimizer in :mod:`pycurv.stability` is, along one
eigen-direction with curvature λ, a linear recurrence ``x_{t+1} = M(λ, η) x_t`` on a
small state (parameter, momentum buffer, ...). The recurrence is **stable** when the
spectral radius ρ(M) = max |eig(M)| is ≤ 1: iterates stay bounded for every start
when ρ < 1 and decay to zero; ρ = 1 exactly is *marginal* (bounded oscillation, or
no motion at all, as for λ = 0) and is counted as stable, so every threshold here
is the largest value with ρ ≤ 1. Above it, some start grows like ρ^t.

The routines below find that largest value by bracketing (doubling or halving
from a start) and then bisecting in floating point until the bracket cannot be
split any more, so the answer is the largest float at which the *computed* ρ is
≤ 1: the closed forms of :mod:`pycurv.stability.quadratic` agree with it to about
1e-15 relative. They assume the stable set along the searched variable is an
interval that contains small positive values (true for every model in this
package: ρ ≤ 1 near λ = 0 and near η = 0); a model with several stable islands
needs its own search.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .._checks import as_real, check_lr

__all__ = [
    "spectral_radius",
    "is_stable",
    "largest_stable_sharpness",
    "largest_stable_lr",
    "largest_stable_value",
]

MatrixFn = Callable[[float, float], np.ndarray]

# Brackets stop growing here: a model that is still stable at 1e300 is called unbounded.
_HUGE = 1e300
_TINY = 1e-300


def spectral_radius(matrix) -> float:
    """ρ(M), the largest modulus of the eigenvalues of a square matrix (a scalar counts as 1×1)."""
    m = np.atleast_2d(np.asarray(matrix, dtype=np.float64))
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"an iteration matrix must be square, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("the iteration matrix contains NaN or Inf")
    if m.shape == (1, 1):
        return abs(float(m[0, 0]))
    return float(np.max(np.abs(np.linalg.eigvals(m))))


def is_stable(matrix) -> bool:
    """True when ρ(M) ≤ 1 (marginal stability, ρ = 1, counts as stable).

    A matrix with NaN or Inf entries (an overflowing search) counts as unstable.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if not np.all(np.isfinite(m)):
        return False
    return spectral_radius(m) <= 1.0


def largest_stable_value(stable: Callable[[float], bool], start: float) -> float:
    """Largest x > 0 with ``stable(x)``, assuming the stable set contains (0, x*].

    Brackets from ``start`` by doubling (or halving), then bisects until the
    bracket holds two adjacent floats. Returns ``math.inf`` when still stable at
    1e300; raises ValueError when nothing down to 1e-300 is stable.
    """
    x = float(start)
    if not (x > 0 and math.isfinite(x)):
        raise ValueError(f"start must be a finite number > 0, got start={start!r}")
    if stable(x):
        lo, hi = x, 2.0 * x
        while stable(hi):
            lo, hi = hi, 2.0 * hi
            if hi > _HUGE:
                return math.inf
    else:
        lo, hi = 0.5 * x, x
        while not stable(lo):
            lo, hi = 0.5 * lo, lo
            if lo < _TINY:
                raise ValueError("no stable value found: the recurrence is unstable down to 1e-300")
    while True:
        mid = lo + 0.5 * (hi - lo)
        if not lo < mid < hi:
            return lo
        if stable(mid):
            lo = mid
        else:
            hi = mid


def largest_stable_sharpness(matrix_fn: MatrixFn, lr, *, start=None) -> float:
    """Largest curvature λ with ρ(M(λ, η)) ≤ 1 at learning rate η = ``lr``.

    ``matrix_fn(sharpness, lr)`` returns the per-eigenvalue iteration matrix,
    e.g. ``lambda s, lr: iteration_matrix("sgd", s, lr, momentum=0.9)``.
    The search starts at ``start`` (default 1/η).
    """
    lr = check_lr(lr)
    x0 = 1.0 / lr if start is None else as_real("start", start)
    return largest_stable_value(lambda s: is_stable(matrix_fn(s, lr)), x0)


def largest_stable_lr(matrix_fn: MatrixFn, sharpness, *, start=None) -> float:
    """Largest learning rate η with ρ(M(λ, η)) ≤ 1 at curvature λ = ``sharpness``.

    The direction opposite to :func:`largest_stable_sharpness`; ``math.inf`` when
    every learning rate is stable (e.g. λ = 0). The search starts at ``start``
    (default 1/λ, or 1 when λ = 0).
    """
    sharpness = as_real("sharpness", sharpness)
    if start is None:
        x0 = 1.0 / sharpness if sharpness > 0 else 1.0
    else:
        x0 = as_real("start", start)
    return largest_stable_value(lambda lr: is_stable(matrix_fn(sharpness, lr)), x0)
