"""The CUDA backend: the same answers as the CPU backend, from a basis in device memory.

These tests need pycurv._cuda and a visible CUDA device; without them they are
skipped with the reason. They also run against the CPU emulation of the CUDA
backend (pip install . -Ccmake.define.PYCURV_CUDA=EMULATE), which checks the
kernels, the host code, the binding and the dispatch on machines without a GPU;
the tests that exchange arrays with torch, CuPy or JAX need a real GPU.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

import pycurv
from pycurv import _core
from _reference import EPS, check, dense
from test_lanczos_spectra import SPECTRA

try:
    from pycurv import _cuda
except ImportError:  # pragma: no cover - depends on the build
    _cuda = None


def _status():
    if _cuda is None:
        return False, "pycurv was built without CUDA (no pycurv._cuda; install with -Ccmake.define.PYCURV_CUDA=ON)"
    if not _cuda.devices():
        return False, f"pycurv._cuda sees no CUDA device ({_cuda.device_error()})"
    return True, ""


_READY, _REASON = _status()
EMULATED = bool(_READY and _cuda.build_info()["emulated"])

# PYCURV_EXPECT_CUDA=1 (bench/gpu_check.sh, tests/emulated_gpu.sh): a build or machine that cannot run these
# fails them instead of skipping them.
_EXPECTED = os.environ.get("PYCURV_EXPECT_CUDA") == "1"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _READY and not _EXPECTED, reason=_REASON)]


def test_the_cuda_module_is_usable():
    assert _READY, _REASON

MATVEC, REDUCE, STEP, DONE = (int(r.value) for r in (_core.Request.MATVEC, _core.Request.REDUCE,
                                                       _core.Request.STEP, _core.Request.DONE))


def _needs_real_gpu():
    if EMULATED:
        pytest.skip("exchanges arrays with a GPU framework: needs a real GPU, not the CPU emulation")


class HostMatrixOnGpu(pycurv.Operator):
    """A float64 matrix whose products are computed on the host, for a solver on the GPU.

    ``matvec`` gets pycurv's DeviceArray and returns one: the same arithmetic as
    the CPU backend's MatrixOperator, so CPU and GPU runs differ only in the
    basis kernels. ``out_dtype`` returns the product in a lower precision.
    """

    exact = True

    def __init__(self, a, out_dtype="float64"):
        self.a = a
        self.shape = a.shape
        self.dtype = np.dtype(np.float64) if out_dtype == "float64" else out_dtype
        self.exact = out_dtype == "float64"
        self.device = "cuda:0"
        self.out_dtype = out_dtype
        self.calls = 0

    def matvec(self, x):
        self.calls += 1
        assert isinstance(x, _cuda.DeviceArray) and x.shape == (self.shape[0],)
        return _cuda.DeviceArray.from_numpy(self.a @ x.numpy(), dtype=self.out_dtype)


def _gpu_state(n, *, k=1, ncv=10, which=0, tol=1e-10, seed=1, yield_reduce=False, n_local=None, offset=0,
               max_matvecs=20000, check_multiplicity=False, host_basis=False):
    return _cuda.LanczosState(
        n_local=n if n_local is None else n_local, n_global=n, offset=offset, k=k, ncv=ncv, which=which, tol=tol,
        max_matvecs=max_matvecs, seed=seed, start_given=False, check_multiplicity=check_multiplicity,
        explicit_residuals=False, want_vectors=True, yield_reduce=yield_reduce, unit_roundoff=2.0**-53, device=0,
        host_basis=host_basis)


def _on_device(y):
    return _cuda.DeviceArray.from_numpy(np.ascontiguousarray(y))


# ---- the same spectra as on the CPU ----------------------------------------------------------


def test_devices_are_described():
    devs = _cuda.devices()
    assert devs and all({"index", "name", "total_memory", "compute_capability"} <= set(d) for d in devs)
    assert devs[0]["index"] == 0 and devs[0]["total_memory"] > 0
    bandwidth = _cuda.read_bandwidth(n=1 << 22, repeats=2)
    assert bandwidth == 0.0 if EMULATED else 1e10 < bandwidth < 1e14  # bytes/s: tens of GB/s to tens of TB/s


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("which", ["LA", "SA", "BE"])
@pytest.mark.parametrize("k", [1, 4])
def test_spectra_same_eigenvalues_as_cpu(name, which, k):
    """The spectra of test_lanczos_spectra: GPU eigenvalues equal the CPU's to 1e-12 of ||A||."""
    n = 120
    a = dense(SPECTRA[name](n), seed=1)
    tol = 1e-12
    kw = dict(which=which, tol=tol, seed=7, max_matvecs=20000)
    gpu = pycurv.lanczos(HostMatrixOnGpu(a), k, **kw)
    cpu = pycurv.lanczos(a, k, **kw)
    check(a, gpu, k, which, tol=tol)
    scale = max(float(np.max(np.abs(np.linalg.eigvalsh(a)))), 1.0)
    np.testing.assert_allclose(gpu.eigenvalues, cpu.eigenvalues, rtol=0, atol=1e-12 * scale)
    assert isinstance(gpu.eigenvectors, np.ndarray)  # framework None: the vectors come back to the host


