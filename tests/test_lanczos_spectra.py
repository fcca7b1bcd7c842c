"""pycurv.lanczos against dense numpy.linalg.eigh on prescribed spectra, including the ones that break other tools."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg

import pycurv
from _reference import EPS, check, dense, reference


def _linspace(lo, hi, n):
    return np.linspace(lo, hi, n)


SPECTRA = {
    # power iteration returns -5 here; the sharpness is 2
    "dominant_negative": lambda n: np.r_[-5.0, _linspace(-1.0, 2.0, n - 1)],
    "repeated_top_x3": lambda n: np.r_[10.0, 10.0, 10.0, _linspace(0.0, 9.0, n - 3)],
    # lambda_1 at the edge of a continuum: square-root density of states at the top
    "continuum_edge": lambda n: 1.0 - np.linspace(0.0, 1.0, n) ** 2,
    "near_degenerate_1e-6": lambda n: np.r_[1.0, 1.0 - 1e-6, _linspace(-1.0, 0.5, n - 2)],
    "rank_one": lambda n: np.r_[3.0, np.zeros(n - 1)],
    "zero": lambda n: np.zeros(n),
    "clustered_bottom": lambda n: np.r_[-2.0, -2.0 + 1e-9, _linspace(-1.0, 1.0, n - 2)],
}


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("which", ["LA", "SA", "BE"])
@pytest.mark.parametrize("k", [1, 4])
def test_spectra_against_eigh(name, which, k):
    n = 120
    a = dense(SPECTRA[name](n), seed=1)
    tol = 1e-12
    res = pycurv.lanczos(a, k, which=which, tol=tol, seed=7, max_matvecs=20000)
    check(a, res, k, which, tol=tol)


def test_dominant_negative_returns_largest_algebraic():
    a = dense(np.r_[-5.0, _linspace(-1.0, 2.0, 199)], seed=3)
    res = pycurv.lanczos(a, 1, tol=1e-10, seed=0)
    assert abs(res.eigenvalues[0] - 2.0) < 1e-12
    assert pycurv.sharpness(a, tol=1e-10, seed=0) == pytest.approx(2.0, abs=1e-12)
    assert pycurv.lanczos(a, 1, which="SA", tol=1e-10, seed=0).eigenvalues[0] == pytest.approx(-5.0, abs=1e-12)


def test_repeated_top_three_copies_and_the_next():
    n = 300  # larger than ncv: the copies must be found through restarts and verification, not breakdown
    a = dense(np.r_[10.0, 10.0, 10.0, _linspace(0.0, 9.0, n - 3)], seed=4)
    res = pycurv.lanczos(a, 4, tol=1e-10, seed=2)
    check(a, res, 4, tol=1e-10)
    np.testing.assert_allclose(res.eigenvalues, [10.0, 10.0, 10.0, 9.0], rtol=0, atol=1e-12)
    assert res.n_verify_rounds >= 1  # hidden copies are found by fresh random searches after locking


def test_multiplicity_check_costs_matvecs_not_accuracy():
    """On a simple spectrum the check changes nothing but the work done (one extra deflated search)."""
    n = 300
    a = dense(np.r_[_linspace(0.0, 9.0, n - 4), 10.0, 11.0, 12.0, 13.0], seed=4)
    plain = pycurv.lanczos(a, 4, tol=1e-10, seed=2, check_multiplicity=False)
    checked = pycurv.lanczos(a, 4, tol=1e-10, seed=2)
    check(a, plain, 4, tol=1e-10)
    check(a, checked, 4, tol=1e-10)
    np.testing.assert_allclose(checked.eigenvalues, plain.eigenvalues, rtol=0, atol=1e-12)
    assert plain.n_verify_rounds == 0 and checked.n_verify_rounds == 1
    assert checked.n_matvecs > plain.n_matvecs


def test_near_degenerate_top_resolved():
    n = 200
    a = dense(np.r_[1.0, 1.0 - 1e-6, _linspace(-1.0, 0.5, n - 2)], seed=5)
    res = pycurv.lanczos(a, 2, tol=1e-12, seed=1, max_matvecs=20000)
    check(a, res, 2, tol=1e-12)
    assert res.eigenvalues[0] - res.eigenvalues[1] == pytest.approx(1e-6, rel=1e-6)
    # k = 1: the top eigenvalue and its eigenvector, not a mixture of the two
    res1 = pycurv.lanczos(a, 1, tol=1e-12, seed=1, max_matvecs=20000)
    w, v = np.linalg.eigh(a)
    assert abs(res1.eigenvalues[0] - w[-1]) <= 2000 * EPS
    assert abs(abs(res1.eigenvectors[:, 0] @ v[:, -1]) - 1.0) < 1e-8


def test_continuum_edge_large_n_with_restarts():
    """lambda_i = 1 - (i/n)^2: the top sits at the edge of a continuum with gaps of 1/n^2."""
    n = 2000
    lam = 1.0 - np.linspace(0.0, 1.0, n) ** 2
    rng = np.random.default_rng(0)
    q = rng.standard_normal(n)
    q /= np.linalg.norm(q)

    def mv(x):  # diag(lam) in a rotated basis (one Householder reflection keeps the matvec O(n))
        y = x - 2.0 * (q @ x) * q
        y = lam * y
        return y - 2.0 * (q @ y) * q

    res = pycurv.lanczos(mv, 1, n=n, tol=1e-6, seed=0, max_matvecs=20000)
    assert res.converged and res.n_restarts > 0
    # a callable: the residual of its products, from their Gram-Schmidt coefficients, across the restarts
    y = res.eigenvectors[:, 0]
    assert np.linalg.norm(mv(y) - res.eigenvalues[0] * y) <= res.residual_norms[0] * (1 + 1e-6) + 1e-14
    assert 0.0 <= 1.0 - res.eigenvalues[0] <= res.residual_norms[0] + 1.0 / n**2


def test_rank_one():
    u = np.random.default_rng(0).standard_normal(50)
    a = 3.0 * np.outer(u, u) / (u @ u)
    res = pycurv.lanczos(a, 1, tol=1e-12, seed=0)
    check(a, res, 1, tol=1e-12)
    assert res.n_matvecs <= 3  # breakdown after two steps: the Krylov space is invariant
    assert abs(abs(res.eigenvectors[:, 0] @ u) / np.linalg.norm(u) - 1.0) < 1e-13


def test_zero_operator():
    a = np.zeros((40, 40))
    res = pycurv.lanczos(a, 1, seed=0)
    assert res.converged and res.eigenvalues[0] == 0.0 and res.n_matvecs == 1
    res3 = pycurv.lanczos(a, 3, which="BE", seed=0)
    assert res3.converged and np.all(res3.eigenvalues == 0.0)
    assert np.max(np.abs(res3.eigenvectors.T @ res3.eigenvectors - np.eye(3))) <= 1e-12


def test_n_equals_one():
    res = pycurv.lanczos(np.array([[4.5]]), 1, seed=0)
    assert res.converged and res.eigenvalues[0] == 4.5 and res.n_matvecs == 1
    assert abs(abs(res.eigenvectors[0, 0]) - 1.0) < 1e-15
    assert pycurv.sharpness(np.array([[-2.0]])) == -2.0


@pytest.mark.parametrize("which", ["LA", "SA", "BE"])
def test_k_equals_n_full_spectrum(which):
    lam = np.r_[3.0, 3.0, -1.0, 0.5, 0.5, 0.5, 2.0, -4.0]
    a = dense(lam, seed=9)
    res = pycurv.lanczos(a, lam.size, which=which, tol=1e-12, seed=0)
    check(a, res, lam.size, which, tol=1e-12)


@pytest.mark.parametrize("scale", [1e-12, 1e12])
@pytest.mark.parametrize("which", ["LA", "SA"])
def test_scaled_spectra(scale, which):
    lam = scale * np.r_[-5.0, _linspace(-1.0, 2.0, 99)]
    a = dense(lam, seed=2)
    res = pycurv.lanczos(a, 3, which=which, tol=1e-11, seed=0)
    check(a, res, 3, which, tol=1e-11)


def test_same_seed_bit_identical_any_thread_count():
    a = dense(np.r_[-5.0, _linspace(-1.0, 2.0, 299)], seed=3)
    op = pycurv.FunctionOperator(lambda x: a @ x, 300)
    r1 = pycurv.lanczos(op, 3, tol=1e-10, seed=123, ncv=12)
    try:
        pycurv.set_num_threads(1)
        r2 = pycurv.lanczos(op, 3, tol=1e-10, seed=123, ncv=12)
    finally:
        pycurv.set_num_threads(pycurv.build_info()["max_threads"])
    assert r1.n_restarts > 0
    assert np.array_equal(r1.eigenvalues, r2.eigenvalues)
    assert np.array_equal(r1.eigenvectors, r2.eigenvectors)
    assert np.array_equal(r1.residual_norms, r2.residual_norms)
    assert r1.n_matvecs == r2.n_matvecs
    r3 = pycurv.lanczos(op, 3, tol=1e-10, seed=124, ncv=12)
    assert not np.array_equal(r1.eigenvectors, r3.eigenvectors)


def test_large_n_threaded_kernels_bit_identical():
    # n above one 8192-row chunk, so the kernels run in parallel over chunks
    n = 50_000
    lam = np.r_[7.0, 6.5, np.linspace(-1.0, 6.0, n - 2)]
    op = pycurv.MatrixOperator(scipy.sparse.diags(lam))
    res = [pycurv.lanczos(op, 2, tol=1e-9, seed=5) for _ in range(2)]
    assert np.array_equal(res[0].eigenvectors, res[1].eigenvectors)
    np.testing.assert_allclose(res[0].eigenvalues, [7.0, 6.5], rtol=0, atol=1e-12)


def test_thick_restart_small_basis():
    lam = np.r_[_linspace(-1.0, 1.0, 400)]
    a = dense(lam, seed=6)
    res = pycurv.lanczos(a, 5, ncv=8, tol=1e-10, seed=0, max_matvecs=50000)
    check(a, res, 5, tol=1e-10)
    assert res.n_restarts > 10 and res.ncv == 8


def test_default_basis_size():
    """ncv defaults to 2k + 1, at least 32, at most n (README, lanczos docstring)."""
    a = dense(_linspace(-1.0, 1.0, 200), seed=6)
    assert pycurv.lanczos(a, 1, tol=1e-8, seed=0).ncv == 32
    assert pycurv.lanczos(a, 20, tol=1e-8, seed=0).ncv == 41
    assert pycurv.lanczos(a[:10, :10], 1, seed=0).ncv == 10


def test_warm_start_from_ritz_vector():
    a = dense(np.r_[_linspace(-1.0, 1.0, 399), 1.01], seed=8)
    cold = pycurv.lanczos(a, 1, tol=1e-10, seed=0)
    warm = pycurv.lanczos(a + 1e-6 * np.eye(400), 1, tol=1e-10, v0=cold.eigenvectors[:, 0])
    assert warm.n_matvecs < cold.n_matvecs / 2
    assert warm.eigenvalues[0] == pytest.approx(1.01 + 1e-6, abs=1e-12)


def test_start_vector_in_an_invariant_subspace_still_finds_the_top():
    """v0 = eigenvector of the smallest eigenvalue: Lanczos breaks down at once; the search must go on."""
    lam = np.r_[-3.0, _linspace(-1.0, 2.0, 59)]
    a = dense(lam, seed=10)
    w, v = np.linalg.eigh(a)
    res = pycurv.lanczos(a, 1, tol=1e-12, v0=v[:, 0], seed=0)
    assert res.eigenvalues[0] == pytest.approx(2.0, abs=1e-12)
    assert res.n_breakdowns >= 1


def test_input_types_agree(rng):
    sp = scipy.sparse
    sla = scipy.sparse.linalg
    a = dense(np.r_[-5.0, _linspace(-1.0, 2.0, 79)], seed=11)

    class Duck:
        shape = (80, 80)

        def matvec(self, x):
            return a @ x

    inputs = {
        "ndarray": a,
        "list": a.tolist(),
        "sparse": sp.csr_matrix(a),
        "LinearOperator": sla.aslinearoperator(a),
        "duck": Duck(),
        "callable": lambda x: a @ x,
    }
    vals = {}
    for name, A in inputs.items():
        kw = {"n": 80} if name == "callable" else {}
        vals[name] = pycurv.lanczos(A, 2, tol=1e-12, seed=0, **kw).eigenvalues
    for name, v in vals.items():
        np.testing.assert_allclose(v, reference(a, 2, "LA"), rtol=0, atol=1e-12, err_msg=name)


def test_no_eigenvectors_requested():
    a = dense(_linspace(0.0, 1.0, 30), seed=0)
    res = pycurv.lanczos(a, 2, return_eigenvectors=False, seed=0)
    assert res.eigenvectors is None and res.converged


def test_result_is_frozen_and_reports_time():
    a = dense(_linspace(0.0, 1.0, 30), seed=0)
    res = pycurv.lanczos(a, 1, seed=0)
    with pytest.raises(Exception):
        res.converged = False  # type: ignore[misc]
    assert res.time_total >= res.time_matvec + res.time_core - 1e-9
    assert res.history.n_matvecs[-1] <= res.n_matvecs
    assert "LanczosResult" in repr(res)


# Every spectrum, end, k and tol but one: lambda_2 = 1 - 1e-6, far above tol=1e-10 from the top and not yet
# seen by the Krylov space when lambda_1's estimate passes (test_eigenvalue_criterion_unseen_neighbour).
_EIG_CASES = [(name, which, k, tol) for name in SPECTRA for which in ("LA", "SA", "BE") for k in (1, 4)
              for tol in (1e-4, 1e-10)
              if not (name == "near_degenerate_1e-6" and tol == 1e-10 and k == 1 and which != "SA")]


@pytest.mark.parametrize("name,which,k,tol", _EIG_CASES)
def test_eigenvalue_criterion_meets_tol_on_the_eigenvalues(name, which, k, tol):
    """criterion="eigenvalue": every eigenvalue within tol * scale of eigh's, on the spectra that break tools."""
    n = 120
    a = dense(SPECTRA[name](n), seed=1)
    res = pycurv.lanczos(a, k, which=which, tol=tol, seed=7, max_matvecs=20000, criterion="eigenvalue")
    assert res.converged and res.criterion == "eigenvalue", res.message
    norm = max(float(np.max(np.abs(np.linalg.eigvalsh(a)))), np.finfo(float).tiny)
    err = np.abs(res.eigenvalues - reference(a, k, which))
    scale = np.maximum(np.abs(res.eigenvalues), norm)
    assert np.all(err <= tol * scale + 2000 * EPS * norm), (err / scale, tol)
    assert np.all(res.error_bounds <= tol * scale * (1 + 1e-12)), (res.error_bounds / scale, tol)
    assert np.all(err <= res.residual_norms + 100 * EPS * norm * np.sqrt(n))  # the rigorous bound holds
    y = res.eigenvectors
    assert np.max(np.abs(y.T @ y - np.eye(k))) <= 1e-12


