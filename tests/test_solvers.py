"""Critical learning rate from forward passes, persistent catapult warmup, warmup timing."""

import math

import numpy as np
import pytest

import pycurv
from pycurv.solvers import (
    PersistentCatapultWarmup,
    bisect_critical_lr,
    critical_lr,
    exponential_search,
    linear_warmup_crossing,
    margin_report,
    warmup_timing,
)
from pycurv.stability import margin_report as stability_margin_report


def gd_step_loss(h, theta0):
    """Loss ½θᵀHθ after one GD step from θ0 at learning rate lr (H diagonal, given by h)."""
    h, theta0 = np.asarray(h, float), np.asarray(theta0, float)
    return lambda lr: 0.5 * float(np.sum(h * ((1 - lr * h) * theta0) ** 2))


@pytest.mark.parametrize("lam", [0.37, 4.0, 250.0])
@pytest.mark.parametrize("delta", [0.1, 0.01, 1e-4])
def test_finds_the_threshold_of_a_quadratic_to_its_tolerance(lam, delta):
    """One direction: the loss rises iff η > 2/λ, and rises by less than δ below (1 + √(1 + δ))/λ."""
    res = critical_lr(gd_step_loss([lam], [1.3]), delta=delta)
    assert 2 / lam <= res.lr < (1 + math.sqrt(1 + delta)) / lam
    assert res.lower < 2 / lam  # the loss decreased there
    assert res.loss0 <= res.loss < res.loss0 * (1 + delta)
    assert res.n_evals == len(res.history) and not res.capped
    assert res.history[0] == (0.0, res.loss0)


def test_many_directions_one_step_threshold():
    """Several directions: the one-step loss rises past η1 = 2Σh²θ²/Σh³θ² (a root of a quadratic in η)."""
    h = np.array([10.0, 3.0, 1.0, 0.2])
    theta0 = np.array([0.1, 1.0, -2.0, 3.0])
    eta1 = 2 * np.sum(h**2 * theta0**2) / np.sum(h**3 * theta0**2)
    fn = gd_step_loss(h, theta0)
    res = critical_lr(fn, lr0=1e-3, delta=0.05)
    assert res.lr >= eta1 and fn(res.lr) < 1.05 * fn(0.0)
    assert fn(0.999 * eta1) < fn(0.0) < fn(1.001 * eta1)
    assert res.lr > 2 / h.max()  # a single step tolerates more than 2/λ1 when θ0 is spread out


def test_start_above_the_threshold_searches_downward():
    res = critical_lr(gd_step_loss([4.0], [1.0]), lr0=10.0, delta=0.1)
    assert 0.5 <= res.lr < (1 + math.sqrt(1.1)) / 4
    first = exponential_search(gd_step_loss([4.0], [1.0]), lr0=10.0)
    assert first.lower < 0.5 <= first.upper and first.upper == pytest.approx(first.lower * 2)


def test_capped_at_the_target():
    res = critical_lr(gd_step_loss([4.0], [1.0]), lr0=1e-4, lr_target=0.3)
    assert res.capped and res.lr == 0.3 and res.loss < res.loss0


def test_non_finite_loss_counts_as_an_increase():
    lam = 4.0

    def fn(lr):
        return math.nan if lr > 1.0 else 0.5 * lam * (1 - lr * lam) ** 2

    res = critical_lr(fn, lr0=0.3, factor=10.0, delta=0.1)
    assert 0.5 <= res.lr < (1 + math.sqrt(1.1)) / lam


def test_bisection_directly_and_budget():
    fn = gd_step_loss([2.0], [1.0])
    res = bisect_critical_lr(fn, 0.5, 4.0, delta=0.01)
    assert 1.0 <= res.lr < (1 + math.sqrt(1.01)) / 2
    with pytest.raises(pycurv.NoConvergence, match="max_evals=5"):
        critical_lr(fn, lr0=1e-12, max_evals=5)
    with pytest.raises(pycurv.NoConvergence, match="bisection") as info:
        bisect_critical_lr(fn, 0.5, 4.0, delta=1e-9, max_evals=6)
    assert info.value.result.upper < 4.0  # the partial bracket comes back


