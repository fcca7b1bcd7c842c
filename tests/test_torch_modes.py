"""Batch norm, dropout, the determinism probe, and that nothing of the user's is modified."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import torch

import torch.nn.functional as F  # noqa: E402

import pycurv  # noqa: E402
import pycurv.torch as pt  # noqa: E402
import torch_models as tm  # noqa: E402


def _rel(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("mode", ["eval", "batch_stats", "train"])
def test_batch_norm_modes_match_dense_and_leave_running_stats_alone(mode):
    model = tm.bn_mlp()
    model.train()  # the user's model is in training mode; pycurv must not change that either
    batches = tm.classification_batches([10, 7])
    before = tm.snapshot(model)
    H = pt.hessian(model, F.cross_entropy, batches, mode=mode)
    D = tm.dense_hessian(model, F.cross_entropy, batches, mode=mode)
    v = np.random.default_rng(0).standard_normal(H.shape[0])
    assert _rel(H.matvec(v), D @ v) <= 1e-12
    lam = pycurv.sharpness(H, tol=1e-12, seed=0)
    assert abs(lam - np.linalg.eigvalsh(D)[-1]) <= 1e-10 * np.max(np.abs(np.linalg.eigvalsh(D)))
    tm.assert_same(before, tm.snapshot(model))
    assert model.training and model[1].training


def test_batch_norm_eval_and_batch_statistics_differ():
    model = tm.bn_mlp()
    batch = tm.classification_batches([12])[0]
    v = np.random.default_rng(1).standard_normal(sum(p.numel() for p in model.parameters()))
    a = pt.hessian(model, F.cross_entropy, batch, mode="eval").matvec(v)
    b = pt.hessian(model, F.cross_entropy, batch).matvec(v)  # the default: the training loss
    assert _rel(a, b) > 1e-3


@pytest.mark.parametrize("shape", [(12, 5), (6, 5, 7), (4, 5, 3, 6), (3, 5, 2, 3, 4)])
@pytest.mark.parametrize("affine", [True, False])
def test_plain_batch_norm_is_torchs_function_with_its_derivatives(shape, affine):
    """Batch statistics through plain operations (the operator's products on the CPU): the values, the
    gradient and second derivatives of torch's kernel, in float64 for BatchNorm1d/2d/3d inputs."""
    from pycurv.torch.operator import _PlainBatchNorm

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).requires_grad_(True)
    c = shape[1]
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True) if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64).requires_grad_(True) if affine else None
    u = torch.randn(shape, generator=g, dtype=torch.float64)
    leaves = [t for t in (x, w, b) if t is not None]
    tangents = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in leaves]

    def derivatives(plain):
        running = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
        with _PlainBatchNorm() if plain else contextlib.nullcontext():
            out = F.batch_norm(x, *running, w, b, training=True, momentum=0.1, eps=1e-3)
        grads = torch.autograd.grad((torch.tanh(out) * u).sum(), leaves, create_graph=True)
        hvp = torch.autograd.grad(grads, leaves, grad_outputs=tangents)
        return [out] + list(grads) + list(hvp), running

    (plain, running), (native, _) = derivatives(True), derivatives(False)
    for p_, n_ in zip(plain, native):
        p_, n_ = p_.detach(), n_.detach()
        assert torch.allclose(p_, n_, rtol=1e-12, atol=1e-12 * float(n_.abs().max()))
    assert torch.equal(running[0], torch.zeros(c, dtype=torch.float64))  # nothing written


def test_plain_batch_norm_leaves_everything_else_to_torch():
    from pycurv.torch.operator import _PlainBatchNorm

    x = torch.randn(8, 3, 4, 4)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    with _PlainBatchNorm():  # running statistics (eval mode) and low precision: torch's own kernel, bit for bit
        evaluated = F.batch_norm(x, rm, rv, training=False)
        low = F.batch_norm(x.bfloat16(), None, None, training=True)
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            F.batch_norm(torch.randn(1, 3), None, None, training=True)
    assert torch.equal(evaluated, F.batch_norm(x, rm, rv, training=False))
    assert torch.equal(low, F.batch_norm(x.bfloat16(), None, None, training=True))
    model = tm.bn_mlp()
    batch = tm.classification_batches([10])[0]
    assert pt.hessian(model, F.cross_entropy, batch)._plain_batch_norm
    assert pt.hessian(model, F.cross_entropy, batch, mode="train")._plain_batch_norm
    assert not pt.hessian(model, F.cross_entropy, batch, mode="eval")._plain_batch_norm
    assert not pt.hessian(tm.mlp_tanh(), F.cross_entropy, batch)._plain_batch_norm


def test_dropout_in_train_mode_is_caught_by_the_probe():
    model = tm.dropout_mlp()
    batch = tm.classification_batches([32])[0]
    H = pt.hessian(model, F.cross_entropy, batch, mode="train")
    v = np.random.default_rng(2).standard_normal(H.shape[0])
    with pytest.raises(pycurv.NonDeterministicOperatorError,
                       match=r"differ by .* relative.*dropout is on \(mode='train'.*seed=.*mode='batch_stats'"):
        H.matvec(v)
    with pytest.raises(pycurv.NonDeterministicOperatorError, match="differ by"):
        pycurv.sharpness(pt.hessian(model, F.cross_entropy, batch, mode="train"), seed=0)


