"""Scale-out on CPU: 1, 2 and 4 ranks (spawned processes, gloo on 127.0.0.1), replicated or sharded basis.

The model is a 64-256-256-10 tanh MLP (85,002 parameters) on 8,192 samples split
evenly over the ranks; each rank runs one torch thread. Recorded: the seconds per
HVP (each rank's own pass over its shard plus the all-reduce), the core's time,
the Lanczos basis memory on each rank (8 rows (ncv + 1) bytes), and the lambda_1
every rank reports. On a machine with fewer cores than ranks the ranks share cores,
so per-HVP times do not fall as they would with one core per rank.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # benchmarks are run by hand, with the test extra installed
import torch.multiprocessing as mp  # noqa: E402

from _dist_worker import NCV, run  # noqa: E402


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("layout", ["replicated", "sharded"])
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_distributed_sharpness(benchmark, tmp_path, ranks, layout):
    def spawn():
        mp.start_processes(run, args=(ranks, _free_port(), layout, str(tmp_path)), nprocs=ranks, join=True,
                           start_method="spawn")
        return [np.load(tmp_path / f"rank{r}.npy", allow_pickle=True)[0] for r in range(ranks)]

    benchmark.group = "distributed sharpness, CPU"
    outs = benchmark.pedantic(spawn, rounds=1, iterations=1)
    values = {o["value"] for o in outs}
    assert len(values) == 1  # every rank reports the same lambda_1
    slowest = max(outs, key=lambda o: o["wall"])
    benchmark.extra_info.update(
        ranks=ranks, layout=layout, n=outs[0]["n"], ncv=NCV, hvps=outs[0]["hvps"], value=outs[0]["value"],
        seconds_per_hvp=slowest["time_matvec"] / slowest["hvps"], core_s=slowest["time_core"],
        lanczos_s=slowest["wall"], basis_mib_per_rank=max(o["basis_bytes"] for o in outs) / 2**20,
        converged=all(o["converged"] for o in outs),
    )