@pytest.mark.parametrize("call,match", [
    (lambda: critical_lr(lambda lr: lr - 1.0), r"loss at θ0 must be > 0 .* got loss0=-1.0"),
    (lambda: critical_lr(gd_step_loss([1.0], [1.0]), max_evals=0), r"max_evals must be >= 1"),
    (lambda: critical_lr(gd_step_loss([1.0], [1.0]), delta=0.0), r"delta must be > 0, got delta=0.0"),
    (lambda: critical_lr(gd_step_loss([1.0], [1.0]), lr0=-1.0), r"lr0 must be > 0"),
    (lambda: critical_lr(gd_step_loss([1.0], [1.0]), factor=1.0), r"factor must be > 1"),
    (lambda: bisect_critical_lr(gd_step_loss([1.0], [1.0]), 2.0, 1.0), r"need lower < upper"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_step_loss_must_be_callable():
    with pytest.raises(TypeError, match="step_loss must be a callable"):
        critical_lr(0.5)


# --- persistent catapult warmup (Alg. 3) --------------------------------------------------------------


def _uv():
    """f(u, v) = ½(uv − 1)²: sharpness u² + v² near the minima, which catapults reduce."""
    def loss(p):
        return 0.5 * (p[0] * p[1] - 1.0) ** 2

    def step(p, lr):
        r = p[0] * p[1] - 1.0
        return p - lr * np.array([r * p[1], r * p[0]])

    return loss, step


def test_persistent_catapult_warmup_reaches_a_target_that_diverges_without_it():
    loss, step = _uv()
    p0 = np.array([3.0, 0.2])
    sharp0 = float(np.sum(p0**2))
    target = 0.8  # 3.6 × 2/λ0
    assert target > 3 * 2 / sharp0
    p = p0.copy()
    for _ in range(100):  # constant target learning rate: blows up
        p = step(p, target)
        if np.abs(p).max() > 1e6:
            break
    assert np.abs(p).max() > 1e6
    sched = PersistentCatapultWarmup(target, delta=0.1)
    p = p0.copy()
    lrs = []
    for _ in range(2000):
        lrs.append(sched.step(loss(p), lambda eta: loss(step(p, eta))))
        p = step(p, lrs[-1])
    assert sched.done and lrs[-1] == target
    assert loss(p) < 1e-12 and np.sum(p**2) < 2 / target  # converged to a minimum flat enough for η_trgt
    ev = sched.events
    assert ev[0].step == 0 and ev[0].lr > 2 / sharp0 * 0.95  # first catapult: just past η_c at θ0
    assert all(e.loss < e.reference_loss for e in ev[1:])   # re-estimates only below the reference
    assert sched.forward_passes == sum(e.estimate.n_evals for e in ev)
    assert max(lrs) == target


def test_catapult_schedule_state_machine():
    """Scripted losses: the probe is used only at the start and whenever the loss beats the reference."""
    calls = []

    def probe_for(crit, loss):
        def probe(lr):  # one step lowers the loss below η_c = crit and raises it above
            calls.append(lr)
            return 0.9 * loss if lr < crit else loss * lr / crit
        return probe

    sched = PersistentCatapultWarmup(1.0, delta=0.5, lr0=0.01)
    assert sched.lr is None and not sched.done
    lr = sched.step(1.0, probe_for(0.1, 1.0))
    assert 0.1 <= lr < 0.2 and sched.reference_loss == 1.0
    n = len(calls)
    assert sched.step(1.5, probe_for(0.3, 1.5)) == lr and len(calls) == n  # above the reference: keep η
    assert sched.step(1.0, probe_for(0.3, 1.0)) == lr and len(calls) == n  # equal is not below
    lr2 = sched.step(0.9, probe_for(0.3, 0.9))
    assert 0.3 <= lr2 < 0.6 and sched.reference_loss == 0.9 and len(calls) > n
    assert sched.events[-1].reference_loss == 1.0 and sched.events[-1].loss == 0.9
    lr3 = sched.step(0.5, probe_for(5.0, 0.5))  # flat now: the search stops at the target
    assert lr3 == 1.0 and sched.done
    n = len(calls)
    assert sched.step(0.1, probe_for(0.01, 0.1)) == 1.0 and len(calls) == n and len(sched.events) == 3
    assert "catapults=3" in repr(sched)


# --- warmup timing --------------------------------------------------------------------------------


def test_warmup_timing_numbers():
    w = warmup_timing(0.25, 1.0, 1000, forward_passes=10)
    assert w.crossing_step == 250 and w.t_reach == 750 and w.steps_saved == 250 and w.t_save == 245
    w = warmup_timing(2.0, 1.0, 1000)  # η_trgt below η_c: reached in one step, never crosses
    assert w.t_reach == 1 and w.crossing_step == math.inf and w.steps_saved == 999
    assert linear_warmup_crossing(0.1, 1.0, 100, lr_init=0.2) == 0
    assert linear_warmup_crossing(0.55, 1.0, 100, lr_init=0.1) == 50


@pytest.mark.parametrize("eta_c,eta_t,t_wrm,eta0", [(0.3, 1.0, 1000, 0.0), (0.123, 0.5, 97, 0.01),
                                                     (0.5, 0.5, 10, 0.0), (0.2, 0.7, 3, 0.1)])
def test_crossing_step_matches_the_schedule(eta_c, eta_t, t_wrm, eta0):
    t = linear_warmup_crossing(eta_c, eta_t, t_wrm, lr_init=eta0)
    schedule = [eta0 + (eta_t - eta0) * k / t_wrm for k in range(t_wrm + 1)]
    first = next(k for k, eta in enumerate(schedule) if eta >= eta_c * (1 - 1e-12))
    assert t == first


def test_warmup_from_a_threshold():
    """The usual pipeline: sharpness at init -> η_c = 2/λ0 -> when a linear warmup crosses it."""
    eta_c = pycurv.stability.max_stable_lr("sgd", 40.0)  # 2/λ0 = 0.05
    w = warmup_timing(eta_c, 0.4, 2000)
    assert w.crossing_step == 250 and w.t_reach == pytest.approx(1750)


@pytest.mark.parametrize("call,match", [
    (lambda: warmup_timing(0.1, 1.0, 0), r"warmup_steps must be > 0"),
    (lambda: warmup_timing(-0.1, 1.0, 10), r"lr_critical must be > 0"),
    (lambda: warmup_timing(0.1, 1.0, 10, lr_init=2.0), r"lr_init must satisfy 0 <= lr_init <= lr_target"),
    (lambda: warmup_timing(0.1, 1.0, 10, forward_passes=-1), r"forward_passes must be an integer >= 0"),
])
def test_warmup_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_margin_report_is_shared():
    assert margin_report is stability_margin_report
