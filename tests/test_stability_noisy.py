"""Minibatch SGD mean-square stability (Wu et al. 2018) against enumeration and Monte-Carlo simulation."""

import itertools
import math
from functools import reduce

import numpy as np
import pytest

from pycurv.stability import (
    is_mean_square_stable,
    iteration_matrix,
    largest_stable_value,
    max_stable_lr,
    mean_square_radius,
    minibatch_variance_factor,
    noisy_sgd_max_curvature_variance,
    noisy_sgd_max_lr,
    noisy_sgd_max_sharpness,
    noisy_sgd_min_batch_size,
    noisy_sgd_sharpness_range,
    second_moment_operator,
    solve_noisy_sgd,
    spectral_radius,
    threshold,
)

# Per-example curvatures along the top direction: mean 1, population variance 0.6875, some negative.
CURVATURES = 1.0 + 1.5 * np.linspace(-1.0, 1.0, 10)
N, B = CURVATURES.size, 2
A, S2 = float(CURVATURES.mean()), float(CURVATURES.var())


def _subset_means(a, b):
    subsets = np.array(list(itertools.combinations(range(a.size), b)))
    return a[subsets].mean(axis=1)


def test_variance_factor_is_sampling_without_replacement():
    a = np.array([0.3, -1.0, 2.5, 4.0, 0.0, 1.1, 7.0])
    for b in range(1, a.size + 1):
        means = _subset_means(a, b)
        assert means.var() == pytest.approx(a.var() * minibatch_variance_factor(b, a.size), rel=1e-12, abs=1e-15)
    assert minibatch_variance_factor(7, 7) == 0.0
    assert minibatch_variance_factor(4) == 0.25
    assert minibatch_variance_factor(1, 1) == 0.0


def _noise_matrix(hp, lr):
    return iteration_matrix("sgd", 1.0, lr, **hp) - iteration_matrix("sgd", 0.0, lr, **hp)


@pytest.mark.parametrize("hp", [{}, {"momentum": 0.7}, {"momentum": 0.6, "nesterov": True},
                                {"momentum": 0.8, "dampening": 0.8}])
def test_second_moment_map_equals_enumeration_over_all_batches(hp):
    """E over all C(N, B) batches of M(â) S M(â)ᵀ, exactly, for a random symmetric S."""
    lr = 0.3
    means = _subset_means(CURVATURES, B)
    k = iteration_matrix("sgd", A, lr, **hp).shape[0]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((k, k))
    s = x + x.T
    exact = sum(iteration_matrix("sgd", m, lr, **hp) @ s @ iteration_matrix("sgd", m, lr, **hp).T for m in means)
    exact /= means.size
    op = second_moment_operator(iteration_matrix("sgd", A, lr, **hp), _noise_matrix(hp, lr),
                                S2 * minibatch_variance_factor(B, N))
    iu = np.triu_indices(k)
    np.testing.assert_allclose(op @ s[iu], exact[iu], rtol=1e-12, atol=1e-13)


def test_plain_sgd_is_jastrzebski_eq1():
    lr = 0.5
    lhs = (1 - lr * A) ** 2 + S2 * lr**2 * (N - B) / (B * (N - 1))
    assert mean_square_radius(lr, A, S2, B, N) == pytest.approx(lhs, rel=1e-15)
    assert noisy_sgd_max_lr(A, S2, B, N) == pytest.approx(2 * A / (A**2 + S2 * (N - B) / (B * (N - 1))), rel=1e-15)


def _general_radius(lr, a, s2, b, n, hp):
    return spectral_radius(second_moment_operator(iteration_matrix("sgd", a, lr, **hp), _noise_matrix(hp, lr),
                                                  s2 * minibatch_variance_factor(b, n)))


@pytest.mark.parametrize("b,n,s2,a", [(2, 10, 0.6875, 1.0), (32, 50_000, 2000.0, 15.0), (7, None, 3.0, 0.4)])
def test_closed_forms_equal_the_second_moment_routine(b, n, s2, a):
    """Without momentum: the closed forms against bisection on the 1×1 second-moment operator."""
    hp = {}
    lr_closed = noisy_sgd_max_lr(a, s2, b, n)
    lr_general = largest_stable_value(lambda lr: _general_radius(lr, a, s2, b, n, hp) <= 1, 1.0 / a)
    assert lr_closed == pytest.approx(lr_general, rel=1e-12)
    lr = 0.8 * lr_closed
    hi = noisy_sgd_max_sharpness(lr, s2, b, n)
    hi_general = largest_stable_value(lambda x: _general_radius(lr, x, s2, b, n, hp) <= 1, a)
    assert hi == pytest.approx(hi_general, rel=1e-12)
    v_closed = noisy_sgd_max_curvature_variance(lr, a, b, n)
    v_general = largest_stable_value(lambda v: _general_radius(lr, a, v, b, n, hp) <= 1, s2)
    assert v_closed == pytest.approx(v_general, rel=1e-12)