def test_eigenvalue_criterion_stops_where_the_cpu_does():
    """criterion="eigenvalue" reaches the device's state: same stop, same eigenvalue as on the CPU."""
    a = dense(np.r_[10.0, 9.0, np.linspace(-3.0, 3.0, 398)], seed=5)
    kw = dict(tol=1e-10, seed=3, criterion="eigenvalue")
    gpu = pycurv.lanczos(HostMatrixOnGpu(a), 1, **kw)
    cpu = pycurv.lanczos(a, 1, **kw)
    assert gpu.converged and gpu.criterion == "eigenvalue" and gpu.n_matvecs == cpu.n_matvecs
    assert gpu.n_matvecs < pycurv.lanczos(a, 1, tol=1e-10, seed=3).n_matvecs
    np.testing.assert_allclose(gpu.eigenvalues, cpu.eigenvalues, rtol=1e-12, atol=0)
    assert abs(gpu.eigenvalues[0] - 10.0) <= 1e-10 * 10.0
    # min_matvecs reaches the device's state too: without it both stop at the same earlier product
    early = dict(tol=1e-3, seed=3, min_matvecs=0)
    gpu0, cpu0 = pycurv.lanczos(HostMatrixOnGpu(a), 1, **early), pycurv.lanczos(a, 1, **early)
    assert gpu0.n_matvecs == cpu0.n_matvecs < 12


def test_thick_restarts_same_eigenvalues_as_cpu():
    a = dense(np.linspace(-1.0, 1.0, 400), seed=6)
    kw = dict(ncv=8, tol=1e-10, seed=0, max_matvecs=50000)
    gpu = pycurv.lanczos(HostMatrixOnGpu(a), 5, **kw)
    cpu = pycurv.lanczos(a, 5, **kw)
    check(a, gpu, 5, tol=1e-10)
    assert gpu.n_restarts > 10
    np.testing.assert_allclose(gpu.eigenvalues, cpu.eigenvalues, rtol=1e-12, atol=0)


def test_repeated_top_found_through_verification():
    n = 300
    a = dense(np.r_[10.0, 10.0, 10.0, np.linspace(0.0, 9.0, n - 3)], seed=4)
    res = pycurv.lanczos(HostMatrixOnGpu(a), 4, tol=1e-10, seed=2)
    check(a, res, 4, tol=1e-10)
    np.testing.assert_allclose(res.eigenvalues, [10.0, 10.0, 10.0, 9.0], rtol=0, atol=1e-12)
    assert res.n_verify_rounds >= 1


def test_rank_one_breakdown_and_zero_operator():
    u = np.random.default_rng(0).standard_normal(50)
    a = 3.0 * np.outer(u, u) / (u @ u)
    res = pycurv.lanczos(HostMatrixOnGpu(a), 1, tol=1e-12, seed=0)
    check(a, res, 1, tol=1e-12)
    assert res.n_matvecs <= 3
    z = pycurv.lanczos(HostMatrixOnGpu(np.zeros((40, 40))), 3, which="BE", seed=0)
    assert z.converged and np.all(z.eigenvalues == 0.0)


# ---- the basis and the kernels -----------------------------------------------------------------


@pytest.mark.parametrize("host_basis", [False, True])
def test_whole_basis_stays_orthonormal_through_restarts(host_basis):
    n = 400
    a = dense(np.r_[np.linspace(-1.0, 1.0, n - 3), 1.05, 1.1, 5.0], seed=0)
    st = _gpu_state(n, k=3, ncv=16, max_matvecs=3000, host_basis=host_basis)
    worst = 0.0
    steps = 0
    for _ in range(100000):
        req = int(st.advance())
        if req == MATVEC:
            st.set_matvec_output(_on_device(a @ st.matvec_input().numpy()))
        elif req == STEP:
            steps += 1
            j = st.basis_size + 1
            v = st.basis(j).numpy()
            worst = max(worst, float(np.max(np.abs(v @ v.T - np.eye(j)))))
        elif req == DONE:
            break
    assert st.status == 1 and st.n_restarts >= 5 and steps > 50
    assert worst <= 1e-13, worst
    assert st.host_basis == host_basis


def test_random_start_is_the_cpu_vector():
    """normal_at on the device draws the CPU's vector (to the last bits of the device's log and cos)."""
    for n in (1, 50, 1000):
        gpu = _gpu_state(n, ncv=min(n, 10))
        cpu = _core.LanczosState(
            n_local=n, n_global=n, offset=0, k=1, ncv=min(n, 10), which=0, tol=1e-10, max_matvecs=100, seed=1,
            start_given=False, check_multiplicity=False, explicit_residuals=False, want_vectors=True,
            yield_reduce=False, unit_roundoff=2.0**-53)
        assert int(gpu.advance()) == MATVEC and int(cpu.advance()) == MATVEC
        np.testing.assert_allclose(gpu.matvec_input().numpy(), np.array(cpu.matvec_input()), rtol=4 * EPS, atol=0)