def test_eigenvalue_criterion_stops_earlier_at_the_same_accuracy():
    """A gapped top: an eigenvalue to 1e-10 relative needs a residual of only about sqrt(1e-10 * gap)."""
    n = 400
    a = dense(np.r_[10.0, 9.0, _linspace(-3.0, 3.0, n - 2)], seed=5)
    by_res = pycurv.lanczos(a, 1, tol=1e-10, seed=3)
    by_eig = pycurv.lanczos(a, 1, tol=1e-10, seed=3, criterion="eigenvalue")
    assert by_eig.converged and "eigenvalue error estimate" in by_eig.message
    assert 12 <= by_eig.n_matvecs < by_res.n_matvecs
    assert abs(by_eig.eigenvalues[0] - 10.0) <= 1e-10 * 10.0
    assert abs(by_res.eigenvalues[0] - 10.0) <= 1e-10 * 10.0


def _lanczos_tridiagonal(a, v0, m):
    """m steps of Lanczos with full reorthogonalisation, in NumPy: T_m and beta_m."""
    n = a.shape[0]
    q = np.zeros((m + 1, n))
    t = np.zeros((m, m))
    q[0] = v0 / np.linalg.norm(v0)
    beta = 0.0
    for j in range(m):
        w = a @ q[j]
        for _ in range(2):
            w -= q[: j + 1].T @ (q[: j + 1] @ w)
        t[j, j] = q[j] @ (a @ q[j])
        beta = np.linalg.norm(w)
        q[j + 1] = w / beta
        if j + 1 < m:
            t[j, j + 1] = t[j + 1, j] = beta
    return t, beta


