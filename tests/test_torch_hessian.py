"""pycurv.torch.hessian against dense torch Hessians of tiny models, in float64."""

from __future__ import annotations

import numpy as np
import pytest

import torch

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import pycurv  # noqa: E402
import pycurv.torch as pt  # noqa: E402
import torch_models as tm  # noqa: E402

CASES = {
    "mlp-tanh-xent": (tm.mlp_tanh, F.cross_entropy, lambda: tm.classification_batches([16])),
    "mlp-relu-mse": (tm.mlp_relu, F.mse_loss, lambda: tm.regression_batches([20])),
    "convnet-xent-3-batches": (tm.convnet, F.cross_entropy, lambda: tm.classification_batches([5, 7, 4], image=True)),
    "layernorm-xent": (tm.lnblock, F.cross_entropy, lambda: tm.classification_batches([12], d=6)),
    "layernorm-mse-2-batches": (tm.lnblock, lambda o, y: F.mse_loss(o, y), lambda: tm.regression_batches([9, 6], d=6, k=3)),
    "mlp-tanh-xent-3-batches": (tm.mlp_tanh, F.cross_entropy, lambda: tm.classification_batches([3, 11, 6])),
}


def _data(batches):
    return batches[0] if len(batches) == 1 else batches


def _rel(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("case", list(CASES))
def test_hvp_and_extreme_eigenvalues_match_dense(case):
    make, loss_fn, make_data = CASES[case]
    model, batches = make(), make_data()
    D = tm.dense_hessian(model, loss_fn, batches)
    ev = np.linalg.eigvalsh(D)
    scale = np.max(np.abs(ev))
    H = pt.hessian(model, loss_fn, _data(batches))
    n = H.shape[0]
    assert H.shape == D.shape == (n, n)
    assert H.dtype == "float64" and H.device == "cpu" and H.exact is False
    V = np.random.default_rng(0).standard_normal((n, 3))
    for v in V.T:
        assert np.max(np.abs(H.matvec(v) - D @ v)) <= 1e-10 * scale * np.linalg.norm(v)
    res = pycurv.lanczos(H, 1, tol=1e-12, seed=0)
    assert res.converged
    assert abs(res.eigenvalues[0] - ev[-1]) <= 1e-10 * scale
    low = pycurv.lanczos(H, 1, which="SA", tol=1e-12, seed=0)
    assert abs(low.eigenvalues[0] - ev[0]) <= 1e-10 * scale
    assert H.n_samples == sum(len(y) for _, y in batches)


def test_mse_uses_the_cached_reverse_products_and_agrees():
    """F.mse_loss has no usable forward-over-reverse derivative (pytorch#123996): reverse mode needs none."""
    model, batches = tm.mlp_relu(), tm.regression_batches([20])
    D = tm.dense_hessian(model, F.mse_loss, batches)
    H = pt.hessian(model, F.mse_loss, batches[0])
    v = np.random.default_rng(1).standard_normal(H.shape[0])
    y = H.matvec(v)
    assert H.hvp_method == "cached reverse-over-reverse"
    assert _rel(y, D @ v) <= 1e-12
    with pytest.raises(RuntimeError, match="ZeroTensor"):
        pt.hessian(model, F.mse_loss, batches[0], hvp="forward").matvec(v)


def test_the_three_product_methods_agree():
    model, batches = tm.lnblock(), tm.classification_batches([10], d=6)
    cached = pt.hessian(model, F.cross_entropy, batches[0])
    fwd = pt.hessian(model, F.cross_entropy, batches[0], hvp="forward")
    rev = pt.hessian(model, F.cross_entropy, batches[0], hvp="reverse")
    v = np.random.default_rng(2).standard_normal(fwd.shape[0])
    a, b, c = cached.matvec(v), fwd.matvec(v), rev.matvec(v)
    assert fwd.hvp_method == "forward-over-reverse" and rev.hvp_method == "reverse-over-reverse"
    assert rev.cache_batches == 0 and fwd.cache_batches == 0 and cached.cache_batches == 1
    assert _rel(a, b) <= 1e-12 and _rel(c, b) <= 1e-12


def test_mse_written_by_hand_in_forward_mode():
    model, batches = tm.mlp_relu(), tm.regression_batches([20])
    loss = lambda o, y: ((o - y) ** 2).mean()  # noqa: E731
    H = pt.hessian(model, loss, batches[0], hvp="forward")
    D = tm.dense_hessian(model, F.mse_loss, batches)
    v = np.random.default_rng(3).standard_normal(H.shape[0])
    assert _rel(H.matvec(v), D @ v) <= 1e-12
    assert H.hvp_method == "forward-over-reverse"


def test_huber_loss_without_forward_derivative():
    model, batches = tm.mlp_tanh(), tm.regression_batches([12], k=3)
    H = pt.hessian(model, F.huber_loss, batches[0])
    D = tm.dense_hessian(model, F.huber_loss, batches)
    v = np.random.default_rng(4).standard_normal(H.shape[0])
    assert _rel(H.matvec(v), D @ v) <= 1e-12
    assert H.hvp_method == "cached reverse-over-reverse"


def test_microbatches_and_sum_reduction_give_the_mean_hessian():
    model = tm.mlp_tanh()
    batches = tm.classification_batches([30])
    x, y = batches[0]
    D = tm.dense_hessian(model, F.cross_entropy, batches)
    v = np.random.default_rng(5).standard_normal(D.shape[0])
    micro = pt.hessian(model, F.cross_entropy, (x, y), microbatch_size=7)
    assert _rel(micro.matvec(v), D @ v) <= 1e-12
    summed = pt.hessian(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), [(x[:13], y[:13]), (x[13:], y[13:])],
                        reduction="sum")
    assert _rel(summed.matvec(v), D @ v) <= 1e-12
    assert micro.n_samples == summed.n_samples == 30
    assert pt.hessian(model, F.cross_entropy, [(x[:13], y[:13]), (x[13:], y[13:])]).count_samples() == 30


