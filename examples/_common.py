"""Shared by the examples: a synthetic classification task and a small tanh MLP, in float64.

The task stands in for the CIFAR-10 subsets of the papers (no download): 1,000
points in 20 dimensions, labelled by a random tanh teacher with label noise,
10 classes, fitted with the squared loss on one-hot targets (Cohen et al. 2021
use the squared loss too). The network is a 20-64-64-10 tanh MLP (6,154 parameters).
"""

from __future__ import annotations

import numpy as np
import torch

# Tiny models: torch's thread pool costs more than it saves, badly so on a busy machine.
torch.set_num_threads(1)


def synthetic_classification(n: int = 1000, d: int = 20, classes: int = 10, seed: int = 0):
    """Inputs (n, d) and one-hot targets (n, classes), float64."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    teacher = rng.standard_normal((d, classes))
    labels = np.argmax(np.tanh(x @ teacher) + 0.5 * rng.standard_normal((n, classes)), axis=1)
    return torch.tensor(x), torch.tensor(np.eye(classes)[labels])


def mlp(d: int = 20, width: int = 64, classes: int = 10, seed: int = 0, init_scale: float = 1.0):
    """A 2-hidden-layer tanh MLP in float64; ``init_scale`` multiplies PyTorch's default weights."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(d, width), torch.nn.Tanh(),
        torch.nn.Linear(width, width), torch.nn.Tanh(),
        torch.nn.Linear(width, classes),
    ).double()
    if init_scale != 1.0:
        with torch.no_grad():
            for m in model:
                if isinstance(m, torch.nn.Linear):
                    m.weight.mul_(init_scale)
    return model


def mse(outputs, targets):
    """Half the squared error, summed over classes, averaged over samples."""
    return 0.5 * ((outputs - targets) ** 2).sum(dim=1).mean()


def figure(nrows: int = 1, ncols: int = 2, size=(11.0, 4.0)):
    """A matplotlib Figure without pyplot (no display backend needed)."""
    from pycurv._optional import require

    require("matplotlib", "the examples' plots")
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(nrows, ncols)