def test_same_seed_bit_identical():
    a = dense(np.r_[-5.0, np.linspace(-1.0, 2.0, 299)], seed=3)
    runs = [pycurv.lanczos(HostMatrixOnGpu(a), 3, tol=1e-10, seed=123, ncv=12) for _ in range(2)]
    r1, r2 = runs
    assert r1.n_restarts > 0
    assert np.array_equal(r1.eigenvalues, r2.eigenvalues)
    assert np.array_equal(r1.eigenvectors, r2.eigenvectors)
    assert np.array_equal(r1.residual_norms, r2.residual_norms)
    assert r1.n_matvecs == r2.n_matvecs


def test_host_basis_gives_the_same_bits():
    a = dense(np.r_[np.linspace(0.0, 1.0, 197), 1.5, 2.0, 3.0], seed=5)
    dev = pycurv.lanczos(HostMatrixOnGpu(a), 2, tol=1e-10, seed=4, ncv=10)
    host = pycurv.lanczos(HostMatrixOnGpu(a), 2, tol=1e-10, seed=4, ncv=10, host_basis=True)
    assert np.array_equal(dev.eigenvalues, host.eigenvalues)
    assert np.array_equal(dev.eigenvectors, host.eigenvectors)


def test_reduce_requests_are_the_identity_in_one_process():
    n = 300
    a = dense(np.r_[np.linspace(-1.0, 1.0, n - 1), 2.0], seed=1)
    results = []
    for yield_reduce in (False, True):
        st = _gpu_state(n, k=2, ncv=12, yield_reduce=yield_reduce)
        reduces = 0
        for _ in range(100000):
            req = int(st.advance())
            if req == MATVEC:
                st.set_matvec_output(_on_device(a @ st.matvec_input().numpy()))
            elif req == REDUCE:
                reduces += 1
            elif req == DONE:
                break
        results.append((st.values(), st.eigenvectors().numpy(), reduces, st.n_matvecs))
    (v0, y0, r0, m0), (v1, y1, r1, m1) = results
    assert r0 == 0 and r1 >= 2 * m1
    assert np.array_equal(v0, v1) and np.array_equal(y0, y1) and m0 == m1


def test_third_pass_decided_on_the_device_as_on_the_host():
    """A product nearly in the basis's span (A = I + 1e-5 D) takes a third pass at every step: decided on the
    device in one process (one wait per step), on the host when every pass is reduced (REDUCE): the same bits."""
    n = 400
    lam = 1.0 + 1e-5 * np.r_[np.linspace(-1.0, 1.0, n - 1), 3.0]
    states = []
    for yield_reduce in (False, True):
        st = _gpu_state(n, ncv=12, tol=1e-11, yield_reduce=yield_reduce)
        for _ in range(100000):
            req = int(st.advance())
            if req == MATVEC:
                st.set_matvec_output(_on_device(lam * st.matvec_input().numpy()))
            elif req == DONE:
                break
        states.append(st)
    fused, reduced = states
    assert fused.status == 1 and fused.n_pass3 >= 5 and fused.n_pass3 == reduced.n_pass3
    assert np.array_equal(fused.values(), reduced.values())
    assert np.array_equal(fused.eigenvectors().numpy(), reduced.eigenvectors().numpy())
    assert fused.values()[0] == pytest.approx(1.00003, rel=1e-12)


def test_sharded_basis_on_one_device_matches_the_cpu():
    """Two states holding halves of the rows (offsets), reduced by hand: the multi-process protocol on a GPU."""
    n = 240
    a = dense(np.r_[-3.0, np.linspace(-1.0, 1.0, n - 4), 1.0 + 1e-3, 1.5, 2.0], seed=2)
    bounds = [0, 100, n]
    kw = dict(k=3, ncv=14, which=2, tol=1e-11, check_multiplicity=True)
    states = [_gpu_state(n, n_local=hi - lo, offset=lo, yield_reduce=True, **kw) for lo, hi in zip(bounds, bounds[1:])]
    for _ in range(1000000):
        reqs = {int(s.advance()) for s in states}
        assert len(reqs) == 1
        req = reqs.pop()
        if req == MATVEC:
            y = a @ np.concatenate([s.matvec_input().numpy() for s in states])
            for s, lo, hi in zip(states, bounds, bounds[1:]):
                s.set_matvec_output(_on_device(y[lo:hi]))
        elif req == REDUCE:
            bufs = [s.reduce_buffer() for s in states]
            total = np.sum(bufs, axis=0)
            for b in bufs:
                b[:] = total
        elif req == DONE:
            break
    ref = pycurv.lanczos(a, 3, which="BE", tol=1e-11, ncv=14, seed=1)
    np.testing.assert_allclose(states[0].values(), ref.eigenvalues, rtol=0, atol=1e-12)
    assert np.array_equal(states[0].values(), states[1].values())