def _lehmann_reference(t, beta):
    """The top Ritz value's error bound by Lehmann's theorem, as a generalised eigenproblem: with
    rho = max_i (theta_i + r_i) over the others (the assumption: no eigenvalue but lambda_1 above it),
    lambda_1 <= rho + 1/mu_max for the pencil (T - rho, (T - rho)^2 + beta^2 e e^T); never above the
    residual r. Also Kato-Temple's min(r, r^2/gap) and rho."""
    import scipy.linalg

    theta, s = np.linalg.eigh(t)
    r = beta * np.abs(s[-1])
    gap = np.min(theta[-1] - theta[:-1] - r[:-1])
    rho = theta[-1] - gap
    if gap <= 0:  # no gap to assume: the residual
        return theta[-1], r[-1], r[-1], rho
    a0 = t - rho * np.eye(len(t))
    a1 = a0 @ a0
    a1[-1, -1] += beta**2
    mu = scipy.linalg.eigh(a0, a1, eigvals_only=True)[-1]
    return theta[-1], min(r[-1], rho + 1.0 / mu - theta[-1]), min(r[-1], r[-1] ** 2 / gap), rho


@pytest.mark.parametrize("name,which", [("gapped", "LA"), ("clustered_top", "LA"), ("dominant_negative", "SA")])
@pytest.mark.parametrize("m", [6, 10, 14, 20])
def test_eigenvalue_error_bound_is_lehmanns(name, which, m):
    """The extreme Ritz value's error bound: Lehmann's, under the same assumption as Kato-Temple's r^2/gap
    and never above it; a rigorous bound on the error wherever the assumption holds."""
    n = 300
    lam = {"gapped": np.r_[10.0, 9.8, _linspace(-3.0, 9.5, n - 2)],
           "clustered_top": np.r_[6.0, 5.9, 5.8, 5.5, np.random.default_rng(3).standard_normal(n - 4)],
           "dominant_negative": np.r_[-5.0, -4.6, _linspace(-4.2, 2.0, n - 2)]}[name]
    a = dense(lam, seed=2)
    v0 = np.random.default_rng(m).standard_normal(n)
    with pytest.warns(pycurv.ConvergenceWarning):  # stopped by max_matvecs before any tol this small
        res = pycurv.lanczos(a, 1, which=which, v0=v0, tol=1e-13, max_matvecs=m, min_matvecs=m,
                             criterion="eigenvalue")
    sign = 1.0 if which == "LA" else -1.0  # the bottom of A is the top of -A
    theta, bound, temple, rho = _lehmann_reference(*_lanczos_tridiagonal(sign * a, v0, m))
    assert res.n_matvecs == m and abs(sign * res.eigenvalues[0] - theta) <= 1e-12 * np.abs(lam).max()
    assert bound * (1 - 1e-9) <= res.error_bounds[0] <= bound * (1 + 2e-3)  # bisected to 1e-3, from above
    assert res.error_bounds[0] <= temple * (1 + 1e-9)
    top = np.sort(sign * lam)[::-1]
    if rho >= top[1]:  # the assumption holds: lambda_1 is within the bound
        assert 0.0 <= top[0] - theta <= res.error_bounds[0] * (1 + 1e-9) + 1e-13 * top[0]