MOMENTA = [{}, {"momentum": 0.5}, {"momentum": 0.9}, {"momentum": 0.5, "nesterov": True},
           {"momentum": 0.8, "dampening": 0.8}, {"momentum": 0.9, "weight_decay": 0.01}]


@pytest.mark.parametrize("hp", MOMENTA, ids=[str(h) for h in MOMENTA])
def test_each_solver_lands_on_the_boundary(hp):
    """Solve for η, a, s², B in turn: ρ of the second-moment map is 1 at each answer."""
    a, s2, b, n = 4.0, 9.0, 8, 1000
    lr = noisy_sgd_max_lr(a, s2, b, n, **hp)
    assert mean_square_radius(lr, a, s2, b, n, **hp) == pytest.approx(1.0, abs=1e-12)
    assert not is_mean_square_stable(lr * (1 + 1e-9), a, s2, b, n, **hp)
    lr = 0.7 * lr
    lo, hi = noisy_sgd_sharpness_range(lr, s2, b, n, **hp)
    assert lo < a < hi
    for edge in (lo, hi):
        assert mean_square_radius(lr, edge, s2, b, n, **hp) == pytest.approx(1.0, abs=1e-9)
    vmax = noisy_sgd_max_curvature_variance(lr, a, b, n, **hp)
    assert mean_square_radius(lr, a, vmax, b, n, **hp) == pytest.approx(1.0, abs=1e-12)
    bmin = noisy_sgd_min_batch_size(lr, a, s2 * 20, n, **hp)
    assert 1 < bmin < n
    assert mean_square_radius(lr, a, s2 * 20, bmin, n, **hp) == pytest.approx(1.0, abs=1e-9)
    assert solve_noisy_sgd(sharpness=a, curvature_variance=s2, batch_size=b, dataset_size=n, **hp) == \
        pytest.approx(lr / 0.7, rel=1e-15)
    assert solve_noisy_sgd(lr=lr, curvature_variance=s2, batch_size=b, dataset_size=n, **hp) == hi
    assert solve_noisy_sgd(lr=lr, sharpness=a, batch_size=b, dataset_size=n, **hp) == vmax
    assert solve_noisy_sgd(lr=lr, sharpness=a, curvature_variance=s2 * 20, dataset_size=n, **hp) == bmin


@pytest.mark.parametrize("hp", MOMENTA, ids=[str(h) for h in MOMENTA])
def test_without_noise_the_deterministic_threshold_returns(hp):
    a = 3.0
    det = max_stable_lr("sgd", a, **hp)
    assert noisy_sgd_max_lr(a, 0.0, 4, 100, **hp) == pytest.approx(det, rel=1e-12)
    assert noisy_sgd_max_lr(a, 50.0, 100, 100, **hp) == pytest.approx(det, rel=1e-12)  # full batch
    lr = 0.5 * det
    assert noisy_sgd_max_sharpness(lr, 0.0, 4, 100, **hp) == pytest.approx(
        threshold("sgd", lr, **hp).max_stable_sharpness, rel=1e-12)
    assert noisy_sgd_min_batch_size(lr, a, 0.0, 100, **hp) == 1.0


def test_noise_shrinks_the_bound_monotonically():
    bounds = [noisy_sgd_max_lr(A, S2, b, 64, momentum=0.9) for b in (1, 2, 4, 8, 16, 32, 64)]
    assert all(x < y for x, y in zip(bounds, bounds[1:]))
    assert bounds[-1] == pytest.approx(max_stable_lr("sgd", A, momentum=0.9))


# --- Monte-Carlo of minibatch SGD on the finite sum -------------------------------------------------

# (hyper-parameters, steps): horizons where E[θ_T²] is far from 1 on both sides and the
# fourth moment (hence the standard error) is still moderate.
MC_CASES = [({}, 6), ({"momentum": 0.5}, 8), ({"momentum": 0.5, "nesterov": True}, 6)]


