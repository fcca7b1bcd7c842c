"""Result records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import numpy as np

__all__ = ["LanczosResult", "LanczosProgress", "History"]


class History(NamedTuple):
    """Per Lanczos step: matvecs so far, best wanted Ritz value, largest relative residual of the wanted."""

    n_matvecs: np.ndarray
    value: np.ndarray
    residual: np.ndarray


class LanczosProgress(NamedTuple):
    """What a ``callback`` sees after each Lanczos step."""

    n_matvecs: int
    eigenvalues: np.ndarray
    residual_norms: np.ndarray


@dataclass(frozen=True, repr=False)
class LanczosResult:
    """Outcome of :func:`pycurv.lanczos`.

    Attributes
    ----------
    eigenvalues : (k,) float64
        Ritz values, wanted end first: descending for ``which="LA"`` and ``"BE"``,
        ascending for ``"SA"``.
    eigenvectors : (n, k) float64 or None
        Unit Ritz vectors, column i for eigenvalue i (None unless requested).
    residual_norms : (k,) float64
        ``||A y - theta y||`` of each pair: computed with an extra product when
        ``residuals_explicit`` is True, else the (rigorous) recurrence bound;
        for an operator that is not ``exact``, with the Gram-Schmidt
        coefficients of its products that the recurrence leaves out counted in.
    error_bounds : (k,) float64
        Estimated eigenvalue error ``min(r, r**2 / gap)`` (``r`` is a rigorous
        bound; ``gap``, standing in for the distance to the rest of the
        spectrum, is the distance to the nearest other Ritz value less that
        value's residual, so an unconverged neighbour leaves ``r``); for the
        extreme Ritz value of the basis, Lehmann's bound under the same
        assumption (never larger; see :func:`pycurv.lanczos`'s ``criterion``).
    n_matvecs : int
        Products with A, including those of a final residual check.
    converged : bool
        True only if every residual (every error bound with
        ``criterion="eigenvalue"``) meets ``tol * max(|theta|, ||A||_est)``.
    status : str
        ``"converged"``, ``"max_matvecs"`` (budget spent), ``"noise_floor"``
        (the operator's own error is above ``tol``) or ``"stopped"`` (callback).
    message : str
        One sentence on the outcome and, if not converged, what to do.
    criterion : str
        What ``tol`` bounded: ``"residual"`` or ``"eigenvalue"`` (see :func:`pycurv.lanczos`).
    """

    eigenvalues: np.ndarray
    eigenvectors: Optional[np.ndarray]
    residual_norms: np.ndarray
    error_bounds: np.ndarray
    n_matvecs: int
    converged: bool
    status: str
    message: str
    which: str
    tol: float
    ncv: int
    seed: int
    criterion: str = "residual"
    n_restarts: int = 0
    n_breakdowns: int = 0
    n_verify_rounds: int = 0
    residuals_explicit: bool = False
    anorm_estimate: float = 0.0
    noise_level: float = 0.0
    asymmetry: float = 0.0
    orthogonality: float = 0.0
    time_matvec: float = 0.0
    time_core: float = 0.0
    time_total: float = 0.0
    history: Optional[History] = field(default=None, compare=False)

    @property
    def time_other(self) -> float:
        """Seconds spent in the Python driver itself."""
        return max(0.0, self.time_total - self.time_matvec - self.time_core)

    def __repr__(self) -> str:
        vals = np.array2string(self.eigenvalues, precision=10, separator=", ")
        res = np.array2string(self.residual_norms, precision=2, separator=", ")
        return (
            f"LanczosResult(eigenvalues={vals}, residual_norms={res}, converged={self.converged}, "
            f"status={self.status!r}, n_matvecs={self.n_matvecs}, time_matvec={self.time_matvec:.3g}s, "
            f"time_core={self.time_core:.3g}s)"
        )
