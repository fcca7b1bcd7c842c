"""Any finite operator, at any scale, gets the right answer or an honest non-converged status.

Squared norms of vectors near 1e-160 underflow and near 1e160 overflow; a
residual estimate that underflows to 0 reads as "converged". The core measures
the first nonzero product with sums that cannot leave the float64 range and
works on s A for a power of two s, so every scale from 1e-300 to 1e300 must
give the answer it gives at 1. A tolerance below what float64 can certify
must end in ``noise_floor``, never in a "converged" whose residual is false.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import pycurv
from _reference import EPS, dense

SCALES = [10.0 ** e for e in range(-300, 301, 20)]  # 1e-300, 1e-280, ..., 1e300
IDS = [f"1e{e}" for e in range(-300, 301, 20)]


def _diag_issue(s: float) -> np.ndarray:
    """The audit's operator: top eigenvalue s, next s/2, a bulk in [-s/10, s/10]."""
    return np.diag(s * np.r_[1.0, 0.5, np.linspace(-0.1, 0.1, 98)])


def _true_residuals(a: np.ndarray, res) -> np.ndarray:
    """||A y - theta y|| computed at unit scale (A / s), so that no square leaves the range."""
    s = float(np.max(np.abs(a)))
    y = res.eigenvectors
    r = (a / s) @ y - y * (res.eigenvalues / s)
    return np.linalg.norm(r, axis=0) * s


def assert_honest(a: np.ndarray, res, tol: float, which: str = "LA") -> None:
    """Converged: eigenvalues as eigh's and residuals as claimed. Otherwise: an honest status."""
    w = np.linalg.eigvalsh(a)
    norm = float(np.max(np.abs(w)))
    k = res.eigenvalues.size
    ref = w[::-1][:k] if which == "LA" else w[:k]
    rounding = 1000 * EPS * norm * np.sqrt(a.shape[0])
    true = _true_residuals(a, res)
    if res.converged:
        scale = np.maximum(np.abs(res.eigenvalues), norm)
        assert np.all(true <= tol * scale + rounding), (true / scale, tol, res.message)
        assert np.all(np.abs(res.eigenvalues - ref) <= tol * norm + rounding), (res.eigenvalues, ref)
    else:
        assert res.status in ("noise_floor", "max_matvecs"), res.status
        assert "converged:" not in res.message
    # Whatever the verdict, the residuals it reports are not smaller than the true ones.
    assert np.all(true <= res.residual_norms + rounding), (true, res.residual_norms)


# ---- item 1: tiny and huge operators ---------------------------------------------------


@pytest.mark.parametrize("s", SCALES, ids=IDS)
def test_diagonal_operator_at_every_scale(s):
    a = _diag_issue(s)
    res = pycurv.lanczos(a, seed=0)
    assert res.converged, res.message
    assert res.eigenvalues[0] == pytest.approx(s, rel=1e-12, abs=0)
    assert_honest(a, res, 1e-6)
    # the same through a callable (residuals from its products' Gram-Schmidt coefficients) and through sharpness
    res_f = pycurv.lanczos(lambda v: a @ v, n=100, seed=0)
    assert res_f.converged and not res_f.residuals_explicit and res_f.n_matvecs == res.n_matvecs
    assert_honest(a, res_f, 1e-6)
    assert res_f.eigenvalues[0] == pytest.approx(s, rel=1e-12, abs=0)
    assert_honest(a, res_f, 1e-6)
    assert pycurv.sharpness(lambda v: a @ v, n=100, seed=0) == pytest.approx(s, rel=1e-12, abs=0)


@pytest.mark.parametrize("s", SCALES, ids=IDS)
def test_dense_operator_at_every_scale_both_ends(s):
    base = dense(np.r_[-3.0, np.linspace(-1.0, 1.0, 117), 1.5, 2.0], seed=4)
    a = s * base
    for which in ("LA", "SA"):
        res = pycurv.lanczos(a, 2, which=which, tol=1e-10, seed=1)
        assert res.converged, res.message
        assert_honest(a, res, 1e-10, which)
        ref = pycurv.lanczos(base, 2, which=which, tol=1e-10, seed=1)
        np.testing.assert_allclose(res.eigenvalues / s, ref.eigenvalues, rtol=1e-13)


def test_the_audit_cases_are_right():
    for s in (1e-200, 3e-160):
        a = _diag_issue(s)
        res = pycurv.lanczos(a, seed=0)
        assert res.converged and res.n_matvecs > 1
        assert abs(res.eigenvalues[0] - s) <= 1e-10 * s, res.eigenvalues[0] / s
        assert res.residual_norms[0] > 0.0
        assert pycurv.sharpness(a, seed=0) == pytest.approx(s, rel=1e-10, abs=0)


