"""Gradient covariance (Gram matrix of microbatch gradients) and curvature variance."""

from __future__ import annotations

import numpy as np
import pytest

import pycurv
from pycurv import noise
from pycurv.stability import minibatch_variance_factor, noisy_sgd_max_lr


def test_gram_statistics_with_single_samples_is_the_population_covariance(rng):
    N, n = 12, 7
    per = rng.standard_normal((N, n)) + 0.5
    st = noise.gram_statistics(per, np.ones(N, dtype=int), return_direction=True)
    g = per.mean(0)
    K = (per - g).T @ (per - g) / N
    ev, U = np.linalg.eigh(K)
    assert st.lambda_max == pytest.approx(ev[-1], rel=1e-12)
    assert st.trace == pytest.approx(np.trace(K), rel=1e-12)
    assert st.grad_norm_sq == pytest.approx(g @ g, rel=1e-12)
    assert st.noise_scale == pytest.approx(np.trace(K) / (g @ g), rel=1e-12)
    assert abs(abs(st.direction @ U[:, -1]) - 1) < 1e-10
    assert st.n_batches == N and st.n_samples == N and st.batch_size == 1
    assert st.minibatch_eigenvalues[-1] == pytest.approx(0.0, abs=1e-12)


def test_gram_estimates_are_unbiased_over_random_partitions(rng):
    N, n, M = 60, 5, 6
    A = rng.standard_normal((n, n))
    per = rng.standard_normal((N, n)) @ A + 1.0
    g = per.mean(0)
    K = (per - g).T @ (per - g) / N
    traces, tops = [], []
    for _ in range(3000):
        perm = rng.permutation(N)
        batches = per[perm].reshape(N // M, M, n).mean(1)
        st = noise.gram_statistics(batches, np.full(N // M, M))
        traces.append(st.trace)
        tops.append(st.lambda_max)
    # tr is linear in the data: exactly unbiased; the top eigenvalue is biased upwards only slightly
    se = np.std(traces) / np.sqrt(len(traces))
    assert abs(np.mean(traces) - np.trace(K)) < 4 * se
    assert np.mean(tops) == pytest.approx(np.linalg.eigvalsh(K)[-1], rel=0.25)


def test_curvature_variance_from_batches_is_exact_per_sample_and_unbiased(rng):
    N, M = 40, 5
    a_i = rng.gamma(2.0, 1.5, N)
    a, s2 = noise.curvature_variance_from_batches(a_i, np.ones(N))
    assert a == pytest.approx(a_i.mean(), rel=1e-14)
    assert s2 == pytest.approx(a_i.var(), rel=1e-12)  # population variance (1/N)
    est = []
    for _ in range(4000):
        b = a_i[rng.permutation(N)].reshape(N // M, M).mean(1)
        est.append(noise.curvature_variance_from_batches(b, np.full(N // M, M))[1])
    se = np.std(est) / np.sqrt(len(est))
    assert abs(np.mean(est) - a_i.var()) < 4 * se
    # unequal sizes: still unbiased
    est = []
    sizes = np.array([3, 5, 7, 9, 16])
    cuts = np.cumsum(sizes)[:-1]
    for _ in range(4000):
        parts = np.split(a_i[rng.permutation(N)], cuts)
        est.append(noise.curvature_variance_from_batches([p.mean() for p in parts], sizes)[1])
    se = np.std(est) / np.sqrt(len(est))
    assert abs(np.mean(est) - a_i.var()) < 4 * se


def test_errors_name_the_value():
    with pytest.raises(ValueError, match="at least two microbatches, got 1; build the operator with microbatch_size="):
        noise.curvature_variance_from_batches([1.0], [10])
    with pytest.raises(ValueError, match="at least two microbatches"):
        noise.gram_statistics(np.ones((1, 3)), [4])
    with pytest.raises(ValueError, match="shape \\(L, n\\) with L = len\\(sizes\\) = 3"):
        noise.gram_statistics(np.ones((2, 3)), [1, 1, 1])
    with pytest.raises(TypeError, match="need a framework operator"):
        noise.curvature_variance(pycurv.MatrixOperator(np.eye(3)), np.ones(3))


def test_max_lr_is_the_wu_condition():
    cv = noise.CurvatureVariance(sharpness=10.0, variance=400.0, batch_curvatures=np.zeros(2),
                                 batch_sizes=np.array([50, 50]), n_samples=100)
    B = 8
    expected = 2 * 10.0 / (10.0**2 + 400.0 * (100 - B) / (B * 99))
    assert cv.max_lr(B) == pytest.approx(expected, rel=1e-12)
    assert cv.max_lr(B) == pytest.approx(noisy_sgd_max_lr(10.0, 400.0, B, 100), rel=1e-14)
    assert minibatch_variance_factor(B, 100) == pytest.approx((100 - B) / (B * 99))


# -- through the framework adapters ------------------------------------------


def test_torch_per_sample_noise_matches_autograd():
    import torch
    import torch.nn.functional as F

    import pycurv.torch as pt
    import torch_models as tm

    model = tm.mlp_tanh()
    x, y = tm.classification_batches([14])[0]
    H = pt.hessian(model, F.cross_entropy, (x, y), microbatch_size=1)
    # reference per-sample gradients and Hessians, by plain autograd
    grads, hess = [], []
    for i in range(14):
        Hi = tm.dense_hessian(model, F.cross_entropy, [(x[i:i + 1], y[i:i + 1])])
        hess.append(Hi)
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        grads.append(np.concatenate([p.grad.reshape(-1).numpy() for p in model.parameters()]))
        model.zero_grad()
    grads = np.array(grads)
    st = noise.gradient_noise(H)
    g = grads.mean(0)
    K = (grads - g).T @ (grads - g) / 14
    assert st.lambda_max == pytest.approx(np.linalg.eigvalsh(K)[-1], rel=1e-10)
    assert st.trace == pytest.approx(np.trace(K), rel=1e-10)
    assert st.grad_norm_sq == pytest.approx(g @ g, rel=1e-10)

    res = pycurv.lanczos(H, 1, tol=1e-10, seed=0)
    v = res.eigenvectors[:, 0]
    cv = noise.curvature_variance(H, v)
    a_i = np.array([v @ Hi @ v for Hi in hess])
    assert cv.sharpness == pytest.approx(res.eigenvalues[0], rel=1e-9)
    assert cv.sharpness == pytest.approx(a_i.mean(), rel=1e-10)
    assert cv.variance == pytest.approx(a_i.var(), rel=1e-9)
    assert cv.n_samples == 14 and cv.batch_sizes.tolist() == [1] * 14
    # microbatches of 7: a different (noisier) estimate of the same quantity, same mean
    H7 = pt.hessian(model, F.cross_entropy, (x, y), microbatch_size=7)
    cv7 = noise.curvature_variance(H7, v)
    assert cv7.sharpness == pytest.approx(cv.sharpness, rel=1e-12)
    assert cv7.batch_curvatures.shape == (2,)
    assert torch.is_tensor(next(H.batch_gradients())[1])


def test_jax_noise_runs_on_a_list_of_batches():
    import jax
    import jax.numpy as jnp

    import pycurv.jax as pj

    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.standard_normal((24, 3)), jnp.float32)
    Y = jnp.asarray(rng.standard_normal(24), jnp.float32)
    params = {"w": jnp.asarray([0.3, -0.2, 0.5], jnp.float32)}

    def loss(p, b):
        return jnp.mean((jnp.tanh(b[0] @ p["w"]) - b[1]) ** 2)

    batches = [(X[i:i + 4], Y[i:i + 4]) for i in range(0, 24, 4)]
    H = pj.hessian(loss, params, batches)
    st = noise.gradient_noise(H, return_direction=True)
    assert st.n_batches == 6 and st.n_samples == 24 and st.direction.shape == (3,)
    res = pycurv.lanczos(H, 1, tol=1e-4, seed=0)
    cv = noise.curvature_variance(H, res.eigenvectors[:, 0])
    assert cv.sharpness == pytest.approx(res.eigenvalues[0], rel=1e-4)
    assert cv.variance >= 0
    assert noise.gradient_noise(H, max_batches=3).n_samples == 12
    del jax