@pytest.mark.parametrize("out_dtype,floor", [("float32", 2.0**-24), ("float16", 2.0**-11), ("bfloat16", 2.0**-8)])
def test_low_precision_products_are_cast_on_load(out_dtype, floor):
    """The matvec returns float32/float16/bfloat16; the basis stays float64; the answer is as good as the product."""
    lam = np.r_[np.linspace(0.0, 1.0, 199), 2.0]
    a = dense(lam, seed=8)
    op = HostMatrixOnGpu(a, out_dtype=out_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pycurv.ConvergenceWarning)  # a 16-bit product may stop at its noise floor
        res = pycurv.lanczos(op, 1, tol=max(1e-6, 30 * floor), seed=0)
    assert res.status in ("converged", "noise_floor"), res.message
    assert abs(res.eigenvalues[0] - 2.0) <= 50 * floor * 2.0


class _Strided:
    """A device vector exposing every second element of a buffer through __cuda_array_interface__."""

    def __init__(self, y, shape_n1=False):
        buf = np.zeros(2 * y.size)
        buf[::2] = y
        self.base = _cuda.DeviceArray.from_numpy(buf)
        cai = dict(self.base.__cuda_array_interface__)
        cai["shape"] = (y.size, 1) if shape_n1 else (y.size,)
        cai["strides"] = (16, 8) if shape_n1 else (16,)
        self.__cuda_array_interface__ = cai


@pytest.mark.parametrize("shape_n1", [False, True])
def test_strided_outputs_through_the_array_interface(shape_n1):
    a = dense(np.r_[np.linspace(-1.0, 1.0, 79), 3.0], seed=9)

    class Op(pycurv.Operator):
        shape = a.shape
        dtype = np.dtype(np.float64)
        exact = True
        device = "cuda:0"

        def matvec(self, x):
            return _Strided(a @ x.numpy(), shape_n1)

    res = pycurv.lanczos(Op(), 2, tol=1e-12, seed=0)
    check(a, res, 2, tol=1e-12)


def test_start_vector_on_the_device_warm_starts():
    a = dense(np.r_[np.linspace(-1.0, 1.0, 399), 1.01], seed=8)
    cold = pycurv.lanczos(HostMatrixOnGpu(a), 1, tol=1e-10, seed=0)
    v0 = _cuda.DeviceArray.from_numpy(cold.eigenvectors[:, 0])
    warm = pycurv.lanczos(HostMatrixOnGpu(a + 1e-6 * np.eye(400)), 1, tol=1e-10, v0=v0)
    assert warm.n_matvecs < cold.n_matvecs / 2
    assert warm.eigenvalues[0] == pytest.approx(1.01 + 1e-6, abs=1e-12)
    host_v0 = pycurv.lanczos(HostMatrixOnGpu(a + 1e-6 * np.eye(400)), 1, tol=1e-10, v0=cold.eigenvectors[:, 0])
    assert host_v0.n_matvecs == warm.n_matvecs


@pytest.mark.parametrize("s", [1e-300, 1e-200, 3e-160, 1e160, 1e300])
def test_tiny_and_huge_operators_as_on_the_cpu(s):
    """The products are measured and scaled by the device kernels as by the CPU's: the same run."""
    a = s * dense(np.r_[-3.0, np.linspace(-1.0, 1.0, 57), 1.5, 2.0], seed=4)
    gpu = pycurv.lanczos(HostMatrixOnGpu(a), 2, tol=1e-10, seed=0)
    cpu = pycurv.lanczos(a, 2, tol=1e-10, seed=0)
    assert gpu.converged and gpu.n_matvecs == cpu.n_matvecs
    np.testing.assert_allclose(gpu.eigenvalues, cpu.eigenvalues, rtol=1e-12)
    np.testing.assert_allclose(gpu.eigenvalues, [2.0 * s, 1.5 * s], rtol=1e-12, atol=0)


@pytest.mark.parametrize("fill", [1e300, 1e-320])
def test_start_vector_on_the_device_at_any_scale(fill):
    a = np.diag(np.arange(50.0))
    res = pycurv.lanczos(HostMatrixOnGpu(a), 1, tol=1e-10, v0=_on_device(np.full(50, fill)))
    assert res.converged and res.eigenvalues[0] == pytest.approx(49.0, rel=1e-12, abs=0)