def test_dataloader_and_device_placement():
    model = tm.mlp_tanh()
    x, y = tm.classification_batches([24])[0]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    D = tm.dense_hessian(model, F.cross_entropy, [(x, y)])
    H = pt.hessian(model, F.cross_entropy, loader)
    v = np.random.default_rng(6).standard_normal(D.shape[0])
    assert _rel(H.matvec(v), D @ v) <= 1e-12


def test_float32_model_gives_float32_products_and_the_same_sharpness():
    model = tm.lnblock().float()
    x, y = tm.classification_batches([40], d=6)[0]
    x32 = x.float()
    H32 = pt.hessian(model, F.cross_entropy, (x32, y))
    H64 = pt.hessian(model, F.cross_entropy, (x32, y), dtype="float64")
    assert H32.dtype == "float32" and H64.dtype == "float64"
    assert H32.unit_roundoff == 2.0**-24
    lam64 = pycurv.sharpness(H64, tol=1e-10, seed=0)
    lam32 = pycurv.sharpness(H32, tol=1e-4, seed=0)
    assert abs(lam32 - lam64) <= 1e-5 * abs(lam64)
    D = tm.dense_hessian(model, F.cross_entropy, [(x32, y)])
    assert abs(lam64 - np.linalg.eigvalsh(D)[-1]) <= 1e-10 * abs(lam64)


def test_pycurv_torch_sharpness_and_default_tolerance():
    model, batches = tm.mlp_tanh(), tm.classification_batches([16])
    D = tm.dense_hessian(model, F.cross_entropy, batches)
    lam = pt.sharpness(model, F.cross_entropy, batches[0], tol=1e-12)
    assert abs(lam - np.linalg.eigvalsh(D)[-1]) <= 1e-10 * abs(lam)


@pytest.mark.parametrize("case", ["convnet-xent-3-batches", "layernorm-xent"])
def test_sharpness_to_a_relative_accuracy(case):
    """criterion="eigenvalue": λ1 to tol relative accuracy against the dense Hessian, in fewer products."""
    build, loss_fn, make = CASES[case]
    model, batches = build(), make()
    lam = np.linalg.eigvalsh(tm.dense_hessian(model, loss_fn, batches))[-1]
    H = pt.hessian(model, loss_fn, _data(batches), check_determinism=False)
    for tol in (1e-4, 1e-8):
        by_eig = pycurv.lanczos(H, 1, tol=tol, seed=0, criterion="eigenvalue")
        assert by_eig.converged and abs(by_eig.eigenvalues[0] - lam) <= tol * abs(lam)
        # the criterion's own saving, where no minimum of products hides it (min_matvecs)
        early_eig = pycurv.lanczos(H, 1, tol=tol, seed=0, criterion="eigenvalue", min_matvecs=0)
        early_res = pycurv.lanczos(H, 1, tol=tol, seed=0, min_matvecs=0)
        assert abs(early_eig.eigenvalues[0] - lam) <= tol * abs(lam)
        assert early_eig.n_matvecs < early_res.n_matvecs
    assert pt.sharpness(model, loss_fn, _data(batches), tol=1e-6, criterion="eigenvalue") == pytest.approx(lam, rel=1e-6)


