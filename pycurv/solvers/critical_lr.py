"""The critical learning rate from forward passes only (Kalra & Barkeshli 2024, App. B.2, Alg. 1–2).

``step_loss(lr)`` returns the loss L(θ1) after one optimizer step from the same
start θ0 at learning rate ``lr`` (restore θ0 and the optimizer state between calls;
no gradients beyond that one step are needed). The loss *increases* at ``lr`` when
L(θ1) ≥ L(θ0) or L(θ1) is not finite.

1. Exponential search (Alg. 1): from ``lr0`` multiply by ``factor`` (2 in the paper)
   until the loss increases, or until ``lr_target`` is reached (then the search
   stops there, ``capped=True``). This gives [η_lwr, η_uppr] with the loss
   decreasing at η_lwr and increasing at η_uppr.
2. Bisection (Alg. 2): while L(θ1) at η_uppr exceeds L(θ0)(1 + δ), evaluate the
   midpoint; a decrease moves η_lwr up, anything else moves η_uppr down. The
   estimate is η_c = η_uppr, a learning rate at which the loss rises by less than
   the fraction δ (0.1 in the paper; ~0.01 for Adam).

One deviation: when the loss already increases at ``lr0`` the paper stops and
returns ``lr0``; here the search continues downward (dividing by ``factor``) until
the loss decreases, so the bracket always holds a decrease below an increase.

On a quadratic ½λθ² with θ0 ≠ 0 and GD, the loss increases iff η > 2/λ, and the
estimate lies in [2/λ, (1 + √(1 + δ))/λ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .._checks import as_real, check_int, check_lr
from ..errors import NoConvergence

__all__ = ["CriticalLR", "critical_lr", "exponential_search", "bisect_critical_lr"]

StepLoss = Callable[[float], float]


@dataclass(frozen=True)
class CriticalLR:
    """Result of the critical-learning-rate search.

    Attributes
    ----------
    lr : float
        The estimate η_c (= ``upper``).
    lower, upper : float
        Final bracket: the loss decreased at ``lower``; at ``upper`` it increased by less
        than δ (both are ``lr_target`` when ``capped``).
    loss0 : float
        L(θ0).
    loss : float
        L(θ1) at ``lr``.
    n_evals : int
        Calls of ``step_loss`` (forward passes; L(θ0) included when it was computed).
    capped : bool
        The loss never increased up to ``lr_target``: the estimate is ``lr_target``.
    history : tuple
        Every (lr, loss) evaluated, in order.
    """

    lr: float
    lower: float
    upper: float
    loss0: float
    loss: float
    n_evals: int
    capped: bool
    history: tuple


def _increased(loss: float, loss0: float) -> bool:
    return not math.isfinite(loss) or loss >= loss0


class _Search:
    """Shared state of one search: the callable, L(θ0), every evaluation, the budget."""

    def __init__(self, step_loss, loss0, max_evals):
        if not callable(step_loss):
            raise TypeError(f"step_loss must be a callable lr -> loss, got {type(step_loss).__name__}")
        self.fn = step_loss
        self.max_evals = check_int("max_evals", max_evals)
        if self.max_evals < 1:
            raise ValueError(f"max_evals must be >= 1, got max_evals={self.max_evals}")
        self.history: list = []
        if loss0 is None:
            loss0 = self.loss(0.0)
        loss0 = as_real("loss0", loss0)
        if loss0 <= 0:
            raise ValueError(f"the loss at θ0 must be > 0 for the test L(θ1) < L(θ0)(1 + δ), got loss0={loss0!r}")
        self.loss0 = loss0

    def loss(self, lr: float, what: str = "search", partial=None) -> float:
        if len(self.history) >= self.max_evals:
            raise NoConvergence(f"{what} used max_evals={self.max_evals} loss evaluations without finishing",
                                partial)
        value = float(self.fn(lr))
        self.history.append((lr, value))
        return value

    def result(self, lr, lower, upper, loss, capped=False) -> CriticalLR:
        return CriticalLR(lr, lower, upper, self.loss0, loss, len(self.history), capped, tuple(self.history))


def _check_factor(factor) -> float:
    factor = as_real("factor", factor)
    if factor <= 1:
        raise ValueError(f"factor must be > 1, got factor={factor!r}")
    return factor


def _check_delta(delta) -> float:
    delta = as_real("delta", delta)
    if delta <= 0:
        raise ValueError(f"delta must be > 0, got delta={delta!r}")
    return delta


def _exponential(search: _Search, lr: float, factor: float, target) -> CriticalLR:
    loss0 = search.loss0
    if target is not None and lr > target:
        lr = target
    loss = search.loss(lr, "exponential search")
    if _increased(loss, loss0):
        # Increase already at lr0: walk down until the loss decreases.
        upper, loss_upper = lr, loss
        while True:
            lr = lr / factor
            loss = search.loss(lr, "exponential search (downward)")
            if not _increased(loss, loss0):
                return search.result(upper, lr, upper, loss_upper)
            upper, loss_upper = lr, loss
    while True:
        if target is not None and lr >= target:
            # The loss still decreases at the target: no catapult below it (Alg. 1, lines 8-10).
            return search.result(target, target, target, loss, capped=True)
        lower = lr
        lr = lr * factor
        if target is not None and lr > target:
            lr = target
        loss = search.loss(lr, "exponential search")
        if _increased(loss, loss0):
            return search.result(lr, lower, lr, loss)


def _bisect(search: _Search, lower: float, upper: float, l_up: float, delta: float) -> CriticalLR:
    limit = search.loss0 * (1.0 + delta)
    while not l_up < limit:  # NaN or too large: keep bisecting
        partial = search.result(upper, lower, upper, l_up)
        mid = 0.5 * (lower + upper)
        if not lower < mid < upper:
            raise NoConvergence("bisection reached adjacent floats without meeting the tolerance: "
                                "the loss jumps at the critical learning rate; increase delta", partial)
        l_mid = search.loss(mid, "bisection", partial)
        if not _increased(l_mid, search.loss0):
            lower = mid
        else:
            upper, l_up = mid, l_mid
    return search.result(upper, lower, upper, l_up)


def exponential_search(step_loss: StepLoss, *, lr0=1e-4, factor=2.0, lr_target=None, loss0=None,
                       max_evals: int = 200) -> CriticalLR:
    """Algorithm 1: a bracket [lower, upper] with a loss decrease at lower and an increase at upper.

    ``loss0`` defaults to ``step_loss(0.0)`` (one step at η = 0 leaves θ0 unchanged).
    The result's ``lr`` is ``upper``; ``capped`` when ``lr_target`` was reached first.
    """
    lr = check_lr(lr0, "lr0")
    factor = _check_factor(factor)
    target = None if lr_target is None else check_lr(lr_target, "lr_target")
    return _exponential(_Search(step_loss, loss0, max_evals), lr, factor, target)


def bisect_critical_lr(step_loss: StepLoss, lower, upper, *, delta=0.1, loss0=None, loss_upper=None,
                       max_evals: int = 200) -> CriticalLR:
    """Algorithm 2: shrink [lower, upper] until L(θ1) at upper is below L(θ0)(1 + δ); return upper."""
    lower = check_lr(lower, "lower")
    upper = check_lr(upper, "upper")
    if not lower < upper:
        raise ValueError(f"need lower < upper, got lower={lower!r}, upper={upper!r}")
    delta = _check_delta(delta)
    search = _Search(step_loss, loss0, max_evals)
    l_up = search.loss(upper, "bisection") if loss_upper is None else float(loss_upper)
    return _bisect(search, lower, upper, l_up, delta)


def critical_lr(step_loss: StepLoss, *, lr0=1e-4, factor=2.0, delta=0.1, lr_target=None,
                loss0=None, max_evals: int = 200) -> CriticalLR:
    """Estimate the critical learning rate η_c from forward passes (Algorithm 1, then Algorithm 2).

    Parameters
    ----------
    step_loss : callable
        ``step_loss(lr) -> float``: the loss after one optimizer step from θ0 at ``lr``.
    lr0 : float
        Initial guess (1e-4 in the paper).
    factor : float
        Growth factor of the exponential search (2 in the paper).
    delta : float
        Tolerance δ > 0: the estimate raises the loss by less than a fraction δ.
    lr_target : float, optional
        Stop the exponential search here (the warmup's target learning rate).
    loss0 : float, optional
        L(θ0) if already known (saves one evaluation), else ``step_loss(0.0)``.
    max_evals : int
        Bound on the loss evaluations; :class:`pycurv.NoConvergence` past it.

    Returns
    -------
    CriticalLR
    """
    lr = check_lr(lr0, "lr0")
    factor = _check_factor(factor)
    delta = _check_delta(delta)
    target = None if lr_target is None else check_lr(lr_target, "lr_target")
    search = _Search(step_loss, loss0, max_evals)
    first = _exponential(search, lr, factor, target)
    if first.capped:
        return first
    return _bisect(search, first.lower, first.upper, first.loss, delta)
