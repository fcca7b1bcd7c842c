"""Worker of bench/test_bench_distributed.py (importable by spawned children)."""

from __future__ import annotations

import datetime
import os
import time

import numpy as np

SAMPLES = 8192
NCV = 20


def setup():
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, 64, generator=g)
    y = torch.randint(0, 10, (SAMPLES,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256),
                                torch.nn.Tanh(), torch.nn.Linear(256, 10))
    return model, x, y


def run(rank, size, port, layout, outdir):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import pycurv
    import pycurv.torch as pt
    from pycurv.distributed import end_process_group

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=300))
    try:
        model, x, y = setup()
        lo, hi = rank * SAMPLES // size, (rank + 1) * SAMPLES // size
        H = pt.hessian(model, F.cross_entropy, (x[lo:hi], y[lo:hi]), distributed=True,
                       shard_basis=layout == "sharded", check_determinism=False)
        t0 = time.perf_counter()
        res = pycurv.lanczos(H, 1, tol=1e-4, seed=0, ncv=NCV, return_eigenvectors=False)
        wall = time.perf_counter() - t0
        rows = getattr(H, "n_local", None) or H.shape[0]
        out = dict(rank=rank, value=float(res.eigenvalues[0]), hvps=int(H.n_hvps), wall=wall,
                   time_matvec=res.time_matvec, time_core=res.time_core, n=H.shape[0], rows=rows,
                   basis_bytes=8 * rows * (NCV + 1), converged=bool(res.converged))
        np.save(os.path.join(outdir, f"rank{rank}.npy"), np.array([out], dtype=object), allow_pickle=True)
    finally:
        end_process_group()
