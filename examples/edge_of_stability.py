"""Progressive sharpening and the edge of stability under full-batch gradient descent.

Cohen et al. (2021): trained by full-batch GD with step size η, the sharpness λ1
rises (progressive sharpening) until it reaches 2/η, the largest value at which GD
is stable on a quadratic, and then hovers there (the edge of stability) while the
loss keeps decreasing, non-monotonically. With a small η it keeps rising below 2/η.

Runs in about a minute on one CPU core:

    python examples/edge_of_stability.py            # writes edge_of_stability.png
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import pycurv.torch
from _common import figure, mlp, mse, synthetic_classification


def train(lr: float, steps: int, every: int):
    """Full-batch GD at ``lr``; the tracker measures λ1 every ``every`` steps."""
    import torch

    x, y = synthetic_classification()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = pycurv.torch.Tracker(model, mse, (x, y), opt, every=every, tol=1e-3, warn=False)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        losses.append(loss.item())
        opt.step()
        tracker.step(step)
    return tracker, np.array(losses)


def main(lrs=(0.1, 0.3, 0.4), steps: int = 3000, every: int = 50, plot="edge_of_stability.png", verbose=True):
    """Trains once per learning rate; returns ``{lr: (tracker, losses)}``."""
    runs = {}
    for lr in lrs:
        t0 = time.perf_counter()
        runs[lr] = train(lr, steps, every)
        tracker, losses = runs[lr]
        v = np.array([r.value for r in tracker.records])
        late = v[len(v) * 2 // 3:]
        if verbose:
            print(f"η = {lr:g}: λ1 {v[0]:.2f} -> {v[-1]:.2f}; last third: median λ1 = {np.median(late):.3f}, "
                  f"2/η = {2 / lr:.3f} (ratio {np.median(late) * lr / 2:.3f}); loss {losses[0]:.3f} -> "
                  f"{losses[-1]:.3f}; {sum(r.matvecs for r in tracker.records)} HVPs, "
                  f"{time.perf_counter() - t0:.0f}s")
    if plot:
        fig, (ax_l, ax_s) = figure()
        for i, (lr, (tracker, losses)) in enumerate(runs.items()):
            c = f"C{i}"
            ax_l.plot(losses, color=c, lw=1, label=f"η = {lr:g}")
            steps_ = [r.step for r in tracker.records]
            ax_s.plot(steps_, [r.value for r in tracker.records], color=c, lw=1.2, label=f"λ1, η = {lr:g}")
            ax_s.axhline(2 / lr, color=c, ls="--", lw=1)
        ax_l.set(xlabel="step", ylabel="training loss", yscale="log", title="full-batch GD")
        ax_s.set(xlabel="step", ylabel="sharpness λ1", title="λ1 rises to 2/η (dashed) and stays there")
        ax_s.set_ylim(0, 1.25 * max(2 / min(lrs) if len(lrs) == 1 else 2 / sorted(lrs)[1],
                                    max(max(r.value for r in t.records) for t, _ in runs.values())))
        ax_l.legend(fontsize="small")
        ax_s.legend(fontsize="small")
        fig.savefig(plot, dpi=120)
        if verbose:
            print(f"wrote {plot}")
    return runs


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--plot", default="edge_of_stability.png")
    a = p.parse_args()
    main(steps=a.steps, plot=a.plot)