@pytest.mark.parametrize("k", [-200, -60, -1, 1, 60, 200])
def test_powers_of_four_scale_every_bit(k):
    """The core works on s A for a power of two: scaling A by 4^k scales the answer exactly."""
    a = dense(np.r_[-5.0, np.linspace(-1.0, 2.0, 59)], seed=0)
    f = 4.0 ** k
    r1 = pycurv.lanczos(a, 2, tol=1e-10, seed=3)
    r2 = pycurv.lanczos(f * a, 2, tol=1e-10, seed=3)
    assert r1.n_matvecs == r2.n_matvecs
    np.testing.assert_array_equal(r2.eigenvalues, f * r1.eigenvalues)
    np.testing.assert_array_equal(r2.eigenvectors, r1.eigenvectors)


def test_zero_operator_and_a_start_in_the_null_space():
    res = pycurv.lanczos(np.zeros((20, 20)), seed=0)
    assert res.converged and res.eigenvalues[0] == 0.0
    a = np.diag(np.r_[0.0, 1e-250 * np.arange(1.0, 20.0)])
    res = pycurv.lanczos(a, v0=np.eye(20)[0], seed=0)  # A v0 = 0: the scale comes from a later product
    assert res.converged and res.eigenvalues[0] == pytest.approx(19e-250, rel=1e-12, abs=0)


def test_products_spanning_more_than_float64_are_named():
    a = np.diag([1e-300, 1e300])
    with pytest.raises(pycurv.NonFiniteMatvecError, match=r"matvec call 2 returned values whose norm overflows "
                                                          r"float64 even after scaling \(max \|A v\| = 1e\+300\)"):
        pycurv.lanczos(a, v0=np.array([1.0, 0.0]), seed=0)


# ---- item 2: a tolerance float64 cannot certify ----------------------------------------


@pytest.mark.parametrize("s", SCALES, ids=IDS)
def test_impossible_tolerance_is_a_noise_floor_at_every_scale(s):
    base = dense(np.r_[-3.0, np.linspace(-1.0, 1.0, 117), 1.5, 2.0], seed=4)
    a = s * base
    with pytest.warns(pycurv.ConvergenceWarning, match="rounding floor"):
        res = pycurv.lanczos(a, tol=1e-300, seed=0)
    assert not res.converged and res.status == "noise_floor"
    assert res.residuals_explicit
    assert_honest(a, res, 1e-300)
    assert res.eigenvalues[0] == pytest.approx(2.0 * s, rel=1e-13, abs=0)  # still the best float64 allows
    with pytest.raises(pycurv.NoConvergence, match="rounding floor"):
        pycurv.sharpness(a, tol=1e-300, seed=0)


def test_impossible_tolerance_on_the_audit_matrix():
    rng = np.random.default_rng(0)
    b = rng.standard_normal((2000, 2000))
    a = (b + b.T) / 2
    with pytest.warns(pycurv.ConvergenceWarning) as rec:
        res = pycurv.lanczos(a, tol=1e-300, seed=0)
    msg = str(rec[0].message)
    assert msg.startswith("stopped at float64's rounding floor: relative residual ")
    assert "cannot reach tol=1e-300" in msg and "Loosen tol to about" in msg
    assert res.status == "noise_floor" and not res.converged
    assert res.residual_norms[0] > 0.0
    true = np.linalg.norm(a @ res.eigenvectors[:, 0] - res.eigenvalues[0] * res.eigenvectors[:, 0])
    assert true <= 1.01 * res.residual_norms[0] + 1e-12 * EPS
    assert res.noise_level > 0.0


def test_callable_with_an_impossible_tolerance_is_honest():
    a = dense(np.r_[np.linspace(-1.0, 1.0, 99), 2.0], seed=1)
    with pytest.warns(pycurv.ConvergenceWarning, match="noise floor"):
        res = pycurv.lanczos(lambda v: a @ v, n=100, tol=1e-300, seed=0)
    assert res.status == "noise_floor"
    assert_honest(a, res, 1e-300)


def test_tight_but_certifiable_tolerance_still_converges():
    a = dense(np.r_[np.linspace(-1.0, 1.0, 199), 2.0], seed=2)
    res = pycurv.lanczos(a, tol=1e-14, seed=0)  # below 64 sqrt(n) eps: confirmed on A itself
    assert res.converged and res.residuals_explicit, res.message
    assert_honest(a, res, 1e-14)
    res = pycurv.lanczos(a, tol=1e-10, seed=0)  # the recurrence's estimate suffices
    assert res.converged and not res.residuals_explicit


# ---- item 4: any nonzero finite start vector ----------------------------------------------


@pytest.mark.parametrize("fill", [1e300, 1.7e308, 1e-300, 1e-320, 5e-324])
def test_start_vector_at_any_scale(fill):
    a = np.diag(np.arange(50.0))
    res = pycurv.lanczos(a, v0=np.full(50, fill), tol=1e-10, seed=0)
    assert res.converged and res.eigenvalues[0] == pytest.approx(49.0, rel=1e-12, abs=0)