def test_layout_round_trip_and_parameter_subset():
    model = tm.lnblock()
    x, y = tm.classification_batches([8], d=6)[0]
    H = pt.hessian(model, F.cross_entropy, (x, y))
    names = [k for k, _ in model.named_parameters()]
    assert list(H.layout.names) == names
    assert H.layout.n == sum(p.numel() for p in model.parameters())
    theta = H.parameters_vector()
    assert np.array_equal(theta, H.to_vector(model))
    back = H.from_vector(theta)
    for k, p in model.named_parameters():
        assert torch.equal(back[k], p.detach())
    assert np.array_equal(theta[H.layout.slice("head.bias")], model.head.bias.detach().numpy())
    sub = pt.hessian(model, F.cross_entropy, (x, y), params=["head.weight", "head.bias"])
    assert sub.shape[0] == model.head.weight.numel() + model.head.bias.numel()
    D = tm.dense_hessian(model, F.cross_entropy, [(x, y)])
    idx = np.r_[H.layout.slice("head.weight"), H.layout.slice("head.bias")]
    v = np.random.default_rng(7).standard_normal(sub.shape[0])
    assert _rel(sub.matvec(v), D[np.ix_(idx, idx)] @ v) <= 1e-12


def test_frozen_parameters_are_left_out():
    model = tm.mlp_tanh()
    model[0].weight.requires_grad_(False)
    x, y = tm.classification_batches([8])[0]
    H = pt.hessian(model, F.cross_entropy, (x, y))
    assert "0.weight" not in H.layout.names
    assert H.shape[0] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    D = tm.dense_hessian(model, F.cross_entropy, [(x, y)])
    v = np.random.default_rng(8).standard_normal(H.shape[0])
    assert _rel(H.matvec(v), D @ v) <= 1e-12


def test_l2_adds_a_multiple_of_the_identity():
    model, (x, y) = tm.mlp_tanh(), tm.classification_batches([8])[0]
    H = pt.hessian(model, F.cross_entropy, (x, y))
    H2 = pt.hessian(model, F.cross_entropy, (x, y), l2=0.25)
    v = np.random.default_rng(9).standard_normal(H.shape[0])
    assert np.allclose(H2.matvec(v), H.matvec(v) + 0.25 * v, rtol=0, atol=1e-13)


def test_counts_products_and_runs_the_probe_once():
    model, (x, y) = tm.mlp_tanh(), tm.classification_batches([8])[0]
    H = pt.hessian(model, F.cross_entropy, (x, y))
    v = np.ones(H.shape[0])
    H.matvec(v)
    assert H.n_hvps == 1 and H.last_probe == 0.0  # the probe evaluated the loss again, bit for bit
    H.matvec(v)
    assert H.n_hvps == 2 and H.last_probe == 0.0  # once
    fwd = pt.hessian(model, F.cross_entropy, (x, y), hvp="forward")  # no graph kept: the product recomputed
    fwd.matvec(v)
    assert fwd.n_hvps == 2 and fwd.last_probe == 0.0
    quiet = pt.hessian(model, F.cross_entropy, (x, y), check_determinism=False)
    quiet.matvec(v)
    assert quiet.n_hvps == 1 and quiet.last_probe is None
    assert H.check_determinism() == 0.0 and H.n_hvps == 4  # on demand: two whole products


def test_hvp_on_tensors_stays_in_torch():
    model, (x, y) = tm.mlp_tanh(), tm.classification_batches([8])[0]
    H = pt.hessian(model, F.cross_entropy, (x, y))
    v = torch.randn(H.shape[0], dtype=torch.float64)
    out = H.hvp(v)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64 and out.shape == v.shape
    assert np.allclose(out.numpy(), H.matvec(v.numpy()), rtol=0, atol=1e-14)
    assert abs(H.loss() - F.cross_entropy(model(x), y).detach().item()) < 1e-14


def test_model_with_dict_inputs_and_tuple_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)
            self.b = nn.Linear(4, 2)

        def forward(self, u, w):
            return torch.tanh(self.a(u)) * self.b(w)

    torch.manual_seed(0)
    model = Two().double()
    u, w = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    t = torch.randn(6, 2, dtype=torch.float64)
    loss = lambda o, y: ((o - y) ** 2).mean()  # noqa: E731
    H1 = pt.hessian(model, loss, [((u, w), t)])
    H2 = pt.hessian(model, loss, ({"u": u, "w": w}, t))
    v = np.random.default_rng(10).standard_normal(H1.shape[0])
    assert _rel(H1.matvec(v), H2.matvec(v)) <= 1e-14


def test_bfloat16_model_converges_at_its_default_tolerance():
    from pycurv._progress import measure_top

    model = tm.mlp_tanh().to(torch.bfloat16)
    x, y = tm.classification_batches([64])[0]
    H = pt.hessian(model, F.cross_entropy, (x.bfloat16(), y))
    assert H.dtype == "bfloat16" and H.unit_roundoff == 2.0**-8 and H.probe_rtol == 1e-2
    res = measure_top(H, seed=0)  # tol 1e-2 for bfloat16
    ref = pt.sharpness(model, F.cross_entropy, (x, y), dtype="float64", tol=1e-10)  # the same bf16 weights
    assert res.converged and abs(res.eigenvalues[0] - ref) <= 2e-2 * ref
