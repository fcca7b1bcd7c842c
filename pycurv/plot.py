"""Plots (``pip install 'pycurv[plot]'``): the stability region and NQM batch-size scaling.

matplotlib is imported when a function here is called, never at ``import pycurv``;
figures are built with ``matplotlib.figure.Figure`` (no pyplot, no global state),
so they work without a display.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from ._optional import require

__all__ = ["plot_stability_region", "plot_nqm_scaling", "save_figure"]


def _figure(ax):
    require("matplotlib", "plotting")
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.2), layout="constrained")
    return fig, fig.add_subplot()


def plot_stability_region(optimizer: str, *, lr=None, sharpness=None, lr_range=None, noise=None, ax=None,
                          **hyperparameters):
    """The stable region of an optimizer in the (η, λ1) plane, with a measured point.

    The boundary is the closed form λ1 = A/η − B of :func:`pycurv.stability.threshold`
    (λ1 of P^{-1/2} H P^{-1/2} for Adam/AdamW/RMSprop); below it is stable. ``noise``
    = (batch_size, dataset_size, curvature_variance) adds SGD's minibatch
    mean-square bound. The point (``lr``, ``sharpness``) is drawn when both are
    given, green when stable and red when not. Returns the matplotlib Figure.
    """
    from .stability import max_stable_lr, noisy_sgd_sharpness_range, threshold

    fig, ax = _figure(ax)
    if lr_range is not None:
        lo, hi = (float(x) for x in lr_range)
    else:
        centre = lr
        if centre is None and sharpness is not None and sharpness > 0:
            centre = max_stable_lr(optimizer, sharpness, **hyperparameters)
        if centre is None:
            centre = 1e-3 if optimizer.lower() in ("adam", "adamw") else 0.1
        lo, hi = centre / 30.0, centre * 30.0
    lrs = np.geomspace(lo, hi, 200)
    bounds = np.array([threshold(optimizer, x, **hyperparameters).max_stable_sharpness for x in lrs])
    thr = threshold(optimizer, lrs[0], **hyperparameters)
    ok = bounds > 0
    ax.fill_between(lrs[ok], bounds[ok], np.full(ok.sum(), bounds[ok].min() * 1e-3), color="tab:green",
                    alpha=0.15, label="stable")
    ax.plot(lrs[ok], bounds[ok], color="tab:green", label=f"{thr.symbol} = {thr.formula}")
    if noise is not None:
        b, n, s2 = noise
        ranges = [noisy_sgd_sharpness_range(x, s2, b, n, **hyperparameters) for x in lrs]
        lo_noisy = [np.nan if r is None else r[0] for r in ranges]
        hi_noisy = [np.nan if r is None else r[1] for r in ranges]
        ax.plot(lrs, hi_noisy, color="tab:orange", linestyle="--",
                label=f"minibatch mean-square bounds (B={b}, N={n}, s²={s2:g})")
        ax.plot(lrs, lo_noisy, color="tab:orange", linestyle="--")
    if lr is not None and sharpness is not None and sharpness > 0:
        if noise is None:
            stable = sharpness <= threshold(optimizer, lr, **hyperparameters).max_stable_sharpness
        else:
            rng = noisy_sgd_sharpness_range(lr, noise[2], noise[0], noise[1], **hyperparameters)
            stable = rng is not None and rng[0] <= sharpness <= rng[1]
        ax.plot([lr], [sharpness], "o", color="tab:green" if stable else "tab:red", markersize=8,
                label=f"measured ({'stable' if stable else 'unstable'})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate η")
    ax.set_ylabel(thr.symbol)
    ax.set_title(f"stability region: {thr.optimizer}")
    ax.legend(loc="lower left", fontsize="small")
    return fig


def plot_nqm_scaling(scaling: Union[object, Mapping, Sequence], *, labels: Optional[Sequence[str]] = None,
                     normalize: bool = False, ax=None):
    """Steps to the target against batch size, from :func:`pycurv.stability.nqm_batch_scaling`.

    ``scaling`` is one :class:`BatchScaling`, a sequence of them, or the dict returned
    by :func:`pycurv.stability.curvature_batch_scaling` (labelled by curvature scale).
    Dotted lines show perfect scaling (steps ∝ 1/B) from the smallest batch size, and
    a marker the critical batch size. ``normalize`` divides steps by their first value
    (as in Gilmer et al. 2022, Fig. 6). Returns the matplotlib Figure.
    """
    fig, ax = _figure(ax)
    if isinstance(scaling, Mapping):
        items = list(scaling.values())
        names = [f"curvature × {k:g}" for k in scaling]
    elif isinstance(scaling, (list, tuple)):
        items = list(scaling)
        names = [f"model {i + 1}" for i in range(len(items))]
    else:
        items, names = [scaling], [None]
    if labels is not None:
        names = list(labels)
    for res, name in zip(items, names):
        b = np.asarray(res.batch_sizes, dtype=float)
        s = np.asarray(res.steps, dtype=float)
        if normalize and math.isfinite(s[0]):
            s = s / s[0]
        line, = ax.plot(b, s, "o-", label=name)
        if math.isfinite(s[0]):
            ax.plot(b, s[0] * b[0] / b, ":", color=line.get_color(), alpha=0.6)
        bc = getattr(res, "critical_batch_size", math.nan)
        if math.isfinite(bc) and b.min() <= bc <= b.max():
            ax.axvline(bc, color=line.get_color(), linestyle="--", alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("steps to target" + (" (normalised)" if normalize else ""))
    ax.set_title("noisy quadratic model: steps vs batch size")
    if any(n is not None for n in names):
        ax.legend(loc="best", fontsize="small")
    return fig


def save_figure(fig, path) -> None:
    """Save a figure; the format follows the file extension (png, pdf, svg, ...)."""
    fig.savefig(str(path), dpi=120)
