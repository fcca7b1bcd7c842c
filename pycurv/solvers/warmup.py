"""Warmup timing: when a linear warmup crosses the critical learning rate, T_reach and T_save.

Kalra & Barkeshli 2024, §6.1. A linear warmup η_t = η_init + (η_trgt − η_init)·t/T_wrm
first exceeds the critical learning rate η_c (2/λ0 for GD at initial sharpness λ0;
:func:`pycurv.stability.max_stable_lr` for other optimizers, or
:func:`pycurv.solvers.critical_lr` from forward passes) at step
⌈T_wrm (η_c − η_init)/(η_trgt − η_init)⌉: before it warmup does nothing for stability.

Starting instead at η_init = η_c with the paper's schedule η_t = η_c + η_trgt·t/T_wrm
reaches η_trgt after T_reach = T_wrm (1 − η_c/η_trgt) steps (1 step when η_c ≥ η_trgt),
saving T_wrm − T_reach steps; the search costs T_fp forward passes, about T_fp/2
training steps, so the net saving is T_save = T_wrm·η_c/η_trgt − T_fp/2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._checks import as_real, check_lr

__all__ = ["WarmupTiming", "warmup_timing", "linear_warmup_crossing"]


@dataclass(frozen=True)
class WarmupTiming:
    """Warmup timing for one (η_c, η_trgt, T_wrm).

    Attributes
    ----------
    lr_critical, lr_target, lr_init : float
        η_c, η_trgt and the start of the plain linear warmup.
    warmup_steps : float
        T_wrm.
    crossing_step : float
        First step at which the plain linear warmup's η_t ≥ η_c (0 if it starts above;
        ``inf`` if η_trgt < η_c, never crossing).
    t_reach : float
        Steps to reach η_trgt when starting at η_c: max(T_wrm (1 − η_c/η_trgt), 1).
    steps_saved : float
        T_wrm − t_reach.
    t_save : float
        Net saving, steps_saved − T_fp/2.
    forward_passes : int
        T_fp, the forward passes spent estimating η_c.
    """

    lr_critical: float
    lr_target: float
    lr_init: float
    warmup_steps: float
    crossing_step: float
    t_reach: float
    steps_saved: float
    t_save: float
    forward_passes: int


def linear_warmup_crossing(lr_critical, lr_target, warmup_steps, *, lr_init=0.0) -> float:
    """First step t with η_init + (η_trgt − η_init)·t/T ≥ η_c; 0 if η_init ≥ η_c, inf if η_trgt < η_c."""
    eta_c = check_lr(lr_critical, "lr_critical")
    eta_t = check_lr(lr_target, "lr_target")
    t_wrm = as_real("warmup_steps", warmup_steps)
    if t_wrm <= 0:
        raise ValueError(f"warmup_steps must be > 0, got warmup_steps={warmup_steps!r}")
    eta_0 = as_real("lr_init", lr_init)
    if not 0 <= eta_0 <= eta_t:
        raise ValueError(f"lr_init must satisfy 0 <= lr_init <= lr_target, got lr_init={eta_0!r}, "
                         f"lr_target={eta_t!r}")
    if eta_c <= eta_0:
        return 0.0
    if eta_c > eta_t:
        return math.inf
    exact = t_wrm * (eta_c - eta_0) / (eta_t - eta_0)
    # Guard the ceiling against a product that lands a rounding error above an integer.
    t = math.ceil(exact - 1e-9 * max(1.0, exact))
    return float(t)


def warmup_timing(lr_critical, lr_target, warmup_steps, *, lr_init=0.0, forward_passes: int = 10) -> WarmupTiming:
    """Crossing step of a plain linear warmup, and T_reach, T_save of starting at η_c (§6.1).

    ``forward_passes`` is T_fp (about 10 in the paper; a :class:`CriticalLR` reports
    its ``n_evals``).
    """
    crossing = linear_warmup_crossing(lr_critical, lr_target, warmup_steps, lr_init=lr_init)
    eta_c, eta_t = float(lr_critical), float(lr_target)
    t_wrm = float(warmup_steps)
    if isinstance(forward_passes, bool) or int(forward_passes) != forward_passes or forward_passes < 0:
        raise ValueError(f"forward_passes must be an integer >= 0, got forward_passes={forward_passes!r}")
    t_reach = max(t_wrm * (1.0 - eta_c / eta_t), 1.0)
    saved = t_wrm - t_reach
    return WarmupTiming(lr_critical=eta_c, lr_target=eta_t, lr_init=float(lr_init), warmup_steps=t_wrm,
                        crossing_step=crossing, t_reach=t_reach, steps_saved=saved,
                        t_save=saved - int(forward_passes) / 2.0, forward_passes=int(forward_passes))
