"""Sharpness during training: every N steps, λ1 against the optimizer's current threshold.

:class:`Tracker` is the framework-agnostic core: give it an operator and a
:class:`pycurv.stability.Threshold` and it measures the top eigenvalue
(warm-started from the previous Ritz vector), records step, learning rate,
value, threshold, margin, products and seconds, warns once when the margin
first exceeds 1, writes CSV/JSON and plots the value against the threshold.

This module knows no framework: ``pycurv.torch.Tracker`` and
``pycurv.jax.Tracker`` subclass :class:`Tracker` and build the operator from
the training loop's objects::

    tracker = pycurv.torch.Tracker(model, loss_fn, (x, y), optimizer, every=50)
    for step in range(1000):
        ...; optimizer.step(); scheduler.step()
        tracker.step(step)               # measures when step % every == 0
    tracker.to_csv("sharpness.csv"); tracker.plot("sharpness.png")

For Adam/AdamW and RMSprop the tracked value is the preconditioned sharpness
λ1(P^{-1/2} H P^{-1/2}) with P from the optimizer's state at that step.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

import numpy as np

from ._progress import measure_top

__all__ = ["Record", "Tracker", "MarginWarning", "operator_options"]

PRECONDITIONED = "preconditioned_sharpness"
_log = logging.getLogger("pycurv")


class MarginWarning(UserWarning):
    """The measured sharpness exceeded the optimizer's stability threshold (margin > 1)."""


@dataclass(frozen=True)
class Record:
    """One measurement.

    Attributes
    ----------
    step : int
        Training step (the caller's count).
    lr : float
        Learning rate η at that step (group 0's for torch).
    value : float
        λ1 of H, or of P^{-1/2} H P^{-1/2} when ``quantity`` is ``"preconditioned_sharpness"``.
    threshold : float
        The optimizer's largest stable value of ``quantity`` at this η.
    margin : float
        value / threshold (stable while <= 1).
    quantity, formula, optimizer : str
        What is bounded, the threshold's closed form (``"2/η"``, ``"38/η"``), the optimizer.
    matvecs : int
        Hessian-vector products the measurement took (the determinism probe's included).
    seconds : float
        Wall time of the measurement.
    converged : bool
        Whether the solver met ``tol``; ``status`` says otherwise why (e.g. ``"noise_floor"``).
    function : str
        The loss that was measured (the operator's ``function``: layer modes, batches).
    """

    step: int
    lr: float
    value: float
    threshold: float
    margin: float
    quantity: str
    formula: str
    optimizer: str
    matvecs: int
    seconds: float
    converged: bool
    status: str
    function: str = ""


_COLUMNS = ("step", "lr", "value", "threshold", "margin", "quantity", "formula", "optimizer", "matvecs", "seconds",
            "converged", "status", "function")


def operator_options(thr, optimizer=None) -> Dict[str, Any]:
    """``hessian()`` keyword arguments that make the operator the one ``thr`` bounds.

    Preconditioned thresholds (Adam, AdamW, RMSprop) need the optimizer as the
    preconditioner; Adam's and RMSprop's coupled ``weight_decay`` is part of the
    gradient P divides, so it enters the operator as ``l2`` (for SGD the
    threshold itself is lowered by it instead; AdamW's decay is decoupled).
    """
    opts: Dict[str, Any] = {}
    if thr.quantity == PRECONDITIONED:
        if optimizer is not None:
            opts["preconditioner"] = optimizer
        if thr.optimizer in ("adam", "rmsprop"):
            wd = float(thr.hyperparameters.get("weight_decay", 0.0) or 0.0)
            if wd:
                opts["l2"] = wd
    return opts


