"""The Lanczos driver: owns the matvec, answers the compiled state's requests.

The compiled state holds the float64 Krylov basis and does all O(n * ncv)
work: ``pycurv._core.LanczosState`` in host memory, or, for an operator whose
``device`` is a GPU, ``pycurv._cuda.LanczosState`` in that GPU's memory. This
module validates input, hands basis vectors to the user's operator as zero-copy
views (NumPy, or the operator's framework on a GPU), checks what comes back,
and assembles the result record.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

import numpy as np

from . import _checks, _gpu
from ._drive import collect, drive
from ._memory import basis_memory_error
from ._native import WHICH_CODE, core
from ._sharded import lanczos_sharded
from .errors import ConvergenceWarning, NoConvergence
from .operators import as_operator
from .results import LanczosProgress, LanczosResult

__all__ = ["lanczos", "sharpness"]


def lanczos(
    A,
    k: int = 1,
    *,
    which: str = "LA",
    tol: float = 1e-6,
    ncv: Optional[int] = None,
    max_matvecs: Optional[int] = None,
    v0=None,
    seed=None,
    return_eigenvectors: bool = True,
    callback: Optional[Callable[[LanczosProgress], Optional[bool]]] = None,
    n: Optional[int] = None,
    check_multiplicity: Optional[bool] = None,
    host_basis: bool = False,
    criterion: str = "residual",
    min_matvecs: Optional[int] = None,
) -> LanczosResult:
    """Extreme eigenvalues of a symmetric operator from matrix-vector products.

    Thick-restart Lanczos with a float64 basis and full reorthogonalisation
    (classical Gram-Schmidt twice), in the compiled core.

    Parameters
    ----------
    A : array, sparse matrix, LinearOperator, pycurv operator, or callable
        The symmetric operator. A callable ``f(x) -> A @ x`` needs ``n=``.
        ``matvec`` receives a read-only float64 vector of length n. An
        operator on a GPU (``A.device == "cuda:0"``: the torch and JAX
        adapters on a GPU model, a torch/CuPy/JAX matrix on a GPU,
        ``pycurv.FunctionOperator(f, n, device="cuda:0", framework=...)``)
        is solved there: the basis stays in device memory and ``matvec``
        receives a zero-copy float64 device array of its framework. Where
        pycurv's CUDA module is missing (a CPU-only build) or sees no device
        (e.g. a driver older than its CUDA runtime needs), the basis is kept
        in host memory instead and each product copies one float64 vector to
        the device and one back, with the CPU backend's results
        (:class:`pycurv.HostBasisWarning`, once per process).
    k : int
        Number of eigenvalues wanted, 1 <= k <= n.
    which : {"LA", "SA", "BE"}
        Largest algebraic (default), smallest algebraic, or both ends (k // 2
        from the bottom, the rest from the top). Never largest magnitude: the
        sharpness of a loss is its largest *algebraic* Hessian eigenvalue.
    tol : float
        Relative residual tolerance: a pair (theta, y) is converged when
        ``||A y - theta y|| <= tol * max(|theta|, ||A||_est)``, with
        ``||A||_est`` the largest Ritz value in absolute value seen. Below
        ``64 * sqrt(n) * 2**-53`` the recurrence's residual estimate cannot
        certify it, so it is confirmed with ``A y`` computed (k more
        products); where float64 rounding keeps it out of reach the status is
        ``"noise_floor"``. For an operator that is not ``exact`` (low-precision
        products, a plain callable) the residual also counts the Gram-Schmidt
        coefficients of its products that the recurrence leaves out (their
        rounding and asymmetry): it bounds the residual of the products made,
        and ``A y`` is computed only where that bound does not pass.
    criterion : {"residual", "eigenvalue"}
        What ``tol`` bounds. ``"residual"`` (default, as ARPACK): the relative
        residual above. ``"eigenvalue"``: the estimated eigenvalue error
        ``min(r, r**2 / gap) <= tol * max(|theta|, ||A||_est)`` (``error_bounds``
        of the result), for an eigenvalue to ``tol`` relative accuracy: its
        error falls as the square of the residual, so it stops many products
        earlier. ``gap`` is the distance to the nearest other Ritz value less
        that value's residual, which stands in for the distance to the rest of
        the spectrum. For the extreme Ritz value of the basis (lambda_1 of
        ``"LA"``) the estimate is Lehmann's bound under that same assumption
        (no eigenvalue but the one it approximates beyond the gap): it also
        uses the other Ritz pairs, is never above ``r**2 / gap`` and is
        rigorous wherever the assumption holds (about half of ``r**2 / gap``
        on a BatchNorm convnet). An eigenvalue the Krylov space has not
        resolved yet and that lies closer than the gap can make either
        estimate optimistic (the residual bound is rigorous for the eigenvalue
        nearest the Ritz value, which is lambda_1 once the Krylov space has
        resolved the top of the spectrum: see ``min_matvecs``). The
        eigenvectors are then accurate only to about ``sqrt(tol * gap)``.
    ncv : int, optional
        Basis vectors kept (memory: 8 * n * (ncv + 1) bytes). Default
        ``min(n, max(2k + 1, 32))``; must satisfy k + 2 <= ncv <= n (ncv = n
        when k >= n - 1).
    max_matvecs : int, optional
        Budget of products for the Lanczos steps (default ``max(1000, 30 ncv)``).
        A final residual check, where one is needed, adds up to k products.
    min_matvecs : int, optional
        Products before convergence may be declared (default ``min(12, n,
        max_matvecs)``). A Krylov space of fewer dimensions cannot yet tell an
        isolated top eigenvalue from a cluster (the top of a Hessian at the
        edge of stability), and its Ritz value settles on the cluster's with a
        small residual: on the benchmark spectra, stopping at the first
        passing test returned a value further than ``tol`` from lambda_1 for up
        to 42% of random starts (``criterion="residual"``) and 98%
        (``"eigenvalue"``); from 12 products on, for at most 10%, by at most
        2 tol, as ARPACK (10%, 1.8 tol; bench/RESULTS.md). A random start's Krylov space that
        is exhausted early (an operator of low rank) is exact and ends the run sooner. Lower it only for
        a spectrum known to be separated at the top.
    v0 : array of shape (n,), optional
        Start vector (e.g. the previous Ritz vector, to warm-start); a device
        array for an operator on a GPU. Default: a random vector from ``seed``;
        for ``which="LA"``, what the operator's ``default_start(seed)`` proposes
        where it has one (the torch adapter's: the loss gradient plus a random
        vector of equal norm).
    seed : int or numpy.random.Generator, optional
        Seed of the random start and restart vectors. Same seed, same operator:
        bit-identical results. Drawn from OS entropy if None (recorded in the result).
    return_eigenvectors : bool
        Whether to return the Ritz vectors.
    callback : callable, optional
        Called after each Lanczos step with a :class:`LanczosProgress`;
        returning True stops the solver (status ``"stopped"``).
    n : int, optional
        Dimension, required when ``A`` is a plain callable.
    check_multiplicity : bool, optional
        A single Krylov space holds one copy of a repeated eigenvalue. When
        True (the default for k >= 2) the converged pairs are locked and a new
        random search in their orthogonal complement must not find anything
        that belongs to the wanted set; this costs roughly one more solve.
    host_basis : bool
        GPU operators only: keep the basis (and the Ritz vectors) in pinned
        host memory that the GPU reads over the bus, for bases larger than
        device memory; the device then holds at most two vectors. Slower:
        every pass over the basis runs at the bus's bandwidth instead of the
        GPU memory's. On the CPU the basis is always in host memory and this
        flag changes nothing.

    Returns
    -------
    LanczosResult
        A warning (:class:`pycurv.ConvergenceWarning`) is issued if the result
        did not converge; ``result.converged`` and ``result.status`` say why.
        For an operator on a GPU, ``eigenvectors`` is a device array of the
        operator's framework; everything else is the same as on the CPU.
    """
    op = as_operator(A, n=n)
    try:
        result = _solve(op, k, which=which, tol=tol, ncv=ncv, max_matvecs=max_matvecs, v0=v0, seed=seed,
                        return_eigenvectors=return_eigenvectors, callback=callback,
                        check_multiplicity=check_multiplicity, host_basis=host_basis, criterion=criterion,
                        min_matvecs=min_matvecs)
    finally:
        # Operators may hold per-solve state (a framework's cached linearisations): the solve is over.
        release = getattr(op, "release", None)
        if callable(release):
            release()
    if not result.converged:
        warnings.warn(result.message, ConvergenceWarning, stacklevel=2)
    return result


def _solve(op, k, *, which, tol, ncv, max_matvecs, v0, seed, return_eigenvectors, callback, check_multiplicity,
           host_basis, criterion="residual", min_matvecs=None) -> LanczosResult:
    criterion = _checks.check_criterion(criterion)
    if getattr(op, "shard_bounds", None) is not None:  # the basis split over devices in this process
        with warnings.catch_warnings():  # lanczos() warns once, below
            warnings.simplefilter("ignore", ConvergenceWarning)
            return lanczos_sharded(op.matvec_shards, op.shard_bounds, k, which=which, tol=tol, ncv=ncv,
                                   max_matvecs=max_matvecs, v0=v0, seed=seed,
                                   return_eigenvectors=return_eigenvectors, callback=callback,
                                   check_multiplicity=check_multiplicity, exact=op.exact, dtype=op.dtype,
                                   criterion=criterion, min_matvecs=min_matvecs)
    N = op.shape[0]
    comm = getattr(op, "comm", None)
    n_local = int(getattr(op, "n_local", N))
    offset = int(getattr(op, "offset", 0))
    sharded = comm is not None and (n_local != N or offset != 0 or comm.size > 1 and hasattr(op, "n_local"))
    k = _checks.check_k(k, N)
    which = _checks.check_which(which)
    tol = _checks.check_tol(tol)
    ncv = _checks.check_ncv(ncv, k, N)
    max_matvecs = _checks.check_max_matvecs(max_matvecs, ncv, k)
    min_matvecs = _checks.check_min_matvecs(min_matvecs, N, max_matvecs)
    host_basis = _checks.check_flag("host_basis", host_basis)
    on_gpu = _gpu.is_gpu(op.device)
    run = _gpu.device_run(op, host_basis=host_basis) if on_gpu else None
    if isinstance(run, _gpu.HostBasisRun):  # no usable CUDA module: the CPU core, a host copy each way per product
        on_gpu = False
        v0 = run.host_v0(v0, n_local)
    if on_gpu and sharded:
        raise ValueError("shard_basis=True is not available for operators on a GPU yet; use the replicated basis "
                         "(data parallelism alone) there, or run the sharded basis on the CPU")
    if on_gpu and comm is not None and v0 is not None:
        raise ValueError("v0 cannot be combined with a distributed operator on a GPU yet; rank 0's seed starts "
                         "every rank")
    if v0 is not None:
        v0 = _gpu.check_v0(v0, N) if on_gpu else _checks.check_v0(v0, n_local)
    seed = _checks.check_seed(seed)
    if v0 is None and which == "LA" and comm is None and not on_gpu and callable(getattr(op, "default_start", None)):
        v0 = op.default_start(seed)  # e.g. the torch adapter's gradient start; None: the random one
        if v0 is not None:
            v0 = _checks.check_v0(v0, n_local)
    if comm is not None:
        seed, v0 = _agree(comm, seed, v0, n_local, sharded)
    if check_multiplicity is None:
        check_multiplicity = k >= 2
    options = dict(
        n_local=n_local,
        n_global=N,
        offset=offset,
        k=k,
        ncv=ncv,
        which=WHICH_CODE[which],
        tol=tol,
        max_matvecs=max_matvecs,
        seed=seed,
        start_given=v0 is not None,
        check_multiplicity=bool(check_multiplicity),
        explicit_residuals=not op.exact,
        want_vectors=bool(return_eigenvectors),
        yield_reduce=sharded,
        unit_roundoff=op.unit_roundoff if op.dtype is not None else 2.0**-53,
        tol_on_eigenvalue=criterion == "eigenvalue",
        min_matvecs=min_matvecs,
    )
    learn = op.dtype is None
    if on_gpu:
        state = run.state(**options)
        if v0 is not None:
            state.set_start_vector(v0)
        timing = drive(state, run.matvec, N, learn_dtype=learn, callback=callback, comm=comm,
                       check_output=run.check_output, to_host=_gpu.to_numpy)
        timing = run.timing(state, timing)
        as_array = run.eigenvectors
    else:
        try:
            state = core.LanczosState(**options)
        except MemoryError:
            raise basis_memory_error(n_local, ncv, k, bool(return_eigenvectors)) from None
        if v0 is not None:
            state.start_vector()[:] = v0
        with _core_threads(op):
            timing = drive(state, op.matvec if run is None else run.matvec, n_local,
                           reduce=comm.allreduce_sum if sharded else None, learn_dtype=learn, callback=callback,
                           comm=comm)
        as_array = np.asarray if run is None else run.eigenvectors
    return collect(state, timing, which=which, tol=tol, ncv=ncv, seed=seed, max_matvecs=max_matvecs,
                   want_vectors=return_eigenvectors, as_array=as_array, exact=bool(op.exact), criterion=criterion)


class _core_threads:
    """The core's OpenMP team, sized so it does not fight an operator's own host threads.

    A framework operator on the CPU (torch's intra-op pool, XLA's) declares
    ``host_threads``, the threads its products run on, the calling thread
    included. The two runtimes take turns, but each one's workers spin for a
    while after their parallel regions, and on a busy machine a thread that
    loses its core stalls a whole team at the next barrier. Both teams include
    the calling thread, so the core takes the cores the framework's workers
    leave: cpu_count - host_threads + 1, at least one. Operators without
    ``host_threads`` change nothing.
    """

    def __init__(self, op):
        host = getattr(op, "host_threads", None)
        self.n = None if host is None else max(1, (os.cpu_count() or 1) - int(host) + 1)

    def __enter__(self):
        if self.n is not None:
            self.before = int(core.build_info()["max_threads"])
            core.set_num_threads(min(self.n, self.before))

    def __exit__(self, *exc):
        if self.n is not None:
            core.set_num_threads(self.before)
        return False


def _agree(comm, seed: int, v0, n_local: int, sharded: bool):
    """Makes every rank start from the same place: rank 0's seed; rank 0's v0 (replicated) or every rank's shard."""
    buf = np.array([seed >> 32, seed & 0xFFFFFFFF], dtype=np.int64)  # a 64-bit seed in two int64 halves
    comm.broadcast(buf, root=0)
    seed = (int(buf[0]) << 32) | int(buf[1])
    have = comm.allreduce_max(1 if v0 is not None else 0)
    if sharded:
        if have and comm.allreduce_max(1 if v0 is None else 0):
            raise ValueError(f"v0 was given on some ranks but not on rank {comm.rank}: with a sharded basis every "
                             "rank passes its rows of v0 (or none does)")
        return seed, v0
    if have:
        full = np.zeros(n_local) if v0 is None else np.ascontiguousarray(v0, dtype=np.float64)
        comm.broadcast(full, root=0)
        if not np.any(full):
            raise ValueError("v0 must be given on rank 0 (its v0 is used by every rank)")
        v0 = full
    return seed, v0

def sharpness(A, **kwargs) -> float:
    """The largest algebraic eigenvalue of ``A`` (the sharpness, lambda_1, of a Hessian).

    Takes the keyword arguments of :func:`lanczos` except ``k``, ``which`` and
    ``return_eigenvectors``. Raises :class:`pycurv.NoConvergence` (carrying the
    best estimate in ``.result``) if ``tol`` is not met.
    """
    for bad in ("k", "which", "return_eigenvectors"):
        if bad in kwargs:
            raise TypeError(f"sharpness() computes the largest algebraic eigenvalue; it takes no {bad}=")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = lanczos(A, 1, which="LA", return_eigenvectors=False, **kwargs)
    if not res.converged:
        raise NoConvergence(res.message, result=res)
    return float(res.eigenvalues[0])
