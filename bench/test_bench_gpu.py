"""GPU benchmarks: the core's step time against the HBM roofline, and lambda_1 of real models.

Run on a machine with a CUDA GPU and pycurv built with CUDA:

    pip install . -Ccmake.define.PYCURV_CUDA=ON
    pytest bench/test_bench_gpu.py --benchmark-json=gpu.json && python bench/summarize.py gpu.json

Skipped without a GPU (and on the CPU emulation, which measures nothing).

1. Core time per Lanczos step (matvec excluded, measured with events on the
   stream) at n = 1e8 against the bandwidth roofline: the bytes the basis
   kernels must move (``bytes_moved``, the CPU's traffic model) over the
   device's read bandwidth measured with the same kernels (one pass over 2 GiB).
2. lambda_1 of a ResNet-18-sized conv net (CIFAR shapes) and a small
   transformer, random data, float32 HVPs from ``pycurv.torch.hessian``, with
   the same HVP driven by pycurv on the GPU, by scipy's ``eigsh`` (ARPACK, a
   host copy of every vector each way), by ``cupyx.scipy.sparse.linalg.eigsh``
   (Lanczos on the GPU), each asked for the largest algebraic eigenvalue.
   ``torch.lobpcg`` needs the matrix itself, not products: it runs only in the
   dense-matrix case. Recorded: HVPs, wall time, the value and whether it is
   the largest algebraic eigenvalue (against pycurv's both-ends solve).
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pytest

import pycurv
from pycurv.lanczos import drive

try:
    from pycurv import _cuda
except ImportError:  # pragma: no cover - depends on the build
    _cuda = None


def _status():
    if _cuda is None:
        return False, "pycurv was built without CUDA"
    if not _cuda.devices():
        return False, f"no CUDA device visible ({_cuda.device_error()})"
    if _cuda.build_info()["emulated"]:
        return False, "pycurv._cuda is the CPU emulation: nothing to measure"
    return True, ""


_READY, _REASON = _status()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _READY, reason=_REASON)]

ROOF_N = int(os.environ.get("PYCURV_BENCH_GPU_N", str(10**8)))
ROOF_NCV = [32, 64]
TOL = float(os.environ.get("PYCURV_BENCH_GPU_TOL", "1e-4"))  # a float32 HVP's reach with room to spare


def _torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    return torch


def _device_info():
    d = _cuda.devices()[0]
    return {"gpu": d["name"], "gpu_memory_gb": d["total_memory"] / 1e9, "compute_capability": d["compute_capability"],
            "cuda": dict(_cuda.build_info())}


# ---- 1. the core against the roofline ---------------------------------------------------------


@pytest.fixture(scope="session")
def hbm_bandwidth():
    return max(_cuda.read_bandwidth(n=1 << 28, repeats=10, device=0) for _ in range(3))


@pytest.mark.parametrize("ncv", ROOF_NCV)
def test_core_step_vs_hbm_roofline(benchmark, hbm_bandwidth, ncv):
    torch = _torch()
    n = ROOF_N
    d = torch.linspace(0.0, 1.0, n, device="cuda", dtype=torch.float64)  # does not converge in two cycles
    out = torch.empty_like(d)
    stream = torch.cuda.current_stream().cuda_stream

    def run():
        st = _cuda.LanczosState(
            n_local=n, n_global=n, offset=0, k=1, ncv=ncv, which=0, tol=1e-15, max_matvecs=2 * ncv, seed=1,
            start_given=False, check_multiplicity=False, explicit_residuals=False, want_vectors=False,
            yield_reduce=False, unit_roundoff=2.0**-53, device=0, stream=stream)
        timing = drive(st, lambda x: torch.mul(d, torch.from_dlpack(x), out=out), n, check_output=lambda y, m, c: y)
        torch.cuda.synchronize()
        return st, timing

    benchmark.group = "GPU core time per step vs HBM roofline"
    st, timing = benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=1)
    steps = int(st.n_matvecs)
    core = timing["total"] - float(st.matvec_seconds)
    roof = float(st.bytes_moved) / hbm_bandwidth
    benchmark.extra_info.update(
        device="gpu", n=n, ncv=ncv, steps=steps, restarts=int(st.n_restarts), core_s=core,
        core_ms_per_step=1e3 * core / steps, roofline_s=roof, roofline_ms_per_step=1e3 * roof / steps,
        ratio=core / roof, bandwidth_gbs=hbm_bandwidth / 1e9, gbytes_moved=float(st.bytes_moved) / 1e9,
        matvec_ms_per_step=1e3 * float(st.matvec_seconds) / steps, **_device_info(),
    )


# ---- 2. lambda_1 of real models -------------------------------------------------------------------


def _resnet18(torch, num_classes=10):
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            return torch.relu(self.b2(self.c2(y)) + self.skip(x))

    layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def _transformer(torch, vocab=1000, d=256, heads=4, depth=4, classes=10):
    nn = torch.nn

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(vocab, d)
            self.pos = nn.Parameter(0.02 * torch.randn(64, d))
            layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
            self.head = nn.Linear(d, classes)

        def forward(self, tokens):
            h = self.enc(self.emb(tokens) + self.pos[: tokens.shape[1]])
            return self.head(h.mean(dim=1))

    return Model()


def _model_case(torch, name):
    torch.manual_seed(0)
    if name == "resnet18":
        model = _resnet18(torch).cuda()
        x = torch.randn(128, 3, 32, 32, device="cuda")
        y = torch.randint(0, 10, (128,), device="cuda")
    else:
        model = _transformer(torch).cuda()
        x = torch.randint(0, 1000, (32, 64), device="cuda")
        y = torch.randint(0, 10, (32,), device="cuda")
    return model, torch.nn.functional.cross_entropy, (x, y)


_REFERENCE = {}


def _reference(H, name):
    """lambda_max and lambda_min of the case (pycurv on the GPU, both ends, tighter tolerance)."""
    if name not in _REFERENCE:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pycurv.ConvergenceWarning)
            r = pycurv.lanczos(H, 2, which="BE", tol=TOL / 10, seed=1, return_eigenvectors=False,
                               max_matvecs=3000)
        _REFERENCE[name] = (float(r.eigenvalues[0]), float(r.eigenvalues[-1]))
    return _REFERENCE[name]


def _solve_pycurv(torch, H):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pycurv.ConvergenceWarning)
        r = pycurv.lanczos(H, 1, tol=TOL, seed=0, return_eigenvectors=False, max_matvecs=3000)
    return float(r.eigenvalues[0]), r.converged


def _solve_scipy_host(torch, H):
    sla = pytest.importorskip("scipy.sparse.linalg")
    n = H.shape[0]
    lin = sla.LinearOperator((n, n), matvec=H.matvec, dtype=np.float64)  # NumPy in and out: host copies
    try:
        w = sla.eigsh(lin, k=1, which="LA", tol=TOL, return_eigenvectors=False, maxiter=3000)
        return float(w[0]), True
    except sla.ArpackNoConvergence as exc:
        return (float(exc.eigenvalues[0]) if len(exc.eigenvalues) else float("nan")), False


def _solve_cupyx(torch, H):
    cp = pytest.importorskip("cupy")
    csla = pytest.importorskip("cupyx.scipy.sparse.linalg")
    n = H.shape[0]
    dt = getattr(torch, H.dtype)

    def mv(x):
        y = H.hvp(torch.from_dlpack(x.ravel()).to(dt))
        return cp.from_dlpack(y.to(torch.float64))

    lin = csla.LinearOperator((n, n), matvec=mv, dtype=cp.float64)
    w = csla.eigsh(lin, k=1, which="LA", tol=TOL, return_eigenvectors=False, maxiter=3000)
    return float(w[0]), True


SOLVERS = {"pycurv": _solve_pycurv, "scipy_host": _solve_scipy_host, "cupyx": _solve_cupyx}


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("case", ["resnet18", "transformer"])
def test_model_lambda1(benchmark, case, solver):
    torch = _torch()
    pt = pytest.importorskip("pycurv.torch")
    model, loss, data = _model_case(torch, case)
    H = pt.hessian(model, loss, data)
    lam_max, lam_min = _reference(H, case)
    t0 = time.perf_counter()
    H.hvp(torch.randn(H.shape[0], device="cuda"))
    torch.cuda.synchronize()
    hvp_s = time.perf_counter() - t0
    start = H.n_hvps

    def run():
        value, converged = SOLVERS[solver](torch, H)
        torch.cuda.synchronize()
        return value, converged

    benchmark.group = f"lambda_1 {case} (n={H.shape[0]})"
    value, converged = benchmark.pedantic(run, rounds=2, iterations=1)
    hvps = (H.n_hvps - start) // 2
    err = abs(value - lam_max) / abs(lam_max) if np.isfinite(value) else float("inf")
    benchmark.extra_info.update(
        device="gpu", model=case, solver=solver, n=int(H.shape[0]), hvps_gpu=int(hvps), value=value,
        lambda_max=lam_max, lambda_min=lam_min, relative_error=err, converged=bool(converged),
        largest_algebraic=bool(err <= 10 * TOL), negative_dominates=bool(abs(lam_min) > abs(lam_max)),
        hvp_seconds=hvp_s, hvp_dtype=H.dtype, tol=TOL, **_device_info(),
    )


# ---- 3. a dense matrix on the device, where torch.lobpcg applies too ---------------------------------


def _dense_case(torch, n=8192):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, device="cuda", dtype=torch.float64, generator=g))
    lam = torch.cat([torch.tensor([-5.0], device="cuda", dtype=torch.float64),
                     torch.linspace(-1.0, 2.0, n - 1, device="cuda", dtype=torch.float64)])
    a = (q * lam) @ q.T
    return (a + a.T) / 2, 2.0


def _count(f):
    calls = [0]

    def g(x):
        calls[0] += 1
        return f(x)

    return g, calls


@pytest.mark.parametrize("solver", ["pycurv", "scipy_host", "cupyx", "torch_lobpcg"])
def test_dense_lambda1(benchmark, solver):
    torch = _torch()
    A, lam_max = _dense_case(torch)
    n = A.shape[0]
    tol = 1e-8

    def run():
        if solver == "pycurv":
            f, calls = _count(lambda x: A @ x)
            op = pycurv.FunctionOperator(f, n, device="cuda:0", framework="torch", dtype="float64")
            r = pycurv.lanczos(op, 1, tol=tol, seed=0, return_eigenvectors=False)
            return float(r.eigenvalues[0]), calls[0]
        if solver == "scipy_host":
            sla = pytest.importorskip("scipy.sparse.linalg")
            f, calls = _count(lambda x: (A @ torch.from_numpy(x).cuda()).cpu().numpy())
            w = sla.eigsh(sla.LinearOperator((n, n), matvec=f, dtype=np.float64), k=1, which="LA", tol=tol,
                          return_eigenvectors=False)
            return float(w[0]), calls[0]
        if solver == "cupyx":
            cp = pytest.importorskip("cupy")
            csla = pytest.importorskip("cupyx.scipy.sparse.linalg")
            f, calls = _count(lambda x: cp.from_dlpack(A @ torch.from_dlpack(x.ravel())))
            w = csla.eigsh(csla.LinearOperator((n, n), matvec=f, dtype=cp.float64), k=1, which="LA", tol=tol,
                           return_eigenvectors=False)
            return float(w[0]), calls[0]
        x0 = torch.randn(n, 1, device="cuda", dtype=torch.float64, generator=torch.Generator(device="cuda").manual_seed(0))
        w, _ = torch.lobpcg(A, k=1, X=x0, largest=True, tol=tol, niter=5000)
        return float(w[0]), -1  # lobpcg multiplies by A internally: products not counted

    benchmark.group = f"lambda_1 dense n={n} on the GPU"
    value, calls = benchmark.pedantic(lambda: (run(), torch.cuda.synchronize())[0], rounds=2, iterations=1)
    err = abs(value - lam_max) / lam_max
    benchmark.extra_info.update(
        device="gpu", model=f"dense{n}", solver=solver, n=n, hvps_gpu=calls, value=value, lambda_max=lam_max,
        lambda_min=-5.0, relative_error=err, converged=True, largest_algebraic=bool(err <= 1e-6),
        negative_dominates=True, tol=tol, **_device_info(),
    )
