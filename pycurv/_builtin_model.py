"""The built-in example of ``pycurv sharpness``: a small tanh MLP on a synthetic regression task.

Everything is drawn from NumPy's generator with a fixed seed and held in
float64, so the printed sharpness is the same on every machine and torch version.
The file is also a template for your own: ``pycurv sharpness my_setup.py``
calls its ``setup()``, which returns ``model, loss_fn, data[, optimizer]``.
"""

from __future__ import annotations

import numpy as np

DESCRIPTION = "tanh MLP 8-32-32-1, mean squared error on 512 synthetic samples"


def _linear(torch, rng, d_in, d_out):
    layer = torch.nn.Linear(d_in, d_out, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)))
        layer.bias.copy_(torch.from_numpy(0.1 * rng.standard_normal(d_out)))
    return layer


def setup():
    """``model, loss_fn, data, optimizer`` of the built-in example.

    Inputs x ~ N(0, I_8); targets y = tanh(x W1) w2 + 0.1 noise from a random
    teacher; the student is an 8-32-32-1 tanh MLP (1,377 parameters) with
    LeCun-normal weights, to be trained by SGD with lr 0.4 and momentum 0.9
    (close to its stability threshold (2 + 2β)/η = 9.5).
    """
    import torch

    rng = np.random.default_rng(2022)
    n, d = 512, 8
    x = rng.standard_normal((n, d))
    teacher = rng.standard_normal((d, 4)) / np.sqrt(d)
    y = np.tanh(x @ teacher) @ rng.standard_normal((4, 1)) + 0.1 * rng.standard_normal((n, 1))
    model = torch.nn.Sequential(
        _linear(torch, rng, d, 32), torch.nn.Tanh(),
        _linear(torch, rng, 32, 32), torch.nn.Tanh(),
        _linear(torch, rng, 32, 1),
    )

    def loss_fn(out, target):
        return ((out - target) ** 2).mean()

    data = (torch.from_numpy(x), torch.from_numpy(y))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.4, momentum=0.9)
    return model, loss_fn, data, optimizer
