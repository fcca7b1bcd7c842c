"""pycurv._core: the compiled CPU core, float64 thick-restart Lanczos with full reorthogonalisation.

Always built (csrc/bindings/core.cpp). Driven by reverse communication from
pycurv._native: advance() returns a Request; MATVEC is answered by computing
A @ matvec_input() and handing it back with set_matvec_output(), REDUCE by
summing reduce_buffer() over the processes that hold rows of the basis.
"""

from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike

class NonFiniteError(FloatingPointError):
    """A reduced norm of A q is NaN or Inf (the matvec produced non-finite values)."""

class Request:
    """What advance() asks the driver for."""

    MATVEC: ClassVar["Request"]  # compute A @ matvec_input(), then set_matvec_output()
    REDUCE: ClassVar["Request"]  # sum reduce_buffer() over processes in place (nothing to do in one)
    STEP: ClassVar["Request"]  # a Lanczos step finished: progress may be read, stop() requested
    DONE: ClassVar["Request"]  # results are ready
    __members__: ClassVar[dict[str, "Request"]]
    def __init__(self, value: int) -> None: ...
    @property
    def name(self) -> str:
        """The member's name, e.g. "MATVEC"."""
    @property
    def value(self) -> int:
        """The member's value: MATVEC=1, REDUCE=2, STEP=3, DONE=4."""
    def __int__(self) -> int: ...
    def __index__(self) -> int: ...
    def __eq__(self, other: object) -> bool: ...
    def __ne__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...

class LanczosState:
    """The Lanczos state: owns the float64 Krylov basis of this process's n_local rows."""

    def __init__(self, *, n_local: int, n_global: int, offset: int, k: int, ncv: int, which: int, tol: float,
                 max_matvecs: int, seed: int, start_given: bool, check_multiplicity: bool,
                 explicit_residuals: bool, want_vectors: bool, yield_reduce: bool,
                 unit_roundoff: float, tol_on_eigenvalue: bool = False, min_matvecs: int = 0) -> None:
        """Options as pycurv.lanczos (tol_on_eigenvalue: criterion="eigenvalue"); which is 0 (LA), 1 (SA) or 2 (BE). Raises ValueError when inconsistent."""
    def advance(self) -> Request:
        """Run until the next request (releases the GIL); returns a Request."""
    def start_vector(self) -> np.ndarray:
        """Writable float64 view of basis slot 0: write the start vector here before the first advance()."""
    def matvec_input(self) -> np.ndarray:
        """Read-only float64 view (n_local,) of the vector q to multiply on MATVEC."""
    def set_matvec_output(self, w: ArrayLike) -> None:
        """Hand back A @ q (n_local entries, cast to float64 C order; kept alive by the state)."""
    def reduce_buffer(self) -> np.ndarray:
        """Writable float64 view of the partial sums to all-reduce in place on REDUCE."""
    def basis(self, count: int) -> np.ndarray:
        """Read-only view (count, n_local) of the first count basis vectors (rows)."""
    def eigenvectors(self) -> np.ndarray:
        """Copy of the Ritz vectors (k, n_local), one per row, wanted end first; RuntimeError if not computed."""
    def stop(self) -> None:
        """Ask the state to finish at the next step (status becomes 4, stopped)."""
    def values(self) -> np.ndarray:
        """Wanted Ritz values, wanted end first (after DONE)."""
    def residuals(self) -> np.ndarray:
        """Residual norms of the wanted Ritz pairs (after DONE)."""
    def error_bounds(self) -> np.ndarray:
        """Estimated eigenvalue errors of the final pairs: min(r, r^2/gap), Lehmann's bound for the extreme one (see LanczosResult.error_bounds)."""
    def current_values(self) -> np.ndarray:
        """The wanted Ritz values now (progress, at STEP)."""
    def current_residuals(self) -> np.ndarray:
        """Residual estimates of the wanted Ritz values now (progress, at STEP)."""
    def set_unit_roundoff(self, u: float) -> None:
        """Unit roundoff of the matvec's arithmetic (learned from its first output): sets the noise floor."""
    def history(self) -> dict[str, np.ndarray]:
        """One entry per step: "n_matvecs", "value" (best wanted Ritz value), "residual" (largest relative)."""
    @property
    def status(self) -> int:
        """0 running, 1 converged, 2 max_matvecs, 3 noise_floor, 4 stopped."""
    @property
    def n_matvecs(self) -> int:
        """Products requested so far."""
    @property
    def n_restarts(self) -> int:
        """Thick restarts so far."""
    @property
    def n_breakdowns(self) -> int:
        """Invariant subspaces met (|f| ~ 0)."""
    @property
    def n_pass3(self) -> int:
        """Steps that needed a third Gram-Schmidt pass."""
    @property
    def n_verify_rounds(self) -> int:
        """Multiplicity checks run (fresh chains in the complement of the locked pairs)."""
    @property
    def basis_size(self) -> int:
        """Basis vectors in use, locked and active."""
    @property
    def n_locked(self) -> int:
        """Locked (converged) Ritz pairs."""
    @property
    def bytes_moved(self) -> float:
        """Bytes the basis kernels must move at the least (traffic model for the roofline)."""
    @property
    def anorm(self) -> float:
        """Largest |Ritz value| so far: the estimate of ||A|| that the relative tolerance uses."""
    @property
    def noise_level(self) -> float:
        """Relative residual floor of the matvec's arithmetic, once a residual stagnated or disagreed."""
    @property
    def asymmetry(self) -> float:
        """Largest gap between computed and theoretical couplings (a non-symmetric or noisy matvec)."""
    @property
    def max_h2_ratio(self) -> float:
        """Largest |h2|/|w| left by the second Gram-Schmidt pass in steps that needed no third."""
    @property
    def residuals_explicit(self) -> bool:
        """Whether the residuals were computed as |A y - theta y| rather than estimated."""