def test_impossible_tolerance_is_a_noise_floor_on_the_device():
    a = dense(np.r_[np.linspace(-1.0, 1.0, 99), 2.0], seed=1)
    with pytest.warns(pycurv.ConvergenceWarning, match="rounding floor"):
        res = pycurv.lanczos(HostMatrixOnGpu(a), 1, tol=1e-300, seed=0)
    assert res.status == "noise_floor" and res.residuals_explicit
    y = res.eigenvectors.numpy()[:, 0] if hasattr(res.eigenvectors, "numpy") else np.asarray(res.eigenvectors)[:, 0]
    assert np.linalg.norm(a @ y - res.eigenvalues[0] * y) <= 1.01 * res.residual_norms[0]


def test_callable_on_the_device_and_callback_stop():
    a = dense(np.linspace(0.0, 1.0, 100), seed=0)
    f = pycurv.FunctionOperator(lambda x: _on_device(a @ x.numpy()), 100, device="cuda:0")
    seen = []
    with pytest.warns(pycurv.ConvergenceWarning, match="stopped by the callback"):
        res = pycurv.lanczos(f, 1, tol=1e-14, seed=0, callback=lambda p: seen.append(p.n_matvecs) or len(seen) >= 5)
    assert res.status == "stopped" and not res.converged and len(seen) == 5
    assert res.time_total >= res.time_matvec >= 0.0 and res.time_core >= 0.0


def test_non_finite_product_is_reported_with_its_call_number():
    a = dense(np.linspace(0.0, 1.0, 30), seed=0)
    calls = [0]

    def f(x):
        calls[0] += 1
        y = a @ x.numpy()
        if calls[0] == 3:
            y[4] = np.nan
        return _on_device(y)

    with pytest.raises(pycurv.NonFiniteMatvecError, match="matvec call 3 returned 1 non-finite"):
        pycurv.lanczos(pycurv.FunctionOperator(f, 30, device="cuda:0"), 1, seed=0)


def test_wrong_output_shape_and_dtype_are_named():
    f = pycurv.FunctionOperator(lambda x: _cuda.DeviceArray.from_numpy(np.ones(7)), 8, device="cuda:0")
    with pytest.raises(ValueError, match=r"matvec call 1 returned shape \(7,\); expected \(8,\)"):
        pycurv.lanczos(f, 1, seed=0)


def test_host_outputs_are_copied_up():
    a = dense(np.r_[np.linspace(0.0, 1.0, 59), 2.0], seed=1)
    f = pycurv.FunctionOperator(lambda x: a @ x.numpy(), 60, device="cuda:0")
    res = pycurv.lanczos(f, 1, tol=1e-12, seed=0)
    assert res.converged and abs(res.eigenvalues[0] - 2.0) <= 1e-12


def test_basis_larger_than_the_device_is_a_memory_error_naming_the_bytes():
    n = 10**9  # 8 GB per vector: 41 of them do not fit on any single GPU (nor in the emulation's 4 GiB)
    f = pycurv.FunctionOperator(lambda x: x, n, device="cuda:0")
    with pytest.raises(MemoryError, match=r"n=1000000000.*smaller ncv, or host_basis=True.*outside PyTorch's caching "
                                          r"allocator and JAX's preallocation: torch\.cuda\.empty_cache\(\) .*"
                                          r"XLA_PYTHON_CLIENT_PREALLOCATE=false"):
        pycurv.lanczos(f, 1, ncv=40, seed=0)


def test_the_stream_owner_lives_as_long_as_the_state_and_its_vectors():
    """A framework's stream object (a cupy.cuda.Stream) must outlive the basis freed on it and the vectors naming it."""
    import gc
    import weakref

    class Stream:
        pass

    owner = Stream()
    alive = weakref.ref(owner)
    n = 200
    lam = np.r_[np.linspace(0.0, 1.0, n - 1), 2.0]
    st = _cuda.LanczosState(
        n_local=n, n_global=n, offset=0, k=1, ncv=10, which=0, tol=1e-10, max_matvecs=500, seed=0, start_given=False,
        check_multiplicity=False, explicit_residuals=False, want_vectors=True, yield_reduce=False,
        unit_roundoff=2.0**-53, device=0, stream_owner=owner)
    del owner
    while int(st.advance()) != DONE:
        st.set_matvec_output(_on_device(lam * st.matvec_input().numpy()))
    vectors = st.eigenvectors()
    del st
    gc.collect()
    assert alive() is not None  # held by the eigenvectors
    assert abs(vectors.numpy()[0] @ (lam * vectors.numpy()[0]) - 2.0) < 1e-9
    del vectors
    gc.collect()
    assert alive() is None


class _NoStreamExporter:
    """A DLPack exporter from before the stream argument: __dlpack__() takes none."""

    def __init__(self, arr):
        self.arr = arr

    def __dlpack__(self):
        return self.arr.__dlpack__(stream=None)

    def __dlpack_device__(self):
        return self.arr.__dlpack_device__()


