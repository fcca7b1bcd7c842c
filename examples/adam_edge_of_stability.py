"""Adam's preconditioned sharpness settles at its threshold 38/η (the adaptive edge of stability).

Cohen et al. (2022): under full-batch Adam the largest eigenvalue of the
preconditioned Hessian P^{-1/2} H P^{-1/2}, P = (1 − β1^t)(√v̂ + ε), equilibrates at
(2 + 2β1)/((1 − β1)η) = 38/η for β1 = 0.9, the stability threshold of the
frozen-preconditioner update. It starts far above it (Kalra & Barkeshli 2024, §4.3)
and the raw sharpness λ1(H) stays far below 38/η: it does not bound Adam.

Runs in about 20 seconds on one CPU core:

    python examples/adam_edge_of_stability.py       # writes adam_edge_of_stability.png
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import pycurv.torch
from _common import figure, mlp, mse, synthetic_classification


def main(lr: float = 1e-3, steps: int = 2000, every: int = 50, plot="adam_edge_of_stability.png", verbose=True):
    """Full-batch Adam; returns ``(tracker, raw_sharpness, losses)``."""
    import torch

    t0 = time.perf_counter()
    x, y = synthetic_classification()
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))
    # The tracker sees an Adam optimizer: it measures λ1(P^-1/2 H P^-1/2) against 38/η.
    tracker = pycurv.torch.Tracker(model, mse, (x, y), opt, every=every, tol=1e-3, warn=False)
    raw, losses = [], []
    for step in range(steps):
        opt.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        losses.append(loss.item())
        opt.step()
        if tracker.step(step) is not None and step % (4 * every) == 0:
            raw.append((step, pycurv.torch.sharpness(model, mse, (x, y), tol=1e-3)))
    v = np.array([r.value for r in tracker.records])
    thr = tracker.records[-1].threshold
    late = v[len(v) * 2 // 3:]
    if verbose:
        print(f"Adam, η = {lr:g}: λ1(P⁻¹H) {v[0]:.4g} -> {v[-1]:.4g}; last third: median {np.median(late):.4g}, "
              f"38/η = {thr:.4g} (ratio {np.median(late) / thr:.3f}); raw λ1(H) at the end {raw[-1][1]:.3g}; "
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; {time.perf_counter() - t0:.0f}s")
    if plot:
        fig, (ax_l, ax_s) = figure()
        ax_l.plot(losses, lw=1)
        ax_l.set(xlabel="step", ylabel="training loss", yscale="log", title=f"full-batch Adam, η = {lr:g}")
        tracker.plot(ax=ax_s, log=True)
        ax_s.plot(*zip(*raw), "s-", ms=3, lw=1, color="C2", label="sharpness λ1(H)")
        ax_s.legend(fontsize="small")
        ax_s.set_title("preconditioned sharpness settles at 38/η")
        ax_s.set_ylabel("top eigenvalue")
        fig.savefig(plot, dpi=120)
        if verbose:
            print(f"wrote {plot}")
    return tracker, raw, np.array(losses)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--plot", default="adam_edge_of_stability.png")
    a = p.parse_args()
    main(lr=a.lr, steps=a.steps, plot=a.plot)
