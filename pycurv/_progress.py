"""A one-line progress display on stderr for long measurements, and the measurement itself.

The line appears only when stderr is a terminal and the measurement has run for
more than ``delay`` seconds, so scripts, pipes, CI logs and tests see nothing.
Where there is no terminal, long measurements report to the ``"pycurv"`` logger
at INFO level instead (every ``log_every`` seconds), with the target tolerance:
``logging.basicConfig(level=logging.INFO)`` shows them in a batch job's log.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Optional

from ._adapter import default_tol


class Progress:
    """``callback`` for :func:`pycurv.lanczos` that redraws one stderr line.

    Parameters
    ----------
    label : str
        What is measured (e.g. ``"sharpness"``).
    enabled : bool, optional
        Default: ``sys.stderr.isatty()``.
    delay : float
        Seconds before the line is first drawn.
    tol : float, optional
        The tolerance the residual must reach, shown beside it.
    log_every : float
        Seconds between INFO records to the ``"pycurv"`` logger when the line is not drawn.
    """

    def __init__(self, label: str = "sharpness", *, enabled: Optional[bool] = None, delay: float = 1.0,
                 stream=None, tol: Optional[float] = None, log_every: float = 10.0):
        self.stream = sys.stderr if stream is None else stream
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.tol = tol
        self.log_every = log_every
        self._logger = logging.getLogger("pycurv")
        self.label = label
        self.delay = delay
        self._t0 = time.perf_counter()
        self._logged = self._t0
        self._drawn = False
        self._last = 0.0

    @property
    def wanted(self) -> bool:
        """Whether a callback is needed at all: a terminal to draw on, or a logger listening at INFO."""
        return self.enabled or self._logger.isEnabledFor(logging.INFO)

    def _line(self, info, now: float) -> str:
        val = info.eigenvalues[0] if len(info.eigenvalues) else float("nan")
        res = info.residual_norms[0] if len(info.residual_norms) else float("nan")
        rel = res / abs(val) if val else float("nan")
        target = f" (tol {self.tol:.1e})" if self.tol is not None else ""
        return f"{self.label}: {val:.6g}  residual {rel:.1e}{target}  {info.n_matvecs} HVPs  {now - self._t0:.0f}s"

    def __call__(self, info) -> None:
        now = time.perf_counter()
        if now - self._t0 < self.delay:
            return None
        if not self.enabled:
            if now - self._logged >= self.log_every and self._logger.isEnabledFor(logging.INFO):
                self._logged = now
                self._logger.info(self._line(info, now))
            return None
        if now - self._last < 0.1:
            return None
        self._last = now
        self.stream.write(f"\r{self._line(info, now)} ")
        self.stream.flush()
        self._drawn = True
        return None

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False


def measure_top(op, *, tol=None, seed=0, v0=None, max_matvecs=None, progress=None, which: str = "LA",
                label: str = "sharpness", k: int = 1, criterion: str = "residual"):
    """One Lanczos solve for the top (``which="LA"``) or bottom k eigenpairs of an adapter operator (k=1 default).

    ``tol=None`` picks :func:`pycurv._adapter.default_tol` of the operator's dtype.
    Never warns: the result's ``converged``/``status`` say how it ended.
    """
    from .errors import ConvergenceWarning
    from .lanczos import lanczos

    if tol is None:
        tol = default_tol(op.dtype)
    bar = Progress(label, enabled=progress, tol=tol)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return lanczos(op, k, which=which, tol=tol, seed=seed, v0=v0, max_matvecs=max_matvecs,
                           callback=bar if bar.wanted else None, criterion=criterion)
    finally:
        bar.close()
