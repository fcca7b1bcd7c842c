"""The public entry points of the JAX adapter: the operator and λ1."""

from __future__ import annotations

from typing import Callable, Optional

from .._progress import measure_top
from ..errors import NoConvergence
from .operator import HessianOperator

__all__ = ["hessian", "sharpness"]


def hessian(
    loss_fn: Callable,
    params,
    data,
    *,
    preconditioner=None,
    dtype=None,
    reduction: str = "mean",
    check_determinism: bool = True,
    probe_rtol: Optional[float] = None,
    l2: float = 0.0,
    jit: bool = True,
    mesh=None,
    data_axis: Optional[str] = None,
    shard_basis: bool = False,
    hvp: str = "auto",
    cache=None,
) -> HessianOperator:
    """The Hessian of ``loss_fn`` over ``data`` at ``params``, as a pycurv operator.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(params, batch) -> scalar``, the mean over the batch
        (``reduction="mean"``) or the sum (``reduction="sum"``).
    params : pytree of floating-point arrays
        Where the Hessian is taken; the flat vector is ``ravel_pytree(params)``.
    data : batch or list of batches
        A batch is any pytree ``loss_fn`` accepts (a tuple ``(x, y)``, a dict, an
        array); several batches are a list (or another re-iterable that is not a
        pytree). The loss is the mean over all samples, batches weighted by their
        leading dimension.
    preconditioner : optax state, or 1-D array, optional
        Gives P^{-1/2} H P^{-1/2}: from an optax Adam state built with
        ``optax.inject_hyperparams`` (else use :func:`adam_preconditioner` with
        b1, b2, eps), or the diagonal of P.
    dtype : str or dtype, optional
        Arithmetic of the products; default the parameters' dtype. ``"float64"``
        needs ``jax_enable_x64``.
    reduction : {"mean", "sum"}
        What ``loss_fn`` does over a batch.
    check_determinism : bool
        Computes the first product twice and raises
        :class:`pycurv.NonDeterministicOperatorError` if they differ.
    l2 : float
        Adds ``l2 * v``.
    jit : bool
        ``jax.jit`` the per-batch products (default).
    mesh : jax.sharding.Mesh, optional
        Data parallelism over several devices: each batch is split along its
        leading dimension over ``data_axis`` of the mesh (batch sizes must divide
        evenly), the parameters are replicated, and the jitted products combine
        the devices' partial sums themselves.
    data_axis : str, optional
        The mesh axis the samples are split over (default: the mesh's first axis).
    shard_basis : bool
        With ``mesh``: split the Lanczos basis into one row shard per device of
        the mesh (``shard_bounds``); :func:`pycurv.lanczos` then drives one core
        state per shard and sums their dot products, as ranks of a process group
        would. Same eigenvalues as the replicated basis.
    hvp : {"auto", "forward"}
        ``"auto"``: each batch's gradient is linearised once (``jax.linearize``,
        jitted) and every product applies the linearisation, without redoing
        the forward pass; batches past the ``cache`` budget, and ``"forward"``,
        compute ``jvp(grad)`` in every product. ``H.hvp_method`` says which.
    cache : int, bool or None
        Budget in bytes for the linearisations' residuals: default a quarter of
        the free memory of the device; False or 0 caches nothing.
        ``H.cache_batches`` and ``H.cache_bytes`` say what is held; the solver
        releases it when a solve ends.
    """
    return HessianOperator(loss_fn, params, data, preconditioner=preconditioner, dtype=dtype, reduction=reduction,
                           check_determinism=check_determinism, probe_rtol=probe_rtol, l2=l2, jit=jit, mesh=mesh,
                           data_axis=data_axis, shard_basis=shard_basis, hvp=hvp, cache=cache)


def sharpness(loss_fn: Callable, params, data, *, tol: Optional[float] = None, seed: int = 0, v0=None,
              max_matvecs: Optional[int] = None, progress: Optional[bool] = None, criterion: str = "residual",
              **hessian_kwargs) -> float:
    """The largest algebraic eigenvalue of :func:`hessian` (``tol`` defaults to what its dtype can reach).

    ``criterion="eigenvalue"`` makes ``tol`` bound λ1's estimated relative error
    instead of the residual (fewer products; see :func:`pycurv.lanczos`).
    """
    op = hessian(loss_fn, params, data, **hessian_kwargs)
    res = measure_top(op, tol=tol, seed=seed, v0=v0, max_matvecs=max_matvecs, progress=progress,
                      criterion=criterion)
    if not res.converged:
        raise NoConvergence(res.message, result=res)
    return float(res.eigenvalues[0])
