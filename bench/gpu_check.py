"""A short GPU benchmark for bench/gpu_check.sh, ending in a summary to paste into bench/RESULTS.md.

1. The core's time per Lanczos step (matvec excluded: events on the stream)
   against the HBM roofline: the bytes the basis kernels must move
   (``bytes_moved``) over the device's read bandwidth measured by a streaming
   kernel. n = 1e8 with ncv = 32, and ncv = 96 (n = 2.5e7), where a 64 KB tile
   holds 64 rows or fewer and the update loop keeps that many of its 256
   threads busy: does it still reach the bandwidth?
2. A torch model's lambda_1 with the model on the GPU and on the CPU.
3. On that model's torch HVP: pycurv, cupyx's ``eigsh`` (Lanczos on the GPU),
   ``torch.lobpcg`` (through a tensor whose only operation is the product) and
   scipy's ``eigsh`` with a host copy of every vector each way.

``--emulated``: small sizes, for pycurv built with PYCURV_CUDA=EMULATE on a
machine without a GPU; its times measure the CPU emulation, not a GPU, and
rows that need a GPU library (torch on CUDA, CuPy) say why they are skipped.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings

import numpy as np

import pycurv
from pycurv._drive import drive

try:
    from pycurv import _cuda
except ImportError:  # a build without the CUDA module: section 1 cannot run
    _cuda = None

TOL = 1e-4  # what a float32 HVP reaches with room to spare
FULL = {"roofline": [(10**8, 32), (25 * 10**6, 96)], "width": 64, "batch": 256, "max_matvecs": 2000}
SMALL = {"roofline": [(4096, 32), (2048, 96)], "width": 8, "batch": 64, "max_matvecs": 2000}


def _try_import(name):
    try:
        return __import__(name, fromlist=["_"])
    except Exception as exc:  # noqa: BLE001 - any failure to import is a reason to skip
        return f"{name} is not importable ({type(exc).__name__}: {exc})"


def _torch_cuda(torch):
    if isinstance(torch, str):
        return torch
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    return None


# ---- 1. the core against the roofline -----------------------------------------------------------


def core_vs_roofline(n, ncv, torch):
    """One cycle and a restart (2 ncv steps) on a diagonal operator that does not converge in that budget."""
    why = "pycurv._cuda is missing" if _cuda is None else (None if _cuda.devices() else _cuda.device_error())
    if why:
        return {"n": n, "ncv": ncv, "skipped": why}
    emulated = bool(_cuda.build_info()["emulated"])
    if _torch_cuda(torch) is None:
        d = torch.linspace(0.0, 1.0, n, device="cuda", dtype=torch.float64)
        out = torch.empty_like(d)
        stream = int(torch.cuda.current_stream().cuda_stream)

        def mv(x):
            return torch.mul(d, torch.from_dlpack(x), out=out)

        def sync():
            torch.cuda.synchronize()
    else:  # the module's own arrays, the product on the host: only where nothing else exists (the emulation)
        d_host = np.linspace(0.0, 1.0, n)
        stream = 0

        def mv(x):
            return _cuda.DeviceArray.from_numpy(d_host * x.numpy())

        def sync():
            pass

    matvec_waits = [0]

    def counted(x):  # the emulation counts the host waits of the product's own copies too: not the core's
        before = _cuda.host_syncs() if emulated else 0
        y = mv(x)
        if emulated:
            matvec_waits[0] += _cuda.host_syncs() - before
        return y

    def run():
        matvec_waits[0] = 0
        st = _cuda.LanczosState(
            n_local=n, n_global=n, offset=0, k=1, ncv=ncv, which=0, tol=1e-15, max_matvecs=2 * ncv, seed=1,
            start_given=False, check_multiplicity=False, explicit_residuals=False, want_vectors=False,
            yield_reduce=False, unit_roundoff=2.0**-53, device=0, stream=stream)
        syncs0 = _cuda.host_syncs() if emulated else None
        timing = drive(st, counted, n, check_output=lambda y, m, c: y)
        sync()
        waits = (_cuda.host_syncs() - syncs0 - matvec_waits[0]) if emulated else None
        return st, timing, waits

    run()  # warm-up: allocation pools, kernel attributes, occupancy queries
    st, timing, waits = run()
    steps = int(st.n_matvecs)
    core = timing["total"] - float(st.matvec_seconds)
    bw = _cuda.read_bandwidth(n=min(n, 1 << 28), repeats=5, device=0)
    roof = float(st.bytes_moved) / bw if bw > 0 else None
    return {
        "n": n, "ncv": ncv, "steps": steps, "restarts": int(st.n_restarts),
        "core_ms_per_step": 1e3 * core / steps,
        "roofline_ms_per_step": None if roof is None else 1e3 * roof / steps,
        "ratio": None if roof is None else core / roof,
        "bandwidth_gbs": bw / 1e9 if bw > 0 else None, "effective_gbs": float(st.bytes_moved) / core / 1e9,
        "host_waits_per_step": None if waits is None else waits / steps,
    }


# ---- 2. and 3. a torch model ----------------------------------------------------------------------


def _model(torch, width):
    nn = torch.nn
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.Tanh(), nn.Conv2d(width, width, 3, padding=1), nn.Tanh(),
        nn.AvgPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(4),
        nn.Flatten(), nn.Linear(2 * width * 16, 10))


def _hessian(torch, pt, device, size):
    model = _model(torch, size["width"]).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(size["batch"], 3, 16, 16, generator=g).to(device)
    y = torch.randint(0, 10, (size["batch"],), generator=g).to(device)
    return pt.hessian(model, torch.nn.functional.cross_entropy, (x, y))


def _sync(torch, device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _timed(f, torch, device):
    _sync(torch, device)
    t0 = time.perf_counter()
    out = f()
    _sync(torch, device)
    return out, time.perf_counter() - t0


def model_gpu_vs_cpu(torch, pt, size):
    rows = []
    gpu_why = _torch_cuda(torch)
    for device in ("cuda", "cpu"):
        if device == "cuda" and gpu_why:
            rows.append({"device": "GPU", "skipped": gpu_why})
            continue
        H = _hessian(torch, pt, device, size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pycurv.ConvergenceWarning)
            r, secs = _timed(lambda: pycurv.lanczos(H, 1, tol=TOL, seed=0, return_eigenvectors=False,
                                                    max_matvecs=size["max_matvecs"]), torch, device)
        rows.append({"device": "GPU" if device == "cuda" else "CPU", "n": H.shape[0], "lambda1": float(r.eigenvalues[0]),
                     "status": r.status, "hvps": int(r.n_matvecs), "seconds": secs,
                     "pycurv_share": r.time_core / r.time_total if r.time_total > 0 else None})
    return rows


def _hvp_matrix_class(torch):
    import inspect

    import torch._lobpcg as tl

    names = list(inspect.signature(tl._lobpcg).parameters)

    class HvpMatrix(torch.Tensor):
        """A symmetric n x n tensor with no storage whose only operation is the product: torch.lobpcg's ``A``.

        Caught at the Python level (``__torch_function__``), so the HVP runs with
        autograd on; ``torch.lobpcg`` itself is sent to its implementation, which
        reads A's shape, dtype and device and multiplies by it.
        """

        @staticmethod
        def __new__(cls, hvp, n, dtype, device):
            return torch.Tensor._make_wrapper_subclass(cls, (n, n), dtype=dtype, device=device)

        def __init__(self, hvp, n, dtype, device):
            self.hvp = hvp

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            raise NotImplementedError(f"HvpMatrix has products only, not {func}")

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.lobpcg:
                given = dict(zip(names, args), **kwargs)
                return tl._lobpcg(*[given.get(name) for name in names])
            if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm) and \
                    isinstance(args[0], cls):
                a, x = args
                return torch.stack([a.hvp(x[:, j]) for j in range(x.shape[1])], dim=1)
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)

    return HvpMatrix


def solvers_on_one_hvp(torch, pt, size):
    """pycurv and three other tools on the same torch HVP (the model on the GPU, else on the CPU)."""
    device = "cuda" if _torch_cuda(torch) is None else "cpu"
    H = _hessian(torch, pt, device, size)
    n = H.shape[0]
    dt = getattr(torch, H.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pycurv.ConvergenceWarning)
        ref = pycurv.lanczos(H, 1, tol=TOL / 100, seed=1, return_eigenvectors=False,
                             max_matvecs=size["max_matvecs"])
    lam = float(ref.eigenvalues[0])
    rows = []

    def record(name, f, note=""):
        start = H.n_hvps
        try:
            value, secs = _timed(f, torch, device)
        except Exception as exc:  # noqa: BLE001 - a tool that fails is a finding, reported in its row
            rows.append({"solver": name, "skipped": f"failed: {type(exc).__name__}: {exc}"[:160]})
            return
        rows.append({"solver": name, "lambda1": value, "hvps": H.n_hvps - start, "seconds": secs,
                     "relative_error": abs(value - lam) / abs(lam), "note": note})

    def run_pycurv():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pycurv.ConvergenceWarning)
            return float(pycurv.lanczos(H, 1, tol=TOL, seed=0, return_eigenvectors=False,
                                        max_matvecs=size["max_matvecs"]).eigenvalues[0])

    record("pycurv", run_pycurv, "basis on the GPU" if device == "cuda" else "model on the CPU: basis on the CPU")

    cp = _try_import("cupy")
    csla = _try_import("cupyx.scipy.sparse.linalg") if not isinstance(cp, str) else cp
    if isinstance(csla, str) or device != "cuda":
        rows.append({"solver": "cupyx eigsh", "skipped": csla if isinstance(csla, str) else
                     "needs the model on a GPU (" + _torch_cuda(torch) + ")"})
    else:
        def run_cupyx():
            def mv(x):
                return cp.from_dlpack(H.hvp(torch.from_dlpack(x.ravel()).to(dt)).to(torch.float64))

            lin = csla.LinearOperator((n, n), matvec=mv, dtype=cp.float64)
            return float(csla.eigsh(lin, k=1, which="LA", tol=TOL, maxiter=size["max_matvecs"],
                                    return_eigenvectors=False)[0])

        record("cupyx eigsh", run_cupyx, "Lanczos on the GPU")

    HvpMatrix = _hvp_matrix_class(torch)

    def run_lobpcg():
        a = HvpMatrix(lambda v: H.hvp(v.to(dt)).to(torch.float64), n, torch.float64, torch.device(device))
        x0 = torch.randn(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
        w, _ = torch.lobpcg(a, k=1, X=x0, largest=True, tol=TOL, niter=size["max_matvecs"] // 3)
        return float(w[0])

    record("torch.lobpcg", run_lobpcg, "on the model's device")

    sla = _try_import("scipy.sparse.linalg")
    if isinstance(sla, str):
        rows.append({"solver": "scipy eigsh", "skipped": sla})
    else:
        def run_scipy():
            lin = sla.LinearOperator((n, n), matvec=H.matvec, dtype=np.float64)  # NumPy in and out: host copies
            return float(sla.eigsh(lin, k=1, which="LA", tol=TOL, maxiter=size["max_matvecs"],
                                   return_eigenvectors=False)[0])

        record("scipy eigsh", run_scipy, "ARPACK on the host, a copy each way per product")
    return {"device": device, "n": n, "lambda1_reference": lam, "rows": rows}


# ---- the summary ----------------------------------------------------------------------------------


def _f(x, fmt="{:.3g}"):
    return "—" if x is None else fmt.format(x)


def summary(machine, roof, models, solvers) -> str:
    out = ["### GPU check (`bench/gpu_check.sh`)", ""]
    out += [f"- {k}: {v}" for k, v in machine.items()]
    out += ["", "Core time per Lanczos step against the HBM roofline (matvec excluded; one cycle and a restart):", "",
            "| n | ncv | steps | core ms/step | roofline ms/step | core/roofline | effective GB/s | read GB/s | "
            "core's host waits/step |", "|---|---|---|---|---|---|---|---|---|"]
    for r in roof:
        if "skipped" in r:
            out.append(f"| {r['n']:.3g} | {r['ncv']} | skipped: {r['skipped']} ||||||| ")
            continue
        out.append(f"| {r['n']:.3g} | {r['ncv']} | {r['steps']} | {_f(r['core_ms_per_step'])} | "
                   f"{_f(r['roofline_ms_per_step'])} | {_f(r['ratio'], '{:.2f}')} | {_f(r['effective_gbs'])} | "
                   f"{_f(r['bandwidth_gbs'])} | {_f(r['host_waits_per_step'], '{:.2f}')} |")
    out += ["", f"A torch model's λ1 (float32 HVPs, tol {TOL:g}), the model on the GPU and on the CPU:", "",
            "| device | n | λ1 | status | HVPs | seconds | pycurv's share |", "|---|---|---|---|---|---|---|"]
    for r in models:
        if "skipped" in r:
            out.append(f"| {r['device']} | skipped: {r['skipped']} ||||||")
            continue
        out.append(f"| {r['device']} | {r['n']} | {r['lambda1']:.6g} | {r['status']} | {r['hvps']} | "
                   f"{r['seconds']:.3g} | {_f(r['pycurv_share'], '{:.1%}')} |")
    out += ["", f"Solvers on the same torch HVP (model on {solvers['device']}, n = {solvers['n']}, tol {TOL:g}; "
            f"reference λ1 = {solvers['lambda1_reference']:.6g} from pycurv at tol {TOL / 100:g}):", "",
            "| solver | λ1 | relative error | HVPs | seconds | note |", "|---|---|---|---|---|---|"]
    for r in solvers["rows"]:
        if "skipped" in r:
            out.append(f"| {r['solver']} | skipped: {r['skipped']} |||||")
            continue
        out.append(f"| {r['solver']} | {r['lambda1']:.6g} | {r['relative_error']:.1e} | {r['hvps']} | "
                   f"{r['seconds']:.3g} | {r['note']} |")
    return "\n".join(out) + "\n"


def _guarded(f, row: dict):
    """f(), or the row saying how it failed: one failing part must not cost the others on a one-off GPU run."""
    try:
        return f()
    except Exception as exc:  # noqa: BLE001 - reported in the summary, with the traceback on stderr
        import traceback

        traceback.print_exc()
        return dict(row, skipped=f"failed: {type(exc).__name__}: {exc}"[:200])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--emulated", action="store_true", help="small sizes, for the CPU emulation of the CUDA module")
    p.add_argument("--out", help="also write the summary (Markdown) here")
    args = p.parse_args(argv)
    size = SMALL if args.emulated else FULL
    torch = _try_import("torch")
    pt = _try_import("pycurv.torch") if not isinstance(torch, str) else torch
    if not isinstance(torch, str):
        torch.set_num_threads(max(1, torch.get_num_threads()))
    dev = _cuda.devices()[0] if _cuda is not None and _cuda.devices() else None
    build = dict(_cuda.build_info()) if _cuda is not None else {}
    machine = {
        "GPU": (f"{dev['name']}, {dev['total_memory'] / 2**30:.0f} GiB, compute capability "
                f"{dev['compute_capability']}, {dev['multiprocessors']} SMs") if dev else "none visible",
        "pycurv._cuda": ("CPU emulation (times measure the CPU, not a GPU)" if build.get("emulated") else
                         f"CUDA runtime {build.get('cuda_runtime')}, driver {build.get('cuda_driver')}, "
                         f"architectures {build.get('architectures')}") if build else "not built",
        "software": (f"pycurv {pycurv.__version__}, Python {platform.python_version()}, "
                     f"torch {getattr(torch, '__version__', '-')}"),
    }
    t0 = time.perf_counter()
    roof = []
    for n, ncv in size["roofline"]:
        roof.append(_guarded(lambda: core_vs_roofline(n, ncv, torch), {"n": n, "ncv": ncv}))
        print(f"[gpu_check] roofline n={n} ncv={ncv}: {roof[-1]}", file=sys.stderr, flush=True)
    if isinstance(torch, str):
        models = [{"device": "GPU", "skipped": torch}, {"device": "CPU", "skipped": torch}]
        solvers = {"device": "-", "n": 0, "lambda1_reference": float("nan"), "rows": [{"solver": "all",
                                                                                        "skipped": torch}]}
    else:
        models = _guarded(lambda: model_gpu_vs_cpu(torch, pt, size), {"device": "GPU and CPU"})
        models = models if isinstance(models, list) else [models]
        print(f"[gpu_check] model: {models}", file=sys.stderr, flush=True)
        solvers = _guarded(lambda: solvers_on_one_hvp(torch, pt, size), {"solver": "all"})
        if "rows" not in solvers:
            solvers = {"device": "-", "n": 0, "lambda1_reference": float("nan"), "rows": [solvers]}
        print(f"[gpu_check] solvers: {solvers}", file=sys.stderr, flush=True)
    machine["benchmark time"] = f"{time.perf_counter() - t0:.0f} s"
    text = summary(machine, roof, models, solvers)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
