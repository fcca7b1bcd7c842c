"""The public entry points of the JAX adapter: the operator and λ1."""

from __future__ import annotations

from typing import Callable, Optional

from .._progress import measure_top
from ..errors import NoConvergence
from .operator import HessianOperator

__all__ = ["hessian", "sharpness", "leaf_names"]


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
    wrt=None,
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
    wrt : str or sequence of str, optional
        The parameters the Hessian is taken with respect to, as torch's
        ``params=`` selects by name (JAX's ``params`` is the pytree itself, hence
        the name). A leaf's name is its key path joined by ``/`` (``"dense1/w"``;
        list and tuple entries by index, ``"layers/0/w"``); a name selects that
        leaf or every leaf under it (``"dense1"``). The others are held fixed at
        their values. The flat vector is the selected leaves in ``params``'s
        order, and ``H.unravel`` returns them as a tuple. A preconditioner must
        then be the diagonal of P for the selected parameters (a 1-D array).
    """
    if wrt is not None:
        loss_fn, params = _restrict(loss_fn, params, wrt)
        if preconditioner is not None and not hasattr(preconditioner, "ndim"):
            raise ValueError("with wrt= the preconditioner must be the 1-D diagonal of P for the selected parameters "
                             "(an optax state covers all of params); build it with pycurv.jax.adam_preconditioner "
                             "and take the selected entries")
    return HessianOperator(loss_fn, params, data, preconditioner=preconditioner, dtype=dtype, reduction=reduction,
                           check_determinism=check_determinism, probe_rtol=probe_rtol, l2=l2, jit=jit, mesh=mesh,
                           data_axis=data_axis, shard_basis=shard_basis, hvp=hvp, cache=cache)


def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_names(params) -> list:
    """The names :func:`hessian`'s ``wrt=`` selects by: each leaf's key path joined by ``/``, in leaf order."""
    import jax

    return ["/".join(_key_name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _restrict(loss_fn: Callable, params, wrt):
    """``loss_fn`` as a function of the selected leaves only (a tuple, in leaf order), the others fixed."""
    import jax

    wanted = [wrt] if isinstance(wrt, str) else list(wrt)
    if not wanted or not all(isinstance(w, str) and w for w in wanted):
        raise ValueError(f"wrt must name parameters (a string or a sequence of non-empty strings), got wrt={wrt!r}")
    names = leaf_names(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def hit(name, w):
        return name == w or name.startswith(w.rstrip("/") + "/")

    missing = [w for w in wanted if not any(hit(n, w) for n in names)]
    if missing:
        shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
        raise ValueError(f"wrt names {missing} match no parameter; the leaves are named {shown}")
    chosen = [i for i, n in enumerate(names) if any(hit(n, w) for w in wanted)]
    fixed = list(leaves)

    def merged(selected):
        full = list(fixed)
        for i, leaf in zip(chosen, selected):
            full[i] = leaf
        return jax.tree_util.tree_unflatten(treedef, full)

    def restricted(selected, batch):
        return loss_fn(merged(selected), batch)

    return restricted, tuple(leaves[i] for i in chosen)


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
