"""Worker for tests/test_torch_distributed.py (importable by spawned children)."""

from __future__ import annotations

import datetime
import os

import numpy as np

SHARDS = [(0, 23), (23, 40)]  # unequal on purpose: the ranks' HVPs are weighted by their sample counts


def data():
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    return x, y


def model():
    import torch

    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def run(rank, size, port, outdir):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        import pycurv
        import pycurv.torch as pt
        from pycurv.distributed import DataParallelOperator, TorchCommunicator

        x, y = data()
        lo, hi = SHARDS[rank]
        H = pt.hessian(model(), F.cross_entropy, (x[lo:hi], y[lo:hi]))
        op = DataParallelOperator(H.matvec, H.shape[0], TorchCommunicator(), weight=H.count_samples(),
                                  dtype=H.dtype)
        res = pycurv.lanczos(op, 1, tol=1e-12, seed=3)
        out = {"value": float(res.eigenvalues[0]), "vector": res.eigenvectors[:, 0], "hvps": H.n_hvps}
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        out = {"crash": repr(exc)}
    finally:
        dist.destroy_process_group()
    np.save(os.path.join(outdir, f"rank{rank}.npy"), np.array([out], dtype=object), allow_pickle=True)
