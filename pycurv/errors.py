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
    "HostBasisWarning",
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

    Raised for a device index the CUDA module does not see, and for an
    operator whose matvec takes pycurv's DeviceArray (``framework=None``) where
    the CUDA module is missing or sees no device. Other GPU operators are then
    solved with the basis in host memory (:class:`HostBasisWarning`).
    """


class ConvergenceWarning(UserWarning):
    """Issued when :func:`pycurv.lanczos` returns without meeting ``tol``."""


class HostBasisWarning(UserWarning):
    """Issued once per process when an operator on a GPU is solved with the Lanczos basis in host memory.

    pycurv's CUDA module is missing (a CPU-only build) or sees no device (no
    driver, or one older than the build's CUDA runtime needs): each product
    then copies one float64 vector to the device and one back, and the
    orthogonalisation runs on the CPU. The message names the bytes per product
    and how to get the basis into device memory.
    """