def test_exporter_without_the_stream_argument_is_read_after_a_device_wide_wait():
    a = dense(np.r_[np.linspace(-1.0, 1.0, 99), 2.0], seed=2)
    f = pycurv.FunctionOperator(lambda x: _NoStreamExporter(_on_device(a @ x.numpy())), 100, device="cuda:0",
                                dtype="float64")
    assert pycurv.sharpness(f, tol=1e-12, seed=0) == pytest.approx(2.0, abs=1e-12)


@pytest.mark.skipif(not EMULATED, reason="makes the emulated device disappear")
def test_cleanup_never_throws_when_the_device_is_gone(tmp_path):
    """Destructors and the DLPack deleter free quietly when the device cannot be made current (an exception out of
    a destructor or a C callback is std::terminate: the process would abort)."""
    import subprocess
    import sys

    code = (
        "import os, numpy as np\n"
        "from pycurv import _cuda\n"
        "arr = _cuda.DeviceArray.from_numpy(np.ones(8), device=1)\n"
        "cap = _cuda.DeviceArray.from_numpy(np.ones(8), device=1).__dlpack__()\n"
        "st = _cuda.LanczosState(n_local=8, n_global=8, offset=0, k=1, ncv=4, which=0, tol=1e-8, max_matvecs=50,\n"
        "    seed=0, start_given=False, check_multiplicity=False, explicit_residuals=False, want_vectors=True,\n"
        "    yield_reduce=False, unit_roundoff=2.0**-53, device=1)\n"
        "os.environ['PYCURV_EMULATE_DEVICES'] = '1'  # cuda:1 is gone\n"
        "del arr, cap, st\n"
        "print('freed')\n")
    env = dict(os.environ, PYCURV_EMULATE_DEVICES="2")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "freed", (proc.returncode, proc.stderr)


@pytest.mark.skipif(not EMULATED, reason="sets the emulated device's properties")
def test_emulated_small_shared_memory_exercises_narrow_tiles(monkeypatch):
    """With 4 KiB of shared memory per block the tiles hold 1 to 16 rows: the kernels' general path."""
    monkeypatch.setenv("PYCURV_EMULATE_SMEM", "4096")
    monkeypatch.setenv("PYCURV_EMULATE_SMS", "3")
    a = dense(np.r_[np.linspace(-1.0, 1.0, 297), 1.5, 1.6, 4.0], seed=3)
    res = pycurv.lanczos(HostMatrixOnGpu(a), 3, tol=1e-11, seed=1, ncv=60)
    check(a, res, 3, tol=1e-11)
    with pytest.raises(ValueError, match="too large for the CUDA backend"):
        pycurv.lanczos(HostMatrixOnGpu(dense(np.linspace(0, 1, 600), seed=0)), 1, ncv=520, seed=0)


@pytest.mark.skipif(not EMULATED, reason="sets the emulated device's properties")
def test_emulated_one_multiprocessor_blocks_loop_over_tiles(monkeypatch):
    """One multiprocessor: a few blocks, each looping over many tiles of 256 and (once the basis holds more than
    32 vectors) 128 rows, as on a GPU."""
    monkeypatch.setenv("PYCURV_EMULATE_SMS", "1")
    n = 6000
    lam = np.r_[np.linspace(-1.0, 1.0, n - 2), 1.2, 1.5]
    u = np.random.default_rng(0).standard_normal(n)
    u /= np.linalg.norm(u)

    def mv(x):  # diag(lam) in a rotated basis, O(n)
        y = x - 2.0 * (u @ x) * u
        y = lam * y
        return y - 2.0 * (u @ y) * u

    gpu = pycurv.lanczos(pycurv.FunctionOperator(lambda x: _on_device(mv(x.numpy())), n, device="cuda:0"), 2,
                         tol=1e-10, seed=3, ncv=48)
    cpu = pycurv.lanczos(mv, 2, n=n, tol=1e-10, seed=3, ncv=48)
    np.testing.assert_allclose(gpu.eigenvalues, [1.5, 1.2], rtol=0, atol=1e-12)
    np.testing.assert_allclose(gpu.eigenvalues, cpu.eigenvalues, rtol=1e-12, atol=0)
    assert gpu.converged and gpu.residuals_explicit
    signs = np.sign(np.sum(gpu.eigenvectors * cpu.eigenvectors, axis=0))
    np.testing.assert_allclose(gpu.eigenvectors * signs, cpu.eigenvectors, rtol=0, atol=1e-8)
    assert gpu.n_matvecs > 40  # the basis grew past 32 vectors: 128-row tiles


