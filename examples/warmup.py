"""Learning-rate warmup pushes the sharpness down (Gilmer et al. 2022, Fig. 4).

A network initialised with large weights starts in a sharp region: λ1 ≈ 6, three
times 2/η for the target η = 1. Trained at η = 1 from the first step, GD diverges.
With a linear warmup from 0 to η over 1,000 steps, λ1 is pushed down along 2/η_t as
the learning rate grows, and training succeeds at the same η.

Runs in about 20 seconds on one CPU core:

    python examples/warmup.py                       # writes warmup.png
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

import pycurv.torch
from _common import figure, mlp, mse, synthetic_classification


def train(lr: float, warmup: int, steps: int, every: int, init_scale: float):
    """GD with a linear warmup of ``warmup`` steps (0: none); stops at a non-finite loss."""
    import torch

    x, y = synthetic_classification()
    model = mlp(init_scale=init_scale)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    tracker = pycurv.torch.Tracker(model, mse, (x, y), opt, every=every, tol=1e-3, warn=False)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = mse(model(x), y)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]) or losses[-1] > 1e6:
            break
        loss.backward()
        opt.step()
        sched.step()
        tracker.step(step)
    return tracker, np.array(losses)


def main(lr: float = 1.0, warmup: int = 1000, steps: int = 1200, every: int = 20, init_scale: float = 2.0,
         plot="warmup.png", verbose=True):
    """Returns ``{"warmup": (tracker, losses), "no warmup": (tracker, losses)}``."""
    t0 = time.perf_counter()
    runs = {"warmup": train(lr, warmup, steps, every, init_scale),
            "no warmup": train(lr, 0, min(steps, 300), every, init_scale)}
    if verbose:
        tr, losses = runs["warmup"]
        v = np.array([r.value for r in tr.records])
        end = [r for r in tr.records if r.step >= warmup - 1][0]
        print(f"warmup over {warmup} steps to η = {lr:g}: λ1 {v[0]:.2f} -> {end.value:.2f} at the end of warmup "
              f"(2/η = {2 / lr:.2f}); loss {losses[0]:.3f} -> {losses[-1]:.3f}, never above its start: "
              f"{losses.max() <= losses[0]}")
        tr0, losses0 = runs["no warmup"]
        print(f"no warmup, η = {lr:g} from step 0: λ1 at step 0 {tr0.records[0].value:.2f}; "
              f"{'diverged at step ' + str(len(losses0) - 1) if len(losses0) < min(steps, 300) else 'max loss %.3g' % losses0.max()}; "
              f"{time.perf_counter() - t0:.0f}s")
    if plot:
        fig, (ax_l, ax_s) = figure()
        for i, (name, (tr, losses)) in enumerate(runs.items()):
            ax_l.plot(losses, color=f"C{i}", lw=1, label=name)
            ax_s.plot([r.step for r in tr.records], [r.value for r in tr.records], "o-", ms=2, lw=1,
                      color=f"C{i}", label=f"λ1, {name}")
        tr = runs["warmup"][0]
        ax_s.plot([r.step for r in tr.records], [r.threshold for r in tr.records], "--", color="C3", lw=1,
                  label="2/η_t with warmup")
        ax_l.set(xlabel="step", ylabel="training loss", yscale="log", title=f"GD at η = {lr:g}")
        ax_l.set_ylim(top=100)
        ax_s.set(xlabel="step", ylabel="sharpness λ1", yscale="log", title="warmup pushes λ1 down along 2/η_t")
        ax_s.set_ylim(1, 50)
        ax_l.legend(fontsize="small")
        ax_s.legend(fontsize="small")
        fig.savefig(plot, dpi=120)
        if verbose:
            print(f"wrote {plot}")
    return runs


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--plot", default="warmup.png")
    a = p.parse_args()
    main(warmup=a.warmup, plot=a.plot)
