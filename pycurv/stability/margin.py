"""How close a measured sharpness is to its stability threshold: "λ1 is at 0.93 of 2/η"."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .._checks import as_real
from .quadratic import SHARPNESS, Threshold

__all__ = ["MarginReport", "margin_report", "format_number"]


@dataclass(frozen=True)
class MarginReport:
    """A measured value against its threshold.

    Attributes
    ----------
    value : float
        The measured sharpness (or preconditioned sharpness).
    threshold : float
        Its largest stable value.
    margin : float
        value / threshold: below 1 is stable, 1 is the edge, above 1 is unstable
        (``inf`` when the threshold is ≤ 0, i.e. nothing is stable).
    stable : bool
        ``margin <= 1``.
    quantity : str
        ``"sharpness"`` or ``"preconditioned_sharpness"``.
    text : str
        One line, e.g. ``"λ1 = 19.7 is at 0.99 of 2/η = 20"``.
    """

    value: float
    threshold: float
    margin: float
    stable: bool
    quantity: str
    text: str

    def __str__(self) -> str:
        return self.text


def format_number(x: float) -> str:
    """Three significant digits, positional between 1e-4 and 1e7 (``38000``, ``19.7``, ``0.0123``)."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    if 1e-4 <= abs(x) < 1e7:
        return np.format_float_positional(x, precision=3, unique=False, fractional=False, trim="-")
    return f"{x:.3g}"


def _format_margin(margin: float) -> str:
    text = f"{margin:.2f}"
    if text == "1.00" and margin != 1.0:
        # Do not print "1.00" for a value just past (or just short of) the edge.
        text = f"{margin:.4f}"
    return text


def margin_report(value, thr) -> MarginReport:
    """Compare a measured sharpness with a :class:`Threshold` (or a plain threshold number).

    ``margin = value / threshold``; ``stable`` is ``margin <= 1``. For Adam, AdamW and
    RMSprop ``value`` must be the preconditioned sharpness λ1(P^{-1/2} H P^{-1/2})
    (``thr.quantity`` says which), and the text names it:
    ``"preconditioned sharpness λ1(P⁻¹H) = 3.62e+04 is at 0.95 of 38/η = 38000"``.
    """
    value = as_real("value", value)
    if isinstance(thr, Threshold):
        limit, quantity = thr.max_stable_sharpness, thr.quantity
        label = f"{thr.formula} = {format_number(limit)}"
        name = thr.symbol if quantity == SHARPNESS else f"preconditioned sharpness {thr.symbol}"
    else:
        limit, quantity = as_real("threshold", thr), SHARPNESS
        label = f"the threshold {format_number(limit)}"
        name = "λ1"
    margin = value / limit if limit > 0 else math.inf
    text = f"{name} = {format_number(value)} is at {_format_margin(margin)} of {label}"
    return MarginReport(value=value, threshold=limit, margin=margin, stable=bool(margin <= 1.0),
                        quantity=quantity, text=text)
