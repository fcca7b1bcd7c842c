"""Tiny PyTorch models and a dense reference Hessian, for the torch adapter tests.

The reference is independent of pycurv.torch: plain autograd double backward,
one row at a time, of the mean loss over all samples on a copy of the model.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def mlp_tanh():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def mlp_relu():
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 2)).double()


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def convnet():
    torch.manual_seed(3)
    return ConvNet().double()


class LNBlock(nn.Module):
    """Pre-norm residual block: x + W2 gelu(W1 LN(x)), then a linear head."""

    def __init__(self, d=6, h=10, out=3):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.w1 = nn.Linear(d, h)
        self.w2 = nn.Linear(h, d)
        self.head = nn.Linear(d, out)

    def forward(self, x):
        return self.head(x + self.w2(F.gelu(self.w1(self.ln(x)))))


def lnblock():
    torch.manual_seed(4)
    return LNBlock().double()


def bn_mlp():
    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    # Non-trivial running statistics, as after some training.
    with torch.no_grad():
        m[1].running_mean.copy_(torch.linspace(-0.3, 0.4, 6))
        m[1].running_var.copy_(torch.linspace(0.5, 2.0, 6))
        m[1].num_batches_tracked.fill_(17)
    return m


def dropout_mlp():
    torch.manual_seed(6)
    return nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Dropout(0.3), nn.Linear(12, 3)).double()


def classification_batches(sizes, d=4, classes=3, seed=0, image=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn((n, 1, 6, 6) if image else (n, d), generator=g, dtype=torch.float64)
        y = torch.randint(0, classes, (n,), generator=g)
        out.append((x, y))
    return out


def regression_batches(sizes, d=4, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, k, generator=g, dtype=torch.float64))
            for n in sizes]


def ref_module(model, mode="eval"):
    m = copy.deepcopy(model)
    m.train(mode == "train")
    if mode in ("batch_stats", "train"):
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._NormBase):
                mod.train(True)
                mod.track_running_stats = False
    return m


def dense_hessian(model, loss_fn, batches, mode="eval", dtype=torch.float64):
    """Dense Hessian of sum_b n_b loss_b / N over the trainable parameters (flat, model order).

    Plain autograd on a copy of the model: the gradient with create_graph=True,
    then one backward pass per row. No torch.func, no functional_call.
    """
    m = ref_module(model, mode).to(dtype)
    params = [p for p in m.parameters() if p.requires_grad]
    N = sum(len(y) for _, y in batches)
    total = 0.0
    for x, y in batches:
        x = x.to(dtype)
        y = y.to(dtype) if y.is_floating_point() else y
        total = total + loss_fn(m(x), y) * len(y)
    loss = total / N
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, create_graph=True)])
    n = g.numel()
    H = np.empty((n, n))
    for i in range(n):
        row = torch.autograd.grad(g[i], params, retain_graph=True, allow_unused=True)
        H[i] = torch.cat([torch.zeros(p.numel(), dtype=dtype) if r is None else r.reshape(-1)
                          for r, p in zip(row, params)]).detach().numpy()
    return (H + H.T) / 2


def snapshot(model, optimizer=None):
    """Everything that must not change: state_dict tensors (bit copies), flags, grads, RNG."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = [(m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    req = [p.requires_grad for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    opt = None
    if optimizer is not None:
        st = optimizer.state_dict()
        opt = (copy.deepcopy(st["param_groups"]),
               {k: {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()} for k, v in st["state"].items()})
    return sd, flags, req, grads, opt, torch.get_rng_state()


def assert_same(a, b):
    sd_a, flags_a, req_a, grads_a, opt_a, rng_a = a
    sd_b, flags_b, req_b, grads_b, opt_b, rng_b = b
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert sd_a[k].dtype == sd_b[k].dtype and torch.equal(sd_a[k], sd_b[k]), k
    assert flags_a == flags_b
    assert req_a == req_b
    for ga, gb in zip(grads_a, grads_b):
        assert (ga is None and gb is None) or torch.equal(ga, gb)
    if opt_a is not None:
        assert opt_a[0] == opt_b[0]
        assert opt_a[1].keys() == opt_b[1].keys()
        for k in opt_a[1]:
            for kk in opt_a[1][k]:
                va, vb = opt_a[1][k][kk], opt_b[1][k][kk]
                assert torch.equal(va, vb) if torch.is_tensor(va) else va == vb
    assert torch.equal(rng_a, rng_b)