def _exact_moments(hp, lr, steps):
    """E[θ_T²] and E[θ_T⁴] from θ0 = 1, b0 = 0, by enumerating every batch (no sampling)."""
    mats = [iteration_matrix("sgd", m, lr, **hp) for m in _subset_means(CURVATURES, B)]
    k = mats[0].shape[0]
    x0 = np.zeros(k)
    x0[0] = 1.0
    m2 = sum(np.kron(m, m) for m in mats) / len(mats)
    m4 = sum(reduce(np.kron, [m] * 4) for m in mats) / len(mats)
    e2 = (np.linalg.matrix_power(m2, steps) @ np.kron(x0, x0))[0]
    e4 = (np.linalg.matrix_power(m4, steps) @ reduce(np.kron, [x0] * 4))[0]
    return e2, e4


def _simulate(hp, lr, steps, replicates, seed):
    """Minibatch SGD (PyTorch's update) on the finite sum; each step draws B distinct examples."""
    rng = np.random.default_rng(seed)
    m0 = iteration_matrix("sgd", 0.0, lr, **hp)
    m1 = iteration_matrix("sgd", 1.0, lr, **hp) - m0  # the update is affine in the batch curvature
    x = np.zeros((replicates, m0.shape[0]))
    x[:, 0] = 1.0
    for _ in range(steps):
        batch = np.argpartition(rng.random((replicates, N)), B, axis=1)[:, :B]
        a_hat = CURVATURES[batch].mean(axis=1)
        x = x @ m0.T + a_hat[:, None] * (x @ m1.T)
    return x[:, 0] ** 2


@pytest.mark.parametrize("hp,steps", MC_CASES, ids=["sgd", "heavy-ball", "nesterov"])
def test_monte_carlo_stable_below_unstable_above(hp, steps):
    """At 0.9× the mean-square limit E[θ²] shrinks, at 1.1× it grows, and it matches the recursion."""
    lr_star = noisy_sgd_max_lr(A, S2, B, N, **hp)
    # The regime where the noise term matters: 1.1× the limit is well inside the noise-free bound.
    assert 1.1 * lr_star < 0.8 * max_stable_lr("sgd", A, **hp)
    replicates = 40_000
    for factor, seed in ((0.9, 11), (1.1, 12)):
        lr = factor * lr_star
        e2, e4 = _exact_moments(hp, lr, steps)
        # The second-moment recursion (what the solver uses) is the enumerated expectation.
        op = second_moment_operator(iteration_matrix("sgd", A, lr, **hp), _noise_matrix(hp, lr),
                                    S2 * minibatch_variance_factor(B, N))
        s = np.zeros(op.shape[0])
        s[0] = 1.0
        assert (np.linalg.matrix_power(op, steps) @ s)[0] == pytest.approx(e2, rel=1e-10)
        sim = _simulate(hp, lr, steps, replicates, seed)
        se = math.sqrt((e4 - e2**2) / replicates)
        assert abs(sim.mean() - e2) < 5 * se, (factor, sim.mean(), e2, se)
        # From E[θ0²] = 1: shrunk below the limit, grown above it, beyond sampling error.
        if factor < 1:
            assert sim.mean() + 5 * se < 1.0
        else:
            assert sim.mean() - 5 * se > 1.0


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("call,match", [
    (lambda: minibatch_variance_factor(0, 10), r"batch_size must be >= 1, got batch_size=0"),
    (lambda: minibatch_variance_factor(11, 10), r"batch_size must not exceed dataset_size"),
    (lambda: mean_square_radius(0.1, 1.0, -1.0, 2, 10), r"curvature_variance must be >= 0"),
    (lambda: mean_square_radius(-0.1, 1.0, 1.0, 2, 10), r"lr must be > 0"),
    (lambda: noisy_sgd_max_lr(0.0, 1.0, 2, 10), r"sharpness must be > 0 for a finite learning-rate bound"),
    (lambda: noisy_sgd_max_sharpness(1.0, 100.0, 1, None), r"no sharpness is mean-square stable at lr=1.0"),
    (lambda: noisy_sgd_min_batch_size(1.0, 3.0, 1.0, 100), r"unstable even without gradient noise"),
    (lambda: solve_noisy_sgd(lr=0.1, sharpness=1.0), r"give all but one of .* missing: batch_size, curvature_var"),
    (lambda: solve_noisy_sgd(lr=0.1, sharpness=1.0, batch_size=2, curvature_variance=1.0), r"missing: none"),
    (lambda: noisy_sgd_max_lr(1.0, 1.0, 2, 10, momentum=1.0), r"momentum must satisfy 0 <= momentum < 1"),
    (lambda: noisy_sgd_max_lr(1.0, 1.0, 2, 10, beta1=0.9), r"beta1 does not apply to sgd"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_empty_range_is_none():
    assert noisy_sgd_sharpness_range(1.0, 100.0, 1, None) is None
    assert noisy_sgd_sharpness_range(1.0, 100.0, 1, None, momentum=0.5) is None
