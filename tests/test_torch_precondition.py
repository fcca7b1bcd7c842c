"""Adam's preconditioned Hessian P^{-1/2} H P^{-1/2} against a dense reference."""

from __future__ import annotations

import numpy as np
import pytest

import torch

import torch.nn.functional as F  # noqa: E402

import pycurv  # noqa: E402
import pycurv.torch as pt  # noqa: E402
import torch_models as tm  # noqa: E402


def _train(model, opt, batch, steps):
    x, y = batch
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _dense_P(opt, model, amsgrad=False):
    """P = (1 - b1^t) (sqrt(v / (1 - b2^t)) + eps), written out from the Adam update."""
    g = opt.param_groups[0]
    b1, b2 = g["betas"]
    parts = []
    for p in model.parameters():
        st = opt.state[p]
        t = float(st["step"])
        v = (st["max_exp_avg_sq"] if amsgrad else st["exp_avg_sq"]).double().reshape(-1).numpy()
        parts.append((1 - b1**t) * (np.sqrt(v / (1 - b2**t)) + g["eps"]))
    return np.concatenate(parts)


@pytest.mark.parametrize("kind", ["adam", "adamw-amsgrad"])
def test_preconditioned_operator_matches_dense(kind):
    model = tm.lnblock()
    batch = tm.classification_batches([24], d=6)[0]
    if kind == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.99), eps=1e-6)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, amsgrad=True)
    _train(model, opt, batch, 5)
    D = tm.dense_hessian(model, F.cross_entropy, [batch])
    P = _dense_P(opt, model, amsgrad=kind != "adam")
    s = 1 / np.sqrt(P)
    A = s[:, None] * D * s[None, :]
    ev = np.linalg.eigvalsh(A)
    H = pt.hessian(model, F.cross_entropy, batch, preconditioner=opt)
    assert H.preconditioned
    np.testing.assert_allclose(H.preconditioner_diagonal.numpy(), P, rtol=1e-14)
    v = np.random.default_rng(0).standard_normal(H.shape[0])
    assert np.max(np.abs(H.matvec(v) - A @ v)) <= 1e-10 * np.max(np.abs(ev)) * np.linalg.norm(v)
    lam = pycurv.sharpness(H, tol=1e-12, seed=0)
    assert abs(lam - ev[-1]) <= 1e-10 * np.max(np.abs(ev))
    # the same operator from the diagonal given directly
    H2 = pt.hessian(model, F.cross_entropy, batch, preconditioner=torch.as_tensor(P))
    assert np.allclose(H2.matvec(v), H.matvec(v), rtol=0, atol=1e-12 * np.linalg.norm(H.matvec(v)))


def test_adam_before_its_first_step_is_an_error():
    model = tm.mlp_tanh()
    batch = tm.classification_batches([8])[0]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="has taken no step yet.*after the first optimizer.step"):
        pt.hessian(model, F.cross_entropy, batch, preconditioner=opt)


def test_sgd_is_not_a_preconditioner():
    model = tm.mlp_tanh()
    batch = tm.classification_batches([8])[0]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with pytest.raises(TypeError, match="preconditioner must be a torch.optim.Adam, AdamW or RMSprop.*got SGD"):
        pt.hessian(model, F.cross_entropy, batch, preconditioner=opt)
    rms = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="RMSprop passed as preconditioner has taken no step yet"):
        pt.hessian(model, F.cross_entropy, batch, preconditioner=rms)


def test_bad_diagonal_is_rejected():
    model = tm.mlp_tanh()
    batch = tm.classification_batches([8])[0]
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=f"must have {n} entries"):
        pt.hessian(model, F.cross_entropy, batch, preconditioner=np.ones(3))
    P = np.ones(n)
    P[4] = 0.0
    with pytest.raises(ValueError, match="finite and > 0; 1 entries"):
        pt.hessian(model, F.cross_entropy, batch, preconditioner=P)


def test_groups_with_other_learning_rates_are_rescaled():
    model = tm.mlp_tanh()
    batch = tm.classification_batches([16])[0]
    opt = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 4e-3}], lr=1e-3)
    _train(model, opt, batch, 3)
    P = pt.adam_preconditioner(opt, list(model.parameters()))
    ref = _dense_P(opt, model)
    n0 = sum(p.numel() for p in model[0].parameters())
    np.testing.assert_allclose(P[:n0].numpy(), ref[:n0], rtol=1e-14)
    np.testing.assert_allclose(P[n0:].numpy(), ref[n0:] / 4.0, rtol=1e-14)
    opt.param_groups[1]["betas"] = (0.8, 0.999)
    with pytest.raises(ValueError, match="different beta1"):
        pt.adam_preconditioner(opt, list(model.parameters()))


def test_parameter_not_in_the_optimizer():
    model = tm.mlp_tanh()
    batch = tm.classification_batches([8])[0]
    opt = torch.optim.Adam(model[0].parameters(), lr=1e-3)
    _train(model, opt, batch, 1)
    with pytest.raises(ValueError, match="2.weight is not optimised by the Adam"):
        pt.hessian(model, F.cross_entropy, batch, preconditioner=opt)