@pytest.mark.skipif(not EMULATED, reason="hides the emulated device")
def test_emulated_no_device_solves_with_a_host_basis(monkeypatch):
    """The module sees no device: a torch operator on cuda:0 gets the basis in host memory and the CPU's answers."""
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("PYCURV_EMULATE_DEVICES", "0")
    monkeypatch.setattr(pycurv._gpu, "_warned_host_basis", False)
    f = pycurv.FunctionOperator(lambda x: x, 10, device="cuda:0")
    with pytest.raises(pycurv.CudaUnavailableError, match="framework=None, so its matvec expects pycurv's DeviceArray"):
        pycurv.lanczos(f, 1)
    # torch has no GPU here either: its copies "to cuda:0" stay on the CPU, the operator still says cuda:0
    monkeypatch.setattr(pycurv._gpu._Torch, "to_device", lambda self, x, device: torch.tensor(x, dtype=torch.float64))
    a = dense(np.r_[np.linspace(-1.0, 1.0, 197), 1.5, 2.0, 3.0], seed=5)
    At = torch.tensor(a)
    op = pycurv.FunctionOperator(lambda x: At @ x, 200, device="cuda:0", framework="torch", dtype="float64")
    with pytest.warns(pycurv.HostBasisWarning,
                      match=r"no CUDA device is visible \(no CUDA-capable device is detected \(emulated\)\), so it "
                            r"cannot keep the basis on cuda:0; .* \(3200 bytes per product at n=200, about 0\.1 us"):
        gpu = pycurv.lanczos(op, 2, tol=1e-10, seed=4)
    cpu = pycurv.lanczos(lambda x: (At @ torch.from_numpy(np.array(x))).numpy(), 2, n=200, tol=1e-10, seed=4)
    assert np.array_equal(gpu.eigenvalues, cpu.eigenvalues) and gpu.n_matvecs == cpu.n_matvecs
    assert np.array_equal(gpu.eigenvectors.numpy(), cpu.eigenvectors)


@pytest.mark.skipif(not EMULATED, reason="counts the emulated device's synchronisations")
@pytest.mark.parametrize("host_basis", [False, True])
def test_one_host_wait_per_lanczos_step(host_basis):
    """Passes 1-3 of a step are queued back to back and their sums come down together: the host waits once."""
    n = 2000
    lam = np.r_[np.linspace(-1.0, 1.0, n - 2), 1.2, 1.5]
    st = _gpu_state(n, k=2, ncv=12, host_basis=host_basis)
    per_step, steps, restarts = [], 0, 0
    for _ in range(100000):
        req = int(st.advance())
        if req == MATVEC:
            y = _on_device(lam * st.matvec_input().numpy())
            before = _cuda.host_syncs()
            st.set_matvec_output(y)
        elif req == STEP:
            steps += 1
            per_step.append(_cuda.host_syncs() - before)
        elif req == DONE:
            break
    assert st.status == 1 and st.n_restarts >= 2 and steps > 30
    # the first product's scale is measured once (one more wait); every other step waits exactly once
    assert per_step[0] == 2 and set(per_step[1:]) == {1}, per_step


# ---- frameworks on a real GPU ---------------------------------------------------------------


def _torch_cuda():
    _needs_real_gpu()
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    return torch


def _cupy():
    _needs_real_gpu()
    return pytest.importorskip("cupy")


def _jax_gpu():
    _needs_real_gpu()
    jax = pytest.importorskip("jax")
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if not gpus:
        pytest.skip("JAX sees no GPU")
    return jax, gpus[0]


def test_device_array_is_zero_copy_in_torch():
    torch = _torch_cuda()
    host = np.arange(5.0)
    arr = _cuda.DeviceArray.from_numpy(host)
    t = torch.from_dlpack(arr)
    assert t.is_cuda and t.data_ptr() == arr.ptr and np.array_equal(t.cpu().numpy(), host)
    b = torch.from_dlpack(_cuda.DeviceArray.from_numpy(host, dtype="bfloat16"))
    assert b.dtype == torch.bfloat16 and np.array_equal(b.float().cpu().numpy(), host)


def test_device_array_is_zero_copy_in_cupy():
    cp = _cupy()
    host = np.arange(5.0)
    arr = _cuda.DeviceArray.from_numpy(host)
    c = cp.asarray(arr)  # __cuda_array_interface__
    d = cp.from_dlpack(arr)
    assert c.data.ptr == arr.ptr == d.data.ptr and np.array_equal(cp.asnumpy(d), host)


def test_device_array_in_jax():
    jax, _ = _jax_gpu()
    import jax.dlpack

    host = np.arange(5.0, dtype=np.float32)
    j = jax.dlpack.from_dlpack(_cuda.DeviceArray.from_numpy(host))
    assert np.array_equal(np.asarray(j), host)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_cuda_matrix(dtype):
    torch = _torch_cuda()
    a = dense(np.r_[-5.0, np.linspace(-1.0, 2.0, 299)], seed=3)
    A = torch.tensor(a, device="cuda", dtype=getattr(torch, dtype))
    res = pycurv.lanczos(A, 2, tol=1e-10 if dtype == "float64" else 1e-5, seed=0)
    assert isinstance(res.eigenvectors, torch.Tensor) and res.eigenvectors.is_cuda
    assert res.eigenvectors.shape == (300, 2)
    tol = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(res.eigenvalues, np.linalg.eigvalsh(a)[::-1][:2], atol=tol * 5)
    cpu = pycurv.lanczos(a, 2, tol=1e-10, seed=0)
    if dtype == "float64":
        np.testing.assert_allclose(res.eigenvalues, cpu.eigenvalues, rtol=1e-12, atol=0)


