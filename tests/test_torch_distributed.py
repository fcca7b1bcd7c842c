"""pycurv.torch operators under data parallelism: each rank's HVP on its shard, all-reduced."""

from __future__ import annotations

import socket

import numpy as np
import pytest

import torch  # noqa: F401 - a test dependency: its absence must fail, not skip
import torch.multiprocessing as mp
import torch.nn.functional as F  # noqa: E402

import pycurv  # noqa: E402
import pycurv.torch as pt  # noqa: E402
from _torch_dist_workers import data, model, run  # noqa: E402

pytestmark = pytest.mark.dist


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_with_unequal_shards_give_the_full_data_sharpness(tmp_path):
    mp.start_processes(run, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    outs = [np.load(tmp_path / f"rank{r}.npy", allow_pickle=True)[0] for r in range(2)]
    for o in outs:
        assert "crash" not in o, o["crash"]
    x, y = data()
    full = pycurv.sharpness(pt.hessian(model(), F.cross_entropy, (x, y)), tol=1e-12, seed=3)
    assert outs[0]["value"] == outs[1]["value"]  # every rank takes the same steps
    assert np.array_equal(outs[0]["vector"], outs[1]["vector"])
    assert outs[0]["value"] == pytest.approx(full, rel=1e-11)
