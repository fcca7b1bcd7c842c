"""Persistent catapult warmup (Kalra & Barkeshli 2024, §7 and App. C, Alg. 3) as a schedule object.

Instead of a warmup of fixed length, the learning rate is raised by catapults:

1. At a stable reference point θ* (at first the initialisation) estimate the
   critical learning rate with forward passes (Alg. 1–2, :func:`critical_lr`) and
   set η ← η_uppr, which is just past it: the loss spikes and the sharpness falls.
2. Train at that η until the loss drops below L(θ*); that point becomes the new
   reference, and step 1 repeats.
3. Stop once η reaches the target η_trgt; from then on the schedule returns η_trgt.

Re-estimates start their exponential search at the current η (the paper does not
fix the initial guess after the first one; the current η is the natural one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from .._checks import as_real, check_int, check_lr
from .critical_lr import CriticalLR, critical_lr

__all__ = ["PersistentCatapultWarmup", "CatapultEvent"]


@dataclass(frozen=True)
class CatapultEvent:
    """One re-estimate: at ``step`` the loss ``loss`` fell below the reference ``reference_loss``
    (the first event is the initialisation), the search gave ``estimate`` and the learning rate
    became ``lr``."""

    step: int
    loss: float
    reference_loss: float
    lr: float
    estimate: CriticalLR


class PersistentCatapultWarmup:
    """Algorithm 3 of Kalra & Barkeshli (2024) as a learning-rate schedule.

    Parameters
    ----------
    lr_target : float
        The target learning rate η_trgt.
    delta : float
        Tolerance δ of the critical-learning-rate search (0.1 in the paper; ~0.01 for Adam).
    lr0 : float
        Initial guess of the first search (1e-4 in the paper).
    factor : float
        Growth factor of the exponential search.
    max_evals : int
        Forward passes allowed per search.

    Notes
    -----
    Call :meth:`step` once per training step, before the optimizer step::

        sched = PersistentCatapultWarmup(lr_target=0.5)
        for batch in data:
            loss = loss_fn(params, batch)                 # L(θ_t)
            lr = sched.step(loss, lambda eta: loss_after_one_step(params, batch, eta))
            params = update(params, batch, lr)

    ``probe(eta)`` returns the loss after one step from the current parameters at
    ``eta`` without changing them; it is called only when a re-estimate is due.
    """

    def __init__(self, lr_target, *, delta=0.1, lr0=1e-4, factor=2.0, max_evals: int = 100):
        self.lr_target = check_lr(lr_target, "lr_target")
        self.delta = as_real("delta", delta)
        if self.delta <= 0:
            raise ValueError(f"delta must be > 0, got delta={delta!r}")
        self.lr0 = check_lr(lr0, "lr0")
        self.factor = as_real("factor", factor)
        if self.factor <= 1:
            raise ValueError(f"factor must be > 1, got factor={factor!r}")
        self.max_evals = check_int("max_evals", max_evals)
        self._lr: Optional[float] = None
        self._reference: Optional[float] = None
        self._t = 0
        self.events: list[CatapultEvent] = []

    @property
    def lr(self) -> Optional[float]:
        """The current learning rate (None before the first :meth:`step`)."""
        return self._lr

    @property
    def reference_loss(self) -> Optional[float]:
        """L(θ*) of the current reference point."""
        return self._reference

    @property
    def done(self) -> bool:
        """True once the target learning rate is reached."""
        return self._lr is not None and self._lr >= self.lr_target

    @property
    def forward_passes(self) -> int:
        """Loss evaluations spent on searches so far."""
        return sum(e.estimate.n_evals for e in self.events)

    def step(self, loss, probe: Callable[[float], float]) -> float:
        """The learning rate for the current step, given the current loss L(θ_t) and a probe."""
        loss = float(loss)
        t = self._t
        self._t += 1
        if self.done:
            return self.lr_target
        if self._reference is None or (math.isfinite(loss) and loss < self._reference):
            start = self.lr0 if self._lr is None else self._lr
            est = critical_lr(probe, lr0=start, factor=self.factor, delta=self.delta,
                              lr_target=self.lr_target, loss0=loss, max_evals=self.max_evals)
            self._lr = min(est.upper, self.lr_target)
            self.events.append(CatapultEvent(t, loss, loss if self._reference is None else self._reference,
                                             self._lr, est))
            self._reference = loss
        return self._lr

    def __repr__(self) -> str:
        return (f"PersistentCatapultWarmup(lr_target={self.lr_target:g}, delta={self.delta:g}, "
                f"lr={self._lr!r}, catapults={len(self.events)})")
