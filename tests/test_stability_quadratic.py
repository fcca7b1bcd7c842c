"""Closed-form thresholds of pycurv.stability against the iteration matrix and against simulation."""

import math

import numpy as np
import pytest
from torch_like import SGD, Adam, RMSprop, run

from pycurv.stability import (
    OPTIMIZERS,
    Threshold,
    is_stable,
    iteration_matrix,
    largest_stable_lr,
    largest_stable_sharpness,
    margin_report,
    max_stable_lr,
    spectral_radius,
    threshold,
    threshold_from_optimizer,
)

# (optimizer, hyper-parameters): every convention the closed forms cover.
CONFIGS = [
    ("sgd", {}),
    ("sgd", {"momentum": 0.9}),
    ("sgd", {"momentum": 0.99}),
    ("sgd", {"momentum": 0.5, "dampening": 0.3}),
    ("sgd", {"momentum": 0.9, "dampening": 0.9}),  # EMA momentum
    ("sgd", {"momentum": 0.9, "nesterov": True}),
    ("sgd", {"momentum": 0.3, "nesterov": True}),
    ("sgd", {"momentum": 0.9, "weight_decay": 0.05}),
    ("sgd", {"momentum": 0.7, "nesterov": True, "weight_decay": 0.02}),
    ("adam", {}),
    ("adam", {"beta1": 0.0}),
    ("adam", {"beta1": 0.99, "beta2": 0.9}),
    ("adamw", {"weight_decay": 0.1}),
    ("adamw", {"beta1": 0.5, "weight_decay": 0.3}),
    ("rmsprop", {}),
    ("rmsprop", {"momentum": 0.9}),
]
IDS = [f"{o}-{'-'.join(f'{k}={v}' for k, v in hp.items()) or 'default'}" for o, hp in CONFIGS]
LRS = [1e-3, 0.1, 1.7]


def matrix_fn(opt, hp):
    return lambda s, lr: iteration_matrix(opt, s, lr, **hp)


@pytest.mark.parametrize("opt,hp", CONFIGS, ids=IDS)
@pytest.mark.parametrize("lr", LRS)
def test_closed_form_equals_iteration_matrix_threshold(opt, hp, lr):
    thr = threshold(opt, lr, **hp)
    general = largest_stable_sharpness(matrix_fn(opt, hp), lr)
    assert thr.max_stable_sharpness == pytest.approx(general, rel=1e-12, abs=0)


@pytest.mark.parametrize("opt,hp", CONFIGS, ids=IDS)
@pytest.mark.parametrize("sharpness", [0.3, 25.0, 4e4])
def test_closed_form_lr_equals_iteration_matrix_threshold(opt, hp, sharpness):
    closed = max_stable_lr(opt, sharpness, **hp)
    general = largest_stable_lr(matrix_fn(opt, hp), sharpness)
    assert closed == pytest.approx(general, rel=1e-12, abs=0)


@pytest.mark.parametrize("opt,hp", CONFIGS, ids=IDS)
def test_threshold_is_the_edge_of_the_spectral_radius(opt, hp):
    """ρ ≤ 1 at the threshold and just below, ρ > 1 just above: the boundary is exactly there."""
    lr = 0.1
    s = threshold(opt, lr, **hp).max_stable_sharpness
    assert spectral_radius(iteration_matrix(opt, s * (1 - 1e-9), lr, **hp)) <= 1
    assert spectral_radius(iteration_matrix(opt, s * (1 - 1e-9), lr, **hp)) > 1 - 1e-6
    assert spectral_radius(iteration_matrix(opt, s * (1 + 1e-9), lr, **hp)) > 1


# --- the iteration matrix is PyTorch's update rule ----------------------------------------------------


def _jacobian_sgd(lam, lr, hp):
    """One step of the NumPy port of torch.optim.SGD on ½λθ², applied to the unit states."""
    cols = []
    momentum = hp.get("momentum", 0.0)
    for state in ([1.0, 0.0], [0.0, 1.0]) if momentum else ([1.0],):
        opt = SGD(lr, **hp)
        theta = np.array([state[0]])
        if momentum:
            opt.buf = np.array([state[1]])  # a buffer from earlier steps
        new = opt.step(theta, lam * theta)
        cols.append([new[0], opt.buf[0]] if momentum else [new[0]])
    return np.array(cols).T


