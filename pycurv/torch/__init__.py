"""Hessians of PyTorch losses as pycurv operators.

``hessian(model, loss_fn, data)`` returns an operator whose ``matvec`` is the
Hessian-vector product of the mean loss over ``data`` with respect to the
model's trainable parameters, for :func:`pycurv.lanczos` and
:func:`pycurv.sharpness`::

    import pycurv, pycurv.torch
    H = pycurv.torch.hessian(model, torch.nn.functional.cross_entropy, (x, y))
    lam1 = pycurv.sharpness(H, tol=1e-6, seed=0)

The loss is the training loss by default (normalisation layers on each
batch's statistics, dropout off). Each batch's loss and gradient are built once
per solve with their autograd graph, through ``torch.func.functional_call``,
and every product is one backward pass through it (within a memory budget;
``hvp="reverse"`` recomputes, ``hvp="forward"`` is forward-over-reverse).
Products run on the model's device, in the model's dtype unless ``dtype=``
says otherwise; only the float64 Lanczos vector crosses to the host.

The model, its buffers and any optimizer passed are never modified: the
products use a copy of the parameters and buffers taken when the operator is
built, and a structural copy of the module whose training flags are set by
``mode`` (the parameter tensors are shared with it, not copied twice).
"""

from __future__ import annotations

from .._optional import require

require("torch", "pycurv.torch")

from .functions import hessian, sharpness, stability_report  # noqa: E402
from .operator import HessianOperator, ParameterLayout  # noqa: E402
from .preconditioners import adam_preconditioner, init_adam_from_gradients, rmsprop_preconditioner  # noqa: E402
from .spread import SharpnessSpread, sharpness_spread  # noqa: E402
from .tracker import Tracker  # noqa: E402

__all__ = [
    "hessian",
    "sharpness",
    "stability_report",
    "sharpness_spread",
    "SharpnessSpread",
    "HessianOperator",
    "ParameterLayout",
    "adam_preconditioner",
    "rmsprop_preconditioner",
    "init_adam_from_gradients",
    "Tracker",
]