class Tracker:
    """Measures the top eigenvalue every ``every`` steps and keeps the records.

    Parameters
    ----------
    every : int
        Measure when ``step % every == 0``.
    tol : float
        Relative residual tolerance of each measurement (1e-3 gives λ1 to about
        three digits, usually far better: the error is ~tol² λ1 when λ1 is separated).
    seed : int
        Seed of the first start vector; later measurements start from the previous Ritz vector.
    max_matvecs : int, optional
        Budget per measurement.
    warn : bool
        Issue a :class:`MarginWarning`, with what to expect and what to do, each
        time the margin crosses above 1, and again while it stays above 1 each
        time it has doubled since the last warning.
    progress : bool, optional
        Progress line on stderr during long measurements (default: when stderr is a terminal).
        Each measurement is also logged at INFO level to the ``"pycurv"`` logger
        (``logging.basicConfig(level=logging.INFO)`` shows it where there is no terminal).
    """

    def __init__(self, *, every: int = 100, tol: float = 1e-3, seed: int = 0, max_matvecs: Optional[int] = None,
                 warn: bool = True, progress: Optional[bool] = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got every={every!r}")
        self.every = every
        self.tol = tol
        self.seed = seed
        self.max_matvecs = max_matvecs
        self.warn = warn
        self.progress = progress
        self.records: List[Record] = []
        self._v0: Optional[np.ndarray] = None
        self._warned_margin = math.inf  # margin of the last warning while above 1 (inf: not above 1)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def record(self, op, thr, step: int, *, started: Optional[float] = None) -> Record:
        """Measures ``op``'s top eigenvalue, compares it with ``thr`` and appends a :class:`Record`."""
        from .stability import margin_report

        t0 = time.perf_counter() if started is None else started
        hvps0 = getattr(op, "n_hvps", 0)
        v0 = self._v0 if self._v0 is not None and self._v0.shape == (op.shape[0],) else None
        res = measure_top(op, tol=self.tol, seed=self.seed, v0=v0, max_matvecs=self.max_matvecs,
                          progress=self.progress, label=f"step {step}: λ1")
        value = float(res.eigenvalues[0])
        function = str(getattr(op, "function", ""))
        rep = margin_report(value, thr, function=function)
        matvecs = getattr(op, "n_hvps", hvps0 + res.n_matvecs) - hvps0
        rec = Record(step=int(step), lr=float(thr.lr), value=value, threshold=float(rep.threshold),
                     margin=float(rep.margin), quantity=rep.quantity, formula=thr.formula, optimizer=thr.optimizer,
                     matvecs=int(matvecs), seconds=time.perf_counter() - t0, converged=bool(res.converged),
                     status=res.status, function=function)
        self.records.append(rec)
        if res.eigenvectors is not None:
            self._v0 = np.array(res.eigenvectors[:, 0])
        _log.info("step %d: %s (%d HVPs, %.2f s%s)", rec.step, rep.text, rec.matvecs, rec.seconds,
                  "" if rec.converged else f", {rec.status}")
        if not rec.margin > 1.0:
            self._warned_margin = math.inf
        elif self._warned_margin == math.inf or rec.margin >= 2.0 * self._warned_margin:
            # Each crossing warns, and a margin that keeps growing warns again: a run that recovers
            # from an early excess (Adam's, typically) is still told when it becomes unstable later.
            self._warned_margin = rec.margin
            if self.warn:
                warnings.warn(MarginWarning(f"step {rec.step}: {rep.text} — past the stability threshold. "
                                            f"{rep.advice}"), stacklevel=3)
        return rec

    # -- output ------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def columns(self) -> Dict[str, list]:
        """The records as columns: ``{"step": [...], "lr": [...], "value": [...], ...}``."""
        return {c: [getattr(r, c) for r in self.records] for c in _COLUMNS}

    def to_csv(self, path) -> None:
        """One row per measurement, a header with the :class:`Record` field names (UTF-8)."""
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(_COLUMNS)
            for r in self.records:
                w.writerow([repr(v) if isinstance(v, float) else v for v in (getattr(r, c) for c in _COLUMNS)])

    def to_json(self, path) -> None:
        """``{"records": [{field: value, ...}, ...]}``, strict JSON (non-finite numbers as null)."""
        rows = [{k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in asdict(r).items()}
                for r in self.records]
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"records": rows}, fh, indent=1, allow_nan=False, ensure_ascii=False)
            fh.write("\n")

    def plot(self, path=None, *, ax=None, title: Optional[str] = None, log: Optional[bool] = None):
        """λ1 (or the preconditioned λ1) against the threshold over the steps; needs matplotlib.

        Draws into ``ax`` if given, else a new figure; saves to ``path`` if given.
        The threshold is drawn as the steps it takes (it moves with the learning
        rate). ``log=None`` uses a log value axis when the values and thresholds
        span more than two decades; ``title`` defaults to what is plotted and on
        which loss. Returns the matplotlib Figure.
        """
        from ._optional import require

        require("matplotlib", "Tracker.plot")
        from matplotlib.figure import Figure

        if ax is None:
            fig = Figure(figsize=(6.4, 4.0), layout="constrained")
            ax = fig.add_subplot()
        else:
            fig = ax.figure
        cols = self.columns()
        steps = cols["step"]
        quantity = cols["quantity"][-1] if steps else "sharpness"
        label = "preconditioned sharpness λ1(P⁻¹H)" if quantity == PRECONDITIONED else "sharpness λ1"
        formula = cols["formula"][-1] if steps else "threshold"
        ax.plot(steps, cols["value"], "o-", ms=3, lw=1.2, color="C0", label=label)
        ax.plot(steps, cols["threshold"], "--", lw=1.2, color="C3", drawstyle="steps-post",
                label=f"stability threshold {formula}")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if log is None:
            shown = np.array([v for v in cols["value"] + cols["threshold"] if math.isfinite(v) and v > 0])
            log = shown.size > 0 and len(shown) == len(cols["value"]) + len(cols["threshold"]) and (
                shown.max() > 100.0 * shown.min())
        if log:
            ax.set_yscale("log")
        ax.legend(loc="best", fontsize="small")
        if title is None and steps:
            optimizer = cols["optimizer"][-1]
            loss = cols["function"][-1].split(":")[0].split(";")[0]
            title = f"{label.split(' λ')[0]} against {formula}, {optimizer}" + (f" ({loss})" if loss else "")
        if title:
            ax.set_title(title)
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig
