"""The noisy quadratic model (Zhang et al. 2019): exact expectations, simulation, batch-size scaling."""

import math

import numpy as np
import pytest

from pycurv.stability import (
    NoisyQuadraticModel,
    curvature_batch_scaling,
    iteration_matrix,
    max_stable_lr,
    noise_scale_from_batch_norms,
    noise_scale_from_gradients,
    nqm_batch_scaling,
    nqm_best_lr,
    nqm_critical_batch_size,
    nqm_expected_loss,
    nqm_lr_grid,
    nqm_max_lr,
    nqm_steady_state_loss,
    nqm_steps_to_target,
    simple_noise_scale,
)

SMALL = NoisyQuadraticModel([2.0, 1.0, 0.3, 0.05], noise=[1.0, 3.0, 0.5, 0.2], init=[1.0, 0.5, 2.0, 4.0])


def _simulate(model, lr, batch, steps, replicates, seed, momentum=0.0, nesterov=False):
    """SGD (PyTorch's momentum forms) on ½Σhθ² with gradient noise N(0, c/B); loss per step per replicate."""
    rng = np.random.default_rng(seed)
    h, c = model.curvatures, model.noise
    theta = rng.standard_normal((replicates, h.size)) * np.sqrt(model.init)
    buf = np.zeros_like(theta)
    losses = np.empty((steps + 1, replicates))
    losses[0] = 0.5 * (theta**2) @ h
    for t in range(1, steps + 1):
        g = h * theta + rng.standard_normal(theta.shape) * np.sqrt(c / batch)
        if momentum:
            buf = momentum * buf + g
            g = g + momentum * buf if nesterov else buf
        theta = theta - lr * g
        losses[t] = 0.5 * (theta**2) @ h
    return losses


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.8, False), (0.6, True)],
                         ids=["sgd", "heavy-ball", "nesterov"])
def test_expected_loss_matches_simulation(momentum, nesterov):
    hp = {"momentum": momentum, "nesterov": nesterov} if momentum else {}
    lr = 0.25 * nqm_max_lr(SMALL, **hp)
    batch, steps, replicates = 4, 60, 20_000
    exact = nqm_expected_loss(SMALL, lr, batch, steps, **hp)
    sim = _simulate(SMALL, lr, batch, steps, replicates, seed=7, momentum=momentum, nesterov=nesterov)
    mean = sim.mean(axis=1)
    se = sim.std(axis=1, ddof=1) / math.sqrt(replicates)
    z = np.abs(mean - exact) / se
    assert z.max() < 5, f"max |z| = {z.max():.2f} at step {int(z.argmax())}"
    # and the dynamics went somewhere: from the initial loss towards the noise floor
    assert exact[-1] < 0.5 * exact[0]
    assert exact[-1] > nqm_steady_state_loss(SMALL, lr, batch, **hp)


def test_sgd_steady_state_closed_form():
    lr, b = 0.4, 8
    h, c = SMALL.curvatures, SMALL.noise
    expected = 0.5 * np.sum(h * lr * c / (b * h * (2 - lr * h)))
    assert nqm_steady_state_loss(SMALL, lr, b) == pytest.approx(expected, rel=1e-13)
    long = nqm_expected_loss(SMALL, lr, b, 3000)
    assert long[-1] == pytest.approx(expected, rel=1e-10)
    assert nqm_steady_state_loss(SMALL, 1.01 * nqm_max_lr(SMALL), b) == math.inf


def _first_hit(model, lr, batch, target, **hp):
    losses = nqm_expected_loss(model, lr, batch, 5_000, **hp)
    hit = np.flatnonzero(losses <= target)
    return float(hit[0]) if hit.size else math.inf


