"""Exceptions and warnings raised by pycurv.

Every error names the offending value and says what to do about it.
"""

from __future__ import annotations

__all__ = [
    "PycurvError",
    "NoConvergence",
    "NonFiniteMatvecError",
    "NonDeterministicOperatorError",
    "MissingDependencyError",
    "CudaUnavailableError",
    "ConvergenceWarning",
]


class PycurvError(Exception):
    """Base class of pycurv's own exceptions."""


class NoConvergence(PycurvError, RuntimeError):
    """The solver stopped before the requested tolerance was met.

    ``result`` carries the best estimates found (a :class:`pycurv.LanczosResult`
    with ``converged=False``), like scipy's ``ArpackNoConvergence``.
    """

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


class NonFiniteMatvecError(PycurvError, FloatingPointError):
    """The operator returned NaN or Inf. ``matvec`` is the 1-based call number."""

    def __init__(self, message: str, matvec: int):
        super().__init__(message)
        self.matvec = matvec


class NonDeterministicOperatorError(PycurvError, ValueError):
    """Two applications of the operator to the same vector disagree."""


class MissingDependencyError(PycurvError, ImportError):
    """An optional dependency is needed for this feature and is not installed."""


class CudaUnavailableError(PycurvError, RuntimeError):
    """A GPU operator or array was given, but pycurv cannot run on that device.

    Either this build has no CUDA module (install with
    ``pip install . -Ccmake.define.PYCURV_CUDA=ON`` on a machine with the CUDA
    toolkit) or the CUDA runtime sees no such device (driver, ``CUDA_VISIBLE_DEVICES``).
    """


class ConvergenceWarning(UserWarning):
    """Issued when :func:`pycurv.lanczos` returns without meeting ``tol``."""