def test_torch_on_a_side_stream_and_low_precision_products():
    torch = _torch_cuda()
    a = dense(np.r_[np.linspace(0.0, 1.0, 499), 2.0], seed=2)
    A64 = torch.tensor(a, device="cuda")
    ref = float(np.linalg.eigvalsh(a)[-1])
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        f = pycurv.FunctionOperator(lambda x: A64 @ x, 500, device="cuda:0", framework="torch", dtype="float64")
        res = pycurv.lanczos(f, 1, tol=1e-12, seed=0)
    assert abs(res.eigenvalues[0] - ref) <= 1e-12
    for dt, floor in ((torch.float32, 2.0**-24), (torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)):
        Ad = A64.to(dt)
        g = pycurv.FunctionOperator(lambda x, Ad=Ad, dt=dt: Ad @ x.to(dt), 500, device="cuda:0", framework="torch")
        r = pycurv.lanczos(g, 1, tol=max(1e-6, 30 * floor), seed=0)
        assert abs(r.eigenvalues[0] - ref) <= 100 * floor * 2.0, (dt, r.eigenvalues, r.message)
    strided = pycurv.FunctionOperator(lambda x: torch.stack([A64 @ x, x], dim=1)[:, 0], 500, device="cuda:0",
                                      framework="torch", dtype="float64")
    assert abs(pycurv.lanczos(strided, 1, tol=1e-12, seed=0).eigenvalues[0] - ref) <= 1e-12


def test_cupy_matrix_and_callable():
    cp = _cupy()
    a = dense(np.r_[-5.0, np.linspace(-1.0, 2.0, 199)], seed=5)
    A = cp.asarray(a)
    res = pycurv.lanczos(A, 3, which="BE", tol=1e-11, seed=0)
    assert isinstance(res.eigenvectors, cp.ndarray)
    cpu = pycurv.lanczos(a, 3, which="BE", tol=1e-11, seed=0)
    np.testing.assert_allclose(res.eigenvalues, cpu.eigenvalues, rtol=1e-12, atol=1e-12)
    f = pycurv.FunctionOperator(lambda x: A @ x, 200, device="cuda:0", framework="cupy")
    assert pycurv.sharpness(f, tol=1e-10, seed=0) == pytest.approx(2.0, abs=1e-10)


def test_jax_gpu_matrix():
    jax, dev = _jax_gpu()
    import jax.numpy as jnp

    a = dense(np.r_[np.linspace(0.0, 1.0, 149), 2.0], seed=6)
    A = jax.device_put(jnp.asarray(a), dev)  # float32 unless jax_enable_x64
    res = pycurv.lanczos(A, 1, tol=1e-5, seed=0)
    assert abs(res.eigenvalues[0] - 2.0) <= 1e-5
    assert isinstance(res.eigenvectors, jax.Array)


def test_torch_model_sharpness_same_on_gpu_and_cpu(monkeypatch):
    """A float32 HVP of a small conv net: lambda_1 on the GPU equals lambda_1 on the CPU to 1e-6."""
    torch = _torch_cuda()
    pt = pytest.importorskip("pycurv.torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.AvgPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10))
    x = torch.randn(64, 3, 8, 8)
    y = torch.randint(0, 10, (64,))
    loss = torch.nn.functional.cross_entropy
    H_cpu = pt.hessian(model, loss, (x, y))
    H_gpu = pt.hessian(model.cuda(), loss, (x.cuda(), y.cuda()))
    assert H_gpu.device.startswith("cuda") and H_cpu.dtype == H_gpu.dtype == "float32"

    def no_host_copies(*args, **kwargs):
        raise AssertionError("the GPU run copied a product to the host")

    monkeypatch.setattr(H_gpu, "_to_numpy", no_host_copies)
    # tol 3e-5: above the float32 product's own error, and the eigenvalue's error (~ tol^2 ||H||^2 / gap) far below 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pycurv.ConvergenceWarning)
        cpu = pycurv.lanczos(H_cpu, 1, tol=3e-5, seed=0, return_eigenvectors=False)
        gpu = pycurv.lanczos(H_gpu, 1, tol=3e-5, seed=0, return_eigenvectors=False)
    assert cpu.status in ("converged", "noise_floor") and gpu.status in ("converged", "noise_floor")
    lam_cpu, lam_gpu = float(cpu.eigenvalues[0]), float(gpu.eigenvalues[0])
    assert abs(lam_gpu - lam_cpu) <= 1e-6 * abs(lam_cpu), (lam_gpu, lam_cpu)