@pytest.mark.parametrize("model,hp", [
    (SMALL, {}),
    (NoisyQuadraticModel([2.0, 1.0, 0.3, 0.05], init=[1.0, 1e-4, 1.0, 1.0]), {}),  # one direction starts low
    (SMALL, {"momentum": 0.9}),
    (SMALL, {"momentum": 0.5, "nesterov": True}),
])
def test_steps_to_target_is_the_first_hit(model, hp):
    l_inf = nqm_steady_state_loss(model, 0.3 * nqm_max_lr(model, **hp), 16, **hp)
    for frac in (0.3, 0.6, 0.9):
        lr = frac * nqm_max_lr(model, **hp)
        for batch in (1, 16, None):
            target = 1.5 * l_inf if batch is not None else 1e-3 * model.initial_loss
            assert nqm_steps_to_target(model, lr, batch, target, **hp) == _first_hit(model, lr, batch, target, **hp)
    # unreachable: at or below the steady state
    lr = 0.3 * nqm_max_lr(model, **hp)
    assert nqm_steps_to_target(model, lr, 16, l_inf, **hp) == math.inf
    assert nqm_steps_to_target(model, lr, 16, model.initial_loss * 2, **hp) == 0.0


def test_best_lr_is_the_grid_minimum():
    target = 0.05 * SMALL.initial_loss
    lrs = nqm_lr_grid(SMALL, 30)
    lr, steps = nqm_best_lr(SMALL, 8, target, lrs=lrs)
    brute = [nqm_steps_to_target(SMALL, x, 8, target) for x in lrs]
    assert steps == min(brute) and lr == lrs[int(np.argmin(brute))]
    assert lrs[-1] == pytest.approx(0.999 * 2 / SMALL.sharpness) and lrs[0] == pytest.approx(1e-4 * 2 / SMALL.sharpness)


def test_batch_scaling_and_critical_batch_size():
    model = NoisyQuadraticModel.zhang(50)
    target = 0.01 * model.initial_loss
    res = nqm_batch_scaling(model, [1, 4, 16, 64, 256, 1024], target)
    assert np.all(np.diff(res.steps) <= 0)  # more batch never hurts on a fixed grid
    # perfect scaling at small batch sizes: 4× the batch, about 4× fewer steps and 4× the learning rate
    assert res.steps[0] / res.steps[1] == pytest.approx(4.0, rel=0.05)
    assert res.best_lr[1] / res.best_lr[0] == pytest.approx(4.0, rel=0.1)
    # diminishing returns at large batch sizes
    assert res.steps[-2] / res.steps[-1] < 1.5
    bc = res.critical_batch_size
    assert bc == nqm_critical_batch_size(model, target)
    grid = nqm_lr_grid(model)
    assert nqm_best_lr(model, bc, target, lrs=grid)[1] <= 2 * res.min_steps
    assert nqm_best_lr(model, bc / 1.002, target, lrs=grid)[1] > 2 * res.min_steps
    assert res.min_steps == nqm_best_lr(model, None, target, lrs=grid)[1]
    assert res.max_stable_lr == pytest.approx(2.0)


def test_gilmer_high_curvature_gains_little_from_larger_batches():
    """Gilmer et al. 2022, §6 / Fig. 6, reproduced in the NQM: same noise, curvature × 1, × 16."""
    batches = [1, 4, 16, 64, 256, 1024]
    res = curvature_batch_scaling(NoisyQuadraticModel.zhang(50), (1.0, 16.0), batches)
    low, high = res[1.0], res[16.0]
    assert low.speedup[-1] > 50          # near-linear scaling over a wide range
    assert high.speedup[-1] < 2          # almost none
    assert low.best_lr[2] / low.best_lr[0] == pytest.approx(16.0, rel=0.15)  # η* grows with B
    assert np.all(high.lr_fraction > 0.75)  # η* held at the stability limit 2/λ1
    assert np.ptp(high.best_lr[1:]) == 0  # ... and fixed
    assert high.critical_batch_size < low.critical_batch_size / 100
    # in this model curvature × s is batch size × s²: steps(s, B) = steps(1, s²·B)
    ident = curvature_batch_scaling(NoisyQuadraticModel.zhang(50), (1.0, 2.0), [4, 16, 64], critical=False)
    np.testing.assert_allclose(ident[2.0].steps[:2], ident[1.0].steps[1:], atol=1)