def test_dropout_in_train_mode_with_a_seed_is_a_fixed_symmetric_operator():
    model = tm.dropout_mlp()
    batch = tm.classification_batches([32])[0]
    rng_before = torch.get_rng_state()
    H = pt.hessian(model, F.cross_entropy, batch, mode="train", seed=7)
    assert H.check_determinism() == 0.0
    u, w = np.random.default_rng(3).standard_normal((2, H.shape[0]))
    assert abs(u @ H.matvec(w) - w @ H.matvec(u)) <= 1e-12 * np.linalg.norm(u) * np.linalg.norm(H.matvec(u))
    # the masks are drawn: the operator differs from eval mode
    E = pt.hessian(model, F.cross_entropy, batch)
    assert _rel(H.matvec(u), E.matvec(u)) > 1e-3
    assert torch.equal(rng_before, torch.get_rng_state())
    res = pycurv.lanczos(H, 1, tol=1e-10, seed=0)
    assert res.converged


def test_dropout_model_in_eval_mode_matches_dense():
    model = tm.dropout_mlp()
    batch = tm.classification_batches([20])[0]
    H = pt.hessian(model, F.cross_entropy, batch)
    D = tm.dense_hessian(model, F.cross_entropy, [batch])
    v = np.random.default_rng(4).standard_normal(H.shape[0])
    assert _rel(H.matvec(v), D @ v) <= 1e-12


def test_probe_on_demand_and_tolerance():
    model = tm.dropout_mlp()
    batch = tm.classification_batches([16])[0]
    H = pt.hessian(model, F.cross_entropy, batch, mode="train", check_determinism=False)
    with pytest.raises(pycurv.NonDeterministicOperatorError, match="float64 rounding allows"):
        H.check_determinism()
    assert H.check_determinism(rtol=10.0) > 0  # accepted when the caller says so
    assert pt.hessian(model, F.cross_entropy, batch).probe_rtol == pytest.approx(1e3 * 2.0**-53)


def test_changing_data_between_passes_is_caught_and_named():
    model = tm.mlp_tanh()
    x, y = tm.classification_batches([40])[0]

    class Reshuffled:
        """A re-iterable that draws a new 32 of 40 samples each pass (a hand-made shuffling loader)."""

        def __iter__(self):
            idx = torch.randperm(40)[:32]
            return iter([(x[idx[:16]], y[idx[:16]]), (x[idx[16:]], y[idx[16:]])])

    H = pt.hessian(model, F.cross_entropy, Reshuffled(), check_determinism=False)
    v = np.ones(H.shape[0])
    torch.manual_seed(0)
    H.matvec(v)  # 32 of 40 samples; another 32 next time: sizes agree, contents do not
    with pytest.raises(pycurv.NonDeterministicOperatorError, match=r"the data \(Reshuffled\) yields different "
                                                                   r"batches in each pass") as err:
        H.check_determinism()
    assert "dropout" not in str(err.value)


def test_model_buffers_optimizer_and_rng_are_untouched():
    model = tm.bn_mlp()
    x, y = tm.classification_batches([16])[0]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    before = tm.snapshot(model, opt)
    for mode in ("eval", "batch_stats", "train"):
        for method in ("forward", "reverse"):
            H = pt.hessian(model, F.cross_entropy, (x, y), mode=mode, preconditioner=opt, hvp=method)
            pycurv.lanczos(H, 2, tol=1e-8, seed=0)
            list(H.batch_gradients())
            list(H.batch_hvps(torch.ones(H.shape[0], dtype=torch.float64)))
    tm.assert_same(before, tm.snapshot(model, opt))
    assert not model.training


def test_errors_name_the_value():
    model = tm.mlp_tanh()
    batch = tm.classification_batches([8])[0]
    with pytest.raises(ValueError, match="mode must be one of .*got mode='training'"):
        pt.hessian(model, F.cross_entropy, batch, mode="training")
    with pytest.raises(ValueError, match="reduction must be"):
        pt.hessian(model, F.cross_entropy, batch, reduction="avg")
    with pytest.raises(ValueError, match="hvp must be"):
        pt.hessian(model, F.cross_entropy, batch, hvp="double")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        pt.hessian(lambda x: x, F.cross_entropy, batch)
    with pytest.raises(TypeError, match="one-shot iterator"):
        pt.hessian(model, F.cross_entropy, (b for b in [batch]))
    with pytest.raises(ValueError, match="data is empty"):
        pt.hessian(model, F.cross_entropy, [])
    with pytest.raises(ValueError, match="dtype must be one of"):
        pt.hessian(model, F.cross_entropy, batch, dtype="int8")
    with pytest.raises(ValueError, match="seed must be"):
        pt.hessian(model, F.cross_entropy, batch, seed=-1)
    with pytest.raises(ValueError, match="microbatch_size must be"):
        pt.hessian(model, F.cross_entropy, batch, microbatch_size=0)
    with pytest.raises(ValueError, match=r"params names \['nope'\]"):
        pt.hessian(model, F.cross_entropy, batch, params=["nope"])
    H = pt.hessian(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), batch)
    with pytest.raises(TypeError, match=r"must return a scalar tensor, got a tensor of shape \(8,\)"):
        H.matvec(np.ones(H.shape[0]))
    H = pt.hessian(model, F.cross_entropy, [batch, (batch[0],)])
    with pytest.raises(TypeError, match="each batch must be an \\(inputs, targets\\) pair"):
        H.matvec(np.ones(H.shape[0]))
    with pytest.raises(ValueError, match="vector must have shape"):
        pt.hessian(model, F.cross_entropy, batch).from_vector(np.ones(3))


def test_nonfinite_products_are_reported():
    model = tm.mlp_tanh()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    batch = tm.classification_batches([8])[0]
    with pytest.raises(pycurv.PycurvError):
        pycurv.sharpness(pt.hessian(model, F.cross_entropy, batch, check_determinism=False), seed=0)
