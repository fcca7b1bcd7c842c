"""How close a measured sharpness is to its stability threshold: "λ1 is at 0.93 of 2/η"."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .._checks import as_real
from .quadratic import SHARPNESS, Threshold

__all__ = ["MarginReport", "margin_report", "unstable_advice", "format_number"]


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
    function : str
        The loss whose curvature was measured (e.g. ``"training loss: 2 normalisation
        layers use each batch's statistics, dropout off; 1 batch, 64 samples"``), or ``""``.
    advice : str
        Past the threshold: what to expect and what to do (the largest stable
        learning rate, warmup, GI-Adam for Adam); ``""`` while stable.
    top_k : tuple of float
        The k largest eigenvalues (λ1, ..., λk) of the same operator, descending,
        when the report was measured with ``k >= 2``; ``()`` otherwise.
        :attr:`ratios` are λi/λ1 (Gilmer et al. 2022, §7, on improving λk/λ1).
    """

    value: float
    threshold: float
    margin: float
    stable: bool
    quantity: str
    text: str
    function: str = ""
    advice: str = ""
    top_k: tuple = ()

    @property
    def ratios(self) -> tuple:
        """λi/λ1 for the values in ``top_k`` (``()`` without them; NaN when λ1 = 0)."""
        if not self.top_k:
            return ()
        first = self.top_k[0]
        return tuple(v / first if first != 0 else math.nan for v in self.top_k)

    def __str__(self) -> str:
        lines = [self.text]
        if len(self.top_k) >= 2:
            lines.append("top " + str(len(self.top_k)) + ": " + ", ".join(
                f"λ{i + 1} = {format_number(v)}" + ("" if i == 0 else f" ({r:.3g} λ1)")
                for i, (v, r) in enumerate(zip(self.top_k, self.ratios))))
        if self.function:
            lines.append(f"measured on the {self.function}")
        if self.advice:
            lines.append(self.advice)
        return "\n".join(lines)


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


def margin_report(value, thr, *, function: str = "", top_k=()) -> MarginReport:
    """Compare a measured sharpness with a :class:`Threshold` (or a plain threshold number).

    ``margin = value / threshold``; ``stable`` is ``margin <= 1``. For Adam, AdamW and
    RMSprop ``value`` must be the preconditioned sharpness λ1(P^{-1/2} H P^{-1/2})
    (``thr.quantity`` says which), and the text names it:
    ``"preconditioned sharpness λ1(P⁻¹H) = 3.62e+04 is at 0.95 of 38/η = 38000"``.
    ``function`` names the loss that was measured; past the threshold ``advice``
    says what to expect and what to do (:func:`unstable_advice`). ``top_k``, the k
    largest eigenvalues of the same operator (descending, ``value`` first), is
    kept with their ratios λi/λ1.
    """
    value = as_real("value", value)
    top_k = tuple(as_real("top_k", v) for v in top_k)
    if top_k and (top_k[0] != value or any(b > a for a, b in zip(top_k, top_k[1:]))):
        raise ValueError(f"top_k must be descending and start with value={value!r}, got top_k={top_k!r}")
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
    advice = unstable_advice(value, thr) if margin > 1.0 and isinstance(thr, Threshold) else ""
    return MarginReport(value=value, threshold=limit, margin=margin, stable=bool(margin <= 1.0),
                        quantity=quantity, text=text, function=str(function), advice=advice, top_k=top_k)


def unstable_advice(value: float, thr: Threshold) -> str:
    """What a value past ``thr`` means for training, and what to change; ``""`` if it is not past it.

    Past the threshold the quadratic model diverges, but a network need not: the
    step grows the loss along the top eigenvector until the curvature falls (a
    catapult; Kalra & Barkeshli 2024, §4), or training fails. For Adam the
    preconditioned sharpness often starts at 1e5 to 1e6 and falls during early
    training (their §4.3); warmup (their §6.1) and initialising the second
    moment with the first gradient squared (GI-Adam, their §6.2, which divides
    the initial λ1(P⁻¹H) by about 1/√(1 − β2)) keep it below.
    """
    value = as_real("value", value)
    if not value > thr.max_stable_sharpness:
        return ""
    lr = float(thr.lr)
    try:
        lr_c = float(thr.max_stable_lr(value))
    except ValueError:  # no stable learning rate at this value (e.g. weight decay past it)
        lr_c = math.nan
    fix = []
    if math.isfinite(lr_c) and lr_c > 0:
        fix.append(f"lower the learning rate to ≤ {format_number(lr_c)}")
        fix.append(f"or warm up from {format_number(lr_c)} to {format_number(lr)}: a linear warmup over T steps "
                   f"then reaches {format_number(lr)} after T·(1 − {format_number(lr_c / lr)}) steps while the "
                   "curvature comes down (Kalra & Barkeshli 2024, §6.1; pycurv.solvers.warmup_timing)")
    if thr.quantity == SHARPNESS:
        expect = ("Expect the loss to grow along the top eigenvector: training either catapults (the loss spikes, "
                  "λ1 falls below the threshold and training goes on) or diverges (Gilmer et al. 2022; "
                  "Kalra & Barkeshli 2024, §4).")
    else:
        name = {"adam": "Adam", "adamw": "AdamW"}.get(thr.optimizer, "RMSprop")
        expect = (f"{name} need not diverge past its threshold: it catapults, the loss spiking while the second "
                  "moment grows and λ1(P⁻¹H) falls (Kalra & Barkeshli 2024, §4.3). Early in training λ1(P⁻¹H) "
                  "often starts at 1e5 to 1e6 and comes down; a large excess can still end in a training failure.")
        if thr.optimizer in ("adam", "adamw"):
            b2 = float(thr.hyperparameters.get("beta2", 0.999))
            fix.append(f"or initialise the second moment with the first gradient squared (GI-Adam, their §6.2: "
                       f"pycurv.torch.init_adam_from_gradients), which lowers the initial λ1(P⁻¹H) by about "
                       f"1/√(1 − β2) = {format_number(1.0 / math.sqrt(1.0 - b2))}")
    todo = ("To stay below it: " + "; ".join(fix) + ".") if fix else ""
    return (expect + " " + todo).strip()
