"""Sharpness during a JAX training loop: ``tracker.step(step, params, opt_state)``."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Union

import numpy as np

from ..stability import threshold
from ..track import Record, operator_options
from ..track import Tracker as _Tracker
from .functions import hessian
from .preconditioners import adam_preconditioner, find_hyperparams

__all__ = ["Tracker"]


class Tracker(_Tracker):
    """Tracks a JAX training loop: ``tracker.step(step, params, opt_state)``.

    Parameters
    ----------
    loss_fn, data
        As for :func:`pycurv.jax.hessian`.
    optimizer : {"sgd", "adam", "adamw", "rmsprop"}
        Which stability threshold applies (:func:`pycurv.stability.threshold`).
        For Adam/AdamW the preconditioner is read from ``opt_state`` (optax).
    lr : float or callable, optional
        The learning rate, or a schedule ``lr(step)`` (an optax schedule works);
        default: ``opt_state``'s ``hyperparams["learning_rate"]`` (``optax.inject_hyperparams``).
    hyperparameters : dict, optional
        The optimizer's (``momentum``, ``beta1``, ``beta2``, ``eps``, ``weight_decay``, ...);
        Adam's b1, b2, eps are read from ``inject_hyperparams`` state when not given.
    """

    def __init__(self, loss_fn, data, *, optimizer: str = "sgd", lr: Union[None, float, Callable] = None,
                 hyperparameters: Optional[Dict[str, Any]] = None, every: int = 100, tol: float = 1e-3,
                 seed: int = 0, max_matvecs: Optional[int] = None, warn: bool = True,
                 progress: Optional[bool] = None, **hessian_kwargs):
        super().__init__(every=every, tol=tol, seed=seed, max_matvecs=max_matvecs, warn=warn, progress=progress)
        self.optimizer = str(optimizer).lower()
        self.hyperparameters = dict(hyperparameters or {})
        threshold(self.optimizer, 1.0, **self.hyperparameters)  # validates names now
        if self.optimizer == "rmsprop":
            raise ValueError("pycurv.jax.Tracker supports optimizer='sgd', 'adam' or 'adamw'; for RMSprop build the "
                             "operator with pycurv.jax.hessian(preconditioner=sqrt(nu) + eps) and use Tracker.record")
        self.lr = lr
        self.loss_fn, self.data = loss_fn, data
        self.hessian_kwargs = hessian_kwargs

    def _lr(self, step: int, opt_state) -> float:
        if callable(self.lr):
            return float(np.asarray(self.lr(step)))
        if self.lr is not None:
            return float(self.lr)
        if opt_state is not None:
            hp = find_hyperparams(opt_state)
            if hp is not None and "learning_rate" in hp:
                return float(np.asarray(hp["learning_rate"]))
        raise ValueError("pycurv.jax.Tracker needs the learning rate: pass lr= (a number or a schedule), or build the "
                         "optimizer with optax.inject_hyperparams so that opt_state records it")

    def step(self, step: int, params, opt_state=None) -> Optional[Record]:
        """Measures at ``params`` (and ``opt_state``) if ``step`` is due."""
        return self.measure(step, params, opt_state) if self.due(step) else None

    def measure(self, step: int, params, opt_state=None) -> Record:
        t0 = time.perf_counter()
        hp = dict(self.hyperparameters)
        kw = dict(self.hessian_kwargs)
        kw.setdefault("check_determinism", not self.records)
        if self.optimizer in ("adam", "adamw"):
            if opt_state is None:
                raise ValueError(f"optimizer={self.optimizer!r}: pass opt_state to step() (the preconditioner "
                                 "is read from it)")
            found = find_hyperparams(opt_state) or {}
            for ours, theirs in (("beta1", "b1"), ("beta2", "b2"), ("eps", "eps")):
                if ours not in hp and theirs in found:
                    hp[ours] = float(np.asarray(found[theirs]))
            if "beta1" not in hp or "beta2" not in hp or "eps" not in hp:
                raise ValueError("pycurv.jax.Tracker with Adam needs beta1, beta2 and eps: pass hyperparameters="
                                 "{'beta1': 0.9, 'beta2': 0.999, 'eps': 1e-8} (your values), or use "
                                 "optax.inject_hyperparams")
            kw.setdefault("preconditioner", adam_preconditioner(opt_state, b1=hp["beta1"], b2=hp["beta2"],
                                                                   eps=hp["eps"]))
        thr = threshold(self.optimizer, self._lr(step, opt_state), **hp)
        for key, value in operator_options(thr).items():
            kw.setdefault(key, value)
        op = hessian(self.loss_fn, params, self.data, **kw)
        return self.record(op, thr, step, started=t0)
