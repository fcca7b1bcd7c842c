"""Lanczos with the basis split into row shards held in one process (one per device).

The shards' core states are driven in lockstep and their partial dot products
summed in shard order, exactly as ranks of a process group would sum them
through REDUCE requests. Re-exported as :func:`pycurv.distributed.lanczos_sharded`.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Callable

import numpy as np

from . import _checks
from ._drive import collect, nonfinite_error
from ._memory import basis_memory_error
from ._native import DONE, MATVEC, REDUCE, STEP, WHICH_CODE, core
from .errors import ConvergenceWarning
from .operators import unit_roundoff
from .results import LanczosProgress

__all__ = ["lanczos_sharded"]


def lanczos_sharded(matvec: Callable, bounds, k: int = 1, *, which: str = "LA", tol: float = 1e-6, ncv=None,
                    max_matvecs=None, v0=None, seed=None, return_eigenvectors: bool = True, callback=None,
                    check_multiplicity=None, exact: bool = False, dtype=None, criterion: str = "residual",
                    min_matvecs=None):
    """Lanczos with the basis split into row shards held in one process (e.g. one per device).

    ``bounds`` lists the shards' row ranges ``[(0, n1), (n1, n2), ...]`` covering
    0..n. ``matvec(xs)`` takes the list of shards of x (float64, read-only) and
    returns the list of shards of A x. One core state holds each shard; the
    states are driven in lockstep and their partial dot products are summed in
    shard order, exactly as ranks of a process group would through REDUCE. The
    eigenvectors are returned whole (rows concatenated in shard order).
    """
    bounds = [(int(lo), int(hi)) for lo, hi in bounds]
    if not bounds or bounds[0][0] != 0 or any(a[1] != b[0] for a, b in zip(bounds, bounds[1:])) or any(
            hi <= lo for lo, hi in bounds):
        raise ValueError(f"bounds must be consecutive non-empty row ranges starting at 0, got {bounds}")
    n = bounds[-1][1]
    k = _checks.check_k(k, n)
    which = _checks.check_which(which)
    tol = _checks.check_tol(tol)
    criterion = _checks.check_criterion(criterion)
    ncv = _checks.check_ncv(ncv, k, n)
    max_matvecs = _checks.check_max_matvecs(max_matvecs, ncv, k)
    min_matvecs = _checks.check_min_matvecs(min_matvecs, n, max_matvecs)
    v0 = None if v0 is None else _checks.check_v0(v0, n)
    seed = _checks.check_seed(seed)
    if check_multiplicity is None:
        check_multiplicity = k >= 2
    try:
        states = [core.LanczosState(
            n_local=hi - lo, n_global=n, offset=lo, k=k, ncv=ncv, which=WHICH_CODE[which], tol=tol,
            max_matvecs=max_matvecs, seed=seed, start_given=v0 is not None,
            check_multiplicity=bool(check_multiplicity), explicit_residuals=not exact,
            want_vectors=bool(return_eigenvectors), yield_reduce=True, unit_roundoff=unit_roundoff(dtype),
            tol_on_eigenvalue=criterion == "eigenvalue", min_matvecs=min_matvecs)
            for lo, hi in bounds]
    except MemoryError:
        raise basis_memory_error(n, ncv, k, bool(return_eigenvectors)) from None
    if v0 is not None:
        for st, (lo, hi) in zip(states, bounds):
            st.start_vector()[:] = v0[lo:hi]
    t_start = time.perf_counter()
    t_mv = t_core = 0.0
    count = 0
    ys = None
    while True:
        t0 = time.perf_counter()
        try:
            reqs = {int(st.advance()) for st in states}
        except core.NonFiniteError:
            raise nonfinite_error(None if ys is None else np.concatenate(ys), count) from None
        t_core += time.perf_counter() - t0
        if len(reqs) != 1:  # pragma: no cover - identical reduced values give identical decisions
            raise RuntimeError(f"the shards' Lanczos states diverged: {sorted(reqs)}")
        req = reqs.pop()
        if req == MATVEC:
            xs = [st.matvec_input() for st in states]
            count += 1
            t0 = time.perf_counter()
            ys = list(matvec(xs))
            t_mv += time.perf_counter() - t0
            if len(ys) != len(states):
                raise ValueError(f"matvec call {count} returned {len(ys)} shards, expected {len(states)}")
            for i, (st, y, (lo, hi)) in enumerate(zip(states, ys, bounds)):
                y = _checks.matvec_output(y, hi - lo, count)
                if dtype is None and count == 1:
                    st.set_unit_roundoff(unit_roundoff(y.dtype))
                ys[i] = y
                st.set_matvec_output(y)
        elif req == REDUCE:
            bufs = [st.reduce_buffer() for st in states]
            total = bufs[0].copy()
            for b in bufs[1:]:
                total += b
            for b in bufs:
                b[:] = total
        elif req == STEP:
            if callback is not None and callback(LanczosProgress(int(states[0].n_matvecs),
                                                                  states[0].current_values(),
                                                                  states[0].current_residuals())) is True:
                for st in states:
                    st.stop()
        elif req == DONE:
            break
    timing = {"matvec": t_mv, "core": t_core, "total": time.perf_counter() - t_start}
    res = collect(states[0], timing, which=which, tol=tol, ncv=ncv, seed=seed, max_matvecs=max_matvecs,
                  want_vectors=False, exact=bool(exact), criterion=criterion)
    if return_eigenvectors:
        vecs = np.concatenate([np.asarray(st.eigenvectors()).T for st in states], axis=0)
        res = dataclasses.replace(res, eigenvectors=vecs)
    if not res.converged:
        warnings.warn(res.message, ConvergenceWarning, stacklevel=2)
    return res
