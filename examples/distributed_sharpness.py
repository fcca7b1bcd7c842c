"""Sharpness of a model whose data is split across processes (torch.distributed).

Each rank holds its shard of the data; pycurv sums the ranks' Hessian-vector
products (weighted by their sample counts) and every rank gets the sharpness of
the mean loss over all the data. With --shard-basis each rank also keeps only
its rows of the Lanczos vectors.

Run with torchrun (one process per GPU or CPU slot):

    torchrun --nproc_per_node=4 examples/distributed_sharpness.py --shard-basis

or let the script start its own ranks on this machine (gloo on 127.0.0.1):

    python examples/distributed_sharpness.py --ranks 2
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.nn.functional as F

import pycurv
import pycurv.torch as pt
from pycurv.distributed import end_process_group
from _common import mlp, synthetic_classification


def main(args) -> None:
    rank, size = dist.get_rank(), dist.get_world_size()
    x, y = synthetic_classification(n=args.samples)
    lo, hi = rank * args.samples // size, (rank + 1) * args.samples // size  # this rank's shard
    model = mlp()
    if args.ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)  # used as is: the wrapper is looked through
    H = pt.hessian(model, F.mse_loss, (x[lo:hi], y[lo:hi]), distributed=True, shard_basis=args.shard_basis)
    res = pycurv.lanczos(H, 1, tol=1e-8, seed=0, ncv=args.ncv)
    rows = getattr(H, "n_local", None) or H.shape[0]
    basis_mib = 8 * rows * (args.ncv + 1) / 2**20
    line = (f"rank {rank}/{size}: {hi - lo} samples, lambda_1 = {res.eigenvalues[0]:.10g} "
            f"({res.n_matvecs} HVPs, {res.time_matvec:.2f} s in HVPs), basis {basis_mib:.2f} MiB on this rank")
    # One write per line: ranks share stdout, and print() may write the text and the newline separately.
    os.write(1, (line + "\n").encode())


def _spawned(rank: int, size: int, port: int, args) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        main(args)
    finally:
        end_process_group()  # not barrier + destroy: see its docstring


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2, help="processes to start when not run by torchrun (default 2)")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--ncv", type=int, default=20)
    p.add_argument("--shard-basis", action="store_true", help="each rank holds only its rows of the basis")
    p.add_argument("--ddp", action="store_true", help="wrap the model in DistributedDataParallel first")
    args = p.parse_args()
    if "RANK" in os.environ:  # started by torchrun
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
        try:
            main(args)
        finally:
            end_process_group()
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.start_processes(_spawned, args=(args.ranks, port, args), nprocs=args.ranks,
                                              start_method="spawn")
