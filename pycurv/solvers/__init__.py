"""Solvers for practice: the critical learning rate from forward passes, catapult warmup,
warmup timing, and margins against a threshold.

- :func:`critical_lr` — Kalra & Barkeshli 2024, Alg. 1–2 (exponential search, then bisection).
- :class:`PersistentCatapultWarmup` — their Alg. 3, as a schedule object.
- :func:`warmup_timing` — when a linear warmup crosses η_c; T_reach and T_save (§6.1).
- :func:`margin_report` — "λ1 = 19.7 is at 0.99 of 2/η = 20" (also in :mod:`pycurv.stability`).
"""

from __future__ import annotations

from ..stability.margin import MarginReport, margin_report
from .catapult import CatapultEvent, PersistentCatapultWarmup
from .critical_lr import CriticalLR, bisect_critical_lr, critical_lr, exponential_search
from .warmup import WarmupTiming, linear_warmup_crossing, warmup_timing

__all__ = [
    # critical learning rate
    "CriticalLR",
    "critical_lr",
    "exponential_search",
    "bisect_critical_lr",
    # warmup
    "PersistentCatapultWarmup",
    "CatapultEvent",
    "WarmupTiming",
    "warmup_timing",
    "linear_warmup_crossing",
    # margins
    "MarginReport",
    "margin_report",
]
