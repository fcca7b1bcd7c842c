"""The compiled core directly: its dense Ritz eigensolver, the orthogonality of the
whole Krylov basis, and the reverse-communication protocol with a sharded basis."""

from __future__ import annotations

import numpy as np
import pytest

from pycurv import _core
from pycurv.lanczos import collect, drive
from _reference import EPS, dense

MATVEC, REDUCE, STEP, DONE = (int(r.value) for r in (_core.Request.MATVEC, _core.Request.REDUCE,
                                                       _core.Request.STEP, _core.Request.DONE))


# ---- the Ritz solver: Householder tridiagonalisation + implicit QL -------------------


def _symeig_checks(a):
    w, z = _core.symeig(a)
    ref = np.linalg.eigvalsh(a)
    n = a.shape[0]
    norm = max(np.max(np.abs(ref)), np.finfo(float).tiny) if n else 1.0
    assert np.all(np.diff(w) >= 0)
    assert np.max(np.abs(w - ref), initial=0.0) <= 50 * n * EPS * norm
    assert np.max(np.abs(z.T @ z - np.eye(n)), initial=0.0) <= 50 * n * EPS
    assert np.max(np.abs(a @ z - z * w), initial=0.0) <= 50 * n * EPS * norm


@pytest.mark.parametrize("n", [1, 2, 3, 7, 20, 64, 130])
def test_symeig_random(n, rng):
    m = rng.standard_normal((n, n))
    _symeig_checks((m + m.T) / 2)


def test_symeig_special_matrices(rng):
    # zero, identity, diagonal with repeats, graded, Wilkinson W21+, arrowhead (thick restart's shape)
    _symeig_checks(np.zeros((5, 5)))
    _symeig_checks(np.eye(6))
    _symeig_checks(np.diag([3.0, 3.0, -1.0, 3.0, 0.0]))
    g = np.diag(np.logspace(0, -14, 10)) + np.diag(np.logspace(-1, -14, 9), 1) + np.diag(np.logspace(-1, -14, 9), -1)
    _symeig_checks(g)
    w21 = np.diag(np.abs(np.arange(-10.0, 11.0))) + np.diag(np.ones(20), 1) + np.diag(np.ones(20), -1)
    _symeig_checks(w21)
    arrow = np.diag(rng.standard_normal(12))
    arrow[-1, :-1] = arrow[:-1, -1] = rng.standard_normal(11) * 1e-3
    _symeig_checks(arrow)
    _symeig_checks(1e-300 * np.diag([1.0, 2.0, 3.0]) + 1e-300 * np.ones((3, 3)))


def test_symeig_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        _core.symeig(np.ones((2, 3)))


# ---- driving the state by hand ----------------------------------------------------------


def _state(n, *, k=1, ncv=10, which=0, tol=1e-10, seed=1, yield_reduce=False, n_local=None, offset=0,
           max_matvecs=20000, check_multiplicity=False):
    return _core.LanczosState(
        n_local=n if n_local is None else n_local, n_global=n, offset=offset, k=k, ncv=ncv, which=which, tol=tol,
        max_matvecs=max_matvecs, seed=seed, start_given=False, check_multiplicity=check_multiplicity,
        explicit_residuals=False, want_vectors=True, yield_reduce=yield_reduce, unit_roundoff=2.0**-53)


def test_whole_basis_stays_orthonormal_through_restarts():
    """||V^T V - I|| over every basis vector, checked after every step, restarts included."""
    n = 400
    a = dense(np.r_[np.linspace(-1.0, 1.0, n - 3), 1.05, 1.1, 5.0], seed=0)
    st = _state(n, k=3, ncv=16, max_matvecs=3000)
    worst = 0.0
    steps = 0
    for _ in range(100000):
        req = int(st.advance())
        if req == MATVEC:
            st.set_matvec_output(a @ st.matvec_input())
        elif req == STEP:
            steps += 1
            j = st.basis_size + 1  # the active basis and the next (pending) vector
            v = st.basis(j)
            worst = max(worst, float(np.max(np.abs(v @ v.T - np.eye(j)))))
        elif req == DONE:
            break
    assert st.status == 1 and st.n_restarts >= 5 and steps > 50
    assert worst <= 1e-13, worst