def test_criterion_is_checked():
    with pytest.raises(ValueError, match="criterion must be 'residual' or 'eigenvalue', got criterion='ritz'"):
        pycurv.lanczos(np.eye(3), 1, criterion="ritz")


def test_eigenvalue_criterion_unseen_neighbour():
    """lambda_2 = 1 - 1e-6 not yet resolved when lambda_1's estimate passes tol=1e-10: the estimate is
    optimistic there (as the docstring says), and the rigorous residual bound still holds."""
    a = dense(SPECTRA["near_degenerate_1e-6"](120), seed=1)
    res = pycurv.lanczos(a, 1, tol=1e-10, seed=7, criterion="eigenvalue")
    err = abs(res.eigenvalues[0] - 1.0)
    assert res.error_bounds[0] <= 1e-10 < err  # what the docstring warns about
    assert err <= res.residual_norms[0]  # never beyond the rigorous bound
    assert err < 1e-6  # still closer to lambda_1 than lambda_2 is
    exact = pycurv.lanczos(a, 1, tol=1e-10, seed=7)  # the residual criterion resolves it
    assert abs(exact.eigenvalues[0] - 1.0) <= 1e-13


def _eos_misses(min_matvecs, tol, criterion, seeds=30):
    """Starts whose value is further than tol * scale from lambda_1 = 20, on the edge-of-stability cluster
    (20, 19.98, 19.96, then 15 and a bulk), n = 2000."""
    from pycurv.testing import SpectrumOperator, spectrum

    lam = spectrum("eos_cluster", 2000, seed=0)
    op = SpectrumOperator(lam, seed=0)
    scale = float(np.abs(lam).max())
    misses, products = 0, []
    for seed in range(seeds):
        res = pycurv.lanczos(op.matvec, 1, n=2000, tol=tol, seed=seed, criterion=criterion,
                             min_matvecs=min_matvecs, return_eigenvectors=False)
        assert res.converged, res.message
        misses += bool(lam.max() - res.eigenvalues[0] > tol * scale)
        products.append(res.n_matvecs)
    return misses, min(products)


