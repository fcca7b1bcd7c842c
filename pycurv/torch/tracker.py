"""Sharpness during a PyTorch training loop: ``tracker.step()`` after each ``optimizer.step()``."""

from __future__ import annotations

import time
from typing import Optional

from ..stability import threshold_from_optimizer
from ..track import Record, operator_options
from ..track import Tracker as _Tracker
from .functions import hessian

__all__ = ["Tracker"]


class Tracker(_Tracker):
    """Tracks a PyTorch training loop: ``tracker.step(step)`` after each ``optimizer.step()``.

    The threshold is read from the optimizer at each measurement: its current
    learning rate, the one the next step will use (after ``scheduler.step()``)
    (:func:`pycurv.stability.threshold_from_optimizer`), so learning-rate schedules
    are followed; for Adam/AdamW/RMSprop the operator is preconditioned with the
    optimizer's current state. ``hessian_kwargs`` go to :func:`pycurv.torch.hessian`
    (``dtype``, ``mode``, ``microbatch_size``, ...). The determinism probe runs at
    the first measurement only.
    """

    def __init__(self, model, loss_fn, data, optimizer, *, every: int = 100, tol: float = 1e-3, seed: int = 0,
                 max_matvecs: Optional[int] = None, warn: bool = True, progress: Optional[bool] = None,
                 group: int = 0, **hessian_kwargs):
        super().__init__(every=every, tol=tol, seed=seed, max_matvecs=max_matvecs, warn=warn, progress=progress)
        threshold_from_optimizer(optimizer, group=group)  # fails now, not at the first measurement
        self.model, self.loss_fn, self.data, self.optimizer = model, loss_fn, data, optimizer
        self.group = group
        self.hessian_kwargs = hessian_kwargs
        self._count = 0

    def step(self, step: Optional[int] = None) -> Optional[Record]:
        """Counts a training step (or takes the caller's ``step``) and measures if it is due."""
        if step is None:
            step = self._count
        self._count = step + 1
        return self.measure(step) if self.due(step) else None

    def measure(self, step: int) -> Record:
        """Measures now, whatever the step."""
        t0 = time.perf_counter()
        thr = threshold_from_optimizer(self.optimizer, group=self.group)
        kw = dict(operator_options(thr, self.optimizer))
        kw.setdefault("check_determinism", not self.records)
        kw.update(self.hessian_kwargs)
        op = hessian(self.model, self.loss_fn, self.data, **kw)
        return self.record(op, thr, step, started=t0)
