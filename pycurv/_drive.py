"""Answering the compiled state's requests, and reading the finished state.

:func:`drive` runs the reverse-communication loop (matvec, reduction, step,
done) for one state; :func:`collect` turns a finished state into a
:class:`pycurv.LanczosResult`. Shared by :func:`pycurv.lanczos` and the
sharded-basis driver (:func:`pycurv.distributed.lanczos_sharded`).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np

from . import _checks
from ._comm import guard
from ._native import DONE, MATVEC, REDUCE, STATUS, STEP, core
from .errors import NonFiniteMatvecError
from .operators import unit_roundoff
from .results import History, LanczosProgress, LanczosResult

__all__ = ["drive", "collect", "nonfinite_error"]


def drive(state, matvec: Callable, n_local: int, *, reduce: Optional[Callable] = None,
          learn_dtype: bool = False, callback=None, comm=None, check_output: Callable = _checks.matvec_output,
          to_host: Callable = np.asarray) -> dict:
    """Answers the state's requests until it is done; returns the time spent.

    ``reduce(buffer)`` sums a float64 buffer over processes in place (None: one
    process). With a communicator ``comm`` every matvec runs under
    :func:`pycurv.distributed.guard`, so a failure on one rank stops all ranks,
    and a callback's request to stop is agreed by all ranks. Exceptions raised
    by ``matvec`` propagate unchanged. ``check_output(y, n_local, count)``
    validates each product (device arrays on a GPU); ``to_host(y)`` reads one
    for the error message when the core finds non-finite values.
    """
    t_start = time.perf_counter()
    t_mv = 0.0
    t_core = 0.0
    count = 0
    y = None

    def checked(x, count):
        return check_output(matvec(x), n_local, count)

    while True:
        t0 = time.perf_counter()
        try:
            req = int(state.advance())
        except core.NonFiniteError:
            t_core += time.perf_counter() - t0
            raise nonfinite_error(None if y is None else to_host(y), count, comm) from None
        t_core += time.perf_counter() - t0
        if req == MATVEC:
            x = state.matvec_input()
            count += 1
            t0 = time.perf_counter()
            y = checked(x, count) if comm is None else guard(comm, checked, x, count)
            t_mv += time.perf_counter() - t0
            if learn_dtype and count == 1:
                state.set_unit_roundoff(unit_roundoff(y.dtype))
            state.set_matvec_output(y)
        elif req == REDUCE:
            if reduce is not None:
                reduce(state.reduce_buffer())
        elif req == STEP:
            if callback is not None:
                info = LanczosProgress(int(state.n_matvecs), state.current_values(), state.current_residuals())
                stop = callback(info) is True
                if comm is not None:
                    stop = bool(comm.allreduce_max(int(stop)))
                if stop:
                    state.stop()
        elif req == DONE:
            break
        else:  # pragma: no cover - the core only issues the four requests
            raise RuntimeError(f"unknown request {req} from the Lanczos state")
    return {"matvec": t_mv, "core": t_core, "total": time.perf_counter() - t_start}


def nonfinite_error(y, count: int, comm=None) -> NonFiniteMatvecError:
    bad = int(np.count_nonzero(~np.isfinite(np.asarray(y)))) if y is not None else 0
    if comm is not None:
        # Every rank sees the same non-finite reduced norm and raises here together.
        counts = [int(c) for c in comm.gather_messages(str(bad))]
        ranks = [r for r, c in enumerate(counts) if c]
        if ranks:
            return NonFiniteMatvecError(
                f"matvec call {count} returned non-finite values (NaN or Inf) on rank(s) "
                f"{', '.join(map(str, ranks))} ({sum(counts)} entries); the operator must be finite "
                "(look for NaN parameters or an overflowing loss)",
                matvec=count,
            )
    if y is not None and bad:
        return NonFiniteMatvecError(
            f"matvec call {count} returned {bad} non-finite values (NaN or Inf) out of {np.asarray(y).size}; "
            "the operator must be finite (look for NaN parameters or an overflowing loss)",
            matvec=count,
        )
    if y is not None:
        # Products are scaled by a power of two fixed at the first nonzero one, so
        # only a product some 1e150 times larger than that one overflows here.
        return NonFiniteMatvecError(
            f"matvec call {count} returned values whose norm overflows float64 even after scaling "
            f"(max |A v| = {float(np.max(np.abs(np.asarray(y)))):.3g}): the operator's products span more than "
            "float64's range (over 1e150 apart) from the first nonzero one; rescale the operator or start "
            "from a vector it does not nearly annihilate",
            matvec=count,
        )
    return NonFiniteMatvecError(f"matvec call {count} returned non-finite values", matvec=count)


def collect(state, timing: dict, *, which: str, tol: float, ncv: int, seed: int, max_matvecs: int,
            want_vectors: bool, as_array: Callable = np.asarray, exact: bool = False,
            criterion: str = "residual") -> LanczosResult:
    """Builds the result record from a finished state (``as_array`` reads its eigenvectors).

    ``exact``: the operator's products are exact float64 (an array), so a noise
    floor can only be float64's own rounding, and the message says so.
    """
    values = np.asarray(state.values(), dtype=np.float64)
    res = np.asarray(state.residuals(), dtype=np.float64)
    status = STATUS.get(int(state.status), "unknown")
    anorm = float(state.anorm)
    vecs = None
    if want_vectors:
        vecs = as_array(state.eigenvectors()).T  # (n, k), column i <-> eigenvalue i
    bounds = np.asarray(state.error_bounds(), dtype=np.float64)  # what the core's eigenvalue criterion stops on
    rel = _relative(res, values, anorm)
    message = _message(status, rel, tol, max_matvecs, float(state.noise_level), int(state.n_matvecs), exact=exact)
    if criterion == "eigenvalue" and status in ("converged", "max_matvecs"):
        message = _eigenvalue_message(status, _relative(bounds, values, anorm), tol, max_matvecs,
                                      int(state.n_matvecs))
    h = state.history()
    return LanczosResult(
        eigenvalues=values,
        eigenvectors=vecs,
        residual_norms=res,
        error_bounds=bounds,
        n_matvecs=int(state.n_matvecs),
        converged=status == "converged",
        status=status,
        message=message,
        which=which,
        tol=tol,
        criterion=criterion,
        ncv=ncv,
        seed=seed,
        n_restarts=int(state.n_restarts),
        n_breakdowns=int(state.n_breakdowns),
        n_verify_rounds=int(state.n_verify_rounds),
        residuals_explicit=bool(state.residuals_explicit),
        anorm_estimate=anorm,
        noise_level=float(state.noise_level),
        asymmetry=float(state.asymmetry) / anorm if anorm > 0 else 0.0,
        orthogonality=float(state.max_h2_ratio),
        time_matvec=timing["matvec"],
        time_core=timing["core"],
        time_total=timing["total"],
        history=History(np.asarray(h["n_matvecs"], dtype=np.int64), np.asarray(h["value"]),
                        np.asarray(h["residual"])),
    )


def _relative(res: np.ndarray, values: np.ndarray, anorm: float) -> np.ndarray:
    scale = np.maximum(np.abs(values), anorm)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(scale > 0, res / np.where(scale > 0, scale, 1.0), np.where(res > 0, np.inf, 0.0))


def _eigenvalue_message(status: str, rel: np.ndarray, tol: float, max_matvecs: int, n_mv: int) -> str:
    worst = float(np.max(rel)) if rel.size else float("nan")
    if status == "converged":
        return (f"converged: largest relative eigenvalue error estimate {worst:.2g} <= tol={tol:g} "
                f"(criterion='eigenvalue') after {n_mv} matvecs")
    return (f"did not converge within max_matvecs={max_matvecs}: largest relative eigenvalue error estimate "
            f"{worst:.2g} > tol={tol:g}; these are the best estimates (converged=False). Increase max_matvecs "
            "or ncv, or loosen tol")


def _message(status: str, rel: np.ndarray, tol: float, max_matvecs: int, noise: float, n_mv: int, *,
             exact: bool = False) -> str:
    worst = float(np.max(rel)) if rel.size else float("nan")
    if status == "noise_floor" and exact:
        return (
            f"stopped at float64's rounding floor: relative residual {worst:.2g} cannot reach tol={tol:g}. "
            "The products A @ v are exact to float64, but their rounding and the basis's leave residuals of "
            f"about {max(noise, worst):.2g} * ||A|| (some sqrt(n) * 1.1e-16), so a smaller one cannot be "
            f"certified; the eigenvalues are the best float64 allows. Loosen tol to about "
            f"{max(noise, worst) * 10:.0e}"
        )
    if status == "converged":
        return f"converged: largest relative residual {worst:.2g} <= tol={tol:g} after {n_mv} matvecs"
    if status == "max_matvecs":
        return (
            f"did not converge within max_matvecs={max_matvecs}: largest relative residual {worst:.2g} > "
            f"tol={tol:g}; these are the best estimates (converged=False). Increase max_matvecs or ncv, "
            "or loosen tol"
        )
    if status == "noise_floor":
        return (
            f"stopped at the operator's noise floor: relative residual {worst:.2g} cannot reach tol={tol:g} "
            f"because A @ v itself carries errors of about {noise:.2g} * ||A|| (low-precision arithmetic, "
            "or an operator that is not exactly symmetric or deterministic); the eigenvalues are the best "
            f"this operator allows. Loosen tol to about {max(noise, worst) * 10:.0e}, or compute A @ v in float64"
        )
    if status == "stopped":
        return f"stopped by the callback after {n_mv} matvecs (largest relative residual {worst:.2g})"
    return f"finished with status {status!r}"
