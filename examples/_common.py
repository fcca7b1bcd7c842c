"""Shared by the examples: synthetic classification tasks, a small tanh MLP and a BatchNorm convnet, in float64.

The tasks stand in for the CIFAR-10 subsets of the papers (no download): 1,000
points in 20 dimensions, labelled by a random tanh teacher with label noise, or
256 RGB 8x8 images of 10 classes (smooth class templates plus noise); both are
fitted with the squared loss on one-hot targets (Cohen et al. 2021 and 2022
use the squared loss too). The networks are a 20-64-64-10 tanh MLP (6,154
parameters) and a convnet of two conv-BatchNorm-ReLU layers, global average
pooling and a linear head (930 parameters).
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


def synthetic_images(n: int = 256, classes: int = 10, noise: float = 0.8, seed: int = 0):
    """RGB 8x8 images (n, 3, 8, 8) of smoothed random class templates plus noise, and one-hot targets, float64."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, 3, 8, 8, generator=g, dtype=torch.float64)
    templates = F.avg_pool2d(F.pad(templates, (1, 1, 1, 1), mode="circular"), 3, stride=1)
    labels = torch.randint(0, classes, (n,), generator=g)
    x = templates[labels] + noise * torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    return x, F.one_hot(labels, classes).to(torch.float64)


class BNConvNet(torch.nn.Module):
    """conv-BN-ReLU, conv-BN-ReLU, global average pooling, linear: the shape of the convnets people train."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, width, 3, padding=1)
        self.b1 = torch.nn.BatchNorm2d(width)
        self.c2 = torch.nn.Conv2d(width, width, 3, padding=1)
        self.b2 = torch.nn.BatchNorm2d(width)
        self.fc = torch.nn.Linear(width, classes)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def bn_convnet(width: int = 8, classes: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    return BNConvNet(width, classes).double()


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
