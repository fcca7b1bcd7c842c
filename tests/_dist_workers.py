"""Worker functions for the multi-process tests (importable by spawned children)."""

from __future__ import annotations

import datetime
import os
import time
import traceback

import numpy as np

# The process group's timeout. Nothing is timed against it: a rank stopped by a
# peer's failure raises PeerError at its next collective, while one left waiting
# would raise gloo's timeout error instead, so the error itself says which. It
# only bounds how long a broken build hangs, and is long enough for spawned ranks
# that import torch on a loaded machine to meet at the rendezvous.
TIMEOUT_S = 300


def matrix(n, seed=0):
    from _reference import dense

    return dense(np.r_[-3.0, np.linspace(-1.0, 1.0, n - 4), 1.0 + 1e-3, 1.5, 2.0], seed=seed)


SCENARIOS = {2: ("sharded", "replicated", "raise", "nan"), 4: ("sharded", "replicated", "raise", "nan")}


def run(rank, size, port, outdir):
    """Runs every scenario for this world size in one process group (errors leave it consistent)."""
    import torch.distributed as dist

    from pycurv.distributed import end_process_group

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        for scenario in SCENARIOS[size]:
            out = scenario_run(rank, size, scenario)
            np.save(os.path.join(outdir, f"{scenario}-rank{rank}.npy"), np.array([out], dtype=object),
                    allow_pickle=True)
    finally:
        end_process_group()


def scenario_run(rank, size, scenario):
    import pycurv
    from pycurv.distributed import DataParallelOperator, RowShardedOperator, TorchCommunicator, shard_bounds

    out = {"rank": rank}
    try:
        comm = TorchCommunicator()
        n = 240
        a = matrix(n)
        lo, hi = shard_bounds(n, size, rank)
        t0 = time.perf_counter()
        if scenario == "sharded":
            op = RowShardedOperator(a[lo:hi], n, comm)
            res = pycurv.lanczos(op, 3, tol=1e-11, seed=5, ncv=14)
            out.update(values=res.eigenvalues, vectors=res.eigenvectors, lo=lo, hi=hi, matvecs=res.n_matvecs)
        elif scenario == "replicated":
            # each rank holds a different part of a sum that averages to A
            noise = np.random.default_rng(100).standard_normal((n, n))
            part = a + (noise + noise.T) * (rank - (size - 1) / 2.0)  # parts sum to size * A
            op = DataParallelOperator(lambda x: part @ x, n, comm, weight=1.0)
            res = pycurv.lanczos(op, 3, tol=1e-11, seed=7 + rank, ncv=14)  # rank 0's seed wins
            out.update(values=res.eigenvalues, vectors=res.eigenvectors, matvecs=res.n_matvecs)
        elif scenario == "raise":
            calls = {"n": 0}

            def local(x):
                calls["n"] += 1
                if rank == size - 1 and calls["n"] == 4:
                    raise KeyError("HVP failed on the last rank")
                return a @ x

            op = DataParallelOperator(local, n, comm)
            try:
                pycurv.lanczos(op, 1, tol=1e-11, seed=1)
                out["error"] = None
            except BaseException as exc:  # noqa: BLE001
                out["error"] = f"{type(exc).__name__}: {exc}"
            out["products"] = calls["n"]
        elif scenario == "nan":
            op = RowShardedOperator(a[lo:hi], n, comm)
            inner = op.matvec
            calls = {"n": 0}

            def nan_matvec(x):
                calls["n"] += 1
                y = inner(x)
                if rank == 1 and calls["n"] == 3:
                    y[0] = np.nan
                return y

            op.matvec = nan_matvec
            try:
                pycurv.lanczos(op, 1, tol=1e-11, seed=1)
                out["error"] = None
            except BaseException as exc:  # noqa: BLE001
                out["error"] = f"{type(exc).__name__}: {exc}"
            out["products"] = calls["n"]
        out["seconds"] = time.perf_counter() - t0
    except BaseException:  # noqa: BLE001 - reported to the parent
        out["crash"] = traceback.format_exc()
    return out