@pytest.mark.parametrize("hp", [{}, {"momentum": 0.9}, {"momentum": 0.6, "dampening": 0.25},
                                {"momentum": 0.8, "nesterov": True}, {"momentum": 0.8, "weight_decay": 0.3}])
def test_sgd_iteration_matrix_is_torch_update(hp):
    for lam in (0.0, 0.7, 13.0):
        np.testing.assert_allclose(iteration_matrix("sgd", lam, 0.05, **hp), _jacobian_sgd(lam, 0.05, hp),
                                   rtol=1e-14, atol=1e-15)


def test_nesterov_closed_form_derivation():
    """M = [[1 − η(1 + β)λ, −ηβ²], [λ, β]]: trace and determinant as derived, −1 crossing binds."""
    lr, beta = 0.1, 0.7
    for lam in (1.0, 5.0, 12.0):
        m = iteration_matrix("sgd", lam, lr, momentum=beta, nesterov=True)
        assert np.trace(m) == pytest.approx(1 + beta - lr * (1 + beta) * lam, rel=1e-14)
        assert np.linalg.det(m) == pytest.approx(beta * (1 - lr * lam), rel=1e-12)
    s = threshold("sgd", lr, momentum=beta, nesterov=True).max_stable_sharpness
    assert s == pytest.approx((2 + 2 * beta) / ((1 + 2 * beta) * lr), rel=1e-15)
    eig = np.linalg.eigvals(iteration_matrix("sgd", s, lr, momentum=beta, nesterov=True))
    assert np.min(np.abs(eig + 1)) < 1e-12  # the eigenvalue leaving the unit disc is −1


def test_adam_iteration_matrix_is_torch_update_with_frozen_preconditioner():
    """On a 1-D quadratic with frozen v and t, the NumPy port of torch Adam/AdamW is M(λ/P) in u = √P θ."""
    lr, b1, t = 0.01, 0.8, 7
    v = np.array([0.3])
    for decoupled, wd in ((False, 0.0), (True, 0.5)):
        opt = Adam(lr, betas=(b1, 0.99), eps=1e-3, weight_decay=wd, decoupled=decoupled, exp_avg_sq=v, step=t,
                   freeze=True)
        opt.exp_avg = np.zeros(1)
        p = opt.preconditioner()[0]
        h = 40.0
        cols = []
        for theta0, m0 in ((1.0, 0.0), (0.0, 1.0)):
            opt.exp_avg = np.array([m0])
            theta = opt.step(np.array([theta0]), h * np.array([theta0]))
            # state (u, n) = (√P θ, m/√P)
            cols.append([math.sqrt(p) * theta[0], opt.exp_avg[0] / math.sqrt(p)])
        jac = np.array(cols).T
        # the unit states in (u, n) coordinates are (√P, 0) and (0, 1/√P) in (θ, m)
        jac = jac @ np.diag([1 / math.sqrt(p), math.sqrt(p)])
        name = "adamw" if decoupled else "adam"
        np.testing.assert_allclose(jac, iteration_matrix(name, h / p, lr, beta1=b1, weight_decay=wd), rtol=1e-12)


# --- simulation of the update rules at 0.98× and 1.02× the limit -----------------------------------------


def _quadratic(top, n=6, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eigs = top * np.array([1.0, 0.83, 0.6, 0.4, 0.2, 0.1])[:n]
    return (q * eigs) @ q.T, rng.standard_normal(n)


SGD_CASES = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.99},
    {"momentum": 0.5, "dampening": 0.3},
    {"momentum": 0.9, "dampening": 0.9},
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.9, "weight_decay": 0.4},
]


@pytest.mark.parametrize("hp", SGD_CASES, ids=[str(h) for h in SGD_CASES])
@pytest.mark.parametrize("factor", [0.98, 1.02])
def test_sgd_simulation_converges_below_and_diverges_above(hp, factor):
    lr = 0.1
    limit = threshold("sgd", lr, **hp).max_stable_sharpness
    h, theta0 = _quadratic(factor * limit)
    final, peak, _ = run(SGD(lr, **hp), h, theta0, 40_000)
    if factor < 1:
        assert final < 1e-3, f"did not converge at {factor}× the limit: |θ|/|θ0| = {final:.3g}"
    else:
        assert peak > 1e3, f"did not diverge at {factor}× the limit: max |θ|/|θ0| = {peak:.3g}"


