"""pycurv: the sharpness of a loss (its top Hessian eigenvalue) and the stability bounds it implies.

The compiled core finds extreme eigenvalues of symmetric operators from
matrix-vector products alone: float64 thick-restart Lanczos with full
reorthogonalisation. Stability thresholds and the NQM live in ``pycurv.stability``,
practical solvers (critical learning rate, catapult warmup) in ``pycurv.solvers``.
The trace (Hutchinson, Hutch++) and the spectral density (stochastic Lanczos
quadrature) come from :func:`pycurv.trace` and :func:`pycurv.spectral_density`.
Framework adapters live in ``pycurv.torch`` and ``pycurv.jax`` (imported on
demand); ``import pycurv`` needs NumPy only. Operators whose vectors live on
a GPU are solved there by ``pycurv._cuda`` when the package was built with CUDA.
"""

from __future__ import annotations

from ._native import build_info, set_num_threads
from .errors import (
    ConvergenceWarning,
    CudaUnavailableError,
    HostBasisWarning,
    MissingDependencyError,
    NoConvergence,
    NonDeterministicOperatorError,
    NonFiniteMatvecError,
    PycurvError,
)
from .lanczos import lanczos, sharpness
from .operators import (
    DeviceMatrixOperator,
    FunctionOperator,
    MatrixOperator,
    Operator,
    ShiftedOperator,
    as_operator,
)
from .results import History, LanczosProgress, LanczosResult
from .spectrum import SpectralDensity, TraceEstimate, spectral_density, trace
from . import solvers, stability
from .solvers import CriticalLR, PersistentCatapultWarmup, critical_lr, warmup_timing
from .stability import (
    MarginReport,
    NoisyQuadraticModel,
    Threshold,
    margin_report,
    max_stable_lr,
    nqm_batch_scaling,
    solve_noisy_sgd,
    threshold,
    threshold_from_optimizer,
)

__version__ = "0.1.0"

__all__ = [
    # eigensolvers
    "lanczos",
    "sharpness",
    "LanczosResult",
    "LanczosProgress",
    "History",
    # the wider spectrum: trace and density
    "trace",
    "TraceEstimate",
    "spectral_density",
    "SpectralDensity",
    # operators
    "Operator",
    "MatrixOperator",
    "FunctionOperator",
    "DeviceMatrixOperator",
    "ShiftedOperator",
    "as_operator",
    # stability thresholds (pycurv.stability)
    "stability",
    "threshold",
    "max_stable_lr",
    "threshold_from_optimizer",
    "Threshold",
    "margin_report",
    "MarginReport",
    "solve_noisy_sgd",
    "NoisyQuadraticModel",
    "nqm_batch_scaling",
    # solvers for practice (pycurv.solvers)
    "solvers",
    "critical_lr",
    "CriticalLR",
    "PersistentCatapultWarmup",
    "warmup_timing",
    # errors and warnings
    "PycurvError",
    "NoConvergence",
    "NonFiniteMatvecError",
    "NonDeterministicOperatorError",
    "MissingDependencyError",
    "CudaUnavailableError",
    "ConvergenceWarning",
    "HostBasisWarning",
    # build
    "build_info",
    "set_num_threads",
    "__version__",
]
