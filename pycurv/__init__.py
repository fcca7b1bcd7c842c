"""pycurv: the sharpness of a loss (its top Hessian eigenvalue) and the stability bounds it implies.

The compiled core finds extreme eigenvalues of symmetric operators from
matrix-vector products alone: float64 thick-restart Lanczos with full
reorthogonalisation. Framework adapters live in ``pycurv.torch`` and
``pycurv.jax`` (imported on demand); ``import pycurv`` needs NumPy only.
"""

from __future__ import annotations

from ._native import build_info, set_num_threads
from .errors import (
    ConvergenceWarning,
    MissingDependencyError,
    NoConvergence,
    NonDeterministicOperatorError,
    NonFiniteMatvecError,
    PycurvError,
)
from .lanczos import lanczos, sharpness
from .operators import FunctionOperator, MatrixOperator, Operator, ShiftedOperator, as_operator
from .results import History, LanczosProgress, LanczosResult

__version__ = "0.1.0"

__all__ = [
    # eigensolvers
    "lanczos",
    "sharpness",
    "LanczosResult",
    "LanczosProgress",
    "History",
    # operators
    "Operator",
    "MatrixOperator",
    "FunctionOperator",
    "ShiftedOperator",
    "as_operator",
    # errors and warnings
    "PycurvError",
    "NoConvergence",
    "NonFiniteMatvecError",
    "NonDeterministicOperatorError",
    "MissingDependencyError",
    "ConvergenceWarning",
    # build
    "build_info",
    "set_num_threads",
    "__version__",
]