def test_reduce_requests_are_the_identity_in_one_process():
    n = 300
    a = dense(np.r_[np.linspace(-1.0, 1.0, n - 1), 2.0], seed=1)
    results = []
    for yield_reduce in (False, True):
        st = _state(n, k=2, ncv=12, yield_reduce=yield_reduce)
        reduces = 0
        for _ in range(100000):
            req = int(st.advance())
            if req == MATVEC:
                st.set_matvec_output(a @ st.matvec_input())
            elif req == REDUCE:
                reduces += 1
                assert st.reduce_buffer().shape[0] >= 1
            elif req == DONE:
                break
        results.append((st.values(), st.eigenvectors(), reduces, st.n_matvecs))
    (v0, y0, r0, m0), (v1, y1, r1, m1) = results
    assert r0 == 0 and r1 >= 2 * m1  # pass 1 and pass 2 of every step ask for a reduction
    assert np.array_equal(v0, v1) and np.array_equal(y0, y1) and m0 == m1


def _run_sharded(a, parts, **kw):
    """Drives one state per simulated rank in lockstep: the matvec sees the gathered vector,
    REDUCE sums the partial sums of all ranks. This is what a sharded basis does across processes."""
    n = a.shape[0]
    bounds = np.linspace(0, n, parts + 1).astype(int)
    states = [_state(n, n_local=int(hi - lo), offset=int(lo), yield_reduce=True, **kw)
              for lo, hi in zip(bounds[:-1], bounds[1:])]
    n_reduce = 0
    for _ in range(1000000):
        reqs = [int(s.advance()) for s in states]
        assert len(set(reqs)) == 1, f"ranks diverged: {reqs}"
        req = reqs[0]
        if req == MATVEC:
            y = a @ np.concatenate([np.asarray(s.matvec_input()) for s in states])
            for s, lo, hi in zip(states, bounds[:-1], bounds[1:]):
                s.set_matvec_output(y[lo:hi])
        elif req == REDUCE:
            n_reduce += 1
            bufs = [s.reduce_buffer() for s in states]
            total = np.sum(bufs, axis=0)
            for b in bufs:
                b[:] = total
        elif req == DONE:
            break
    vals = [s.values() for s in states]
    for v in vals[1:]:
        assert np.array_equal(v, vals[0])  # every rank reaches the same answer
    vecs = np.concatenate([s.eigenvectors() for s in states], axis=1)
    return vals[0], vecs, states[0].n_matvecs, n_reduce


@pytest.mark.parametrize("parts", [2, 3, 4])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_sharded_basis_matches_single_process(parts, which):
    n = 240
    a = dense(np.r_[-3.0, np.linspace(-1.0, 1.0, n - 4), 1.0 + 1e-3, 1.5, 2.0], seed=2)
    kw = dict(k=3, ncv=14, which=which, tol=1e-11, check_multiplicity=True)
    v1, y1, m1, _ = _run_sharded(a, 1, **kw)
    vp, yp, mp, nred = _run_sharded(a, parts, **kw)
    assert nred > 0
    np.testing.assert_allclose(vp, v1, rtol=1e-10, atol=1e-12)
    # same random vectors, same decisions: the same eigenvectors (up to sign) and work
    signs = np.sign(np.sum(yp * y1, axis=1))
    np.testing.assert_allclose(yp * signs[:, None], y1, atol=1e-8)
    assert abs(mp - m1) <= 2


def test_random_start_is_the_same_vector_whatever_the_sharding():
    n = 50
    full = _state(n, ncv=10)
    full.advance()  # generates and normalises the start vector, then asks for A q
    q_full = np.array(full.matvec_input())
    halves = [_state(n, n_local=25, offset=0, ncv=10, yield_reduce=True),
              _state(n, n_local=25, offset=25, ncv=10, yield_reduce=True)]
    for s in halves:
        assert int(s.advance()) == REDUCE  # norm of the start vector
    total = sum(s.reduce_buffer()[0] for s in halves)
    for s in halves:
        s.reduce_buffer()[0] = total
        assert int(s.advance()) == MATVEC
    q_sharded = np.concatenate([np.array(s.matvec_input()) for s in halves])
    np.testing.assert_allclose(q_sharded, q_full, rtol=1e-15, atol=0)


def test_collect_builds_a_result_from_a_hand_driven_state():
    n = 60
    a = dense(np.linspace(0.0, 1.0, n), seed=3)
    st = _state(n, k=2, ncv=10)
    timing = drive(st, lambda x: a @ x, n)
    res = collect(st, timing, which="LA", tol=1e-10, ncv=10, seed=1, max_matvecs=100000, want_vectors=True)
    assert res.converged
    np.testing.assert_allclose(res.eigenvalues, np.linalg.eigvalsh(a)[::-1][:2], atol=1e-12)


def test_state_rejects_inconsistent_layout():
    with pytest.raises(ValueError, match="inconsistent n_local, n_global, offset"):
        _state(10, n_local=6, offset=5)
    with pytest.raises(ValueError, match="ncv must be at least k \\+ 2"):
        _state(10, k=3, ncv=4)
