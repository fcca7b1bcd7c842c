"""Bad input gets a clear error naming the value; nothing is half-done; nothing the user passed is mutated."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import pycurv
from _reference import dense


@pytest.fixture
def a():
    return dense(np.r_[-5.0, np.linspace(-1.0, 2.0, 29)], seed=0)


# ---- the operator ------------------------------------------------------------------


def test_non_square(a):
    with pytest.raises(ValueError, match=r"A must be square, got shape \(3, 4\)"):
        pycurv.lanczos(np.ones((3, 4)))


def test_not_2d():
    with pytest.raises(ValueError, match=r"2-D square matrix, got shape \(5,\)"):
        pycurv.lanczos(np.ones(5))


def test_empty():
    with pytest.raises(ValueError, match=r"at least one row, got shape \(0, 0\)"):
        pycurv.lanczos(np.ones((0, 0)))


def test_non_numeric():
    with pytest.raises(TypeError, match="numeric matrix, got dtype object"):
        pycurv.lanczos(np.array([[object(), 1], [1, 2]], dtype=object))
    with pytest.raises(TypeError, match="numeric matrix, got dtype <U1"):
        pycurv.lanczos(np.array([["a", "b"], ["b", "c"]]))


def test_complex():
    with pytest.raises(TypeError, match="real symmetric, got complex dtype complex128"):
        pycurv.lanczos(np.eye(3, dtype=complex))


def test_nan_in_matrix():
    m = np.eye(4)
    m[1, 2] = m[2, 1] = np.nan
    with pytest.raises(ValueError, match="A contains NaN or Inf"):
        pycurv.lanczos(m)


def test_not_symmetric():
    m = np.eye(4)
    m[0, 3] = 1.0
    with pytest.raises(ValueError, match=r"A is not symmetric: max \|A - A.T\| = 1"):
        pycurv.lanczos(m)


def test_rounding_level_asymmetry_is_accepted(a):
    b = a.copy()
    b[0, 1] += 1e-14
    assert pycurv.sharpness(b, tol=1e-10, seed=0) == pytest.approx(2.0, abs=1e-12)


def test_unsupported_type():
    with pytest.raises(TypeError, match="A must be a symmetric matrix .* got object"):
        pycurv.lanczos(object())


def test_callable_needs_n():
    with pytest.raises(TypeError, match=r"pass its dimension too, e.g. pycurv.lanczos\(f, n=1000\)"):
        pycurv.lanczos(lambda x: x)


def test_n_mismatch(a):
    with pytest.raises(ValueError, match=r"n=10 does not match A's shape \(30, 30\)"):
        pycurv.lanczos(a, n=10)


# ---- k, ncv, which, tol, budget, seed --------------------------------------------------


@pytest.mark.parametrize("k", [0, -1, 31])
def test_k_out_of_range(a, k):
    with pytest.raises(ValueError, match=rf"k must satisfy 1 <= k <= n, got k={k}, n=30"):
        pycurv.lanczos(a, k)


@pytest.mark.parametrize("k", [1.5, True, "2"])
def test_k_not_integer(a, k):
    with pytest.raises(TypeError, match="k must be an integer"):
        pycurv.lanczos(a, k)


@pytest.mark.parametrize("ncv", [2, 31, 1])
def test_ncv_out_of_range(a, ncv):
    with pytest.raises(ValueError, match=rf"ncv must satisfy k \+ 2 <= ncv <= n, got ncv={ncv}, k=1, n=30"):
        pycurv.lanczos(a, 1, ncv=ncv)


def test_ncv_must_be_n_for_nearly_full_spectrum(a):
    with pytest.raises(ValueError, match="ncv must equal n when k >= n - 1, got ncv=20, k=29, n=30"):
        pycurv.lanczos(a, 29, ncv=20)


def test_which(a):
    with pytest.raises(ValueError, match=r"which must be one of 'LA', 'SA', 'BE', got which='LM'"):
        pycurv.lanczos(a, which="LM")


@pytest.mark.parametrize("tol", [0.0, -1e-3, 1.0, float("nan"), "1e-6"])
def test_tol(a, tol):
    with pytest.raises(ValueError, match="tol must be a number with 0 < tol < 1"):
        pycurv.lanczos(a, tol=tol)


def test_max_matvecs(a):
    with pytest.raises(ValueError, match="max_matvecs must be >= 1, got max_matvecs=0"):
        pycurv.lanczos(a, max_matvecs=0)


def test_seed(a):
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got seed=-3"):
        pycurv.lanczos(a, seed=-3)
    with pytest.raises(ValueError, match=r"seed must be below 2\*\*64 \(seeds are 64-bit\), got seed=18446744073709551616"):
        pycurv.lanczos(a, seed=2**64)
    top = 2**64 - 1  # the largest seed is a seed of its own, not seed 0 or 2**63 - 1
    r = pycurv.lanczos(a, seed=top)
    assert r.seed == top and r.converged
    assert not np.array_equal(r.history.value, pycurv.lanczos(a, seed=0).history.value)


def test_basis_that_does_not_fit_names_its_bytes():
    with pytest.raises(MemoryError, match=r"the Krylov basis does not fit in memory: 33 vectors of n=1000000000000 "
                                          r"float64 need 8·n·\(ncv\+1\) = 264000000000000 bytes \(240 TiB\)"
                                          r" plus 7.28 TiB for the 1 returned eigenvector\(s\)\. Lower ncv "
                                          r"\(ncv=32 now; at least k \+ 2 = 3\)"):
        pycurv.lanczos(lambda x: x, n=10**12, seed=0)
    with pytest.raises(MemoryError, match=r"33 vectors of n=1000000000000 float64 need .*TiB\)\. Lower ncv"):
        pycurv.lanczos(lambda x: x, n=10**12, seed=0, return_eigenvectors=False)


def test_sharpness_rejects_k(a):
    with pytest.raises(TypeError, match="takes no k="):
        pycurv.sharpness(a, k=2)


# ---- v0 -------------------------------------------------------------------------


def test_v0_wrong_size(a):
    with pytest.raises(ValueError, match=r"v0 must have shape \(30,\) to match A, got shape \(29,\)"):
        pycurv.lanczos(a, v0=np.ones(29))


def test_v0_zero(a):
    with pytest.raises(ValueError, match="v0 is the zero vector"):
        pycurv.lanczos(a, v0=np.zeros(30))


def test_v0_not_finite(a):
    v = np.ones(30)
    v[3] = np.inf
    with pytest.raises(ValueError, match="v0 contains NaN or Inf"):
        pycurv.lanczos(a, v0=v)


def test_v0_complex(a):
    with pytest.raises(TypeError, match="v0 must hold real numbers, got dtype complex128"):
        pycurv.lanczos(a, v0=np.ones(30, dtype=complex))


# ---- what the matvec returns -----------------------------------------------------------


def test_nan_from_matvec_names_the_call(a):
    calls = {"n": 0}

    def mv(x):
        calls["n"] += 1
        y = a @ x
        if calls["n"] == 3:
            y[[2, 7]] = np.nan
        return y

    with pytest.raises(pycurv.NonFiniteMatvecError, match=r"matvec call 3 returned 2 non-finite values") as exc:
        pycurv.lanczos(mv, n=30, seed=0)
    assert exc.value.matvec == 3


def test_inf_from_matvec(a):
    def mv(x):
        y = a @ x
        y[0] = np.inf
        return y

    with pytest.raises(pycurv.NonFiniteMatvecError, match="matvec call 1 returned 1 non-finite values"):
        pycurv.lanczos(mv, n=30, seed=0)


def test_huge_matvec_is_scaled_not_refused(a):
    # Products near 1e300 are scaled by a power of two before any square is taken.
    assert pycurv.sharpness(lambda x: 1e300 * (a @ x), n=30, tol=1e-10, seed=0) == pytest.approx(2e300, rel=1e-12)


def test_overflowing_matvec():
    # Only products that span more than float64's range from the first nonzero one overflow.
    with pytest.raises(pycurv.NonFiniteMatvecError, match="norm overflows float64 even after scaling"):
        pycurv.lanczos(lambda x: np.array([1e-300 * x[0], 1e300 * x[1]]), n=2, v0=np.array([1.0, 0.0]), seed=0)


def test_wrong_shape_from_matvec(a):
    with pytest.raises(ValueError, match=r"matvec call 1 returned shape \(29,\); expected \(30,\)"):
        pycurv.lanczos(lambda x: (a @ x)[:29], n=30)


def test_column_vector_from_matvec_is_accepted(a):
    assert pycurv.sharpness(lambda x: (a @ x)[:, None], n=30, tol=1e-10, seed=0) == pytest.approx(2.0, abs=1e-12)


def test_complex_from_matvec(a):
    with pytest.raises(TypeError, match="matvec call 1 returned complex values"):
        pycurv.lanczos(lambda x: (a @ x).astype(complex), n=30)


def test_non_array_from_matvec(a):
    with pytest.raises(TypeError, match="matvec call 1 returned dtype object"):
        pycurv.lanczos(lambda x: [object()] * 30, n=30)


def test_exception_inside_matvec_propagates_unchanged(a):
    boom = KeyError("from the user's code")

    def mv(x):
        raise boom

    with pytest.raises(KeyError) as exc:
        pycurv.lanczos(mv, n=30)
    assert exc.value is boom


def test_matvec_cannot_write_into_the_basis(a):
    def mv(x):
        x *= 2.0
        return a @ x

    with pytest.raises(ValueError, match="read-only"):
        pycurv.lanczos(mv, n=30)


# ---- nothing mutated, nothing half-done ------------------------------------------------


def test_inputs_not_mutated(a):
    a0 = a.copy()
    v0 = np.arange(1.0, 31.0)
    v00 = v0.copy()
    pycurv.lanczos(a, 3, v0=v0, seed=0)
    assert np.array_equal(a, a0) and np.array_equal(v0, v00)


def test_non_convergence_is_reported_not_success(a):
    big = dense(np.linspace(-1.0, 1.0, 500), seed=1)
    with pytest.warns(pycurv.ConvergenceWarning, match="did not converge within max_matvecs=30"):
        res = pycurv.lanczos(big, 1, tol=1e-12, max_matvecs=30, seed=0)
    assert not res.converged and res.status == "max_matvecs"
    assert res.n_matvecs == 30
    assert res.eigenvalues.shape == (1,) and res.eigenvectors.shape == (500, 1)
    true = np.linalg.eigvalsh(big)[-1]
    # the best estimate is an honest lower bound with an honest residual
    assert res.eigenvalues[0] <= true + 1e-12
    y = res.eigenvectors[:, 0]
    assert np.linalg.norm(big @ y - res.eigenvalues[0] * y) <= res.residual_norms[0] * (1 + 1e-8) + 1e-13
    with pytest.raises(pycurv.NoConvergence, match="did not converge") as exc:
        pycurv.sharpness(big, tol=1e-12, max_matvecs=30, seed=0)
    assert exc.value.result.status == "max_matvecs"


def test_float32_matvec_stops_at_the_noise_floor():
    """A float32 matvec cannot reach tol=1e-12: the solver must say so quickly, not spin."""
    a = dense(np.r_[np.linspace(-1.0, 1.0, 399), 1.5], seed=2)
    a32 = a.astype(np.float32)
    with pytest.warns(pycurv.ConvergenceWarning, match="noise floor"):
        res = pycurv.lanczos(lambda x: a32 @ x.astype(np.float32), n=400, tol=1e-12, seed=0, max_matvecs=5000)
    assert res.status == "noise_floor" and not res.converged
    assert res.n_matvecs < 300
    assert 1e-9 < res.noise_level < 1e-4
    assert res.eigenvalues[0] == pytest.approx(1.5, rel=1e-5)
    # with a tolerance above the floor the same matvec converges
    ok = pycurv.lanczos(lambda x: a32 @ x.astype(np.float32), n=400, tol=1e-4, seed=0)
    assert ok.converged and ok.eigenvalues[0] == pytest.approx(1.5, rel=1e-5)


def test_float32_matvec_hidden_behind_float64_output():
    """The matvec computes in float32 but returns float64: only the explicit residual can tell."""
    a = dense(np.r_[np.linspace(-1.0, 1.0, 399), 1.5], seed=2)
    a32 = a.astype(np.float32)
    with pytest.warns(pycurv.ConvergenceWarning, match="noise floor"):
        res = pycurv.lanczos(lambda x: (a32 @ x.astype(np.float32)).astype(np.float64), n=400, tol=1e-12,
                             seed=0, max_matvecs=5000)
    assert res.status == "noise_floor" and res.n_matvecs < 300


def test_nondeterministic_matvec_is_flagged():
    """A matvec with 1e-6 relative random noise (dropout-like) is reported, not declared converged."""
    a = dense(np.r_[np.linspace(-1.0, 1.0, 199), 1.5], seed=3)
    rng = np.random.default_rng(0)

    def mv(x):
        y = a @ x
        return y + 1e-6 * np.linalg.norm(y) * rng.standard_normal(y.size) / np.sqrt(y.size)

    with pytest.warns(pycurv.ConvergenceWarning, match="noise floor"):
        res = pycurv.lanczos(mv, n=200, tol=1e-10, seed=0, max_matvecs=5000)
    assert res.status == "noise_floor" and res.n_matvecs < 500


def test_callback_sees_progress_and_can_stop(a):
    seen = []

    def cb(info):
        seen.append(info)
        return info.n_matvecs >= 5

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pycurv.ConvergenceWarning)
        res = pycurv.lanczos(dense(np.linspace(0, 1, 200), seed=5), 1, tol=1e-12, callback=cb, seed=0)
    assert res.status == "stopped" and res.n_matvecs == 5
    assert [s.n_matvecs for s in seen] == [1, 2, 3, 4, 5]
    assert all(s.eigenvalues.shape == (1,) for s in seen)


def test_callback_exception_propagates(a):
    def cb(info):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        pycurv.lanczos(a, callback=cb)