def _adam_problem(opt_factory, factor, limit_fn, nondiagonal=False):
    """A quadratic whose preconditioned sharpness is factor × the limit, for a frozen preconditioner."""
    rng = np.random.default_rng(3)
    n = 5
    v = rng.uniform(0.01, 4.0, n)
    opt = opt_factory(v)
    p = opt.preconditioner()
    target = factor * limit_fn()
    rel = np.array([1.0, 0.7, 0.45, 0.3, 0.15])
    if nondiagonal:
        q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        a = (q * (target * rel)) @ q.T          # A = P^-1/2 H P^-1/2
        h = np.sqrt(p)[:, None] * a * np.sqrt(p)[None, :]
    else:
        h = np.diag(target * rel * p)           # preconditioned eigenvalues target·rel
    return opt, h, rng.standard_normal(n)


ADAM_CASES = [
    ("adam", dict(betas=(0.9, 0.999), eps=1e-8), {}),
    ("adam", dict(betas=(0.0, 0.99), eps=1e-3), {"beta1": 0.0}),
    ("adam", dict(betas=(0.95, 0.98), eps=1e-2, weight_decay=0.0), {"beta1": 0.95}),
    ("adamw", dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=5.0, decoupled=True), {"weight_decay": 5.0}),
]


@pytest.mark.parametrize("name,kw,hp", ADAM_CASES, ids=["adam", "adam-b1=0", "adam-b1=0.95", "adamw-wd"])
@pytest.mark.parametrize("factor", [0.98, 1.02])
@pytest.mark.parametrize("nondiagonal", [False, True], ids=["diagonal", "rotated"])
def test_adam_frozen_preconditioner_simulation(name, kw, hp, factor, nondiagonal):
    lr, t = 0.01, 12
    limit = threshold(name, lr, **hp).max_stable_sharpness
    opt, h, theta0 = _adam_problem(
        lambda v: Adam(lr, exp_avg_sq=v, step=t, freeze=True, **kw), factor, lambda: limit, nondiagonal)
    final, peak, _ = run(opt, h, theta0, 40_000)
    if factor < 1:
        assert final < 1e-3
    else:
        assert peak > 1e3


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("factor", [0.98, 1.02])
def test_rmsprop_frozen_preconditioner_simulation(momentum, factor):
    lr = 0.01
    limit = threshold("rmsprop", lr, momentum=momentum).max_stable_sharpness
    opt, h, theta0 = _adam_problem(
        lambda v: RMSprop(lr, eps=1e-4, momentum=momentum, square_avg=v, freeze=True), factor, lambda: limit)
    final, peak, _ = run(opt, h, theta0, 40_000)
    if factor < 1:
        assert final < 1e-3
    else:
        assert peak > 1e3


# --- values, names, conventions ---------------------------------------------------------------------


