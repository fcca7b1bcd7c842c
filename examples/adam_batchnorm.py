"""Adam on a BatchNorm convnet: with batch statistics, λ1(P⁻¹H) rises to 38/η and hovers there.

Cohen et al. (2022) find that under full-batch Adam the preconditioned sharpness
λ1(P^{-1/2} H P^{-1/2}) rises until it reaches (2 + 2β1)/((1 − β1)η) = 38/η and
then hovers near it (the adaptive edge of stability). On a network with batch
normalisation that holds for the loss training descends, in which each batch is
normalised by its own statistics: pycurv's default. The same network in eval
mode (running statistics) is another function, whose preconditioned sharpness
is orders of magnitude larger and says nothing about Adam's stability.

Runs in about 30 seconds on one CPU core:

    python examples/adam_batchnorm.py               # writes adam_batchnorm.png
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import pycurv.torch
from _common import bn_convnet, figure, mse, synthetic_images


def main(lr: float = 3e-3, steps: int = 800, every: int = 40, plot="adam_batchnorm.png", verbose=True):
    """Full-batch Adam; returns ``(tracker, eval_mode, losses)``, eval_mode a list of (step, λ1(P⁻¹H) in eval mode)."""
    import torch

    t0 = time.perf_counter()
    x, y = synthetic_images()
    model = bn_convnet()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # The default measures the training loss: batch norm on the batch's statistics.
    tracker = pycurv.torch.Tracker(model, mse, (x, y), opt, every=every, tol=1e-3, warn=False)
    eval_mode, losses = [], []
    for step in range(steps):
        model.train()
        opt.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        losses.append(loss.item())
        opt.step()
        if tracker.step(step) is not None and step % (4 * every) == 0:
            rep = pycurv.torch.stability_report(model, mse, (x, y), opt, mode="eval", tol=1e-3)
            eval_mode.append((step, rep.value))
    v = np.array([r.value for r in tracker.records])
    thr = tracker.records[-1].threshold
    late = v[len(v) // 2:]
    if verbose:
        ratio = np.array([e / thr for _, e in eval_mode])
        print(f"Adam, η = {lr:g}, BatchNorm convnet: λ1(P⁻¹H) of the training loss {v[0]:.4g} -> {v[-1]:.4g}; "
              f"second half: {late.min() / thr:.2f} to {late.max() / thr:.2f} of 38/η = {thr:.4g} (median "
              f"{np.median(late) / thr:.3f}); eval mode: {ratio.min():.3g} to {ratio.max():.3g} times 38/η; "
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; {time.perf_counter() - t0:.0f}s")
    if plot:
        fig, (ax_l, ax_s) = figure()
        ax_l.plot(losses, lw=1)
        ax_l.set(xlabel="step", ylabel="training loss", yscale="log", title=f"full-batch Adam, η = {lr:g}")
        tracker.plot(ax=ax_s, log=True)
        ax_s.plot(*zip(*eval_mode), "s-", ms=3, lw=1, color="C2", label="λ1(P⁻¹H) in eval mode")
        ax_s.legend(fontsize="small")
        ax_s.set_title("batch statistics: λ1(P⁻¹H) rises to 38/η")
        fig.savefig(plot, dpi=120)
        if verbose:
            print(f"wrote {plot}")
    return tracker, eval_mode, np.array(losses)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--plot", default="adam_batchnorm.png")
    a = p.parse_args()
    main(lr=a.lr, steps=a.steps, plot=a.plot)
