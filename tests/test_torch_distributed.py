"""pycurv.torch across real processes (spawn, gloo on 127.0.0.1, 2 and 4 ranks): data-parallel
products, a DDP-wrapped model, a sharded Lanczos basis, and failures on one rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch  # noqa: F401 - a test dependency: its absence must fail, not skip
import torch.multiprocessing as mp
import torch.nn.functional as F

import pycurv
import pycurv.torch as pt
from _torch_dist_workers import data, model, run
from conftest import free_port

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module", params=[2, 4], ids=["2-ranks", "4-ranks"])
def world(request, tmp_path_factory):
    size = request.param
    outdir = tmp_path_factory.mktemp(f"torchdist{size}")
    mp.start_processes(run, args=(size, free_port(), str(outdir)), nprocs=size, join=True, start_method="spawn")

    def results(scenario):
        outs = [np.load(outdir / f"{scenario}-rank{r}.npy", allow_pickle=True)[0] for r in range(size)]
        for o in outs:
            assert "crash" not in o, o["crash"]
        return outs

    return size, results


@pytest.fixture(scope="module")
def union():
    """The same solve in one process on all the data."""
    H = pt.hessian(model(), F.cross_entropy, data())
    return pycurv.lanczos(H, 2, tol=1e-12, seed=3)


def _same_direction(a, b):
    return a * np.sign(np.sum(a * b, axis=0))


def test_data_parallel_equals_single_process_on_the_union(world, union):
    size, results = world
    outs = results("replicated")
    for o in outs:
        np.testing.assert_array_equal(o["values"], outs[0]["values"])  # every rank takes identical steps
        np.testing.assert_array_equal(o["vector"], outs[0]["vector"])
        assert o["samples"] == 46  # the sample count is summed over ranks
    np.testing.assert_allclose(outs[0]["values"], union.eigenvalues, rtol=1e-10, atol=0)


def test_ddp_wrapped_model(world, union):
    size, results = world
    outs = results("ddp")
    assert outs[0]["n"] == union.eigenvectors.shape[0]  # the DDP wrapper is looked through
    np.testing.assert_allclose(outs[0]["values"], union.eigenvalues, rtol=1e-10, atol=0)


def test_sharded_basis_equals_replicated(world):
    size, results = world
    rep = results("replicated")[0]
    outs = results("sharded")
    n = rep["vector"].shape[0]
    for o in outs:
        np.testing.assert_allclose(o["values"], rep["values"], rtol=1e-10, atol=0)
        assert o["vector"].shape[0] == o["n_local"] <= -(-n // size)  # only this rank's rows are held
    vec = np.concatenate([o["vector"] for o in sorted(outs, key=lambda o: o["offset"])], axis=0)
    np.testing.assert_allclose(_same_direction(vec, rep["vector"]), rep["vector"], atol=1e-8)


def test_a_rank_that_raises_stops_every_rank(world):
    size, results = world
    outs = results("raise")
    assert outs[-1]["error"] == "RuntimeError: out of memory in the loss on the last rank"
    for o in outs[:-1]:
        # a PeerError, not gloo's timeout: stopped at the next collective (nothing is timed: load stretches time)
        assert o["error"].startswith(f"PeerError: rank {o['rank']} stopped because rank(s) {size - 1} failed")
    assert [o["losses"] for o in outs] == [5] * size  # every rank stopped at the loss that failed on the last


def test_nan_on_one_rank_stops_every_rank(world):
    _, results = world
    for o in results("nan"):
        assert o["error"].startswith("NonFiniteMatvecError: matvec call 1 returned non-finite values")


def test_collectives_leave_no_tensor_with_the_worker_threads(world):
    """A reference left with gloo's worker thread would abort the process at exit 1 time in ~10."""
    size, results = world
    for o in results("settle"):
        assert o["max_use_count"] == 1  # 300 all-reduces and all-gathers, each settled before returning
        assert o["total"] == sum(range(size))
        assert o["messages"] == ["ünïcode ✓ message"] + [""] * (size - 1)


def test_launcher_example_matches_one_process(tmp_path):
    """examples/distributed_sharpness.py spawns its own ranks; every rank prints the single-process lambda_1."""
    import re
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "distributed_sharpness.py"), "--ranks", "2",
                           "--shard-basis", "--samples", "400"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, report
    values = [float(v) for v in re.findall(r"lambda_1 = ([0-9.e+-]+)", proc.stdout)]
    assert len(values) == 2 and values[0] == values[1], report
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from _common import mlp, synthetic_classification
    finally:
        sys.path.pop(0)
    x, y = synthetic_classification(n=400)
    single = pycurv.sharpness(pt.hessian(mlp(), F.mse_loss, (x, y)), tol=1e-8, seed=0)
    assert values[0] == pytest.approx(single, rel=1e-9)


def test_a_random_loss_on_one_rank_stops_every_rank_alike(world):
    """The determinism probe's verdict is agreed over the ranks: every rank raises the same error."""
    size, results = world
    for o in results("random"):
        assert o["error"] is not None and o["error"].startswith("NonDeterministicOperatorError: two evaluations "
                                                                "of the loss at the same parameters differ by"), o