@pytest.mark.parametrize("criterion", ["residual", "eigenvalue"])
def test_no_convergence_before_min_matvecs_finds_the_top_of_a_cluster(criterion):
    """A Krylov space of a few dimensions settles on a cluster's Ritz value, residual small; from 12
    products on the space has resolved lambda_1 from its neighbours 1e-3 below, for every start."""
    early, fewest = _eos_misses(0, 1e-3, criterion)
    assert early >= 5 and fewest < 12  # what stopping at the first passing test returns
    assert _eos_misses(None, 1e-3, criterion)[0] == 0


def test_min_matvecs_options():
    a = dense(np.r_[2.0, _linspace(0.0, 1.0, 199)], seed=2)  # a separated top: a few products would do
    by_default = pycurv.lanczos(a, 1, tol=1e-2, seed=0)
    assert by_default.converged and by_default.n_matvecs >= 12
    assert pycurv.lanczos(a, 1, tol=1e-2, seed=0, min_matvecs=0).n_matvecs < 12
    assert pycurv.lanczos(a, 1, tol=1e-2, seed=0, min_matvecs=40).n_matvecs >= 40
    capped = pycurv.lanczos(a, 1, tol=1e-2, seed=0, min_matvecs=40, max_matvecs=20)  # the cap wins
    assert capped.converged and capped.n_matvecs <= 21
    small = pycurv.lanczos(np.diag([1.0, 2.0, 3.0]), 1, seed=0)  # at most n
    assert small.converged and small.n_matvecs <= 4 and small.eigenvalues[0] == pytest.approx(3.0, abs=1e-14)
    rank_one = pycurv.lanczos(np.ones((50, 50)), 1, seed=0)  # a random start's space exhausted: exact
    assert rank_one.n_matvecs <= 3 and rank_one.eigenvalues[0] == pytest.approx(50.0, rel=1e-13)
    with pytest.raises(ValueError, match="min_matvecs must be >= 0, got min_matvecs=-1"):
        pycurv.lanczos(a, 1, min_matvecs=-1)
    with pytest.raises(TypeError, match="min_matvecs"):
        pycurv.lanczos(a, 1, min_matvecs=2.5)
