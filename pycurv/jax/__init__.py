"""Hessians of JAX losses as pycurv operators.

``hessian(loss_fn, params, data)`` returns an operator whose ``matvec`` is the
Hessian-vector product of ``loss_fn(params, batch)`` (mean over all samples of
``data``) with respect to the raveled parameters, for :func:`pycurv.lanczos`
and :func:`pycurv.sharpness`::

    import pycurv, pycurv.jax
    H = pycurv.jax.hessian(loss_fn, params, (x, y))
    lam1 = pycurv.sharpness(H, tol=1e-4, seed=0)

Each batch's gradient of ``f(flat) = loss_fn(unravel(flat), batch)`` is
linearised once per solve (``jax.linearize``, jitted) and every product applies
the linearisation (past a memory budget, ``jax.jvp(jax.grad(f))`` in every
product); ``jax.flatten_util.ravel_pytree`` flattens the parameters, and
``params`` may be any pytree of floating-point arrays. Products run on the
parameters' device in their dtype (float32 without ``jax_enable_x64``), or in
``dtype=`` when asked; only the float64 Lanczos vector crosses to the host.
"""

from __future__ import annotations

from .._optional import require

require("jax", "pycurv.jax")

from .functions import hessian, leaf_names, sharpness  # noqa: E402
from .operator import HessianOperator  # noqa: E402
from .preconditioners import adam_preconditioner, find_adam_state, find_hyperparams  # noqa: E402
from .tracker import Tracker  # noqa: E402

__all__ = ["hessian", "sharpness", "leaf_names", "HessianOperator", "adam_preconditioner", "find_adam_state",
           "find_hyperparams", "Tracker"]