def test_start_vector_direction_is_kept_at_any_scale():
    a = dense(np.r_[np.linspace(-1.0, 1.0, 79), 2.0], seed=5)
    v = np.linalg.eigh(a)[1][:, -1]
    warm = pycurv.lanczos(a, v0=v, tol=1e-10, seed=0)
    for f in (2.0 ** 1000, 2.0 ** -1000):  # exact multiples: the very same start, the very same run
        res = pycurv.lanczos(a, v0=f * v, tol=1e-10, seed=0)
        assert res.converged and res.n_matvecs == warm.n_matvecs
        np.testing.assert_array_equal(res.eigenvalues, warm.eigenvalues)
    for f in (1e300, 1e-300, 2.0 ** -1060):  # rounded (subnormal: to a few digits), still a start
        res = pycurv.lanczos(a, v0=f * v, tol=1e-10, seed=0)
        assert res.converged and res.eigenvalues[0] == pytest.approx(2.0, abs=1e-12)
    mixed = np.where(np.arange(80) % 2 == 0, 1e300, 1e-320) * np.sign(v + 1e-300)
    assert pycurv.sharpness(a, v0=mixed, tol=1e-10) == pytest.approx(2.0, abs=1e-12)


def test_start_vector_for_a_sharded_basis_is_scaled_as_a_whole():
    from pycurv.distributed import lanczos_sharded

    a = dense(np.r_[np.linspace(-1.0, 1.0, 59), 2.0], seed=6)
    bounds = [(0, 20), (20, 60)]

    def matvec(xs):
        y = a @ np.concatenate(xs)
        return [y[lo:hi] for lo, hi in bounds]

    v0 = np.r_[np.full(20, 1e300), np.full(40, 1e-300)]  # the first shard dominates
    res = lanczos_sharded(matvec, bounds, 1, tol=1e-10, v0=v0, seed=0)
    ref = pycurv.lanczos(lambda v: a @ v, n=60, tol=1e-10, v0=v0, seed=0)
    assert res.converged and res.n_matvecs == ref.n_matvecs
    np.testing.assert_allclose(res.eigenvalues, ref.eigenvalues, rtol=1e-13)


# ---- residuals from the products' Gram-Schmidt coefficients ---------------------------


def _not_quite_symmetric(n: int, eps: float) -> np.ndarray:
    """A symmetric matrix plus eps times a Gaussian one: the error of a low-precision product, made exact."""
    a = dense(np.r_[np.linspace(-1.0, 1.0, n - 2), 1.5, 2.0], seed=0)
    return a + eps * np.random.default_rng(1).standard_normal((n, n))


@pytest.mark.parametrize("ncv", [None, 8])
@pytest.mark.parametrize("criterion", ["residual", "eigenvalue"])
def test_residuals_from_the_products_coefficients_bound_the_true_ones(ncv, criterion):
    """An operator of unknown precision that is not exactly symmetric: converged without a product to check,
    its reported residuals bound the true ones (to float64 rounding), across restarts too."""
    a = _not_quite_symmetric(300, 1e-7)
    res = pycurv.lanczos(lambda v: a @ v, 2, n=300, tol=1e-4, seed=1, ncv=ncv, criterion=criterion,
                         check_multiplicity=False)
    assert res.converged and not res.residuals_explicit, res.message
    assert (res.n_restarts > 0) == (ncv is not None)
    true = _true_residuals(a, res)
    rounding = 100 * EPS * np.sqrt(300) * np.max(np.abs(np.linalg.eigvals(a)))
    assert np.all(true <= res.residual_norms + rounding), (true, res.residual_norms)
    sym = pycurv.lanczos((a + a.T) / 2, 2, tol=1e-4, seed=1, ncv=ncv, criterion=criterion, check_multiplicity=False)
    assert sym.n_matvecs == res.n_matvecs  # no product spent on checking


def test_products_too_far_from_symmetric_are_still_checked_with_a_product():
    """Where the coefficients cannot vouch for tol (asymmetry above it), A y is computed, as before."""
    a = _not_quite_symmetric(300, 1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pycurv.ConvergenceWarning)
        res = pycurv.lanczos(lambda v: a @ v, 1, n=300, tol=1e-6, seed=1)
    assert res.residuals_explicit
    assert np.all(_true_residuals(a, res) <= res.residual_norms * (1 + 1e-6))


def test_products_as_noisy_as_the_tolerance_are_still_checked_with_a_product():
    """float32 products: the coefficients vouch for tol = 1e-5, where a fresh product's own rounding is far
    below it; at 1e-7, about that rounding, A y is computed as before."""
    a = dense(np.r_[np.linspace(-1.0, 1.0, 398), 1.5, 2.0], seed=3)

    def mv(v):
        return (a.astype(np.float32) @ v.astype(np.float32)).astype(np.float64)

    loose = pycurv.lanczos(mv, 1, n=400, tol=1e-5, seed=0)
    assert loose.converged and not loose.residuals_explicit
    y = loose.eigenvectors[:, 0]
    assert np.linalg.norm(mv(y) - loose.eigenvalues[0] * y) <= loose.residual_norms[0] + 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pycurv.ConvergenceWarning)
        tight = pycurv.lanczos(mv, 1, n=400, tol=1e-7, seed=0)
    assert tight.residuals_explicit