class TridiagState:
    """A fixed number of Lanczos steps from one start vector, returning the tridiagonal matrix (for quadrature).

    float64 basis of steps + 1 vectors, full reorthogonalisation (CGS2), no restarts. Stops early, with
    ``exhausted`` True, where the start vector's Krylov space is invariant (|f| ~ 0, or steps = n).
    """

    def __init__(self, *, n: int, steps: int) -> None:
        """n: dimension; steps: Lanczos steps (products) wanted, >= 1. Raises ValueError otherwise."""
    def advance(self) -> Request:
        """Run until the next request, MATVEC or DONE (releases the GIL)."""
    def start_vector(self) -> np.ndarray:
        """Writable float64 view (n,) of basis slot 0: the start vector (any nonzero finite scale), before advance()."""
    def matvec_input(self) -> np.ndarray:
        """Read-only float64 view (n,) of the vector q to multiply on MATVEC."""
    def set_matvec_output(self, w: ArrayLike) -> None:
        """Hand back A @ q (n entries, cast to float64 C order; kept alive by the state)."""
    def alphas(self) -> np.ndarray:
        """Diagonal of the tridiagonal matrix (steps_done entries), after DONE."""
    def betas(self) -> np.ndarray:
        """Off-diagonal of the tridiagonal matrix (steps_done - 1 entries), after DONE."""
    @property
    def n_matvecs(self) -> int:
        """Products requested so far."""
    @property
    def steps_done(self) -> int:
        """Lanczos steps completed (the size of the tridiagonal matrix)."""
    @property
    def exhausted(self) -> bool:
        """Whether the recurrence stopped at an invariant Krylov space before the steps asked for."""
    @property
    def n_pass3(self) -> int:
        """Steps that needed a third Gram-Schmidt pass."""
    @property
    def last_beta(self) -> float:
        """|f| after the last step (0 when exhausted)."""

def symeig(a: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a small dense symmetric matrix: (ascending eigenvalues, eigenvectors as columns)."""

def build_info() -> dict[str, Any]:
    """How the core was built: openmp (bool), max_threads (int), compiler (str), cxx_standard (int)."""

def read_bandwidth(n: int = 67108864, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s of one threaded pass over n doubles (best of repeats)."""

def set_num_threads(n: int) -> None:
    """Threads used by the CPU kernels (OpenMP); no effect without OpenMP."""