def test_textbook_values():
    assert threshold("sgd", 0.1).max_stable_sharpness == pytest.approx(20.0, rel=1e-15)
    assert threshold("sgd", 0.1, momentum=0.9).max_stable_sharpness == pytest.approx(38.0, rel=1e-14)
    assert threshold("sgd", 0.1, momentum=0.9, dampening=0.9).max_stable_sharpness == pytest.approx(380.0, rel=1e-14)
    adam = threshold("adam", lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    assert adam.max_stable_sharpness == pytest.approx(38.0 / 1e-3, rel=1e-14)
    assert adam.quantity == "preconditioned_sharpness" and adam.formula == "38/η"
    assert threshold("sgd", 0.1).quantity == "sharpness"
    assert threshold("rmsprop", 0.01, alpha=0.9, eps=1e-6, momentum=0.0).max_stable_sharpness == pytest.approx(200.0)
    assert max_stable_lr("sgd", sharpness=20.0, momentum=0.9) == pytest.approx(0.19, rel=1e-14)
    assert max_stable_lr("sgd", 0.0) == math.inf


def test_threshold_record():
    thr = threshold("sgd", lr=0.1, momentum=0.9, dampening=0.0, nesterov=False)
    assert isinstance(thr, Threshold)
    assert thr.optimizer == "sgd" and thr.lr == 0.1 and thr.formula == "(2 + 2β)/η"
    assert thr.hyperparameters == {"momentum": 0.9, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0}
    assert "b ← βb + g" in thr.model
    assert thr.max_stable_lr(38.0) == pytest.approx(0.1)
    assert str(thr) == "λ1 ≤ (2 + 2β)/η = 38 (sgd, lr=0.1)"
    with pytest.raises(AttributeError):
        thr.lr = 1.0  # frozen
    assert threshold("adamw", 1e-3, weight_decay=0.01).formula == "38/η − 19·wd"
    assert threshold("sgd", 0.1, momentum=0.9, nesterov=True).formula == "(2 + 2β)/((1 + 2β)η)"


def test_names_are_case_insensitive_and_lr_may_be_a_0d_array():
    class Scalar:  # what a 0-d torch tensor offers
        def __float__(self):
            return 0.1

    for name in ("SGD", "Sgd", " sgd "):
        assert threshold(name, 0.1).optimizer == "sgd"
    assert threshold("AdamW", np.float32(1e-3)).optimizer == "adamw"
    assert threshold("sgd", np.array(0.1)).max_stable_sharpness == pytest.approx(20.0)
    assert threshold("sgd", Scalar()).max_stable_sharpness == pytest.approx(20.0)
    assert set(OPTIMIZERS) == {"sgd", "adam", "adamw", "rmsprop"}


@pytest.mark.parametrize("call,match", [
    (lambda: threshold("sgd", -0.1), r"lr must be > 0, got lr=-0.1"),
    (lambda: threshold("sgd", float("nan")), r"lr must be a finite number"),
    (lambda: threshold("sgd", 0.0), r"lr must be > 0"),
    (lambda: threshold("sgd", 0.1, momentum=1.0), r"momentum must satisfy 0 <= momentum < 1, got momentum=1.0"),
    (lambda: threshold("sgd", 0.1, momentum=-0.1), r"momentum must satisfy 0 <= momentum < 1"),
    (lambda: threshold("adam", 0.1, beta1=1.2), r"beta1 must satisfy 0 <= beta1 < 1, got beta1=1.2"),
    (lambda: threshold("lbfgs", 0.1), r"unknown optimizer 'lbfgs'; expected one of sgd, adam, adamw, rmsprop"),
    (lambda: threshold("sgd", 0.1, beta1=0.9), r"beta1 does not apply to sgd"),
    (lambda: threshold("adam", 0.1, momentum=0.9), r"momentum does not apply to adam"),
    (lambda: threshold("sgd", 0.1, nesterov=True), r"nesterov requires momentum > 0 and dampening = 0"),
    (lambda: threshold("sgd", 0.1, momentum=0.9, dampening=0.1, nesterov=True), r"nesterov requires"),
    (lambda: threshold("sgd", 0.1, weight_decay=-1.0), r"weight_decay must be >= 0"),
    (lambda: threshold("adam", 0.1, betas=(0.9, 0.99), beta1=0.9), r"either betas or beta1"),
    (lambda: threshold("adam", 0.1, betas=0.9), r"betas must be a pair"),
    (lambda: max_stable_lr("sgd", -1.0), r"sharpness must be >= 0, got sharpness=-1.0"),
])
def test_bad_arguments_name_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("call", [lambda: threshold("sgd", "0.1"), lambda: threshold(3, 0.1),
                                  lambda: threshold("sgd", 0.1, nesterov=1), lambda: threshold("sgd", None)])
def test_wrong_types(call):
    with pytest.raises(TypeError):
        call()


@pytest.mark.parametrize("opt,hp", CONFIGS, ids=IDS)
def test_max_stable_lr_inverts_threshold(opt, hp):
    for s in (0.5, 30.0, 2e4):
        lr = max_stable_lr(opt, s, **hp)
        assert threshold(opt, lr, **hp).max_stable_sharpness == pytest.approx(s, rel=1e-12)


# --- torch.optim objects by duck typing ------------------------------------------------------------------


def _fake(name, **group):
    cls = type(name, (), {})
    obj = cls()
    obj.param_groups = [group]
    return obj


def test_threshold_from_optimizer_reads_param_groups():
    sgd = _fake("SGD", lr=np.array(0.1), momentum=0.9, dampening=0, nesterov=True, weight_decay=0,
                maximize=False, foreach=None)
    thr = threshold_from_optimizer(sgd)
    assert thr.optimizer == "sgd" and thr.lr == 0.1
    assert thr.max_stable_sharpness == pytest.approx(3.8 / 2.8 / 0.1)
    adam = _fake("Adam", lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False)
    assert threshold_from_optimizer(adam).max_stable_sharpness == pytest.approx(38000)
    assert threshold_from_optimizer(adam).quantity == "preconditioned_sharpness"
    adamw = _fake("AdamW", lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False)
    assert threshold_from_optimizer(adamw).max_stable_sharpness == pytest.approx(38000 - 19 * 0.01, rel=1e-14)
    decoupled = _fake("Adam", lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                      decoupled_weight_decay=True)
    assert threshold_from_optimizer(decoupled).optimizer == "adamw"
    rms = _fake("RMSprop", lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0.5, centered=True)
    thr = threshold_from_optimizer(rms)
    assert thr.max_stable_sharpness == pytest.approx(300.0) and thr.hyperparameters["centered"] is True
    two = _fake("SGD", lr=0.1, momentum=0.0, dampening=0, nesterov=False, weight_decay=0)
    two.param_groups.append(dict(lr=0.01, momentum=0.0, dampening=0, nesterov=False, weight_decay=0))
    assert threshold_from_optimizer(two, group=1).max_stable_sharpness == pytest.approx(200.0)


def test_threshold_from_optimizer_errors():
    with pytest.raises(ValueError, match="no stability model for optimizer LBFGS"):
        threshold_from_optimizer(_fake("LBFGS", lr=1.0))
    with pytest.raises(ValueError, match=r"group must be an index 0 <= group < 1, got group=1"):
        threshold_from_optimizer(_fake("SGD", lr=0.1), group=1)
    with pytest.raises(ValueError, match="has no param_groups"):
        threshold_from_optimizer(type("SGD", (), {})())
    with pytest.raises(ValueError, match="momentum must satisfy"):
        threshold_from_optimizer(_fake("SGD", lr=0.1, momentum=1.5))


# --- margins -------------------------------------------------------------------------------------


def test_margin_report():
    rep = margin_report(19.7, threshold("sgd", 0.1))
    assert rep.value == 19.7 and rep.threshold == pytest.approx(20.0)
    assert rep.margin == pytest.approx(0.985) and rep.stable and rep.quantity == "sharpness"
    assert rep.text == "λ1 = 19.7 is at 0.98 of 2/η = 20"
    adam = margin_report(36200.0, threshold("adam", 1e-3, beta1=0.9))
    assert adam.quantity == "preconditioned_sharpness"
    assert adam.text == "preconditioned sharpness λ1(P⁻¹H) = 36200 is at 0.95 of 38/η = 38000"
    over = margin_report(20.01, threshold("sgd", 0.1))
    assert not over.stable and over.text == "λ1 = 20 is at 1.0005 of 2/η = 20"
    assert margin_report(20.0, threshold("sgd", 0.1)).stable  # the edge itself is (marginally) stable
    assert margin_report(np.float64(5.0), 10.0).text == "λ1 = 5 is at 0.50 of the threshold 10"
    assert margin_report(-3.0, threshold("sgd", 0.1)).stable
    with pytest.raises(ValueError, match="value must be a finite number"):
        margin_report(float("inf"), threshold("sgd", 0.1))


def test_general_routine_edges():
    """Unbounded and empty stable sets, marginal matrices, overflow, a complex pair on the unit circle."""
    assert largest_stable_lr(matrix_fn("sgd", {"momentum": 0.9}), 0.0) == math.inf  # λ = 0: nothing moves
    with pytest.raises(ValueError, match="unstable down to 1e-300"):
        largest_stable_lr(lambda s, lr: np.array([[1.0 + lr + 1e-3]]), 1.0)
    assert is_stable(np.eye(2)) and is_stable([[0.0, -1.0], [1.0, 0.0]])  # |eig| = 1 exactly: marginal
    assert not is_stable([[np.inf]]) and not is_stable([[1.0 + 1e-15]])
    # a rotation by θ scaled by r: unstable exactly when r > 1, whatever the angle
    rot = lambda r, lr: r * np.array([[math.cos(lr), -math.sin(lr)], [math.sin(lr), math.cos(lr)]])  # noqa: E731
    assert largest_stable_sharpness(rot, 0.7, start=0.3) == pytest.approx(1.0, rel=1e-15)
    with pytest.raises(ValueError, match="must be square"):
        spectral_radius(np.ones((2, 3)))