def test_momentum_batch_scaling_runs_and_uses_the_momentum_limit():
    model = NoisyQuadraticModel.zhang(20)
    res = nqm_batch_scaling(model, [1, 16, 256], 0.02 * model.initial_loss, momentum=0.9, critical=False)
    assert res.max_stable_lr == pytest.approx(max_stable_lr("sgd", 1.0, momentum=0.9))
    assert np.all(np.diff(res.steps) < 0) and math.isnan(res.critical_batch_size)


def test_model_construction():
    m = NoisyQuadraticModel.zhang(4, top=2.0, power=1.0, noise_scale=3.0)
    np.testing.assert_allclose(m.curvatures, [2.0, 1.0, 2 / 3, 0.5])
    np.testing.assert_allclose(m.noise, 3 * m.curvatures)
    assert m.initial_loss == pytest.approx(0.5 * m.curvatures.sum())
    assert m.sharpness == 2.0 and m.dim == 4
    assert m.scaled(10.0).sharpness == 20.0
    assert m.noise_scale() == pytest.approx(3 * m.curvatures.sum() / np.sum(m.curvatures**2))
    with pytest.raises(ValueError):
        m.curvatures[0] = 5.0  # read-only


@pytest.mark.parametrize("call,match", [
    (lambda: NoisyQuadraticModel([1.0, 0.0]), r"curvatures must be > 0, got curvatures\[1\]=0.0"),
    (lambda: NoisyQuadraticModel([1.0, 2.0], noise=[1.0]), r"noise must have 2 entries"),
    (lambda: NoisyQuadraticModel([1.0], init=[-1.0]), r"init must be >= 0"),
    (lambda: NoisyQuadraticModel([1.0, float("nan")]), r"curvatures contains NaN"),
    (lambda: NoisyQuadraticModel.zhang(0), r"dim must be an integer >= 1"),
    (lambda: nqm_steps_to_target(SMALL, 0.1, 0, 1.0), r"batch_size must be > 0"),
    (lambda: nqm_expected_loss(SMALL, 0.1, 1, -1), r"steps must be an integer >= 0"),
    (lambda: nqm_lr_grid(SMALL, 1), r"n must be an integer >= 2"),
    (lambda: curvature_batch_scaling(SMALL, target_fraction=2.0), r"target_fraction must satisfy"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_iteration_matrices_agree_with_nqm_dynamics():
    """The NQM's 3×3 map is M⊗M of the same iteration matrix the thresholds use."""
    lr, h = 0.2, 1.7
    model = NoisyQuadraticModel([h], noise=[0.0], init=[1.0])
    m = iteration_matrix("sgd", h, lr, momentum=0.7)
    x = np.array([1.0, 0.0])
    second = []
    for _ in range(5):
        x = m @ x
        second.append(x[0] ** 2)
    np.testing.assert_allclose(nqm_expected_loss(model, lr, None, 5, momentum=0.7)[1:], 0.5 * h * np.array(second),
                               rtol=1e-12)


# --- gradient noise scale -------------------------------------------------------------------------


def test_noise_scale():
    assert simple_noise_scale(10.0, 2.0) == 5.0
    assert simple_noise_scale(1.0, 0.0) == math.inf
    rng = np.random.default_rng(0)
    g_true = np.array([1.0, -2.0, 0.5])
    sigma = np.array([3.0, 1.0, 2.0])
    grads = g_true + sigma * rng.standard_normal((40_000, 3))
    expected = np.sum(sigma**2) / np.sum(g_true**2)
    assert noise_scale_from_gradients(grads) == pytest.approx(expected, rel=0.03)
    # two batch sizes, exact expectations E‖G_B‖² = ‖G‖² + tr Σ / B
    g2, tr = np.sum(g_true**2), np.sum(sigma**2)
    assert noise_scale_from_batch_norms(8, g2 + tr / 8, 128, g2 + tr / 128) == pytest.approx(tr / g2, rel=1e-12)
    with pytest.raises(ValueError, match="need 0 < batch_small < batch_big"):
        noise_scale_from_batch_norms(16, 1.0, 8, 1.0)
    with pytest.raises(ValueError, match=r"shape \(n, p\) with n >= 2"):
        noise_scale_from_gradients(np.ones(3))


# ---- sizes and scales a hostile caller may ask for -----------------------------------------


def test_zhang_curvatures_that_underflow_are_named():
    with pytest.raises(ValueError, match=r"h_i = top·i\^-power underflows to 0 from i = 3 on \(top=1, power=1000, "
                                         r"dim=100\): every curvature must be a positive float64"):
        NoisyQuadraticModel.zhang(100, power=1000)
    from pycurv.stability.nqm import zhang_underflow

    assert zhang_underflow(100, 1.0, 1.0) is None
    first = zhang_underflow(10**6, 1e-300, 10.0)
    assert 1e-300 * float(first - 1) ** -10.0 > 0 and 1e-300 * float(first) ** -10.0 == 0


def test_a_search_that_does_not_fit_is_refused_with_its_bytes(monkeypatch):
    import pycurv._memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 10 << 20)  # 10 MiB left
    model = NoisyQuadraticModel.zhang(20000)
    with pytest.raises(MemoryError, match=r"the noisy quadratic model's search over 80 learning rates for 20000 "
                                          r"directions needs about .* MiB \(\d\.\d+e\+0\d bytes\), more than the "
                                          r"10 MiB this process can still take; use fewer directions or learning"):
        nqm_batch_scaling(model, [1.0, 2.0], 0.01 * model.initial_loss)
    monkeypatch.setattr(memory, "available_bytes", lambda: None)  # unknown: no refusal
    nqm_best_lr(NoisyQuadraticModel.zhang(50), 4.0, 0.1)


def test_scan_tables_stay_within_their_budget(monkeypatch):
    """Past the budget the per-learning-rate tables are built for each use, and the answers do not change."""
    import pycurv.stability.nqm as nqm

    model = NoisyQuadraticModel.zhang(300)
    target = 0.01 * model.initial_loss
    ref = nqm_batch_scaling(model, [1.0, 8.0, 64.0], target, critical=False, momentum=0.9)
    seen = []
    put = nqm._RowsCache.put

    def spy(self, key, entry):
        put(self, key, entry)
        seen.append((self.bytes, len(self.entries)))

    budget = 2 * (256 * 300 * 3 + 300 * 9) * 8  # two learning rates' tables (momentum: 3 moments)
    monkeypatch.setattr(nqm, "_SCAN_CACHE_BYTES", budget)
    monkeypatch.setattr(nqm._RowsCache, "put", spy)
    small = nqm_batch_scaling(model, [1.0, 8.0, 64.0], target, critical=False, momentum=0.9)
    assert len(seen) > 20 and max(b for b, _ in seen) <= budget and max(n for _, n in seen) == 2
    np.testing.assert_array_equal(small.steps, ref.steps)
    np.testing.assert_array_equal(small.best_lr, ref.best_lr)


@pytest.mark.filterwarnings("error")
def test_extreme_curvatures_give_answers_without_warnings():
    huge = NoisyQuadraticModel.zhang(100, top=1e300)
    assert huge.noise_scale() == pytest.approx(NoisyQuadraticModel.zhang(100).noise_scale() / 1e300, rel=1e-12,
                                               abs=0)
    res = nqm_batch_scaling(huge, [1.0, 1024.0], 0.01 * huge.initial_loss)
    assert np.all(np.isfinite(res.steps))  # the noise η²c ~ 1/top is negligible: every batch size the same
    tiny = NoisyQuadraticModel.zhang(100, top=1e-300)
    res = nqm_batch_scaling(tiny, [1.0, 1024.0], 0.01 * tiny.initial_loss)
    assert np.all(np.isinf(res.steps))  # η²c ~ 1/top overflows: the target is out of reach, said as "never"
