"""Worker for tests/test_torch_distributed.py (importable by spawned children)."""

from __future__ import annotations

import datetime
import os
import time
import traceback

import numpy as np

N_SAMPLES = 46
# The process group's timeout; nothing is timed against it (see _dist_workers.TIMEOUT_S).
TIMEOUT_S = 300


def shards(size):
    """Unequal shards on purpose: the ranks' HVPs are weighted by their sample counts."""
    cuts = np.linspace(0, N_SAMPLES, size + 1).astype(int)
    cuts[1] += 3
    return list(zip(cuts[:-1], cuts[1:]))


def data():
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N_SAMPLES,), generator=g)
    return x, y


def model():
    import torch

    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


SCENARIOS = ("replicated", "ddp", "sharded", "raise", "nan", "settle", "random")


def run(rank, size, port, outdir):
    import torch
    import torch.distributed as dist

    from pycurv.distributed import end_process_group

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        for scenario in SCENARIOS:
            out = scenario_run(rank, size, scenario)
            np.save(os.path.join(outdir, f"{scenario}-rank{rank}.npy"), np.array([out], dtype=object),
                    allow_pickle=True)
    finally:
        end_process_group()


def scenario_run(rank, size, scenario):
    import torch
    import torch.nn.functional as F

    import pycurv
    import pycurv.torch as pt

    out = {"rank": rank}
    t0 = time.perf_counter()
    try:
        x, y = data()
        lo, hi = shards(size)[rank]
        shard = (x[lo:hi], y[lo:hi])
        if scenario == "replicated":
            H = pt.hessian(model(), F.cross_entropy, shard, distributed=True)
            res = pycurv.lanczos(H, 2, tol=1e-12, seed=3 + rank)  # rank 0's seed is used everywhere
            out.update(values=res.eigenvalues, vector=res.eigenvectors, samples=H.n_samples)
        elif scenario == "ddp":
            ddp = torch.nn.parallel.DistributedDataParallel(model())
            H = pt.hessian(ddp, F.cross_entropy, shard)  # data parallel over DDP's group by default
            res = pycurv.lanczos(H, 2, tol=1e-12, seed=3)
            out.update(values=res.eigenvalues, vector=res.eigenvectors, n=H.shape[0])
        elif scenario == "sharded":
            H = pt.hessian(model(), F.cross_entropy, shard, distributed=True, shard_basis=True)
            res = pycurv.lanczos(H, 2, tol=1e-12, seed=3)
            out.update(values=res.eigenvalues, vector=res.eigenvectors, n_local=H.n_local, offset=H.offset)
        elif scenario == "raise":
            calls = {"n": 0}

            def loss_fn(outputs, targets):
                calls["n"] += 1
                if rank == size - 1 and calls["n"] == 5:
                    raise RuntimeError("out of memory in the loss on the last rank")
                return F.cross_entropy(outputs, targets)

            # cache=False: the loss runs in every product, so the failure comes mid-solve
            H = pt.hessian(model(), loss_fn, shard, distributed=True, cache=False)
            try:
                pycurv.lanczos(H, 1, tol=1e-12, seed=3)
                out["error"] = None
            except BaseException as exc:  # noqa: BLE001
                out["error"] = f"{type(exc).__name__}: {exc}"
            out["losses"] = calls["n"]
        elif scenario == "settle":
            # After a collective returns, gloo's worker thread must hold none of its tensors:
            # if it released the last reference while the interpreter exits, the process aborts.
            from pycurv.distributed import TorchCommunicator

            comm = TorchCommunicator()
            held = []
            for i in range(300):
                t = torch.full((64,), float(rank))
                comm.allreduce_tensor(t)
                parts = [torch.empty(8) for _ in range(size)]
                mine = torch.full((8,), float(i))
                comm.allgather_tensor(parts, mine)
                held.append(max(x._use_count() for x in [t, mine, *parts]))
            out.update(max_use_count=max(held), total=float(t[0]))
            out.update(messages=comm.gather_messages("" if rank else "ünïcode ✓ message"))
        elif scenario == "random":
            def noisy_loss(outputs, targets):  # the last rank's loss draws random numbers
                noise = 1e-3 * torch.rand(()) if rank == size - 1 else 0.0
                return F.cross_entropy(outputs, targets) + noise

            H = pt.hessian(model(), noisy_loss, shard, distributed=True)
            try:
                pycurv.lanczos(H, 1, tol=1e-12, seed=3)
                out["error"] = None
            except BaseException as exc:  # noqa: BLE001
                out["error"] = f"{type(exc).__name__}: {exc}"
        elif scenario == "nan":
            xs = shard[0].clone()
            if rank == 1:
                xs[0, 0] = float("nan")
            H = pt.hessian(model(), F.cross_entropy, (xs, shard[1]), distributed=True, check_determinism=False)
            try:
                pycurv.lanczos(H, 1, tol=1e-12, seed=3)
                out["error"] = None
            except BaseException as exc:  # noqa: BLE001
                out["error"] = f"{type(exc).__name__}: {exc}"
    except BaseException:  # noqa: BLE001 - reported to the parent
        out["crash"] = traceback.format_exc()
    out["seconds"] = time.perf_counter() - t0
    return out
